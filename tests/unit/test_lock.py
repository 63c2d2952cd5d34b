"""One gateway per interface: the lock file (an flock holding the PID)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wgjit.gateway.lock import AlreadyRunning, LockError, acquire, lock_path


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = acquire("wg0", tmp_path)
    path = lock_path("wg0", tmp_path)
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(AlreadyRunning) as e:
        acquire("wg0", tmp_path)  # a second open file description: flock refuses it
    msg = str(e.value)
    assert f"(PID {os.getpid()}) is already running on interface wg0" in msg
    assert str(path) in msg and "\n" not in msg
    with acquire("wg1", tmp_path):  # another interface is independent
        pass
    first.release()
    first.release()  # idempotent
    with acquire("wg0", tmp_path):  # released (as on exit, crashed or not): free again
        pass
    assert path.exists()  # never unlinked (that would race with a starting gateway)


def test_refuses_symlinks_and_bad_names(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    lock_path("wg0", tmp_path).symlink_to(target)
    with pytest.raises(LockError, match="cannot create the lock file"):
        acquire("wg0", tmp_path)
    assert target.read_text() == "keep me"
    with pytest.raises(LockError, match="invalid interface name"):
        acquire("../x", tmp_path)


def test_unwritable_lock_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LockError, match="needs root"):
        acquire("wg0", blocker / "sub")
