"""chainrun demo: the sample workflow run through the `chainrun` CLI on a local stack.

    python -m infra.demo [--cli target/debug/chainrun] [--sample infra/samples/feedback-analysis.json]

`make demo` builds the CLI and runs this inside `python -m infra.stack run`, which exports
the stack's env file (STACK_ENV_FILE, API_URL, …) to it; the CLI reads API_URL there and
mints a token for user `demo` with the stack's secret. Everything a user sees comes from the
CLI, exactly as they would type it:

    chainrun run infra/samples/feedback-analysis.json     # follows the run live
    chainrun runs --limit 1 --json                        # its id
    chainrun show RUN --open                              # the run's view page
    chainrun show RUN --mermaid                           # its graph, as Mermaid

This file only does what the CLI does not: says which model server answers, and chains
the commands. Exit status: `chainrun run`'s — 0 the run completed, 1 it failed, 2 it could
not be started, 3 it waits for input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import INFRA, ROOT

USER = "demo"


def say(line: str = "") -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the sample workflow through the chainrun CLI on a local stack.")
    ap.add_argument("--cli", default=str(ROOT / "target" / "debug" / "chainrun"), help="the chainrun binary")
    ap.add_argument("--sample", default=str(INFRA / "samples" / "feedback-analysis.json"))
    args = ap.parse_args(argv)
    if not os.environ.get("API_URL"):
        say("demo: no API_URL; run it as `make demo`, which starts a stack for it")
        return 2
    # The demo stack's token, minted from its env file, whatever the caller has set.
    env = {k: v for k, v in os.environ.items() if k not in ("CHAINRUN_TOKEN", "CHAINRUN_TOKEN_COMMAND", "CHAINRUN_ENV_FILE")}
    env.update(CHAINRUN_USER=USER, CHAINRUN_GROUPS=USER)

    def chainrun(*cli_args: str, capture: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([args.cli, *cli_args], env=env, text=True, capture_output=capture)

    if os.environ.get("DEVMODEL_URL"):
        say(f"model: the dev model server {os.environ['DEVMODEL_URL']} (scripted replies, infra/devmodel-rules.json)")
    elif os.environ.get("BEDROCK_MODE") == "aws":
        say("model: Amazon Bedrock (BEDROCK=aws)")
    sample = os.path.relpath(args.sample, ROOT)
    say(f"$ chainrun run {sample}")
    rc = chainrun("run", args.sample).returncode
    listed = chainrun("--json", "runs", "--limit", "1", capture=True)
    items = json.loads(listed.stdout).get("items", []) if listed.returncode == 0 else []
    if not items:
        say(f"demo: the run is not in `chainrun runs` ({listed.stderr.strip() or 'no runs'})")
        return rc or 2
    run_id = items[0]["run_id"]
    say()
    say(f"$ chainrun show {run_id} --open")
    chainrun("show", run_id, "--open")
    say()
    say(f"$ chainrun show {run_id} --mermaid    # paste into a ```mermaid block")
    chainrun("show", run_id, "--mermaid")
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        sys.exit(130)
