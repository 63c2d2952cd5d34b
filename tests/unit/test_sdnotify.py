"""sd_notify: one datagram to $NOTIFY_SOCKET (a path or an abstract name), never an error."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from wgjit.sdnotify import notify


def test_ready_reaches_a_real_unix_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2)
        assert notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(4096) == b"READY=1\nSTATUS=serving"


def test_abstract_socket_name() -> None:
    name = f"wgjit-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"READY=1"


def test_without_systemd_or_with_a_dead_socket_it_does_nothing(tmp_path: Path) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:123"})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
