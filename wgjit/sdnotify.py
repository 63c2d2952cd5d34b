"""systemd's readiness protocol (sd_notify(3)) in a few lines, no dependency: one datagram
such as `READY=1` to the unix socket named by $NOTIFY_SOCKET (a path, or `@name` in the
abstract namespace). Without $NOTIFY_SOCKET (not started by systemd with Type=notify) it
does nothing. It never raises and never blocks: a service must not fail for want of systemd.
"""

from __future__ import annotations

import os
import socket

ENV = "NOTIFY_SOCKET"


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...": newline-separated
    assignments); True if it was sent."""
    address = (os.environ if env is None else env).get(ENV, "")
    if not address or address[0] not in "/@":
        return False  # unset, or a vsock address (not for us)
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto(state.encode(), target)
    except OSError:
        return False
    return True
