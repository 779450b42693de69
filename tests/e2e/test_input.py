"""End-to-end: an `input` step collecting values over several answers, on the local stack."""

from __future__ import annotations

import time

from test_control import wait_for, wait_for_status
from test_runs import MODEL, add_rules, calls_with, follow, marker, start, workflow


def account_step(m: str, **extra) -> dict:
    return {"id": "account", "type": "input", "ask": "Which account should " + m + " open?",
            "fields": {"type": "object",
                       "properties": {"account_id": {"type": "string", "pattern": "^AC-[0-9]{6}$"},
                                      "plan": {"enum": ["free", "pro"]}},
                       "required": ["account_id", "plan"]},
            "extract": {"model": MODEL, "max_tokens": 100}, **extra}


def asked_events(api, token, run_id):
    _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=token)
    return [e for e in page["events"] if e["type"] == "AWAITING_INPUT" and e.get("step_id") == "account"]


def test_an_input_step_collects_its_values_over_three_answers_and_a_downstream_step_reads_them(api, stack, devmodel):
    m = marker("input")
    # The extraction prompt quotes the answer, so a rule keyed on the answer's wording
    # plays the model reading it.
    add_rules(devmodel,
              {"name": m + "-x", "match": {"prompt_contains": m + " we are on the pro plan"}, "reply": {"json": {"plan": "pro"}},
               "usage": {"input_tokens": 300, "output_tokens": 12}},
              {"name": m + "-o", "match": {"prompt_contains": m + " OPEN"}, "reply": {"text": "opened"}})
    alice = stack.token("alice")
    wf = workflow("e2e-input", [
        account_step(m),
        {"id": "open", "type": "llm", "prompt": m + " OPEN {{ steps.account.output.account_id }} on {{ steps.account.output.plan }}"},
    ], output="{{ steps.open.text }}")
    run_id = start(api, alice, wf)["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert run["waiting"]["kind"] == "input" and run["waiting"]["steps"] == ["account"], run["waiting"]
    (asked,) = asked_events(api, alice, run_id)
    assert asked["data"]["show"] == f"Which account should {m} open?"
    assert asked["data"]["missing"] == ["account_id", "plan"] and asked["data"]["attempts_left"] == 3
    _, _, feed = api("GET", "/progress", token=alice)
    row = next(r for r in feed["items"] if r["run_id"] == run_id)
    assert row["waiting"]["kind"] == "input" and row["waiting"]["steps"] == ["account"], row
    status, _, _ = api("POST", f"/runs/{run_id}/resume", token=stack.token("mallory"), body={"step": "account", "values": {"plan": "pro"}})
    assert status == 404

    # 1: free text, read by the extract model (a charged call): plan is kept, account_id still asked for.
    status, _, answered = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "account", "text": m + " we are on the pro plan"})
    assert status == 202 and answered["state"] == "reading", answered
    wait_for("the step to ask again", lambda: len(asked_events(api, alice, run_id)) == 2, timeout=30)
    again = asked_events(api, alice, run_id)[-1]
    assert again["data"]["missing"] == ["account_id"] and again["data"]["attempts_left"] == 2, again["data"]
    wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    _, _, feed = api("GET", "/progress", token=alice)
    row = next(r for r in feed["items"] if r["run_id"] == run_id)
    assert row["totals"]["model_calls"] == 1 and row["totals"]["input_tokens"] == 300, row["totals"]
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    account = next(s for s in run["steps"] if s["id"] == "account")
    assert account["status"] == "WAITING" and account["input_tokens"] == 300, "the charge is on the waiting step"
    assert len(calls_with(devmodel, m + " we are on the pro plan")) == 1

    # 2: an invalid value: 422 naming it; nothing else changes.
    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "account", "values": {"account_id": "AC-12"}})
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["account_id"] and "^AC-[0-9]{6}$" in problem["errors"][0]["message"], problem
    assert problem["attempts_left"] == 1

    # 3: the last value completes it; the run continues and `open` reads both values.
    status, _, answered = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "account", "values": {"account_id": "AC-123456"}})
    assert status == 202 and answered["state"] == "complete", answered
    assert answered["values"] == {"plan": "pro", "account_id": "AC-123456"}
    events = follow(api, alice, run_id, timeout=30, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED" and events[-1]["data"]["output"] == "opened", events[-1]
    (opened,) = calls_with(devmodel, m + " OPEN")
    assert "AC-123456 on pro" in opened["prompt"]
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    account = next(s for s in run["steps"] if s["id"] == "account")
    assert account["status"] == "COMPLETED" and account["output"] == {"plan": "pro", "account_id": "AC-123456"}, account
    assert run["totals"]["model_calls"] == 2, "the extraction and open, each once"
    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "account", "values": {"plan": "free"}})
    assert status == 409, problem


def test_an_input_deadline_fails_the_step_while_nobody_polls_and_a_late_answer_is_told(api, stack, devmodel):
    m = marker("input-deadline")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m + " OPEN"}, "reply": {"text": "opened"}})
    alice = stack.token("alice")
    wf = workflow("e2e-input-deadline", [
        account_step(m, timeout="1m"),
        {"id": "open", "type": "llm", "prompt": m + " OPEN {{ steps.account.output.account_id }}"},
    ])
    run_id = start(api, alice, wf)["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert run["waiting"]["deadline"], run["waiting"]
    status, _, _ = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "account", "values": {"plan": "pro"}})
    assert status == 422
    # Nobody polls: the deadline's one-time schedule (or the sweeper) hands the run on.
    time.sleep(68)
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    assert run["status"] == "FAILED" and run["error"]["code"] == "INPUT_TIMED_OUT", run
    assert "account_id: required" in run["error"]["message"]
    assert calls_with(devmodel, m + " OPEN") == []
    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "account", "values": {"account_id": "AC-123456"}})
    assert status == 409 and "passed its deadline without its values" in problem["detail"], problem
