"""Training jobs: the spec, the worker that runs them, and the service the UI calls."""
from .spec import JobSpec

__all__ = ["JobSpec"]
