"""The systemd units in contrib/ pass `systemd-analyze verify` (with ExecStart pointing at
this checkout's wgjit: verify insists that the program exists)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


@pytest.mark.parametrize(
    ("unit", "as_"), [("wgjit-gateway@.service", "wgjit-gateway@wg0.service"),
                      ("wgjit-serve.service", "wgjit-serve.service")],
)  # fmt: skip
def test_unit_verifies(unit: str, as_: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found; install it: apt-get install systemd "
                    "(./dev.sh setup does)", pytrace=False)
    wgjit = Path(sys.executable).with_name("wgjit")
    text = (UNITS / unit).read_text()
    assert "/usr/local/bin/wgjit " in text
    (tmp_path / as_).write_text(text.replace("/usr/local/bin/wgjit ", f"{wgjit} "))
    r = subprocess.run([analyze, "verify", str(tmp_path / as_)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_gateway_unit_essentials() -> None:
    text = (UNITS / "wgjit-gateway@.service").read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "EnvironmentFile=-/etc/wgjit/wgjit.env",
        "ExecStart=/usr/local/bin/wgjit gateway --config /etc/wgjit/%i.toml --interface %i",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6 AF_PACKET",
    ):
        assert line in text.splitlines(), line
