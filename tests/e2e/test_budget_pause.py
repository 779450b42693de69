"""End-to-end: `budget.on_exceeded: "pause"` on the local stack.

A call the run's budget refuses does not fail its step: the run waits (AWAITING_INPUT,
`waiting.kind: "budget"`, the refusal's numbers as its reason) holding no runner, and a
resume that raises the budget continues it where it stopped. The dev model server's call
log is the witness that nothing settled is called (and paid for) again.

Prompts are padded to known lengths and every reply's usage is scripted, so the worst
cases the runner reserves, and the refusal's numbers, are known to the pico-dollar:
Nova Micro charges 35,000 pico-dollars per input token and 140,000 per output token, and
a call's worst case is (64 + 32 + prompt bytes) input tokens plus max_tokens of output
(shared/src/budget.rs: estimate_input_tokens, worst_case).
"""

from __future__ import annotations

from decimal import Decimal


from test_control import wait_for_status
from test_runs import MODEL, add_rules, calls_with, follow, marker, start

IN_PICO, OUT_PICO = 35_000, 140_000
MAX_TOKENS = 100
# Step a's reply, which b's prompt carries: no whitespace, so nothing trims it.
A_TEXT = "alpha-" * 50


def worst_case(prompt: str) -> tuple[int, int]:
    """(tokens, pico-dollars) the runner reserves for one call with this prompt."""
    tokens_in = 64 + 32 + len(prompt.encode())
    return tokens_in + MAX_TOKENS, tokens_in * IN_PICO + MAX_TOKENS * OUT_PICO


def charged(usage: dict) -> int:
    return usage["input_tokens"] * IN_PICO + usage["output_tokens"] * OUT_PICO


def usd(pico: int) -> str:
    """Dollars as the engine prints them: exact, trailing zeros trimmed."""
    return format((Decimal(pico) / Decimal(10) ** 12).normalize(), "f")


def resume(api, token, run_id, budget=None):
    return api("POST", f"/runs/{run_id}/resume", token=token, body=None if budget is None else {"budget": budget})


