"""End-to-end: steering a run through the real API and runner on the local stack."""

from __future__ import annotations

import time

from test_runs import add_rules, calls_with, follow, marker, start, workflow


def wait_for(what, probe, timeout=30.0):
    """Polls probe() until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout}s")


def wait_for_event(api, token, run_id, kind, timeout=30.0):
    def probe():
        _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=token)
        return page["events"] if any(e["type"] == kind and e.get("step_id") for e in page["events"]) else None
    return wait_for(f"{kind} in run {run_id}", probe, timeout)


def test_a_cancelled_run_stops_its_slow_step_starts_nothing_more_and_says_who(api, stack, devmodel):
    m = marker("cancel")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha"}},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "beta"}, "latency_ms": 60_000},
              {"name": m + "-c", "match": {"prompt_contains": m + " C"}, "reply": {"text": "gamma"}})
    token = stack.token("alice")
    wf = workflow("e2e-cancel", [
        {"id": "a", "type": "llm", "prompt": m + " A"},
        {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
        {"id": "c", "type": "llm", "prompt": m + " C {{ steps.b.text }}"},
    ])
    run_id = start(api, token, wf)["run_id"]
    events = wait_for_event(api, token, run_id, "STEP_STARTED")
    while not any(e["type"] == "STEP_STARTED" and e["step_id"] == "b" for e in events):
        events = wait_for_event(api, token, run_id, "STEP_STARTED")
    t0 = time.monotonic()

    status, _, asked = api("POST", f"/runs/{run_id}/cancel", token=token, body={"reason": "wrong input"})
    assert status == 202, asked
    assert asked["control"]["by"] == "alice" and asked["control"]["kind"] == "cancel"
    # Another user cannot see it, so cannot cancel it; a repeat is harmless.
    status, _, _ = api("POST", f"/runs/{run_id}/cancel", token=stack.token("mallory"))
    assert status == 404
    status, _, again = api("POST", f"/runs/{run_id}/cancel", token=token)
    assert status == 202 and again["control"] == asked["control"]

    events = follow(api, token, run_id, timeout=30, limit=100)
    elapsed = time.monotonic() - t0
    assert events[-1]["type"] == "RUN_CANCELLED", [e["type"] for e in events]
    assert events[-1]["data"]["by"] == "alice" and events[-1]["data"]["reason"] == "wrong input"
    # Stopped within a heartbeat or two (the local lease is 6 s), not after b's 60 s reply.
    assert elapsed < 15, f"cancel took {elapsed:.1f}s"
    cancelled = [e["step_id"] for e in events if e["type"] == "STEP_CANCELLED"]
    assert cancelled == ["b", "c"]
    assert len(calls_with(devmodel, m + " B")) == 1 and calls_with(devmodel, m + " C") == []

    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert run["status"] == "CANCELLED" and run["control"] == asked["control"]
    assert [s["status"] for s in run["steps"]] == ["COMPLETED", "CANCELLED", "CANCELLED"]
    # b's call in flight is reported at its worst case, apart from a's exact charge.
    assert run["totals"]["reserved_lost"]["calls"] == 1, run["totals"]

    status, _, problem = api("POST", f"/runs/{run_id}/cancel", token=token)
    assert status == 409 and "already ended (CANCELLED)" in problem["detail"]


def test_a_run_cancelled_before_it_starts_never_calls_a_model(api, stack, devmodel):
    m = marker("cancel-queued")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "x"}, "latency_ms": 3000})
    token = stack.token("alice")
    wf = workflow("e2e-cancel-early", [
        {"id": "slow", "type": "llm", "prompt": m + " first"},
        {"id": "after", "type": "llm", "prompt": m + " then {{ steps.slow.text }}"},
    ])
    run_id = start(api, token, wf)["run_id"]
    status, _, _ = api("POST", f"/runs/{run_id}/cancel", token=token)
    assert status == 202
    events = follow(api, token, run_id, timeout=30, limit=100)
    assert events[-1]["type"] == "RUN_CANCELLED"
    assert len(calls_with(devmodel, m)) <= 1, "at most the first call, if the runner had started it"
    assert calls_with(devmodel, m + " then") == []


def test_a_paused_run_waits_holding_no_runner_and_a_resume_continues_it_on_another(api, stack, devmodel):
    m = marker("pause")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha"}, "latency_ms": 2000},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "beta"}})
    token = stack.token("alice")
    wf = workflow("e2e-pause", [
        {"id": "a", "type": "llm", "prompt": m + " A"},
        {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
    ], output="{{ steps.b.text }}")
    run_id = start(api, token, wf)["run_id"]
    wait_for_event(api, token, run_id, "STEP_STARTED")
    status, _, paused = api("POST", f"/runs/{run_id}/pause", token=token, body={"reason": "review a"})
    assert status == 202, paused

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, _, run = api("GET", f"/runs/{run_id}", token=token)
        if run["status"] == "AWAITING_INPUT":
            break
        time.sleep(0.2)
    assert run["status"] == "AWAITING_INPUT", run
    assert run["waiting"]["kind"] == "paused" and run["waiting"]["reason"] == "review a"
    assert [s["status"] for s in run["steps"]] == ["COMPLETED", "PENDING"], "a finished, b did not start"
    _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=token)
    assert page["events"][-1]["type"] == "AWAITING_INPUT"

    # Longer than a lease and a sweep: nothing takes a waiting run over or runs it.
    time.sleep(8)
    assert calls_with(devmodel, m + " B") == []
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert run["status"] == "AWAITING_INPUT"

    status, _, resumed = api("POST", f"/runs/{run_id}/resume", token=token)
    assert status == 202, resumed
    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=token)
    assert status == 409 and "not waiting" in problem["detail"], "a second resume is refused, saying why"
    events = follow(api, token, run_id, timeout=30, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED" and events[-1]["data"]["output"] == "beta"
    resumed_event = next(e for e in events if e["type"] == "RUN_RESUMED")
    assert resumed_event["data"]["cause"] == "resume" and resumed_event["data"]["by"] == "alice"
    assert len(calls_with(devmodel, m + " A")) == 1 and len(calls_with(devmodel, m + " B")) == 1


def wait_for_status(api, token, run_id, status, timeout=30.0):
    def probe():
        run = api("GET", f"/runs/{run_id}", token=token)[2]
        return run if run["status"] == status else None
    return wait_for(f"status {status} of run {run_id}", probe, timeout)


def test_a_review_gate_waits_for_its_reviewer_who_edits_and_the_edit_goes_downstream(api, stack, devmodel):
    m = marker("review")
    add_rules(devmodel,
              {"name": m + "-d", "match": {"prompt_contains": m + " DRAFT"}, "reply": {"text": "Dear customer, no."}},
              {"name": m + "-s", "match": {"prompt_contains": m + " SEND"}, "reply": {"text": "sent"}})
    alice, bob = stack.token("alice"), stack.token("bob")
    wf = workflow("e2e-review", [
        {"id": "draft", "type": "llm", "prompt": m + " DRAFT"},
        {"id": "check", "type": "review", "show": "{{ steps.draft.text }}", "reviewers": ["user:bob"]},
        {"id": "send", "type": "llm", "prompt": m + " SEND {{ steps.check.text }}"},
    ], output="{{ steps.send.text }}")
    run_id = start(api, alice, wf)["run_id"]
    run = wait_for_status(api, bob, run_id, "AWAITING_INPUT")
    assert run["waiting"]["kind"] == "review" and run["waiting"]["steps"] == ["check"]
    _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=bob)
    asked = next(e for e in page["events"] if e["type"] == "AWAITING_INPUT" and e.get("step_id") == "check")
    assert asked["data"]["show"] == "Dear customer, no." and asked["data"]["reviewers"] == ["user:bob"]

    # Nothing moves while nobody decides (longer than a lease and a sweep).
    time.sleep(8)
    assert calls_with(devmodel, m + " SEND") == []

    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=stack.token("mallory"),
                             body={"step": "check", "decision": "approve"})
    assert status == 404, problem
    decision = {"step": "check", "decision": "edit", "output": "Dear customer, yes.", "comment": "kinder"}
    status, _, decided = api("POST", f"/runs/{run_id}/resume", token=bob, body=decision)
    assert status == 202, decided
    status, _, again = api("POST", f"/runs/{run_id}/resume", token=bob, body=decision)
    assert status == 202 and again["decision"] == decided["decision"], "a resume arriving twice is answered once"
    events = follow(api, alice, run_id, timeout=30, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED" and events[-1]["data"]["output"] == "sent"
    (send,) = calls_with(devmodel, m + " SEND")
    assert "Dear customer, yes." in send["prompt"]
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    check = next(s for s in run["steps"] if s["id"] == "check")
    assert check["status"] == "COMPLETED" and check["output"] == "Dear customer, yes."


def test_a_start_and_a_cancel_repeated_with_an_idempotency_key_act_once(api, stack, devmodel):
    m = marker("idem")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "ok"}, "latency_ms": 5000})
    token = stack.token("alice")
    body = {"workflow": workflow("e2e-idempotent", [{"id": "a", "type": "llm", "prompt": m + " go"}]), "input": {}}
    key = {"Idempotency-Key": m}
    first = api("POST", "/runs", token=token, body=body, headers=key)
    again = api("POST", "/runs", token=token, body=body, headers=key)
    assert first[0] == again[0] == 202 and first[2] == again[2], (first, again)
    assert again[1].get("Idempotent-Replayed") == "true"
    other = dict(body, input={"x": 1})
    status, _, problem = api("POST", "/runs", token=token, body=other, headers=key)
    assert status == 422, problem
    run_id = first[2]["run_id"]
    cancel = {"Idempotency-Key": m + "-cancel"}
    c1 = api("POST", f"/runs/{run_id}/cancel", token=token, headers=cancel)
    c2 = api("POST", f"/runs/{run_id}/cancel", token=token, headers=cancel)
    assert c1[0] == c2[0] == 202 and c1[2] == c2[2]
    events = follow(api, token, run_id, timeout=30, limit=100)
    assert events[-1]["type"] == "RUN_CANCELLED"
    assert len(calls_with(devmodel, m)) <= 1, "one run, at most its one call"


def test_a_review_deadline_fires_while_nobody_polls_and_a_late_decision_is_told_what_it_did(api, stack, devmodel):
    m = marker("deadline")
    add_rules(devmodel,
              {"name": m + "-d", "match": {"prompt_contains": m + " DRAFT"}, "reply": {"text": "draft"}},
              {"name": m + "-s", "match": {"prompt_contains": m + " SEND"}, "reply": {"text": "sent"}})
    alice = stack.token("alice")
    wf = workflow("e2e-deadline", [
        {"id": "draft", "type": "llm", "prompt": m + " DRAFT"},
        {"id": "check", "type": "review", "show": "{{ steps.draft.text }}", "timeout": "1m", "on_timeout": "approve"},
        {"id": "send", "type": "llm", "prompt": m + " SEND {{ steps.check.text }}"},
    ])
    run_id = start(api, alice, wf)["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    deadline = run["waiting"]["deadline"]
    # The runner set a one-time schedule at the deadline (EventBridge Scheduler, on moto).
    import boto3
    scheduler = boto3.client("scheduler", endpoint_url=stack.env.get("AWS_ENDPOINT_URL_SCHEDULER") or stack.dynamodb_url,
                             region_name=stack.region, aws_access_key_id="t", aws_secret_access_key="t")
    names = [x["Name"] for x in scheduler.list_schedules(GroupName="chainrun-deadlines-local")["Schedules"]]
    assert any(n.startswith(f"run-{run_id}-") for n in names), names
    # Nobody polls: the deadline's one-time schedule (or the sweeper) hands the run on.
    time.sleep(68)
    assert len(calls_with(devmodel, m + " SEND")) == 1, "the deadline approved the review and send ran"
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    assert run["status"] == "COMPLETED", run
    check = next(s for s in run["steps"] if s["id"] == "check")
    assert check["status"] == "COMPLETED"
    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "check", "decision": "reject"})
    assert status == 409 and "already decided: Approve by deadline" in problem["detail"], problem
    assert deadline


def test_a_decision_racing_a_cancel_ends_the_run_once_and_consistently(api, stack, devmodel):
    import threading

    m = marker("race")
    add_rules(devmodel,
              {"name": m + "-d", "match": {"prompt_contains": m + " DRAFT"}, "reply": {"text": "draft"}},
              {"name": m + "-s", "match": {"prompt_contains": m + " SEND"}, "reply": {"text": "sent"}})
    alice = stack.token("alice")
    wf = workflow("e2e-race", [
        {"id": "draft", "type": "llm", "prompt": m + " DRAFT"},
        {"id": "check", "type": "review", "show": "{{ steps.draft.text }}"},
        {"id": "send", "type": "llm", "prompt": m + " SEND {{ steps.check.text }}"},
    ])
    run_id = start(api, alice, wf)["run_id"]
    wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    answers = {}
    barrier = threading.Barrier(2)

    def call(name, path, body):
        barrier.wait()
        answers[name] = api("POST", path, token=alice, body=body)

    threads = [threading.Thread(target=call, args=("decide", f"/runs/{run_id}/resume", {"step": "check", "decision": "approve"})),
               threading.Thread(target=call, args=("cancel", f"/runs/{run_id}/cancel", {"reason": "changed my mind"}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers["cancel"][0] in (202, 409), answers
    assert answers["decide"][0] in (202, 409), answers
    events = follow(api, alice, run_id, timeout=30, limit=100)
    ends = [e["type"] for e in events if e["type"] in ("RUN_COMPLETED", "RUN_FAILED", "RUN_CANCELLED")]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "gap-free and duplicate-free"
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    sent = calls_with(devmodel, m + " SEND")
    # One end, and what happened agrees with it: cancelled before send ran (nothing sent),
    # or the decision's runner finished first (sent once; the cancel came too late).
    if ends == ["RUN_CANCELLED"]:
        assert run["status"] == "CANCELLED" and sent == [] and answers["cancel"][0] == 202
    else:
        assert ends == ["RUN_COMPLETED"] and run["status"] == "COMPLETED" and len(sent) == 1, (ends, answers)
        assert answers["decide"][0] == 202
