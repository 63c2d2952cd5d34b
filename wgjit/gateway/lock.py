"""One gateway per interface: an advisory lock file that holds the running gateway's PID.

`acquire(ifname)` takes an exclusive flock on `/run/wgjit/IFNAME@netns-INODE.lock` (one file
per interface per network namespace: names are a namespace's own) and writes the PID into it;
the kernel drops the lock when the process exits, crashed or not, so a stale file never blocks
a restart. It touches no device and no firewall rule: the gateway takes it before either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Final

from wgjit.errors import WgjitError

LOCK_DIR: Final = Path("/run/wgjit")


class AlreadyRunning(WgjitError):
    """Another gateway holds the interface; the message names its PID and the lock file."""


class LockError(WgjitError):
    """The lock file cannot be created; the message says why and what to do."""


def lock_path(ifname: str, lock_dir: Path = LOCK_DIR) -> Path:
    """The lock file for `ifname` in this process's network namespace."""
    if not ifname or "/" in ifname or ifname in (".", ".."):
        raise LockError(f"invalid interface name {ifname!r}")
    ns = _netns_suffix()
    return lock_dir / (f"{ifname}{ns}.lock")


def _netns_suffix() -> str:
    """`@netns-INODE` of this process's network namespace: an interface name is unique only
    within its namespace, and /run is shared by `ip netns exec`. Always the suffix, never a
    special case for the host's namespace: telling that apart needs /proc/1/ns/net, which only
    root can read, and a root and a non-root gateway on one interface must take one lock."""
    try:
        return f"@netns-{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return ""


class InterfaceLock:
    """Held while the object lives (or until release()); one per gateway process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock; the file stays (unlinking would race)

    def __enter__(self) -> InterfaceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(ifname: str, lock_dir: Path = LOCK_DIR) -> InterfaceLock:
    """Take the lock for `ifname` or raise AlreadyRunning (naming the holder's PID)."""
    path = lock_path(ifname, lock_dir)
    try:
        lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted at the path must not make us truncate its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise LockError(
            f"cannot create the lock file {path}: {e.strerror}; the gateway needs root (or"
            f" write access to {lock_dir})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_pid(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"PID {holder}" if holder else "another process"
            raise AlreadyRunning(
                f"another wgjit gateway ({who}) is already running on interface {ifname}"
                f" (lock {path}); stop it first, one gateway per interface"
            ) from None
        raise LockError(f"cannot lock {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the lock is what counts; the PID is only for the message
    return InterfaceLock(path, fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    return None
