"""Generic helpers for end-to-end tests on real components: network namespaces and wireguard-go.

Everything created here has a name unique to this test process and is removed by pid/name in
fixture finalizers, also when a test fails.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install --no-install-recommends wireguard-go wireguard-tools"
UAPI_DIR = Path("/var/run/wireguard")
_seq = itertools.count()


def unique_name(prefix: str) -> str:
    """`prefix` + pid + a counter: unique across concurrent test runs on this machine."""
    return f"{prefix}{os.getpid()}x{next(_seq)}"


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TUN)", pytrace=False)
    missing = [t for t in ("wireguard-go", "wg", "ip") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found; install: {INSTALL_HINT}", pytrace=False)


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, check: bool = True) -> str:
        p = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True
        )
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {self.name} failed: {p.stderr.strip()}")
        return p.stdout


class WireguardGo:
    """`wireguard-go -f IFNAME` running in a namespace (the pid is wireguard-go itself)."""

    def __init__(self, ns: Netns, ifname: str, log: Path) -> None:
        self.ns = ns
        self.ifname = ifname
        self.log = log
        self.socket = UAPI_DIR / f"{ifname}.sock"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, "wireguard-go", "-f", ifname],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LOG_LEVEL": "verbose"},
            )

    def wait_ready(self) -> None:
        wait_until(f"{self.socket} to accept connections", self._ready)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"wireguard-go {self.ifname} exited:\n{self.log.read_text()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    """Factory of fresh network namespaces (`wjt-<pid>x<n>`), deleted afterwards."""
    require_root_and_tools()
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(unique_name("wjt-"))
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        made.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    yield make
    for ns in reversed(made):
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


@pytest.fixture
def wireguard_go(
    netns: Callable[[], Netns], tmp_path: Path
) -> Iterator[Callable[[Netns], WireguardGo]]:
    """Factory: start wireguard-go in a namespace on `ifname` or a unique `wjg<pid>x<n>`."""
    started: list[WireguardGo] = []

    def start(ns: Netns, ifname: str | None = None) -> WireguardGo:
        ifname = ifname or unique_name("wjg")
        assert len(ifname) <= 15, ifname
        wg = WireguardGo(ns, ifname, tmp_path / f"{ifname}-{len(started)}.log")
        started.append(wg)
        wg.wait_ready()
        return wg

    yield start
    for wg in reversed(started):
        wg.stop()
