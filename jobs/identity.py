"""Who a worker is: ``host:pid:random``, and whether a worker of this machine has died."""
from __future__ import annotations

import os
import secrets
import socket


def hostname() -> str:
    """QALORA_HOSTNAME, else the host name. Set it where machines share a host name but not their
    processes (containers on host networking): a worker must never take a pid it cannot see for dead."""
    return os.environ.get("QALORA_HOSTNAME") or socket.gethostname()


def new_worker_id() -> str:
    """``host:pid:random``; host and pid let a worker on the same machine spot a dead one at once."""
    return f"{hostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def gone(worker_id: str | None) -> bool:
    """True if ``worker_id`` names a process on this machine that no longer exists."""
    host, _, rest = (worker_id or "").partition(":")
    pid = rest.partition(":")[0]
    if host != hostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
