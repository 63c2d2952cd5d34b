"""`python -m benchmarks.unbudgeted --store URL gateway ...`: the `wgjit` command, with the
gateway's global admission budget (GatewayConfig.global_rate / global_burst) lifted.

For benchmarks only (benchmarks/load.py `--budgets lifted`): the gateway has no option for that
budget, and a herd of 10 000 within 1 s spends it (5 000/s, burst 1 000): ~4 000 knocks are
dropped as rate_limited and wait for their client's 5 s retry, whatever the release pacing
does. Lifting it here shows the pacing's own figure; the default budget's row shows the product.

Before `--store`: `--no-release-signal` also turns off hold mode's release wait as a sign of
load (run.RELEASE_LOAD_DELAY), and `--keep-budget` keeps the budget, for the A/B in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from wgjit import cli
from wgjit.gateway.core import GatewayConfig

_config = cli._gateway_config


def _lifted(args: argparse.Namespace) -> GatewayConfig:
    return dataclasses.replace(_config(args), global_rate=1e9, global_burst=1e9)


cli._gateway_config = _lifted

if __name__ == "__main__":
    while sys.argv[1:2] in (["--no-release-signal"], ["--keep-budget"]):
        if sys.argv.pop(1) == "--keep-budget":
            cli._gateway_config = _config
        else:
            from wgjit.gateway import run

            run.RELEASE_LOAD_DELAY = float("inf")
    sys.exit(cli.main())
