"""Who may use the app, decided before it starts: logins from ``QALORA_AUTH`` (``user:password``,
several separated by commas) and ``QALORA_AUTH_FILE`` (one per line), required off loopback; and
whether Publish may fall back to the server's own Hub token (not when shared without a login)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


def _auth(raw: str | None):
    """``QALORA_AUTH``: ``user:password``, several separated by commas."""
    if not raw:
        return None
    users = []
    for entry in raw.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit("QALORA_AUTH must look like user:password (both non-empty; several separated by "
                             "commas); unset it to disable login.")
        users.append((user, password))
    return users


def _auth_file(path: str | None):
    """``QALORA_AUTH_FILE``: one ``user:password`` per line; blank lines and ``#`` comments skipped."""
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"QALORA_AUTH_FILE={path} cannot be read ({exc.strerror}); fix the path or unset it.")
    users = []
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            user, sep, password = line.strip().partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"QALORA_AUTH_FILE line {n} must look like user:password (both non-empty).")
            users.append((user, password))
    if not users:
        raise SystemExit(f"QALORA_AUTH_FILE={path} names no user; add user:password lines or unset it.")
    return users


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Access:
    auth: list | None               # Gradio's auth list, or None for no login
    server_token: bool              # may Publish fall back to HF_TOKEN / the login cache?
    warning: str | None = None      # printed at start


def access(host: str, no_auth: bool, env: dict) -> Access:
    """Who may use the app, decided before it starts: login is required off loopback."""
    users = (_auth(env.get("QALORA_AUTH")) or []) + (_auth_file(env.get("QALORA_AUTH_FILE")) or [])
    if users:
        return Access(users, server_token=True)
    if _is_loopback(host):
        return Access(None, server_token=True)
    if not no_auth:
        raise SystemExit(f"refusing to serve on {host} without a login: anyone who can reach it could run jobs on "
                         "this machine and use its files. Set QALORA_AUTH=user:password (or QALORA_AUTH_FILE), "
                         "or pass --no-auth if this network is yours alone.")
    return Access(None, server_token=False, warning=(
        f"WARNING: serving on {host} with no login (--no-auth). Anyone who can reach this address can start "
        "jobs, read their results and use the GPU. Publishing needs each visitor's own Hub token; the server's "
        "HF_TOKEN and login cache are not used."))


_ACCESS = Access(None, server_token=True)  # what the module-level demo uses; app.main replaces it


def current() -> Access:
    """The access the app was started with (loopback, no login, until ``use`` says otherwise)."""
    return _ACCESS


def use(chosen: Access) -> None:
    """Set the access the running app serves with (``app.main``, before it launches)."""
    global _ACCESS
    _ACCESS = chosen
