"""A small-N run of benchmarks/kernel_scale.py; runs INSIDE the qemu guest (tests/kernel).

Installs and evicts 3 000 peers on a kernel WireGuard interface through the netlink backend
and checks the figures are sane. Not collected on the host (the name does not start with test_).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_scale.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernel_scale", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernel_scale"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_kernel_scale_small() -> None:
    bench = load_bench()
    r = bench.run(3000, 300)
    print("\n" + bench.table(r))
    # run() itself checks that all peers were installed, read back and removed
    # batching must pay off: one message per ~1 365 removals vs one per removal
    assert r.remove_batched_per_s > 3 * r.remove_one_by_one_per_s, r
    assert r.install_batched_per_s > r.install_one_by_one_per_s, r
    # a JIT install stays a few netlink round trips with thousands of peers present
    # (generous for qemu TCG, where one round trip is ~1-5 ms)
    assert r.jit_full_ms_median < 200, r
