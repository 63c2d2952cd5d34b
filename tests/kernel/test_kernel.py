"""Kernel WireGuard, proven in a real Linux kernel: boots Debian's generic kernel once under
qemu (TCG, via virtme-ng, on this machine's root filesystem) and runs pytest inside it.

Inside the guest: the netlink backend's device tests (guest_netlink.py), kernel-only gateway
scenarios (guest_gateway.py), a small-N scale run (guest_scale.py), and tests/e2e/test_gateway.py
unchanged on kernel WireGuard (WGJIT_LAB_WG=kernel). Each test here reports one group of the
guest's results and fails with that group's failures and the guest's output. A missing
prerequisite fails with what to install; nothing is skipped. The guest writes only to the
directory it is given (and its own throwaway overlays).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_FILES = (
    "tests/kernel/guest_netlink.py",
    "tests/kernel/guest_gateway.py",
    "tests/kernel/guest_scale.py",
    "tests/e2e/test_gateway.py",
)
# Each gateway scenario costs about a minute under TCG (every Python process starts in seconds
# there): the guest runs the scenarios of test_gateway.py and the invert-mode first contact
# (role inversion through the gateway), not every completion mode's variants.
GUEST_SELECT = (
    "not mode_refusals and not auto_mode and not hold_rules and (not mode_first_contact or invert)"
)
APT_HINT = (
    "apt-get install --no-install-recommends qemu-system-x86 linux-image-amd64 kmod busybox-static"
)
BOOT_TIMEOUT = 1800  # seconds for boot + the whole guest run under TCG (~10x slower than KVM)
GUEST_TIMEOUT = 600  # per guest test (pytest-timeout inside the guest)
GUEST_MEMORY = "2G"
# qemu TCG runs Python ~10x slower, and cold starts (imports over 9p) take seconds: the lab's
# timeouts are stretched by this; latency assertions stay as they are
TIME_FACTOR = 4

pytestmark = pytest.mark.timeout(BOOT_TIMEOUT + 120)  # the module fixture boots the guest


@dataclass
class GuestRun:
    rc: int
    log: str
    console: str
    seconds: float
    cases: dict[str, list[ET.Element]] = field(default_factory=dict)  # module -> testcases


def find_kernel() -> Path:
    """The newest Debian generic amd64 kernel (the -cloud- flavour cannot mount 9p roots)."""
    images = [
        p
        for p in Path("/boot").glob("vmlinuz-*-amd64")
        if "-cloud-" not in p.name and (Path("/lib/modules") / p.name[len("vmlinuz-") :]).is_dir()
    ]
    if not images:
        pytest.fail(
            f"no generic Debian kernel in /boot; install it with: {APT_HINT}", pytrace=False
        )
    return max(images, key=lambda p: p.stat().st_mtime)


def prerequisites() -> tuple[str, Path, dict[str, str]]:
    if os.geteuid() != 0:
        pytest.fail("the kernel tests need root (qemu, namespaces in the guest)", pytrace=False)
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}"  # vng runs virtme-run
    vng = shutil.which("vng", path=env["PATH"])
    if vng is None:
        pytest.fail("vng not found; install it with: pip install virtme-ng (the test extras: "
                    "./dev.sh setup)", pytrace=False)  # fmt: skip
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                      ("modprobe", "kmod"), ("wg", "wireguard-tools")):  # fmt: skip
        if shutil.which(tool, path=env["PATH"] + ":/usr/sbin:/sbin") is None:
            pytest.fail(f"{tool} not found; install {pkg}: {APT_HINT}", pytrace=False)
    return vng, find_kernel(), env


@pytest.fixture(scope="module")
def guest() -> Iterator[GuestRun]:
    vng, kernel, env = prerequisites()
    # a directory of our own (pytest prunes old basetemps, also those of concurrent runs)
    out = Path(tempfile.mkdtemp(prefix="wgjit-kernel-"))
    try:
        yield run_guest(vng, kernel, env, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_guest(vng: str, kernel: Path, env: dict[str, str], out: Path) -> GuestRun:
    junit, log, rc_file = out / "junit.xml", out / "pytest.log", out / "rc"
    pytest_cmd = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-v",
        f"--timeout={GUEST_TIMEOUT}", f"--junitxml={junit}", "-k", GUEST_SELECT, *GUEST_FILES,
    ]  # fmt: skip
    script = out / "guest.sh"
    script.write_text(
        f"cd {shlex.quote(str(REPO))}\n"
        "export PYTHONDONTWRITEBYTECODE=1 WGJIT_LAB_WG=kernel\n"
        f"export WGJIT_LAB_TIME_FACTOR={TIME_FACTOR}\n"
        f"{shlex.join(pytest_cmd)} > {shlex.quote(str(log))} 2>&1\n"
        f"echo $? > {shlex.quote(str(rc_file))}\n"
    )
    cmd = [
        vng, "--run", str(kernel), "--disable-kvm", "--memory", GUEST_MEMORY, "--cpus", "2",
        f"--rwdir={out}", "--exec", f"sh {shlex.quote(str(script))}",
    ]  # fmt: skip
    # the guest sees the host's files read-only: compile them here, or every Python process in
    # the guest compiles its modules again (seconds each under TCG)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "wgjit", "tests", "benchmarks"],
                   cwd=REPO, check=False, capture_output=True)  # fmt: skip
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BOOT_TIMEOUT,
                           cwd=REPO)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        partial = log.read_text(errors="replace") if log.exists() else "(no guest output)"
        pytest.fail(f"the qemu guest did not finish within {BOOT_TIMEOUT} s ({e}); "
                    f"guest pytest output so far:\n{partial[-8000:]}", pytrace=False)  # fmt: skip
    seconds = time.monotonic() - t0
    console = p.stdout + p.stderr
    if not rc_file.exists():
        pytest.fail(
            f"the qemu guest did not run the tests (vng exit {p.returncode}):\n{console[-6000:]}",
            pytrace=False,
        )
    run = GuestRun(int(rc_file.read_text().strip() or "1"), log.read_text(errors="replace"),
                   console, seconds)  # fmt: skip
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            run.cases.setdefault(case.get("classname", ""), []).append(case)
    print(f"\nkernel guest: boot + tests took {seconds:.0f} s, pytest exit {run.rc}")
    return run


def check_group(run: GuestRun, module: str, minimum: int) -> None:
    cases = [c for cls, cs in run.cases.items() if cls == module or cls.startswith(module + ".")
             for c in cs]  # fmt: skip
    problems = []
    for c in cases:
        for tag in ("failure", "error", "skipped"):
            for el in c.findall(tag):
                text = (el.text or el.get("message") or "").strip()
                problems.append(f"--- {c.get('name')} {tag.upper()} ---\n{text[-4000:]}")
    if problems or len(cases) < minimum:
        pytest.fail(
            f"{module} in the kernel guest: {len(cases)} tests ran (expected >= {minimum}), "
            f"{len(problems)} problems\n"
            + "\n".join(problems)
            + "\n--- guest pytest output (tail) ---\n"
            + run.log[-6000:],
            pytrace=False,
        )


def test_guest_pytest_passed(guest: GuestRun) -> None:
    if guest.rc != 0:
        pytest.fail(f"pytest in the kernel guest exited {guest.rc}:\n{guest.log[-10000:]}",
                    pytrace=False)  # fmt: skip


def test_netlink_device_on_kernel_wireguard(guest: GuestRun) -> None:
    check_group(guest, "tests.kernel.guest_netlink", 20)


def test_gateway_e2e_on_kernel_wireguard(guest: GuestRun) -> None:
    check_group(guest, "tests.e2e.test_gateway", 10)


def test_gateway_survives_interface_vanishing(guest: GuestRun) -> None:
    # and hold mode's release window on kernel WireGuard's answers
    check_group(guest, "tests.kernel.guest_gateway", 2)


def test_kernel_scale_small(guest: GuestRun) -> None:
    check_group(guest, "tests.kernel.guest_scale", 1)
