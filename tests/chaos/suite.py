"""Runs chaos scenarios on the local stacks they need, one stack at a time:

    main    the default stack (kill, duplicates, storm, lost, steer, review, batch)
    faults  Stack(dynamodb_faults=True): the fault proxy between the functions and moto
    chain   the runner's timeout at 8 s (CHAINRUN_LOCAL_RUNNER_TIMEOUT_SECS) and a 2 s
            deadline margin, so a long run continues across invocations

Each stack lives in a temp dir; its logs are kept (and their path printed) when a
scenario on it failed, or always with keep=True.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from infra.stack import Stack

from .driver import Harness
from .scenarios import RUNNERS, SAFE_PHASES, SCENARIOS, STACK_OF, ScenarioResult

STACK_ENV = {
    "main": {},
    "faults": {},
    "chain": {"CHAINRUN_LOCAL_RUNNER_TIMEOUT_SECS": "8", "CHAINRUN_LOCAL_DEADLINE_MARGIN_SECS": "2"},
}


@dataclasses.dataclass
class Plan:
    """How many runs each scenario makes, and its options."""
    runs: dict
    options: dict = dataclasses.field(default_factory=dict)


def full_plan(trials: int = 20) -> Plan:
    return Plan(runs={"kill": trials, "duplicates": 3, "storm": 6, "dynamodb": 6, "lost": 2, "steer": 8, "review": 10,
                      "chain": 2, "batch": trials})


def short_plan() -> Plan:
    """What `make test` runs (tests/chaos/test_chaos.py): a handful of seeded runs. The
    review scenario's 9 runs are every mode but the deadline one (a minute at least)."""
    return Plan(runs={"kill": 3, "duplicates": 1, "storm": 2, "dynamodb": 3, "lost": 1, "steer": 4, "review": 9,
                      "chain": 1, "batch": 3},
                options={"kill": {"phases": SAFE_PHASES}, "batch": {"max_kills": 1}})


def log_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Stacks:
    """Starts each kind of stack when first asked, stops it when asked or at close()."""

    def __init__(self, base_env: dict, keep: bool = False, log=log_err):
        self.base_env = dict(base_env)
        self.keep = keep
        self.log = log
        self.built = False
        self.live: dict[str, tuple[Stack, Path]] = {}
        self.failed: set[str] = set()
        self.kept: list[Path] = []

    def harness(self, kind: str) -> Harness:
        if kind not in self.live:
            tmp = Path(tempfile.mkdtemp(prefix=f"chainrun-chaos-{kind}-"))
            env = dict(self.base_env, **STACK_ENV[kind])
            s = Stack(state_dir=tmp, build=not self.built, base_env=env, dynamodb_faults=(kind == "faults"),
                      log=self.log)
            t0 = time.monotonic()
            try:
                s.start()
            except BaseException:
                self.kept.append(s.logs)
                raise
            self.built = True
            self.log(f"chaos: {kind} stack up in {time.monotonic() - t0:.0f}s (logs: {s.logs})")
            self.live[kind] = (s, tmp)
        s, _ = self.live[kind]
        return Harness(s.client(), log=self.log)

    def stop(self, kind: str) -> None:
        if kind not in self.live:
            return
        s, tmp = self.live.pop(kind)
        s.stop()
        if self.keep or kind in self.failed:
            self.kept.append(s.logs)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        for kind in list(self.live):
            self.stop(kind)


def run_scenario(stacks: Stacks, name: str, runs: int, seed: int, options: dict | None = None,
                 log=log_err) -> ScenarioResult:
    kind = STACK_OF[name]
    h = stacks.harness(kind)
    rng = random.Random(f"{seed}:{name}")
    log(f"chaos[{name}]: {runs} runs, seed {seed}")
    t0 = time.monotonic()
    try:
        result = RUNNERS[name](h, rng, runs, log, **(options or {}))
    except Exception as e:  # noqa: BLE001 - the scenario fails; the others still run
        import traceback

        stacks.failed.add(kind)
        log(traceback.format_exc())
        result = ScenarioResult(name, trials=runs, violations=1, seconds=time.monotonic() - t0,
                                problems=[f"the scenario stopped: {type(e).__name__}: {e}"])
    if not result.ok:
        stacks.failed.add(kind)
    return result


def run_suite(scenarios: list[str], plan: Plan, seed: int, base_env: dict, keep: bool = False,
              log=log_err) -> tuple[list[ScenarioResult], list[Path]]:
    """The scenarios in order, grouped by stack so each stack starts once."""
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    results: list[ScenarioResult] = []
    stacks = Stacks(base_env, keep=keep, log=log)
    try:
        for kind in ("main", "faults", "chain"):
            for name in [s for s in scenarios if STACK_OF[s] == kind]:
                r = run_scenario(stacks, name, plan.runs[name], seed, plan.options.get(name), log=log)
                results.append(r)
                print(r.line(), flush=True)
                for p in r.problems[:40]:
                    print(f"  {p}", flush=True)
                if len(r.problems) > 40:
                    print(f"  … {len(r.problems) - 40} more", flush=True)
            stacks.stop(kind)
    finally:
        stacks.close()
    return results, stacks.kept
