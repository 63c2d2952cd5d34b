"""Files that hold secrets (exports with preshared keys, client configs with private keys).

`private_file(path, force=...)` writes through a temporary file in the target's directory,
created 0600, then moves it into place in one step: a reader never sees half a file, the mode
is 0600 whatever was there before, and no symbolic link is ever followed (a link at the path
is refused, and a rename replaces a name, never writes through it). Without `force` an
existing file is never replaced. Nothing here knows about peers.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from wgjit.errors import WgjitError


class FileRefused(WgjitError):
    """The target cannot or must not be written; the message says why and what to do."""


def check_target(path: str | os.PathLike[str], *, force: bool) -> Path:
    """Refuse a target that is a symbolic link, not a regular file, or exists without
    `force`; return it as a Path. (Checked again when the file is moved into place.)"""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except OSError as e:
        raise FileRefused(f"cannot write {p}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise FileRefused(
            f"{p} is a symbolic link; wgjit does not write secrets through links: give the"
            " real path"
        )
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{p} exists and is not a regular file; choose another path")
    if not force:
        raise FileRefused(f"{p} exists; pass --force to replace it")
    return p


@contextlib.contextmanager
def private_file(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[IO[str]]:
    """A text stream that becomes `path` (mode 0600) when the block ends without an
    exception; on an exception nothing at `path` changes and the temporary file is removed."""
    with _private(path, force, "w") as out:
        yield out


def write_private_bytes(path: str | os.PathLike[str], data: bytes, *, force: bool = False) -> None:
    """`data` into `path` the same way (0600, temporary file and rename, no links)."""
    with _private(path, force, "wb") as out:
        out.write(data)


@contextlib.contextmanager
def _private(path: str | os.PathLike[str], force: bool, mode: str) -> Iterator[IO[Any]]:
    target = check_target(path, force=force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise FileRefused(f"cannot write {target}: {e.strerror}; check the directory") from None
    try:
        os.fchmod(fd, 0o600)  # mkstemp makes 0600 already; say it where it matters
        encoding, newline = (None, None) if "b" in mode else ("utf-8", "")
        with open(fd, mode, encoding=encoding, newline=newline) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        _place(tmp, target, force)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _place(tmp: str, target: Path, force: bool) -> None:
    if force:
        check_target(target, force=True)  # a link may have appeared meanwhile
        os.replace(tmp, target)  # replaces the name; never follows a link at it
        return
    try:
        os.link(tmp, target)  # atomic: fails if anything appeared at the name meanwhile
    except FileExistsError:
        raise FileRefused(f"{target} exists; pass --force to replace it") from None
    except OSError:
        # no hard links here (some file systems): check, then rename
        check_target(target, force=False)
        os.replace(tmp, target)
        return
    os.unlink(tmp)