def test_a_refused_call_pauses_the_run_and_a_raise_by_its_starter_continues_it_without_paying_twice(api, stack, devmodel):
    m = marker("budget-pause")
    a_prompt = (m + " A").ljust(40, ".")
    b_prompt = f"{m} B {A_TEXT}"
    a_usage = {"input_tokens": 50, "output_tokens": 100}
    # b spends all it reserved: the run ends above the first budget, within the raised one.
    b_tokens, b_worst = worst_case(b_prompt)
    b_usage = {"input_tokens": b_tokens - MAX_TOKENS, "output_tokens": MAX_TOKENS}
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": A_TEXT}, "usage": a_usage},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "verdict"}, "usage": b_usage})
    a_cost = charged(a_usage)
    limit = 40_000_000
    assert worst_case(a_prompt)[1] <= limit < a_cost + b_worst, "a fits the budget, b after a does not"
    raised = 100_000_000
    assert a_cost + charged(b_usage) > limit and a_cost + b_worst <= raised

    alice = stack.token("alice")
    wf = {
        "name": "e2e-budget-pause",
        "defaults": {"model": MODEL, "max_tokens": MAX_TOKENS, "retry": {"max_attempts": 2, "initial_backoff_ms": 50}},
        "budget": {"max_cost_usd": usd(limit), "on_exceeded": "pause"},
        "steps": [
            {"id": "a", "type": "llm", "prompt": a_prompt},
            {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
        ],
        "output": "{{ steps.b.text }}",
    }
    run_id = start(api, alice, wf)["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")

    # The run waits for its budget, saying which limit, what was spent and what was attempted.
    waiting = run["waiting"]
    assert waiting["kind"] == "budget", run
    reason = waiting["reason"]
    assert f"max_cost_usd ${usd(limit)}" in reason, reason
    assert f"${usd(b_worst)} / {b_tokens} tokens" in reason, f"attempted, exactly: {reason}"
    assert f"${usd(a_cost)} / 150 tokens already spent" in reason, f"spent, exactly: {reason}"
    assert calls_with(devmodel, m + " B") == [], "the refused call never reached the model"
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["a"]["status"] == "COMPLETED" and steps["a"]["text"] == A_TEXT, "a's result is kept"
    assert steps["a"]["cost_pico_usd"] == a_cost
    assert steps["b"]["status"] == "WAITING" and steps["b"]["cost_pico_usd"] == 0, steps["b"]
    assert run["totals"]["cost_pico_usd"] == a_cost and run["output"] is None
    _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=alice)
    events = page["events"]
    asked = events[-1]
    assert asked["type"] == "AWAITING_INPUT" and asked.get("step_id") is None, asked
    assert asked["data"]["kind"] == "budget" and asked["data"]["reason"] == reason
    assert (asked["data"]["settled_steps"], asked["data"]["step_count"]) == (1, 2)
    assert not [e for e in events if e["type"] in ("STEP_FAILED", "RUN_FAILED")], [e["type"] for e in events]

    # The starter's progress feed shows it waiting, and why.
    _, _, feed = api("GET", "/progress", token=alice)
    row = next(r for r in feed["items"] if r["run_id"] == run_id)
    assert row["status"] == "AWAITING_INPUT" and row["waiting"]["kind"] == "budget", row
    assert row["waiting"]["reason"] == reason and row["last_seq"] == asked["seq"]

    # Refusals leave it waiting: no budget (409 naming it), a lower or an added limit
    # (400), someone who may not see the run (404), a review decision (400).
    status, _, problem = resume(api, alice, run_id)
    assert status == 409 and "waits for a larger budget" in problem["detail"] and "`budget`" in problem["detail"], problem
    assert reason in problem["detail"], "the 409 says what the run waits for"
    for lower in ({"max_cost_usd": usd(limit - 1)}, {"max_cost_usd": usd(raised), "max_total_tokens": 10_000}):
        status, _, problem = resume(api, alice, run_id, lower)
        assert status == 400 and "only raise" in problem["detail"], (lower, problem)
    status, _, problem = resume(api, stack.token("mallory"), run_id, {"max_cost_usd": usd(raised)})
    assert status == 404, problem
    status, _, problem = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "b", "decision": "approve"})
    assert status == 404, f"b is no review to decide: {problem}"
    run = api("GET", f"/runs/{run_id}", token=alice)[2]
    assert run["status"] == "AWAITING_INPUT" and "budget_raises" not in run, run

    # The starter raises it: the run continues with b, and a is not called again.
    status, _, resumed = resume(api, alice, run_id, {"max_cost_usd": usd(raised)})
    assert status == 202, resumed
    raise_ = resumed["resumed"]["budget"]
    assert raise_["by"] == "alice"
    assert raise_["from"] == {"max_cost_pico_usd": limit} and raise_["to"] == {"max_cost_pico_usd": raised}, raise_
    status, _, problem = resume(api, alice, run_id, {"max_cost_usd": "1"})
    assert status == 409, f"a second raise once it runs again is refused: {problem}"
    events = follow(api, alice, run_id, timeout=60, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED" and events[-1]["data"]["output"] == "verdict", events[-1]
    assert len(calls_with(devmodel, m + " A")) == 1, "a settled before the pause: not called (nor paid) again"
    assert len(calls_with(devmodel, m + " B")) == 1
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "gap-free and duplicate-free"
    after = [e for e in events if e["seq"] > asked["seq"]]
    assert after[0]["type"] == "RUN_RESUMED", [e["type"] for e in after]
    assert after[0]["data"]["cause"] == "resume" and after[0]["data"]["by"] == "alice"
    assert after[0]["data"]["settled_steps"] == 1
    assert {e.get("step_id") for e in after if e.get("step_id")} == {"b"}, "only b ran after the resume"

    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    assert run["status"] == "COMPLETED" and "waiting" not in run, run
    (recorded,) = run["budget_raises"]
    assert recorded == raise_, "the raise is on the run: who, when, from, to"
    assert run["resumed"]["by"] == "alice" and run["resumed"]["budget"] == raise_
    steps = {s["id"]: s for s in run["steps"]}
    assert [s["status"] for s in run["steps"]] == ["COMPLETED", "COMPLETED"]
    assert steps["b"]["cost_pico_usd"] == charged(b_usage) and steps["b"]["attempts"] == 1
    totals = run["totals"]
    assert totals["cost_pico_usd"] == sum(s["cost_pico_usd"] for s in run["steps"]) == a_cost + charged(b_usage)
    assert totals["model_calls"] == 2 and "reserved_lost" not in totals
    assert limit < totals["cost_pico_usd"] <= raised, "past the first budget, never past the raised one"
    assert Decimal(totals["cost_usd"]) == Decimal(totals["cost_pico_usd"]) / Decimal(10) ** 12


def test_a_map_paused_by_its_budget_keeps_the_items_it_paid_for_and_runs_only_the_rest(api, stack, devmodel):
    m = marker("budget-map")
    usage = {"input_tokens": 50, "output_tokens": 100}  # 150 tokens per item
    items = ["w", "x", "y", "z"]
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "done"}, "usage": usage})
    # Items one at a time: 0 and 1 fit 500 tokens, 2's worst case after them does not.
    per_item, _ = worst_case(f"{m} item 0: w")
    assert 150 + per_item <= 500 < 300 + per_item
    alice = stack.token("alice")
    wf = {
        "name": "e2e-budget-map",
        "defaults": {"model": MODEL, "max_tokens": MAX_TOKENS, "retry": {"max_attempts": 2, "initial_backoff_ms": 50}},
        "budget": {"max_total_tokens": 500, "on_exceeded": "pause"},
        "steps": [
            {"id": "each", "type": "map", "over": "input.items", "max_concurrency": 1,
             "step": {"type": "llm", "prompt": m + " item {{ index }}: {{ item }}"}},
        ],
        "output": "{{ steps.each.output | join(',') }}",
    }
    run_id = start(api, alice, wf, {"items": items})["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert run["waiting"]["kind"] == "budget" and "max_total_tokens 500" in run["waiting"]["reason"], run
    assert "300 tokens already spent" in run["waiting"]["reason"], run["waiting"]
    assert [c["prompt"] for c in calls_with(devmodel, m)] == [f"{m} item 0: w", f"{m} item 1: x"]
    assert run["steps"][0]["status"] not in ("COMPLETED", "FAILED"), run["steps"][0]

    status, _, resumed = resume(api, alice, run_id, {"max_total_tokens": 1000})
    assert status == 202, resumed
    assert resumed["resumed"]["budget"]["from"] == {"max_total_tokens": 500}
    assert resumed["resumed"]["budget"]["to"] == {"max_total_tokens": 1000}
    events = follow(api, alice, run_id, timeout=60, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED", [e["type"] for e in events]
    assert events[-1]["data"]["output"] == "done,done,done,done"
    prompts = [c["prompt"] for c in calls_with(devmodel, m)]
    assert sorted(prompts) == [f"{m} item {i}: {x}" for i, x in enumerate(items)], "each item paid exactly once"
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    totals = run["totals"]
    assert (totals["total_tokens"], totals["model_calls"]) == (600, 4)
    assert totals["cost_pico_usd"] == run["steps"][0]["cost_pico_usd"] == 4 * charged(usage)
    assert 500 < totals["total_tokens"] <= 1000
    assert [r["to"] for r in run["budget_raises"]] == [{"max_total_tokens": 1000}]


def chain_of_150_token_calls(devmodel, m: str, name: str, steps: int) -> dict:
    """`steps` model steps in a chain, each call charged 150 tokens, under a pausing 400-token budget."""
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "x" * 100},
                         "usage": {"input_tokens": 50, "output_tokens": 100}})
    ids = "abcdefgh"[:steps]
    chain = [{"id": ids[0], "type": "llm", "prompt": m + " A"}]
    chain += [{"id": ids[i], "type": "llm", "prompt": f"{m} {ids[i].upper()} {{{{ steps.{ids[i - 1]}.text }}}}"} for i in range(1, steps)]
    return {
        "name": name,
        "defaults": {"model": MODEL, "max_tokens": MAX_TOKENS, "retry": {"max_attempts": 1}},
        "budget": {"max_total_tokens": 400, "on_exceeded": "pause"},
        "steps": chain,
    }


