"""A real headless Chromium (Debian's `chromium`, driven by Playwright) and a real `wgjit serve`
for the web page's tests: tests/web (no privileges) and tests/e2e/test_web.py (namespaces).

Playwright is only the driver: it launches /usr/bin/chromium by `executable_path` and never
downloads a browser (no `playwright install`, here or anywhere). Missing Chromium fails the
test, naming the package: a test that skips would let CI go green without the browser.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_HINT = (
    "the web page's tests need Debian's headless Chromium at /usr/bin/chromium: install it"
    " with `apt-get install --no-install-recommends chromium` (`./dev.sh setup` does)"
)
TOKEN = "web-test-token-0123456789abcdef"


def require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(CHROMIUM_HINT, pytrace=False)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's Browser)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # as root, Chromium refuses to start without --no-sandbox
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wgjit(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "wgjit", *args, "--store", store],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r


class Serve:
    """`wgjit serve` on 127.0.0.1 and a free port, in a process of its own."""

    def __init__(self, store: str, tmp: Path, *extra: str) -> None:
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wgjit", "--store", store, "serve",
                 "--listen", f"127.0.0.1:{self.port}", "--token-file", str(token_file), *extra],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"wgjit serve did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ui/login", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def serve(store: str, tmp: Path, *extra: str) -> Iterator[Serve]:
    s = Serve(store, tmp, *extra)
    try:
        yield s
    finally:
        s.stop()


def sign_in(page: Any, url: str, token: str = TOKEN) -> None:
    page.goto(f"{url}/")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#add")
