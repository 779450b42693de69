"""End-to-end: runs through the real API and runner binaries on the local stack.

Each test scripts the dev model server with rules keyed on a marker unique to that test
(prepended with POST /_dev/rules), so tests never depend on each other's state.
"""

from __future__ import annotations

import time
import uuid

import pytest

from infra.net import http

MODEL = "amazon.nova-micro-v1:0"


def marker(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def add_rules(devmodel, *rules):
    status, body = devmodel.admin("POST", "/_dev/rules", {"rules": list(rules)})
    assert status == 200, body


def calls_with(devmodel, needle: str) -> list:
    return [c for c in devmodel.calls() if needle in c["prompt"]]


def workflow(name: str, steps: list, **extra) -> dict:
    return {"name": name, "defaults": {"model": MODEL, "max_tokens": 200,
                                       "retry": {"max_attempts": 3, "initial_backoff_ms": 50}},
            "steps": steps, **extra}


def start(api, token, wf, input_=None):
    status, headers, body = api("POST", "/runs", token=token, body={"workflow": wf, "input": input_ or {}})
    assert status == 202, body
    return body


def follow(api, token, run_id, timeout=90.0, limit=3):
    """Reads the event log with a cursor until a terminal event; returns every event."""
    events, after = [], 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, page = api("GET", f"/runs/{run_id}/events?after={after}&limit={limit}", token=token)
        assert status == 200, page
        events.extend(page["events"])
        after = page["last_seq"]
        if events and events[-1]["type"] in ("RUN_COMPLETED", "RUN_FAILED", "RUN_CANCELLED"):
            return events
        if not page["events"]:
            time.sleep(0.1)
    pytest.fail(f"run {run_id} did not finish in {timeout}s; events so far: {[e['type'] for e in events]}")


def test_202_arrives_before_the_run_finishes_and_the_cursor_sees_every_event_once(api, stack, devmodel):
    m = marker("slow")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha"}, "latency_ms": 1500},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "beta"}, "latency_ms": 300},
              {"name": m + "-c", "match": {"prompt_contains": m + " C"}, "reply": {"text": "gamma"}, "latency_ms": 300})
    token = stack.token("alice")
    wf = workflow("e2e-order", [
        {"id": "a", "type": "llm", "prompt": m + " A {{ input.x }}"},
        {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
        {"id": "c", "type": "llm", "prompt": m + " C {{ steps.a.text }}"},
    ], output="{{ steps.b.text }}+{{ steps.c.text }}")
    t0 = time.monotonic()
    accepted = start(api, token, wf, {"x": 1})
    elapsed = time.monotonic() - t0
    run_id = accepted["run_id"]
    assert accepted["status"] == "QUEUED"
    assert accepted["links"] == {"run": f"/runs/{run_id}", "events": f"/runs/{run_id}/events"}
    # The first model call alone takes 1.5 s: an answer sooner than that cannot have waited for the run.
    assert elapsed < 1.5, f"202 took {elapsed:.2f}s"
    _, _, snapshot = api("GET", f"/runs/{run_id}", token=token)
    assert snapshot["status"] in ("QUEUED", "RUNNING"), snapshot["status"]

    events = follow(api, token, run_id)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"gaps or repeats: {seqs}"
    assert events[0]["type"] == "RUN_STARTED" and events[-1]["type"] == "RUN_COMPLETED"
    completed = {e["step_id"]: e for e in events if e["type"] == "STEP_COMPLETED"}
    assert set(completed) == {"a", "b", "c"}
    # b and c both depend only on a: they start before either of them completes.
    kinds = [(e["type"], e.get("step_id")) for e in events]
    assert kinds.index(("STEP_STARTED", "c")) < kinds.index(("STEP_COMPLETED", "b"))
    assert kinds.index(("STEP_STARTED", "b")) < kinds.index(("STEP_COMPLETED", "c"))

    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert run["status"] == "COMPLETED"
    assert run["output"] == "beta+gamma"
    assert [s["id"] for s in run["steps"]] == ["a", "b", "c"]
    for step in run["steps"]:
        assert step["status"] == "COMPLETED" and step["attempts"] == 1
        assert step["input_tokens"] > 0 and step["output_tokens"] > 0
        assert int(step["cost_pico_usd"]) > 0 and step["latency_ms"] >= 250
    assert run["totals"]["cost_pico_usd"] == sum(s["cost_pico_usd"] for s in run["steps"])
    assert run["totals"]["model_calls"] == 3
    assert run["totals"]["step_latency_ms"] == sum(s["latency_ms"] for s in run["steps"])


def test_the_owners_progress_row_agrees_with_the_run(api, stack, devmodel):
    m = marker("progress")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "fine"}})
    token = stack.token("carol")
    run_id = start(api, token, workflow("e2e-progress", [{"id": "only", "type": "llm", "prompt": m}]))["run_id"]
    events = follow(api, token, run_id)
    _, _, run = api("GET", f"/runs/{run_id}", token=token)

    status, _, feed = api("GET", "/progress", token=token)
    assert status == 200, feed
    row = next(r for r in feed["items"] if r["run_id"] == run_id)
    assert row["status"] == run["status"] == "COMPLETED"
    assert row["last_seq"] == events[-1]["seq"]
    assert row["totals"] == run["totals"]
    assert row["workflow"] == "e2e-progress"
    # The row is stored under the owner's key, with a TTL.
    item = stack.ddb().get_item(TableName=stack.tables["CHAINRUN_PROGRESS_TABLE"],
                                Key={"pk": {"S": "USER#carol"}, "sk": {"S": f"RUN#{run_id}"}})["Item"]
    assert item["status"]["S"] == "COMPLETED" and int(item["last_seq"]["N"]) == events[-1]["seq"]
    assert int(item["expires_at"]["N"]) > time.time()
    _, _, other = api("GET", "/progress", token=stack.token("dave"))
    assert all(r["run_id"] != run_id for r in other["items"])


