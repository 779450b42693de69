"""The short seeded chaos suite `make test` runs: each scenario of tests/chaos with a
handful of runs against the real binaries on local stacks (tests/chaos/suite.py starts
one stack per kind, one at a time). `make chaos` runs the full suite.

Each test asserts its scenario's counts are all zero and every run ended as expected; on
failure the message holds the scenario's line and every problem with its run id, and the
stack's logs are kept (their path is printed at the end of the session).
CHAINRUN_CHAOS_KEEP=1 keeps every stack's logs.
"""

from __future__ import annotations

import os

import pytest

from .scenarios import ScenarioResult
from .suite import STACK_OF, Stacks, run_scenario, short_plan

SEED = 7


@pytest.fixture(scope="module")
def stacks(caller_env):
    if (caller_env.get("BEDROCK") or "").lower() == "aws" or caller_env.get("AWS_ENDPOINT_URL_BEDROCK_RUNTIME"):
        pytest.skip("the chaos suite needs the dev model server (unset BEDROCK / AWS_ENDPOINT_URL_BEDROCK_RUNTIME)")
    s = Stacks(caller_env, keep=os.environ.get("CHAINRUN_CHAOS_KEEP") == "1")
    yield s
    s.close()
    for path in s.kept:
        print(f"\nchainrun chaos: local stack logs kept in {path}")


def scenario(stacks: Stacks, name: str, runs: int | None = None, **options) -> ScenarioResult:
    kind = STACK_OF[name]
    for other in list(stacks.live):
        if other != kind:
            stacks.stop(other)  # one stack at a time on a small machine
    plan = short_plan()
    opts = dict(plan.options.get(name) or {}, **options)
    r = run_scenario(stacks, name, runs or plan.runs[name], SEED, opts)
    print(r.line())
    for p in r.problems:
        print(f"  {p}")
    return r


def report(r: ScenarioResult) -> str:
    return "\n".join([r.line(), *r.problems])


def test_killed_runners_are_taken_over_and_every_run_completes(stacks):
    r = scenario(stacks, "kill")
    assert r.ok, report(r)
    assert r.info["kills"] >= 1, report(r)


class ItemsPaidTwice(AssertionError):
    """A map's items answered before a crash were paid for again after it."""


def test_a_runner_killed_mid_map_does_not_pay_again_for_items_it_had(stacks):
    r = scenario(stacks, "kill", runs=1, phases=("mid-map",), max_kills=1)
    others = (r.completed == r.trials and not (r.stuck or r.duplicated_events or r.overruns or r.violations))
    assert others, report(r)  # anything else wrong is a plain failure, not the known one
    assert r.info["kills"] == 1, report(r)
    if r.double_paid_calls:
        raise ItemsPaidTwice(report(r))


def test_100_duplicate_deliveries_pay_each_model_call_once(stacks):
    r = scenario(stacks, "duplicates")
    assert r.ok, report(r)
    assert r.info["deliveries"] == 101 and r.info["failed_deliveries"] == 0, report(r)


def test_a_throttling_storm_stays_within_every_steps_retry_bounds(stacks):
    r = scenario(stacks, "storm")
    assert r.ok, report(r)
    assert r.info["throttled_calls"] > 0, report(r)


def test_a_lost_dispatch_is_started_by_the_sweeper(stacks):
    r = scenario(stacks, "lost")
    assert r.ok, report(r)
    assert r.info["dispatches_lost"] == 1, report(r)


def test_paused_resumed_and_cancelled_runs_end_as_asked_even_with_their_runner_killed(stacks):
    r = scenario(stacks, "steer")
    assert r.ok, report(r)
    assert r.info["paused"] >= 1 and r.info["cancelled"] >= 1, report(r)


def test_reviews_decided_twice_racing_a_cancel_or_with_their_runner_killed_end_as_decided_with_exact_spend(stacks):
    r = scenario(stacks, "review")
    assert r.ok, report(r)
    assert r.info["kills"] >= 1, report(r)
    for end in ("COMPLETED", "FAILED"):
        assert end in r.info["ends"], report(r)


def test_dynamodb_faults_leave_every_run_consistent_and_finished(stacks):
    r = scenario(stacks, "dynamodb")
    assert r.ok, report(r)


def test_a_100_step_run_continues_across_short_invocations(stacks):
    r = scenario(stacks, "chain")
    assert r.ok, report(r)
    assert r.info["suspended"] >= 1, report(r)


def test_runners_killed_while_a_batch_job_is_submitted_followed_or_read_leave_one_job_each_item_paid_once(stacks):
    r = scenario(stacks, "batch")
    assert r.ok, report(r)
    assert r.info["kills"] >= 2 and r.info["jobs"] == r.trials, report(r)
