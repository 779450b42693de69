"""End-to-end: the graph engine (parallel fan-in, routers, `join: any`, schema retries,
maps) through the real API and runner binaries, with the dev model server scripted per
test.

Every test keys its dev model rules on a marker unique to that test (see test_runs.py),
so the tests never depend on each other's state or order.
"""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from pathlib import Path

import pytest

from test_runs import MODEL, add_rules, calls_with, follow, marker, start, workflow

ROOT = Path(__file__).resolve().parents[2]

# Nova Micro's prices as the runner knows them (shared/models.json), in pico-dollars per
# token, so expected costs are computed exactly and independently of the Rust code.
_PRICES = json.loads((ROOT / "shared" / "models.json").read_text())["models"][MODEL]
PICO_PER_INPUT_TOKEN = Decimal(_PRICES["input_per_1k"]) * 10**12 / 1000
PICO_PER_OUTPUT_TOKEN = Decimal(_PRICES["output_per_1k"]) * 10**12 / 1000


def cost_pico(input_tokens: int, output_tokens: int) -> int:
    cost = input_tokens * PICO_PER_INPUT_TOKEN + output_tokens * PICO_PER_OUTPUT_TOKEN
    assert cost == cost.to_integral_value(), "Nova Micro prices are whole pico-dollars per token"
    return int(cost)