def test_a_scripted_model_error_fails_the_step_and_the_run_with_that_error(api, stack, devmodel):
    m = marker("denied")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m},
                         "error": {"type": "AccessDeniedException", "message": "no access to this model"}})
    token = stack.token("alice")
    wf = workflow("e2e-error", [
        {"id": "doomed", "type": "llm", "prompt": m},
        {"id": "after", "type": "llm", "prompt": "never {{ steps.doomed.text }}"},
    ])
    run_id = start(api, token, wf)["run_id"]
    events = follow(api, token, run_id)
    failed = [e for e in events if e["type"] == "STEP_FAILED"]
    assert len(failed) == 1 and failed[0]["step_id"] == "doomed"
    assert failed[0]["data"]["error"]["code"] == "AccessDeniedException"
    assert "no access to this model" in failed[0]["data"]["error"]["message"]
    assert events[-1]["type"] == "RUN_FAILED"
    assert events[-1]["data"]["error"]["code"] == "AccessDeniedException"
    assert len(calls_with(devmodel, m)) == 1, "access denied is terminal: no retry"
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert run["status"] == "FAILED"
    assert "step doomed failed" in run["error"]["message"]
    assert {s["id"]: s["status"] for s in run["steps"]} == {"doomed": "FAILED", "after": "SKIPPED"}


def test_throttling_is_retried_with_events_and_only_that_step_reruns(api, stack, devmodel):
    m = marker("throttle")
    add_rules(devmodel,
              {"name": m + "-first", "match": {"prompt_contains": m + " first"}, "reply": {"text": "one"}},
              {"name": m + "-second", "match": {"prompt_contains": m + " second"}, "reply": {"text": "two"},
               "fail_first": {"count": 2, "error": "ThrottlingException"}})
    token = stack.token("alice")
    wf = workflow("e2e-retry", [
        {"id": "first", "type": "llm", "prompt": m + " first"},
        {"id": "second", "type": "llm", "prompt": m + " second {{ steps.first.text }}"},
    ])
    run_id = start(api, token, wf)["run_id"]
    events = follow(api, token, run_id)
    assert events[-1]["type"] == "RUN_COMPLETED"
    retries = [e for e in events if e["type"] == "STEP_RETRYING"]
    assert [(e["step_id"], e["attempt"], e["data"]["reason"]) for e in retries] == [
        ("second", 2, "ThrottlingException"), ("second", 3, "ThrottlingException")]
    assert all("delay_ms" in e["data"] for e in retries)
    # Three calls for `second` means the SDK did not retry on its own as well.
    assert len(calls_with(devmodel, m + " second")) == 3
    assert len(calls_with(devmodel, m + " first")) == 1