def test_a_run_waiting_for_its_budget_can_be_cancelled_and_its_refused_step_never_runs(api, stack, devmodel):
    m = marker("budget-cancel")
    alice = stack.token("alice")
    wf = chain_of_150_token_calls(devmodel, m, "e2e-budget-cancel", 2)
    run_id = start(api, alice, wf)["run_id"]
    assert wait_for_status(api, alice, run_id, "AWAITING_INPUT")["waiting"]["kind"] == "budget"
    status, _, asked = api("POST", f"/runs/{run_id}/cancel", token=alice, body={"reason": "too dear"})
    assert status == 202, asked
    events = follow(api, alice, run_id, timeout=30, limit=100)
    assert events[-1]["type"] == "RUN_CANCELLED" and events[-1]["data"]["by"] == "alice", events[-1]
    assert [e["step_id"] for e in events if e["type"] == "STEP_CANCELLED"] == ["b"]
    assert stack.wait_quiescent(30)
    assert len(calls_with(devmodel, m)) == 1, "only a was ever called"
    run = api("GET", f"/runs/{run_id}", token=alice)[2]
    assert run["status"] == "CANCELLED" and [s["status"] for s in run["steps"]] == ["COMPLETED", "CANCELLED"], run
    assert run["totals"]["cost_pico_usd"] == run["steps"][0]["cost_pico_usd"] == charged({"input_tokens": 50, "output_tokens": 100})
    status, _, problem = resume(api, alice, run_id, {"max_total_tokens": 1000})
    assert status == 409, f"an ended run takes no raise: {problem}"


