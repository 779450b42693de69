"""`python -m tests.chaos` (what `make chaos` runs): the chaos scenarios on local stacks.

Prints each scenario's counts and problems, then as its last line
    chaos: trials=N completed=N stuck=0 duplicated_events=0 double_paid_calls=0 overruns=0 max_recovery_s=X
and exits 1 if any count is non-zero, a run did not end as expected or a scenario's own
invariant failed (its `violations`), 2 if the suite could not run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from infra.aws_env import make_environ_local

from .scenarios import SCENARIOS, passed, summary_line
from .suite import full_plan, run_suite, short_plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="runs of the kill and batch scenarios (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, in this order per stack: {','.join(SCENARIOS)}")
    ap.add_argument("--short", action="store_true", help="the short seeded version `make test` runs")
    ap.add_argument("--keep", action="store_true", help="keep every stack's logs (failed ones are always kept)")
    args = ap.parse_args(argv)
    base_env = dict(os.environ)
    if (os.environ.get("BEDROCK") or "").lower() == "aws":
        print("chaos: needs the dev model server; unset BEDROCK=aws", file=sys.stderr)
        return 2
    make_environ_local()  # our own boto3 clients talk to the stacks only
    plan = short_plan() if args.short else full_plan(args.trials)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    t0 = time.monotonic()
    try:
        results, kept = run_suite(scenarios, plan, args.seed, base_env, keep=args.keep)
    except Exception as e:  # noqa: BLE001 - reported, exit 2
        print(f"chaos: the suite could not run: {type(e).__name__}: {e}", file=sys.stderr)
        print("chaos: trials=0 completed=0 stuck=0 duplicated_events=0 double_paid_calls=0 overruns=0 max_recovery_s=0.0")
        return 2
    for path in kept:
        print(f"chaos: logs kept in {path}", file=sys.stderr)
    print(f"chaos: {len(results)} scenarios in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(summary_line(results), flush=True)
    return 0 if passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