def test_a_duplicate_dispatch_executes_each_model_call_once(api, stack, devmodel):
    m = marker("dup")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "a"}, "latency_ms": 800},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "b"}, "latency_ms": 200})
    token = stack.token("alice")
    wf = workflow("e2e-dup", [
        {"id": "a", "type": "llm", "prompt": m + " A"},
        {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
    ])
    run_id = start(api, token, wf)["run_id"]
    # Deliver the same event twice more: once while the run is in flight, once after.
    invoke = f"{stack.proxy_url}/2015-03-31/functions/chainrun-runner/invocations"
    status, _, _ = http("POST", invoke, body={"run_id": run_id}, headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 202
    events = follow(api, token, run_id)
    status, _, _ = http("POST", invoke, body={"run_id": run_id}, headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 202
    assert stack.wait_quiescent(60)
    assert len(calls_with(devmodel, m + " A")) == 1
    assert len(calls_with(devmodel, m + " B")) == 1
    assert [e["type"] for e in events].count("RUN_STARTED") == 1
    _, _, page = api("GET", f"/runs/{run_id}/events?after={events[-1]['seq']}", token=token)
    assert page["events"] == [], "nothing was appended after the run ended"


def test_streamed_steps_report_coalesced_deltas_that_add_up_to_the_text(api, stack, devmodel):
    m = marker("stream")
    text = "Streaming lets a client show the reply as it is written. " * 8
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": text},
                         "latency_ms": 1200, "stream_chunk_chars": 8})
    token = stack.token("alice")
    run_id = start(api, token, workflow("e2e-stream", [{"id": "s", "type": "llm", "prompt": m, "stream": True}]))["run_id"]
    events = follow(api, token, run_id)
    assert events[-1]["type"] == "RUN_COMPLETED"
    deltas = [e["data"]["delta"] for e in events if e["type"] == "STREAMING"]
    assert "".join(deltas) == text
    assert 1 <= len(deltas) < len(text) // 8, "deltas are coalesced, not one write per chunk"
    assert [c["stream"] for c in calls_with(devmodel, m)] == [True]


def test_requests_without_a_token_get_401(api, stack):
    wf = workflow("e2e-auth", [{"id": "a", "type": "llm", "prompt": "x"}])
    status, headers, body = api("POST", "/runs", body={"workflow": wf, "input": {}})
    assert status == 401
    assert headers["Content-Type"] == "application/problem+json"
    assert body["status"] == 401
    forged = stack.token("alice") + "x"
    assert api("GET", "/progress", token=forged)[0] == 401


def test_another_users_run_is_404(api, stack, devmodel):
    m = marker("private")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "secret"}})
    owner = stack.token("alice")
    run_id = start(api, owner, workflow("e2e-private", [{"id": "a", "type": "llm", "prompt": m}]))["run_id"]
    intruder = stack.token("mallory")
    for path in (f"/runs/{run_id}", f"/runs/{run_id}/events"):
        status, headers, body = api("GET", path, token=intruder)
        assert status == 404, body
        assert headers["Content-Type"] == "application/problem+json"
    follow(api, owner, run_id)


def test_malformed_json_is_a_400_and_changes_nothing(api, stack):
    token = stack.token("erin")
    status, headers, body = api("POST", "/runs", token=token, raw=b'{"workflow": {"name": ',
                                headers={"Content-Type": "application/json"})
    assert status == 400
    assert headers["Content-Type"] == "application/problem+json"
    assert body["title"] == "Malformed JSON" and "line 1" in body["detail"]
    _, _, feed = api("GET", "/progress", token=token)
    assert feed["items"] == []


def test_an_invalid_definition_is_a_400_naming_each_problem(api, stack):
    token = stack.token("frank")
    wf = workflow("e2e-invalid", [
        {"id": "a", "type": "llm", "prompt": "{{ steps.b.text }}"},
        {"id": "b", "type": "llm", "prompt": "{{ steps.a.text }}"},
        {"id": "c", "type": "llm", "prompt": "x", "model": "acme.imaginary-v1"},
        {"id": "c", "type": "llm", "prompt": "dup"},
    ])
    status, _, body = api("POST", "/runs", token=token, body={"workflow": wf, "input": {}})
    assert status == 400
    assert body["title"] == "Invalid workflow"
    problems = {(p.get("step"), p["field"]) for p in body["problems"]}
    assert ("c", "model") in problems and ("c", "id") in problems, body
    assert any("cycle" in p["message"] and "a" in p["message"] for p in body["problems"]), body
    assert "acme.imaginary-v1" in body["detail"]
    _, _, feed = api("GET", "/progress", token=token)
    assert feed["items"] == []
