import sys

from qalora.cli import main

sys.exit(main())
