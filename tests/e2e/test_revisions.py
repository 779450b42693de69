"""End-to-end: steering a finished run again — retry a step, override an output — as
revisions, through the real API and runner on the local stack."""

from __future__ import annotations

import time

import pytest
from test_runs import add_rules, calls_with, marker, start, workflow

ENDS = ("RUN_COMPLETED", "RUN_FAILED", "RUN_CANCELLED")


def chain(m: str) -> dict:
    """extract -> classify -> respond; tag reads only extract."""
    return workflow("e2e-revisions", [
        {"id": "extract", "type": "llm", "prompt": m + " EXTRACT"},
        {"id": "classify", "type": "llm", "prompt": m + " CLASSIFY {{ steps.extract.text }}"},
        {"id": "respond", "type": "llm", "prompt": m + " RESPOND {{ steps.classify.text }}"},
        {"id": "tag", "type": "llm", "prompt": m + " TAG {{ steps.extract.text }}"},
    ], output="{{ steps.respond.text }} / {{ steps.tag.text }}")


def rules(m: str, classified: str) -> list:
    return [
        {"name": m + "-extract", "match": {"prompt_contains": m + " EXTRACT"}, "reply": {"text": "order 42"}},
        {"name": m + "-classify", "match": {"prompt_contains": m + " CLASSIFY"}, "reply": {"text": classified}},
        {"name": m + "-respond-billing", "match": {"prompt_contains": m + " RESPOND billing"}, "reply": {"text": "refund sent"}},
        {"name": m + "-respond", "match": {"prompt_contains": m + " RESPOND"}, "reply": {"text": "escalated"}},
        {"name": m + "-tag", "match": {"prompt_contains": m + " TAG"}, "reply": {"text": "urgent"}},
    ]


def counts(devmodel, m: str) -> dict:
    return {name: len(calls_with(devmodel, f"{m} {name}")) for name in ("EXTRACT", "CLASSIFY", "RESPOND", "TAG")}


def step(run: dict, id_: str) -> dict:
    return next(s for s in run["steps"] if s["id"] == id_)