def test_a_step_refused_on_a_retry_keeps_what_its_first_attempt_was_charged_and_reruns_from_its_first_attempt(api, stack, devmodel):
    m = marker("budget-retry")
    hint = "previous reply could not be used"  # what the runner adds to a retry's prompt (limits::corrective_hint)
    a_usage = {"input_tokens": 50, "output_tokens": 100}
    bad_usage = {"input_tokens": 60, "output_tokens": 40}
    good_usage = {"input_tokens": 80, "output_tokens": 10}
    add_rules(devmodel,
              {"name": m + "-b-good", "match": {"prompt_contains": m + " B", "prompt_regex": hint},
               "reply": {"text": '{"ok": true}'}, "usage": good_usage},
              {"name": m + "-b-bad", "match": {"prompt_contains": m + " B"}, "reply": {"text": "not json"}, "usage": bad_usage},
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha"}, "usage": a_usage})
    # a, then b's first attempt fit 450 tokens; b's retry, its prompt grown by the hint, does not.
    b_tokens, _ = worst_case(f"{m} B alpha")
    assert worst_case(m + " A")[0] <= 450 and 150 + b_tokens <= 450 < 250 + b_tokens + len(hint)
    alice = stack.token("alice")
    wf = {
        "name": "e2e-budget-retry",
        "defaults": {"model": MODEL, "max_tokens": MAX_TOKENS, "retry": {"max_attempts": 2, "initial_backoff_ms": 50}},
        "budget": {"max_total_tokens": 450, "on_exceeded": "pause"},
        "steps": [
            {"id": "a", "type": "llm", "prompt": m + " A"},
            {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}", "output": {"format": "json"}},
        ],
        "output": "{{ steps.b.text }}",
    }
    run_id = start(api, alice, wf)["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert run["waiting"]["kind"] == "budget" and "250 tokens already spent" in run["waiting"]["reason"], run["waiting"]
    assert len(calls_with(devmodel, m + " B")) == 1, "b's first attempt was made, its retry refused"
    b = next(s for s in run["steps"] if s["id"] == "b")
    assert b["status"] == "WAITING" and b["cost_pico_usd"] == charged(bad_usage), "b keeps what it was charged"
    _, _, feed = api("GET", "/progress", token=alice)
    row = next(r for r in feed["items"] if r["run_id"] == run_id)
    assert row["totals"]["total_tokens"] == 250 and row["totals"]["cost_pico_usd"] == charged(a_usage) + charged(bad_usage)

    status, _, resumed = resume(api, alice, run_id, {"max_total_tokens": 2000})
    assert status == 202, resumed
    events = follow(api, alice, run_id, timeout=60, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED" and events[-1]["data"]["output"] == '{"ok": true}', events[-1]
    calls = calls_with(devmodel, m + " B")
    # From its first attempt again (no hint), then the retry: four b calls would be a bug.
    assert [hint in c["prompt"] for c in calls] == [False, False, True], [c["prompt"][-60:] for c in calls]
    assert len(calls_with(devmodel, m + " A")) == 1
    _, _, run = api("GET", f"/runs/{run_id}", token=alice)
    b = next(s for s in run["steps"] if s["id"] == "b")
    assert b["status"] == "COMPLETED" and b["output"] == {"ok": True}
    every_call = charged(a_usage) + 2 * charged(bad_usage) + charged(good_usage)
    assert b["cost_pico_usd"] == 2 * charged(bad_usage) + charged(good_usage), "the attempt before the pause is on b"
    totals = run["totals"]
    assert totals["cost_pico_usd"] == sum(s["cost_pico_usd"] for s in run["steps"]) == every_call
    assert totals["total_tokens"] == 150 + 2 * 100 + 90 <= 2000 and totals["model_calls"] == 4


def test_a_resume_may_lift_a_limit_and_the_run_then_runs_without_it(api, stack, devmodel):
    m = marker("budget-lift")
    alice = stack.token("alice")
    wf = chain_of_150_token_calls(devmodel, m, "e2e-budget-lift", 3)
    run_id = start(api, alice, wf)["run_id"]
    assert wait_for_status(api, alice, run_id, "AWAITING_INPUT")["waiting"]["kind"] == "budget"
    # An empty raise names nothing to raise; null lifts a limit.
    status, _, problem = resume(api, alice, run_id, {})
    assert status == 400 and "name the limits to raise" in problem["detail"], problem
    status, _, resumed = resume(api, alice, run_id, {"max_total_tokens": None})
    assert status == 202, resumed
    assert resumed["resumed"]["budget"]["from"] == {"max_total_tokens": 400} and resumed["resumed"]["budget"]["to"] == {}
    events = follow(api, alice, run_id, timeout=60, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED", [e["type"] for e in events]
    assert len(calls_with(devmodel, m)) == 3, "b and c ran without a limit, a was not called again"
    run = api("GET", f"/runs/{run_id}", token=alice)[2]
    assert run["totals"]["total_tokens"] == 450 > 400 and [r["to"] for r in run["budget_raises"]] == [{}]


def test_a_run_waiting_for_its_budget_shows_in_its_view_everything_it_was_charged(api, stack, devmodel):
    m = marker("budget-view")
    usage = {"input_tokens": 50, "output_tokens": 100}
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "done"}, "usage": usage})
    alice = stack.token("alice")
    wf = {
        "name": "e2e-budget-view",
        "defaults": {"model": MODEL, "max_tokens": MAX_TOKENS, "retry": {"max_attempts": 1}},
        "budget": {"max_total_tokens": 500, "on_exceeded": "pause"},
        "steps": [{"id": "each", "type": "map", "over": "input.items", "max_concurrency": 1,
                   "step": {"type": "llm", "prompt": m + " item {{ index }}: {{ item }}"}}],
    }
    run_id = start(api, alice, wf, {"items": ["w", "x", "y"]})["run_id"]
    run = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert len(calls_with(devmodel, m)) == 2 and "300 tokens already spent" in run["waiting"]["reason"]
    _, _, feed = api("GET", "/progress", token=alice)
    row = next(r for r in feed["items"] if r["run_id"] == run_id)
    assert (row["totals"]["total_tokens"], row["totals"]["cost_pico_usd"]) == (300, 2 * charged(usage))
    # What a person deciding on a raise reads: what the run spent so far.
    assert (run["totals"]["total_tokens"], run["totals"]["cost_pico_usd"]) == (300, 2 * charged(usage)), run["totals"]
