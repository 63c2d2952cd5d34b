"""The README's first command runs `wgjit demo`: run it as `./dev.sh demo` does (the venv's
console script), with few connects, and check what it says happened."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

DEMO_TIMEOUT_S = 180  # ~20 s here; qemu-free, but a loaded CI machine may be slow


def test_demo_runs_and_every_step_happens() -> None:
    p = subprocess.run(
        [str(Path(sys.executable).parent / "wgjit"), "demo", "--connects", "3"],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip
    out = p.stdout
    assert p.returncode == 0, f"demo exited {p.returncode}:\n{out[-3000:]}\n{p.stderr[-3000:]}"
    # every stored client's first ping answered, installed from its own endpoint
    for name in ("alice", "bob", "dave"):
        assert re.search(rf"{name}\s+\(IPv[46]\) first reply after \d+(\.\d+)? ms", out), (
            f"{name} was not answered:\n{out}"
        )
    assert "mallory on the device: False" in out
    assert "bob knocks again: no reply" in out  # revoked
    assert re.search(r"dave first reply after \d+(\.\d+)? ms", out)  # back after idle eviction
    for row in ("pre-installed peer", "JIT, hold", "JIT, replay", "JIT, invert"):
        assert re.search(rf"{row}.*median\s+\d", out), f"no {row!r} row:\n{out}"
    assert out.rstrip().endswith("removing the lab's namespaces and processes.")
