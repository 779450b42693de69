"""End-to-end: a run's cost budget stops an expensive call before it is made.

The expensive step fits the budget on its own (validation accepts it), but once the
cheap step's long reply is part of its prompt, its worst case (estimated input plus
max_tokens of output, at the inference profile's price) no longer fits what is left.
The runner must refuse it without calling the model: the dev model server's call log is
the witness. The same holds for a caller's daily spend cap, across runs.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from test_runs import add_rules, calls_with, follow, marker, start

CHEAP = "amazon.nova-micro-v1:0"
EXPENSIVE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def test_a_budget_stops_the_expensive_step_before_its_call(api, stack, devmodel):
    m = marker("budget")
    long_reply = "finding " * 500  # 4,000 bytes the expensive prompt will carry
    add_rules(devmodel,
              {"name": m + "-cheap", "match": {"prompt_contains": m + " cheap"}, "reply": {"text": long_reply},
               "usage": {"input_tokens": 40, "output_tokens": 900}},
              {"name": m + "-expensive", "match": {"prompt_contains": m + " expensive"}, "reply": {"text": "verdict"}})
    token = stack.token("alice")
    wf = {
        "name": "e2e-budget",
        "budget": {"max_cost_usd": "0.02"},
        "defaults": {"retry": {"max_attempts": 2, "initial_backoff_ms": 50}},
        "steps": [
            {"id": "cheap", "type": "llm", "model": CHEAP, "max_tokens": 1000, "prompt": m + " cheap {{ input.doc }}"},
            {"id": "expensive", "type": "llm", "model": EXPENSIVE, "max_tokens": 1000,
             "prompt": m + " expensive review of {{ steps.cheap.text }}"},
        ],
    }
    run_id = start(api, token, wf, {"doc": "a short document"})["run_id"]
    events = follow(api, token, run_id)

    assert len(calls_with(devmodel, m + " cheap")) == 1
    assert calls_with(devmodel, m + " expensive") == [], "the refused call never reached the model"
    failed = [e for e in events if e["type"] == "STEP_FAILED"]
    assert [e["step_id"] for e in failed] == ["expensive"]
    error = failed[0]["data"]["error"]
    assert error["code"] == "BUDGET_EXCEEDED" and error["retryable"] is False
    budget = failed[0]["data"]["detail"]["budget"]
    assert budget["limit"] == "max_cost_usd" and budget["max_cost_usd"] == "0.02"
    spent = Decimal(budget["spent"]["cost_usd"])
    attempted = Decimal(budget["attempted"]["cost_usd"])
    assert spent > 0 and attempted > 0
    assert spent + attempted > Decimal("0.02"), "refused only because it would not fit"
    assert not [e for e in events if e["type"] == "STEP_RETRYING"], "a budget refusal is not retried"
    assert events[-1]["type"] == "RUN_FAILED"

    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["cheap"]["status"] == "COMPLETED" and steps["expensive"]["status"] == "FAILED"
    assert steps["expensive"]["attempts"] == 0 and int(steps["expensive"]["cost_pico_usd"]) == 0
    # The run was charged exactly the cheap call, well inside the cap.
    assert run["totals"]["cost_pico_usd"] == steps["cheap"]["cost_pico_usd"]
    assert Decimal(run["totals"]["cost_usd"]) == spent <= Decimal("0.02")


def test_an_estimate_brackets_the_run_it_estimated_and_then_learns_from_it(api, stack, devmodel):
    m = marker("estimate")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha " * 20},
               "usage": {"input_tokens": 30, "output_tokens": 120}},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "beta"},
               "usage": {"input_tokens": 90, "output_tokens": 10}})
    token = stack.token(m)  # a user of its own: other tests check their users' feeds stay empty
    wf = {
        "name": "e2e-estimate-" + m,
        "defaults": {"model": CHEAP, "max_tokens": 200, "retry": {"max_attempts": 2, "initial_backoff_ms": 50}},
        "steps": [
            {"id": "a", "type": "llm", "prompt": m + " A {{ input.doc }}"},
            {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
        ],
    }
    body = {"workflow": wf, "input": {"doc": "short"}}
    status, _, before = api("POST", "/workflows/estimate", token=token, body=body)
    assert status == 200, before
    assert before["basis"] == "heuristic" and [s["step_id"] for s in before["steps"]] == ["a", "b"]
    total = before["total"]
    assert calls_with(devmodel, m) == [], "an estimate calls no model"

    run_id = start(api, token, wf, {"doc": "short"})["run_id"]
    assert follow(api, token, run_id)[-1]["type"] == "RUN_COMPLETED"
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    actual = run["totals"]["cost_pico_usd"]
    assert total["min"]["cost_pico_usd"] <= actual <= total["max"]["cost_pico_usd"], (total, actual)
    assert total["min"]["tokens"] <= run["totals"]["total_tokens"] <= total["max"]["tokens"]

    # The runner rolls a run up just after its last event (README: Analytics); poll briefly.
    for _ in range(50):
        _, _, after = api("POST", "/workflows/estimate", token=token, body=body)
        if after["basis"] == "history":
            break
        time.sleep(0.1)
    assert after["basis"] == "history" and after["history_runs"] == 1, after
    assert after["total"]["expected"]["cost_pico_usd"] == actual


def test_a_callers_daily_cap_spans_runs_and_stops_the_call_that_would_break_it(api, stack, devmodel):
    caps = json.loads(stack.function_env.get("CHAINRUN_OWNER_DAILY_CAPS") or "{}")
    if not caps:
        pytest.skip("this stack was started without the e2e daily cap (CHAINRUN_E2E_STACK_ENV)")
    [(capped_user, cap_usd)] = caps.items()  # set by conftest.py
    m = marker("daily")
    prompt = (m + " daily check").ljust(40, ".")  # 40 bytes, as the cap in conftest.py assumes
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "ok"},
                         "usage": {"input_tokens": 50, "output_tokens": 100}})
    token = stack.token(capped_user)
    wf = {"name": "e2e-daily-" + m, "defaults": {"model": CHEAP, "max_tokens": 100, "retry": {"max_attempts": 1}},
          "steps": [{"id": "check", "type": "llm", "prompt": prompt}]}

    first = start(api, token, wf, {})["run_id"]
    assert follow(api, token, first)[-1]["type"] == "RUN_COMPLETED"
    # Another run, no run budget at all: the caller's day has no room for its worst case.
    second = start(api, token, wf, {})["run_id"]
    events = follow(api, token, second)
    assert len(calls_with(devmodel, m)) == 1, "the second run's call never reached the model"
    failed = [e for e in events if e["type"] == "STEP_FAILED"]
    assert [e["step_id"] for e in failed] == ["check"] and events[-1]["type"] == "RUN_FAILED"
    assert failed[0]["data"]["error"]["code"] == "BUDGET_EXCEEDED"
    budget = failed[0]["data"]["detail"]["budget"]
    assert budget["limit"] == "owner_daily_cost_usd" and budget["owner"] == capped_user
    assert Decimal(budget["owner_daily_cost_usd"]) == Decimal(cap_usd)
    _, _, run = api("GET", f"/runs/{first}", token=token)
    assert budget["committed_today_pico_usd"] == run["totals"]["cost_pico_usd"] == 15_750_000
    assert budget["attempted"]["cost_pico_usd"] == 18_760_000

    # The caller can see where their day stands.
    status, _, spend = api("GET", "/analytics/spend", token=token)
    assert status == 200, spend
    assert (spend["owner"], spend["cap_usd"]) == (capped_user, cap_usd)
    assert (spend["charged_pico_usd"], spend["held_pico_usd"]) == (15_750_000, 0)
    assert spend["remaining_pico_usd"] == 34_509_999 - 15_750_000