def ts(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def kinds(events) -> list[tuple[str, str | None]]:
    return [(e["type"], e.get("step_id")) for e in events]


def assert_gap_free(events):
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"gaps or repeats: {seqs}"


def get_run(api, token, run_id) -> dict:
    status, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert status == 200, run
    return run


def steps_by_id(run) -> dict:
    return {s["id"]: s for s in run["steps"]}


# --------------------------------------------------------------------------------------
# 1. Fan-out / fan-in: three checks in parallel, then a summary that reads all three.
# --------------------------------------------------------------------------------------

VERDICT_SCHEMA = {
    "type": "object",
    "required": ["verdict", "notes"],
    "properties": {"verdict": {"enum": ["pass", "needs_work", "fail"]}, "notes": {"type": "string"}},
}


def test_three_checks_run_in_parallel_then_the_summary_reads_all_three(api, stack, devmodel):
    m = marker("review")
    check_ms, summary_ms = 1000, 200
    verdicts = {"security": "pass", "style": "needs_work", "tests": "fail"}
    usage = {"security": (120, 30), "style": (110, 25), "tests": (100, 20), "summary": (200, 15)}
    add_rules(devmodel, *[
        {"name": f"{m}-{check}", "match": {"prompt_contains": f"{m}/{check}-check"},
         "reply": {"json": {"verdict": verdict, "notes": f"{check} notes"}},
         "usage": {"input_tokens": usage[check][0], "output_tokens": usage[check][1]},
         "latency_ms": check_ms}
        for check, verdict in verdicts.items()
    ], {"name": f"{m}-summary", "match": {"prompt_contains": f"{m}/summary"},
        "reply": {"text": "Fix the style and the failing tests before merging."},
        "usage": {"input_tokens": usage["summary"][0], "output_tokens": usage["summary"][1]},
        "latency_ms": summary_ms})
    token = stack.token("alice")
    checks = [
        {"id": check, "type": "llm",
         "prompt": f"{m}/{check}-check Review this diff for {check}: {{{{ input.diff }}}}",
         "output": {"format": "json", "schema": VERDICT_SCHEMA}}
        for check in verdicts
    ]
    summary = {"id": "summary", "type": "llm",
               "prompt": (f"{m}/summary Summarise the review. "
                          "security={{ steps.security.output.verdict }} ({{ steps.security.output.notes }}); "
                          "style={{ steps.style.output.verdict }} ({{ steps.style.output.notes }}); "
                          "tests={{ steps.tests.output.verdict }} ({{ steps.tests.output.notes }})")}
    wf = workflow("e2e-code-review", checks + [summary],
                  output=("{{ steps.summary.text }} [security={{ steps.security.output.verdict }}, "
                          "style={{ steps.style.output.verdict }}, tests={{ steps.tests.output.verdict }}]"))
    run_id = start(api, token, wf, {"diff": "+ password = 'hunter2'"})["run_id"]
    events = follow(api, token, run_id)

    assert_gap_free(events)
    assert events[0]["type"] == "RUN_STARTED" and events[-1]["type"] == "RUN_COMPLETED", kinds(events)
    k = kinds(events)
    started = {c: k.index(("STEP_STARTED", c)) for c in verdicts}
    completed = {c: k.index(("STEP_COMPLETED", c)) for c in verdicts}
    # Concurrency: every check had started before the first of them completed.
    assert max(started.values()) < min(completed.values()), k
    # Fan-in: the summary started only once all three had completed.
    assert k.index(("STEP_STARTED", "summary")) > max(completed.values()), k
    assert k.index(("STEP_COMPLETED", "summary")) < len(k) - 1

    # The summary's prompt, as the model received it, carries all three verdicts.
    [summary_call] = calls_with(devmodel, f"{m}/summary")
    assert ("security=pass (security notes); style=needs_work (style notes); "
            "tests=fail (tests notes)") in summary_call["prompt"], summary_call["prompt"]
    for check in verdicts:
        [call] = calls_with(devmodel, f"{m}/{check}-check")
        assert "password = 'hunter2'" in call["prompt"]
        assert call["model"] == MODEL

    run = get_run(api, token, run_id)
    assert run["status"] == "COMPLETED"
    assert run["output"] == ("Fix the style and the failing tests before merging. "
                             "[security=pass, style=needs_work, tests=fail]")
    assert events[-1]["data"]["output"] == run["output"]
    steps = steps_by_id(run)
    assert set(steps) == {"security", "style", "tests", "summary"}
    for check, verdict in verdicts.items():
        assert steps[check]["output"] == {"verdict": verdict, "notes": f"{check} notes"}
    for sid, (tin, tout) in usage.items():
        s = steps[sid]
        assert s["status"] == "COMPLETED" and s["attempts"] == 1, s
        assert (s["input_tokens"], s["output_tokens"]) == (tin, tout), s
        assert s["cost_pico_usd"] == cost_pico(tin, tout), s
        assert Decimal(s["cost_usd"]) * 10**12 == s["cost_pico_usd"], s
        assert s["model"] == MODEL
    assert all(steps[c]["latency_ms"] >= check_ms - 50 for c in verdicts)
    totals = run["totals"]
    assert totals["model_calls"] == 4
    assert totals["input_tokens"] == sum(t for t, _ in usage.values())
    assert totals["output_tokens"] == sum(t for _, t in usage.values())
    assert totals["cost_pico_usd"] == sum(cost_pico(*u) for u in usage.values())
    # The STEP_COMPLETED events report the same per-step numbers.
    for e in events:
        if e["type"] == "STEP_COMPLETED":
            s = steps[e["step_id"]]
            assert (e["data"]["input_tokens"], e["data"]["cost_pico_usd"]) == (s["input_tokens"], s["cost_pico_usd"])

    # In parallel, not one after another: every check was running while each other one was
    # (their recorded intervals overlap pairwise). Order, not a wall-clock bound: a loaded
    # machine slows a run down but cannot make this pass for sequential checks.
    spans = {c: (ts(steps[c]["started_at"]), ts(steps[c]["finished_at"])) for c in verdicts}
    for a in verdicts:
        for b in verdicts:
            assert spans[a][0] < spans[b][1], f"{a} started after {b} finished: {spans}"


# --------------------------------------------------------------------------------------
# 2. Router: only the chosen branch runs; a `join: any` step reads whichever ran.
# --------------------------------------------------------------------------------------

SENTIMENT_SCHEMA = {
    "type": "object",
    "required": ["label"],
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
}


@pytest.mark.parametrize(("label", "chosen", "skipped", "reply"), [
    ("negative", "escalate", "auto_reply", "Escalated to the on-call lead."),
    ("positive", "auto_reply", "escalate", "Thanks for the kind words!"),
], ids=["negative-escalates", "positive-auto-replies"])
def test_the_router_runs_only_the_chosen_branch_and_the_any_join_step_reads_it(
        api, stack, devmodel, label, chosen, skipped, reply):
    m = marker("router")
    add_rules(devmodel,
              {"name": f"{m}-sentiment", "match": {"prompt_contains": f"{m}/sentiment"},
               "reply": {"json": {"label": label}}},
              {"name": f"{m}-escalate", "match": {"prompt_contains": f"{m}/escalate"},
               "reply": {"text": "Escalated to the on-call lead."}},
              {"name": f"{m}-auto_reply", "match": {"prompt_contains": f"{m}/auto_reply"},
               "reply": {"text": "Thanks for the kind words!"}})
    token = stack.token("alice")
    wf = workflow("e2e-router", [
        {"id": "sentiment", "type": "llm", "prompt": f"{m}/sentiment Classify: {{{{ input.message }}}}",
         "output": {"format": "json", "schema": SENTIMENT_SCHEMA}},
        {"id": "route", "type": "router",
         "routes": [{"when": "steps.sentiment.output.label == 'negative'", "to": ["escalate"]}],
         "default": ["auto_reply"]},
        {"id": "escalate", "type": "llm", "depends_on": ["route"],
         "prompt": f"{m}/escalate Write an escalation note for: {{{{ input.message }}}}"},
        {"id": "auto_reply", "type": "llm", "depends_on": ["route"],
         "prompt": f"{m}/auto_reply Write a friendly reply to: {{{{ input.message }}}}"},
        {"id": "report", "type": "transform", "join": "any",
         "template": ("{{ steps.escalate.text if steps.escalate.status == 'COMPLETED' "
                      "else steps.auto_reply.text }}")},
    ], output="{{ steps.report.output }}")
    run_id = start(api, token, wf, {"message": "The app ate my homework"})["run_id"]
    events = follow(api, token, run_id)

    assert_gap_free(events)
    assert events[-1]["type"] == "RUN_COMPLETED", kinds(events)
    k = kinds(events)
    assert ("STEP_COMPLETED", chosen) in k
    assert ("STEP_STARTED", skipped) not in k
    [skip] = [e for e in events if e["type"] == "STEP_SKIPPED"]
    assert skip["step_id"] == skipped
    assert skip["data"]["reason"] == "not chosen by router route", skip
    # The skip is decided when the router settles, before the join step runs.
    assert k.index(("STEP_COMPLETED", "route")) < events.index(skip) < k.index(("STEP_STARTED", "report"))

    # The skipped branch never reached the model; the chosen one did, once.
    assert calls_with(devmodel, f"{m}/{skipped}") == []
    assert len(calls_with(devmodel, f"{m}/{chosen}")) == 1
    assert len(calls_with(devmodel, f"{m}/sentiment")) == 1

    run = get_run(api, token, run_id)
    assert run["status"] == "COMPLETED"
    assert run["output"] == reply
    steps = steps_by_id(run)
    assert {sid: s["status"] for sid, s in steps.items()} == {
        "sentiment": "COMPLETED", "route": "COMPLETED", chosen: "COMPLETED",
        skipped: "SKIPPED", "report": "COMPLETED"}
    assert steps["sentiment"]["output"] == {"label": label}
    assert steps["route"]["output"]["selected"] == [chosen]
    assert steps["route"]["output"]["route"] == (0 if chosen == "escalate" else "default")
    assert steps["report"]["output"] == reply
    assert steps[skipped]["attempts"] == 0 and steps[skipped]["cost_pico_usd"] == 0
    # Routers and transforms cost nothing; only the two model steps are charged.
    assert steps["route"]["cost_pico_usd"] == steps["report"]["cost_pico_usd"] == 0
    assert run["totals"]["model_calls"] == 2
    assert run["totals"]["cost_pico_usd"] == steps["sentiment"]["cost_pico_usd"] + steps[chosen]["cost_pico_usd"]


# --------------------------------------------------------------------------------------
# 3. JSON that breaks its schema is retried with a corrective hint.
# --------------------------------------------------------------------------------------


def test_json_that_breaks_its_schema_is_retried_with_a_hint_naming_the_violation(api, stack, devmodel):
    m = marker("schema")
    add_rules(devmodel,
              # Placed first: the retried prompt carries the hint and gets a valid answer.
              {"name": f"{m}-corrected", "match": {"prompt_contains": f"{m}/classify", "prompt_regex": "could not be used"},
               "reply": {"json": {"label": "negative"}}, "usage": {"input_tokens": 90, "output_tokens": 6}},
              # The first attempt answers JSON whose label is outside the schema's enum.
              {"name": f"{m}-invalid", "match": {"prompt_contains": f"{m}/classify"},
               "reply": {"json": {"label": "furious"}}, "usage": {"input_tokens": 40, "output_tokens": 6}})
    token = stack.token("alice")
    wf = workflow("e2e-schema-retry", [
        {"id": "classify", "type": "llm", "prompt": f"{m}/classify Sentiment of: {{{{ input.text }}}}",
         "output": {"format": "json", "schema": SENTIMENT_SCHEMA}},
    ], output="{{ steps.classify.output.label }}")
    run_id = start(api, token, wf, {"text": "Nothing works and nobody answers."})["run_id"]
    events = follow(api, token, run_id)

    assert_gap_free(events)
    assert events[-1]["type"] == "RUN_COMPLETED", kinds(events)
    [retry] = [e for e in events if e["type"] == "STEP_RETRYING"]
    assert retry["step_id"] == "classify" and retry["attempt"] == 2
    assert retry["data"]["reason"] == "INVALID_OUTPUT", retry
    assert "/label" in retry["data"]["message"], retry
    # Full jitter on the first backoff: somewhere in [0, initial_backoff_ms].
    assert isinstance(retry["data"]["delay_ms"], int) and 0 <= retry["data"]["delay_ms"] <= 50, retry
    k = kinds(events)
    assert k.index(("STEP_STARTED", "classify")) < events.index(retry) < k.index(("STEP_COMPLETED", "classify"))
    [done] = [e for e in events if e["type"] == "STEP_COMPLETED"]
    assert done["attempt"] == 2 and done["data"]["attempts"] == 2

    calls = calls_with(devmodel, f"{m}/classify")
    assert [c["rule"] for c in calls] == [f"{m}-invalid", f"{m}-corrected"]
    first, second = calls[0]["prompt"], calls[1]["prompt"]
    assert "could not be used" not in first
    assert second.startswith(first + "\n\n"), second
    hint = second[len(first):].strip()
    assert hint.startswith("Your previous reply could not be used:"), hint
    assert "/label" in hint and "furious" in hint, f"the hint names the violation: {hint}"
    assert "corrected JSON" in hint

    run = get_run(api, token, run_id)
    assert run["status"] == "COMPLETED"
    assert run["output"] == "negative"
    [step] = run["steps"]
    assert step["status"] == "COMPLETED" and step["attempts"] == 2
    assert step["output"] == {"label": "negative"} and step["error"] is None
    # Both attempts were paid for, and both are charged to the step.
    assert (step["input_tokens"], step["output_tokens"]) == (40 + 90, 6 + 6)
    assert step["cost_pico_usd"] == cost_pico(40, 6) + cost_pico(90, 6)
    assert run["totals"]["model_calls"] == 2
    assert run["totals"]["cost_pico_usd"] == step["cost_pico_usd"]


# --------------------------------------------------------------------------------------
# 4. Map: fan-out over a list with bounded concurrency; results in input order.
# --------------------------------------------------------------------------------------


def test_a_map_returns_results_in_input_order_though_items_finish_out_of_order(api, stack, devmodel):
    m = marker("map")
    files = ["main.rs", "lib.rs", "graph.rs", "engine.rs"]
    # Item 0 is by far the slowest: with two at a time, the others finish first. Its 4 s
    # leave room for item 1's checkpoint writes, which take several hundred ms on a loaded
    # 2-core machine.
    latency = [4000, 150, 250, 150]
    add_rules(devmodel, *[
        {"name": f"{m}-{i}", "match": {"prompt_contains": f"{m}/review file {i}: {name}"},
         "reply": {"text": f"notes on {name}"}, "latency_ms": latency[i]}
        for i, name in enumerate(files)
    ])
    token = stack.token("alice")
    wf = workflow("e2e-map", [
        {"id": "review", "type": "map", "over": "input.files", "max_concurrency": 2,
         "step": {"type": "llm", "prompt": f"{m}/review file {{{{ index }}}}: {{{{ item }}}}"}},
    ], output="{{ steps.review.output | join(' | ') }}")
    run_id = start(api, token, wf, {"files": files})["run_id"]
    events = follow(api, token, run_id)

    assert_gap_free(events)
    assert events[-1]["type"] == "RUN_COMPLETED", kinds(events)
    expected = [f"notes on {name}" for name in files]

    # Each item was rendered with its own index and value, and called exactly once.
    calls = calls_with(devmodel, f"{m}/review file")
    assert sorted(c["rule"] for c in calls) == sorted(f"{m}-{i}" for i in range(len(files))), calls
    by_item = {int(c["rule"].rsplit("-", 1)[1]): c for c in calls}
    for i, name in enumerate(files):
        assert by_item[i]["prompt"] == f"{m}/review file {i}: {name}"
    arrived = {i: ts(c["at"]) for i, c in by_item.items()}

    def in_flight_at(i):
        t = arrived[i]
        return [j for j in arrived
                if arrived[j] <= t < arrived[j] + datetime.timedelta(milliseconds=latency[j] - 20)]

    # Never more than two items at the model at once…
    assert all(len(in_flight_at(i)) <= 2 for i in arrived), {i: in_flight_at(i) for i in arrived}
    # …and item 2 could only start once item 1 had freed a slot, while item 0 was still
    # running: item 1 finished before item 0 did. (Item 3 also starts then on an idle
    # machine, but only after item 2's checkpoint writes, which CI once saw moto stall for
    # 8 s: its start says nothing about the order of results.)
    slow_done = arrived[0] + datetime.timedelta(milliseconds=latency[0])
    assert arrived[1] < arrived[2] < slow_done, arrived

    run = get_run(api, token, run_id)
    assert run["status"] == "COMPLETED"
    assert run["output"] == " | ".join(expected)
    [step] = run["steps"]
    assert step["id"] == "review" and step["status"] == "COMPLETED"
    assert step["output"] == expected
    assert json.loads(step["text"]) == expected
    [done] = [e for e in events if e["type"] == "STEP_COMPLETED"]
    assert done["data"]["detail"] == {"items": len(files), "failed": []}
    assert step["input_tokens"] > 0 and step["output_tokens"] > 0 and step["cost_pico_usd"] > 0
    assert run["totals"]["model_calls"] == len(files)
    assert run["totals"]["cost_pico_usd"] == step["cost_pico_usd"]
