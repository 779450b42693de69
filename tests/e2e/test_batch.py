"""Batch inference for large maps on the local stack (README, Cost levers: batch inference).

The dev model server emulates Bedrock's model invocation jobs (the records read from and
the answers written to the outputs bucket on moto); the runner polls each job every
second here (CHAINRUN_BATCH_POLL_SECONDS=1), and the run waits in between holding no
runner, handed back by its one-time schedule.

- a 120-item map with `mode: batch` runs as one job: every record is answered in the job,
  the results come back in item order, and the run is charged exactly the registry's batch
  price (half the on-demand one) for the tokens the server reported;
- a run waiting for its job cannot be resumed by hand (409), and a cancel ends it with
  the job counted at its worst case;
- the CLI follows a run through its batch wait and exits 0.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from test_cli import cli, plain, write  # noqa: F401 (fixtures)
from test_cost_levers import priced, start, wait_for_end
from test_runs import add_rules, follow, marker
from test_views import chromium, page, snapshot, text  # noqa: F401 (fixtures)

MODEL = "amazon.nova-micro-v1:0"
ITEMS = 120
KINDS = "abc"


def labelling(m: str, mode: str = "batch") -> dict:
    return {"name": "batch-labels", "budget": {"max_cost_usd": "1"},
            "steps": [{"id": "labels", "type": "map", "over": "input.tickets", "mode": mode,
                       "step": {"type": "llm", "model": MODEL, "max_tokens": 20,
                                "prompt": m + " label {{ item }}"}}]}


def tickets(n: int = ITEMS) -> dict:
    return {"tickets": [f"t{i}-{KINDS[i % 3]}" for i in range(n)]}


def rules(devmodel, m: str) -> None:
    add_rules(devmodel, *({"name": f"{m}-{k}", "match": {"prompt_regex": f"{m} label t\\d+-{k}$"}, "reply": {"text": k.upper()}}
                          for k in KINDS))


def test_a_large_map_runs_as_one_batch_job_at_the_batch_price_while_the_run_waits_without_a_runner(api, stack, devmodel):
    m = marker("batch")
    rules(devmodel, m)
    token = stack.token("bea")
    run_id = start(api, token, labelling(m), tickets())["run_id"]
    events = follow(api, token, run_id, timeout=120.0, limit=50)
    assert events[-1]["type"] == "RUN_COMPLETED", [e["type"] for e in events]

    jobs = [e["data"] for e in events if e["type"] == "BATCH_JOB"]
    assert jobs[0]["status"] == "Submitted" and jobs[0]["records"] == ITEMS and jobs[0]["next_poll_at"], jobs[0]
    assert {j["job"] for j in jobs} == {jobs[0]["job"]}, "one job throughout"
    assert (jobs[-1]["status"], jobs[-1]["answered"], jobs[-1]["online"]) == ("Completed", ITEMS, 0), jobs[-1]
    waits = [e["data"] for e in events if e["type"] == "AWAITING_INPUT" and not e.get("step_id")]
    assert waits and all(w["kind"] == "batch" and w["steps"] == ["labels"] and w["deadline"] for w in waits), waits
    assert all(w["settled_steps"] == 0 and w["step_count"] == 1 for w in waits), waits
    assert any(e["type"] == "RUN_RESUMED" for e in events), "handed back to a runner after the wait"

    calls = [c for c in devmodel.calls() if m in c["prompt"]]
    assert len(calls) == ITEMS, "each item answered once"
    assert {c["batch_job"] for c in calls} == {jobs[0]["job"].rsplit("/", 1)[-1]}, "all of them in the job, none online"

    status, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert status == 200, run
    assert run["output"]["labels"] == [KINDS[i % 3].upper() for i in range(ITEMS)], "answers in item order"
    totals = run["totals"]
    assert totals["model_calls"] == ITEMS
    assert totals["cost_pico_usd"] == priced(MODEL, totals, 50), "exactly the registry's batch price"
    assert totals["cost_pico_usd"] * 2 == priced(MODEL, totals), "half the on-demand price"
    step = next(s for s in run["steps"] if s["id"] == "labels")
    assert step["detail"]["batch"]["status"] == "Completed", step


def test_a_run_waiting_for_its_job_is_shown_waiting_is_not_resumed_by_hand_and_a_cancel_stops_the_job(
        api, stack, devmodel, page, tmp_path):  # noqa: F811
    m = marker("batch-slow")
    rules(devmodel, m)
    status, before = devmodel.admin("GET", "/_dev/batch")
    assert status == 200, before
    status, body = devmodel.admin("PUT", "/_dev/batch", {"validate_ms": 600_000})
    assert status == 200, body
    try:
        token = stack.token("bea")
        run_id = start(api, token, labelling(m), tickets(100))["run_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, _, run = api("GET", f"/runs/{run_id}", token=token)
            if run.get("waiting", {}) and run["waiting"]["kind"] == "batch":
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"run {run_id} never waited for its batch job: {run}")
        # The run view: the map's node names its job, the waiting section says nobody needs to act.
        page.open(f"{stack.api_url}/runs/{run_id}/view#token={token}")
        page.wait_for("document.querySelector('#graph g.step[data-step=labels] text.batch[data-batch-status]')"
                      " && document.getElementById('waiting-section') && !document.getElementById('waiting-section').hidden", timeout_s=30)
        snapshot(page, tmp_path, "batch-waiting")
        assert text(page, "#waiting-title") == "Waiting for a batch job", page.console
        assert text(page, "#graph g.step[data-step=labels] text.batch").startswith("batch: "), page.console
        assert "100 records" in text(page, ".ask[data-run-wait=batch][data-step=labels] p.batch-job")
        assert not page.evaluate("document.querySelector('#waiting-section .reviewers')"), "nobody is asked"
        status, _, problem = api("POST", f"/runs/{run_id}/resume", token=token, body={})
        assert status == 409 and "batch inference job of labels" in problem["detail"], problem
        status, _, body = api("POST", f"/runs/{run_id}/cancel", token=token, body={"reason": "too slow"})
        assert status == 202, body
        run = wait_for_end(api, token, run_id, timeout=60)
        assert run["status"] == "CANCELLED", run
        lost = run["totals"]["reserved_lost"]
        assert lost["calls"] == 1 and lost["cost_pico_usd"] > 0, "the job, which may have been billed, stays counted"
        assert not [c for c in devmodel.calls() if m in c["prompt"]], "nothing was answered"
        status, _, page_ = api("GET", f"/runs/{run_id}/events?after=0&limit=100", token=token)
        arn = next(e["data"]["job"] for e in page_["events"] if e["type"] == "BATCH_JOB")
        status, batch = devmodel.admin("GET", "/_dev/batch")
        job = next(j for j in batch["jobs"] if j["jobArn"] == arn)
        assert job["status"] in ("Stopping", "Stopped"), "the cancel stopped the job"
        assert job["clientRequestToken"].startswith(run_id), "the run's own idempotency token"
    finally:
        status, body = devmodel.admin("PUT", "/_dev/batch", before["timing"])
        assert status == 200, body


def test_the_cli_follows_a_run_through_its_batch_wait_and_exits_0(cli, stack, devmodel, write):  # noqa: F811
    m = marker("batch-cli")
    rules(devmodel, m)
    path = write("batch.json", {"workflow": labelling(m), "input": tickets(100)})
    result = cli("run", path, "--no-progress", token=stack.token("cli-bea"))
    out = plain(result)
    assert result.code == 0, result
    assert re.search(r"⧗ labels\s+batch job Submitted · 100 records · next poll", out), out
    assert re.search(r"labels\s+batch job Completed · 100 answered at the batch price, 0 run online", out), out