def follow_revision(api, token, run_id, revision: int, timeout: float = 60.0) -> list:
    """The run's whole log, once the end of `revision` is in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=token)
        assert status == 200, page
        events = page["events"]
        if any(e["type"] in ENDS and e.get("revision", 0) == revision for e in events):
            return events
        time.sleep(0.1)
    pytest.fail(f"revision {revision} of run {run_id} did not end in {timeout}s")


def finished(api, token, run_id, revision: int = 0) -> dict:
    follow_revision(api, token, run_id, revision)
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    return run


def test_a_retried_middle_step_reruns_exactly_its_dependents_and_every_revision_stays_readable(api, stack, devmodel):
    m = marker("retry")
    add_rules(devmodel, *rules(m, "other"))
    token = stack.token("alice")
    run_id = start(api, token, chain(m))["run_id"]
    first = finished(api, token, run_id)
    assert first["status"] == "COMPLETED" and first["output"] == "escalated / urgent", first
    assert counts(devmodel, m) == {"EXTRACT": 1, "CLASSIFY": 1, "RESPOND": 1, "TAG": 1}

    # Another user cannot see it, so cannot steer it.
    status, _, _ = api("POST", f"/runs/{run_id}/steps/classify/retry", token=stack.token("mallory"))
    assert status == 404
    # The classifier is fixed; retry it. A repeat with the same Idempotency-Key starts one revision.
    add_rules(devmodel, *rules(m, "billing"))
    key = {"Idempotency-Key": m}
    status, _, accepted = api("POST", f"/runs/{run_id}/steps/classify/retry", token=token, body={"comment": "new prompt"}, headers=key)
    assert status == 202, accepted
    assert accepted["revision"] == 1 and accepted["rerun"] == ["classify", "respond"]
    status, _, again = api("POST", f"/runs/{run_id}/steps/classify/retry", token=token, body={"comment": "new prompt"}, headers=key)
    assert status == 202 and again == accepted

    events = follow_revision(api, token, run_id, 1)
    _, _, now = api("GET", f"/runs/{run_id}", token=token)
    assert now["status"] == "COMPLETED" and now["output"] == "refund sent / urgent", now
    assert now["revision"] == 1 and now["revisions"][0]["by"] == "alice"
    # Exactly classify and respond were called again, counted at the model server.
    assert counts(devmodel, m) == {"EXTRACT": 1, "CLASSIFY": 2, "RESPOND": 2, "TAG": 1}

    # Costs of both revisions add up in the run's totals.
    again_cost = step(now, "classify")["cost_pico_usd"] + step(now, "respond")["cost_pico_usd"]
    assert now["totals"]["cost_pico_usd"] == first["totals"]["cost_pico_usd"] + again_cost
    assert now["totals"]["model_calls"] == 6
    # Revision 0 is readable as it was: its output, its steps, its totals.
    status, _, old = api("GET", f"/runs/{run_id}?revision=0", token=token)
    assert status == 200 and old["output"] == "escalated / urgent" and old["totals"] == first["totals"]
    assert step(old, "classify")["text"] == "other" and step(now, "classify")["text"] == "billing"
    # One gap-free log; REVISION_STARTED opens revision 1, whose events say so.
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    _, _, page = api("GET", f"/runs/{run_id}/events?revision=1&limit=1000", token=token)
    kinds = [e["type"] for e in page["events"]]
    assert kinds[0] == "REVISION_STARTED" and kinds[-1] == "RUN_COMPLETED", kinds
    assert page["events"][0]["data"]["rerun"] == ["classify", "respond"]
    assert all(e["revision"] == 1 for e in page["events"])
    ran = {e["step_id"] for e in page["events"] if e["type"] == "STEP_COMPLETED"}
    assert ran == {"classify", "respond"}


def test_an_output_set_by_hand_reruns_only_its_dependents(api, stack, devmodel):
    m = marker("override")
    add_rules(devmodel, *rules(m, "other"))
    token = stack.token("alice")
    run_id = start(api, token, chain(m))["run_id"]
    assert finished(api, token, run_id)["status"] == "COMPLETED"

    status, _, accepted = api("PUT", f"/runs/{run_id}/steps/classify/output", token=token,
                              body={"output": "billing", "comment": "it is a refund"})
    assert status == 202, accepted
    assert accepted["rerun"] == ["respond"]
    now = finished(api, token, run_id, 1)
    assert now["output"] == "refund sent / urgent", now
    assert counts(devmodel, m) == {"EXTRACT": 1, "CLASSIFY": 1, "RESPOND": 2, "TAG": 1}
    assert calls_with(devmodel, m + " RESPOND billing"), "respond read the output set by hand"
    classify = step(now, "classify")
    assert classify["output"] == "billing" and classify["detail"]["overridden_by"] == "alice"
    _, _, page = api("GET", f"/runs/{run_id}/events?revision=1&limit=1000", token=token)
    overridden = [e for e in page["events"] if e["type"] == "STEP_OVERRIDDEN"]
    assert len(overridden) == 1 and overridden[0]["step_id"] == "classify"
    assert overridden[0]["data"]["comment"] == "it is a refund" and overridden[0]["data"]["output"] == "billing"


def test_steering_a_run_that_has_not_ended_is_a_409_saying_why(api, stack, devmodel):
    m = marker("steer-early")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "x"}, "latency_ms": 4000})
    token = stack.token("alice")
    run_id = start(api, token, workflow("e2e-steer-early", [{"id": "slow", "type": "llm", "prompt": m}]))["run_id"]
    status, _, problem = api("POST", f"/runs/{run_id}/steps/slow/retry", token=token)
    assert status == 409 and "once the run has ended" in problem["detail"], problem
    status, _, problem = api("PUT", f"/runs/{run_id}/steps/slow/output", token=token, body={"output": 1})
    assert status == 409, problem
    assert finished(api, token, run_id)["revision"] == 0
    status, _, problem = api("POST", f"/runs/{run_id}/steps/nope/retry", token=token)
    assert status == 404 and "no step" in problem["detail"]
