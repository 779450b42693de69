"""Bedrock's cost levers on the local stack (README, Cost levers).

The dev model server reports prompt-cache usage the way Bedrock does (a marked prefix is
written by the first call that sends it and read by later ones within 5 minutes) and
takes its cache rules, tiers and structured-output support from shared/models.json, the
registry the runner prices with.

- a 200-item map over a long shared system prompt costs far less with no change to its
  definition than the same map with `cache: "off"`; every figure is the registry's price
  times the reported tokens, within the budget and the estimate;
- every call carries requestMetadata naming its run, step, item and owner;
- a flex step is sent in its tier and priced at the tier's price;
- a legacy model is warned about in the 202 and the estimate; a retired one is refused;
- a json step with a schema asks a model that has it for structured output natively.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest
from test_runs import add_rules, marker

HAIKU = "global.anthropic.claude-haiku-4-5-20251001-v1:0"
GPT_OSS = "openai.gpt-oss-120b-1:0"
REGISTRY = json.loads((Path(__file__).resolve().parents[2] / "shared" / "models.json").read_text())["models"]
ITEMS = 200


def start(api, token, workflow, input_=None):
    status, _, body = api("POST", "/runs", token=token, body={"workflow": workflow, "input": input_ or {}})
    assert status == 202, body
    return body


def wait_for_end(api, token, run_id, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, run = api("GET", f"/runs/{run_id}", token=token)
        if status == 200 and run["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return run
        time.sleep(0.5)
    pytest.fail(f"run {run_id} did not end within {timeout} s")


def bare(model: str) -> str:
    prefix, _, rest = model.partition(".")
    return rest if prefix in ("global", "us", "eu", "apac", "jp", "au", "us-gov") else model


def pico_per_token(model: str, field: str, pct: int = 100) -> int:
    """The registry's price per token in pico-dollars (the runner's unit), at `pct` percent;
    a cache price the sheet does not list is the input price, as Bedrock bills it."""
    entry = REGISTRY[bare(model)]
    pico = Decimal(entry.get(field, entry["input_per_1k"])) * 10**12 / 1000
    assert pico == int(pico)
    scaled = int(pico) * pct
    assert scaled % 100 == 0
    return scaled // 100


def priced(model: str, totals: dict, pct: int = 100) -> int:
    """What a run's tokens cost at the registry's prices: the figure the runner must report."""
    return sum(totals[tokens] * pico_per_token(model, price, pct) for tokens, price in [
        ("input_tokens", "input_per_1k"), ("output_tokens", "output_per_1k"),
        ("cache_read_tokens", "cache_read_per_1k"), ("cache_write_tokens", "cache_write_per_1k")])


def triage(m: str, cache: str | None = None) -> dict:
    """One map over tickets, each item answered under the same long system prompt."""
    step = {"type": "llm", "system": f"{m} " + "Rule: answer in one line, cite the ticket, never promise refunds. " * 320,
            "prompt": "Ticket: {{ item }}"}
    if cache:
        step["cache"] = cache
    return {"name": "levers-triage", "defaults": {"model": HAIKU, "max_tokens": 40},
            "budget": {"max_cost_usd": "2"},
            "steps": [{"id": "answers", "type": "map", "over": "input.tickets", "max_concurrency": 8, "step": step}],
            "output": "{{ steps.answers.output | length }}"}


def tickets(m: str) -> dict:
    return {"tickets": [f"{m} ticket {i}: my order is late" for i in range(ITEMS)]}


def test_a_200_item_map_over_a_long_shared_prompt_costs_far_less_with_no_change_to_its_definition(api, stack, devmodel):
    token = stack.token("levers-alice")
    m_auto, m_off = marker("cached"), marker("plain")
    add_rules(devmodel, {"name": m_auto, "match": {"system_contains": m_auto}, "reply": {"text": "noted"}},
              {"name": m_off, "match": {"system_contains": m_off}, "reply": {"text": "noted"}})
    status, _, estimate = api("POST", "/workflows/estimate", token=token, body={"workflow": triage(m_auto), "input": tickets(m_auto)})
    assert status == 200, estimate

    cached = wait_for_end(api, token, start(api, token, triage(m_auto), tickets(m_auto))["run_id"])
    plain = wait_for_end(api, token, start(api, token, triage(m_off, cache="off"), tickets(m_off))["run_id"])
    assert cached["status"] == plain["status"] == "COMPLETED", (cached.get("error"), plain.get("error"))
    assert cached["output"] == plain["output"] == str(ITEMS)

    calls = [c for c in devmodel.calls() if m_auto in c["system"]]
    assert len(calls) == ITEMS and all(c["cache_points"] == 1 for c in calls)
    assert all(c["cache_points"] == 0 for c in devmodel.calls() if m_off in c["system"])
    # The first calls in flight write the prefix (at most one per concurrent item); every
    # later one reads it.
    t = cached["totals"]
    prefix = calls[0]["cache_read_tokens"] or calls[0]["cache_write_tokens"]
    assert prefix >= 4096
    assert t["cache_write_tokens"] + t["cache_read_tokens"] == ITEMS * prefix
    assert 1 <= t["cache_write_tokens"] // prefix <= 8
    assert plain["totals"]["cache_read_tokens"] == plain["totals"]["cache_write_tokens"] == 0

    # Every figure is exact: the registry's prices times the reported tokens.
    assert int(t["cost_pico_usd"]) == priced(HAIKU, t)
    assert int(plain["totals"]["cost_pico_usd"]) == priced(HAIKU, plain["totals"])
    saving = 1 - int(t["cost_pico_usd"]) / int(plain["totals"]["cost_pico_usd"])
    print(f"levers e2e: {ITEMS} items, prefix {prefix} tokens, cached ${Decimal(t['cost_pico_usd']) / 10**12} "
          f"vs ${Decimal(plain['totals']['cost_pico_usd']) / 10**12}: {saving:.1%} saved")
    assert saving > 0.6
    # Within the budget and inside the estimate's bracket.
    assert int(t["cost_pico_usd"]) <= 2 * 10**12
    assert int(estimate["total"]["min"]["cost_pico_usd"]) <= int(t["cost_pico_usd"]) <= int(estimate["total"]["max"]["cost_pico_usd"])


def test_every_call_carries_its_run_step_item_and_owner_for_reconciliation(api, stack, devmodel):
    token = stack.token("levers-bob")
    m = marker("labels")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "ok"}})
    wf = {"name": "levers-labels", "defaults": {"model": "amazon.nova-micro-v1:0", "max_tokens": 20},
          "steps": [{"id": "one", "type": "llm", "prompt": m + " one"},
                    {"id": "each", "type": "map", "over": "input.xs", "step": {"type": "llm", "prompt": m + " {{ item }}"}}]}
    run = wait_for_end(api, token, start(api, token, wf, {"xs": ["a", "b"]})["run_id"])
    assert run["status"] == "COMPLETED", run.get("error")
    labels = sorted((c["request_metadata"] for c in devmodel.calls() if m in c["prompt"]), key=lambda l: (l["chainrun_step"], l.get("chainrun_item", "")))
    assert labels == [
        {"chainrun_run": run["run_id"], "chainrun_workflow": "levers-labels", "chainrun_owner": "levers-bob", "chainrun_step": "each", "chainrun_item": "0"},
        {"chainrun_run": run["run_id"], "chainrun_workflow": "levers-labels", "chainrun_owner": "levers-bob", "chainrun_step": "each", "chainrun_item": "1"},
        {"chainrun_run": run["run_id"], "chainrun_workflow": "levers-labels", "chainrun_owner": "levers-bob", "chainrun_step": "one"},
    ]


def test_a_flex_step_is_sent_in_its_tier_and_priced_at_half_the_standard_price(api, stack, devmodel):
    token = stack.token("levers-carol")
    m = marker("flex")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "a summary of the week"}})
    wf = {"name": "levers-flex", "steps": [
        {"id": "sum", "type": "llm", "model": GPT_OSS, "service_tier": "flex", "max_tokens": 100, "prompt": m + " summarise {{ input.t }}"}]}
    run = wait_for_end(api, token, start(api, token, wf, {"t": "the week"})["run_id"])
    assert run["status"] == "COMPLETED", run.get("error")
    [call] = [c for c in devmodel.calls() if m in c["prompt"]]
    assert call["service_tier"] == "flex"
    flex_pct = REGISTRY[GPT_OSS]["tiers"]["flex"]
    assert int(run["totals"]["cost_pico_usd"]) == priced(GPT_OSS, run["totals"], flex_pct)
    assert int(run["totals"]["cost_pico_usd"]) * 2 == priced(GPT_OSS, run["totals"])

    # A tier the model does not offer is refused before anything is stored.
    bad = {"name": "levers-flex", "steps": [{"id": "sum", "type": "llm", "model": HAIKU, "service_tier": "flex", "prompt": "x"}]}
    status, _, problem = api("POST", "/runs", token=token, body={"workflow": bad, "input": {}})
    assert status == 400, problem
    assert [(p["step"], p["field"]) for p in problem["problems"]] == [("sum", "service_tier")]


def test_a_legacy_model_is_warned_about_and_a_retired_one_is_refused(api, stack, devmodel):
    token = stack.token("levers-dave")
    legacy = {"name": "levers-legacy", "steps": [
        {"id": "old", "type": "llm", "model": "anthropic.claude-3-5-haiku-20241022-v1:0", "max_tokens": 20, "prompt": "hello"}]}
    accepted = start(api, token, legacy)
    assert [(w["step"], w["field"]) for w in accepted["warnings"]] == [("old", "model")]
    assert "legacy" in accepted["warnings"][0]["message"]
    status, _, estimate = api("POST", "/workflows/estimate", token=token, body={"workflow": legacy, "input": {}})
    assert status == 200 and estimate["warnings"] == accepted["warnings"], estimate
    # A current model starts without any.
    current = {"name": "levers-current", "steps": [{"id": "new", "type": "llm", "model": HAIKU, "max_tokens": 20, "prompt": "hello"}]}
    assert "warnings" not in start(api, token, current)

    retired = {"name": "levers-retired", "steps": [
        {"id": "gone", "type": "llm", "model": "anthropic.claude-3-7-sonnet-20250219-v1:0", "max_tokens": 20, "prompt": "hello"}]}
    status, _, problem = api("POST", "/runs", token=token, body={"workflow": retired, "input": {}})
    assert status == 400, problem
    assert [(p["step"], p["field"]) for p in problem["problems"]] == [("gone", "model")]
    assert "no longer served" in problem["problems"][0]["message"]
    status, _, listing = api("GET", "/runs?workflow=levers-retired", token=token)
    assert status == 200 and not listing.get("runs"), "nothing was stored"


def test_a_json_step_with_a_schema_asks_a_model_that_has_structured_output_for_it_natively(api, stack, devmodel):
    token = stack.token("levers-erin")
    m = marker("structured")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"json": {"label": "late"}}})
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    wf = {"name": "levers-structured", "steps": [
        {"id": "c", "type": "llm", "model": HAIKU, "max_tokens": 50, "prompt": m + " classify", "output": {"format": "json", "schema": schema}}]}
    run = wait_for_end(api, token, start(api, token, wf)["run_id"])
    assert run["status"] == "COMPLETED", run.get("error")
    [call] = [c for c in devmodel.calls() if m in c["prompt"]]
    assert call["output_schema"] == schema
    assert run["output"] == {"label": "late"} or run["steps"][0]["output"] == {"label": "late"}


def test_a_deterministic_step_reuses_an_identical_earlier_reply_for_free(api, stack, devmodel):
    token = stack.token("levers-frank")
    m = marker("response")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "category: shipping"}})
    wf = {"name": "levers-response", "steps": [
        {"id": "classify", "type": "llm", "model": "amazon.nova-micro-v1:0", "temperature": 0, "cache": "response",
         "max_tokens": 30, "prompt": m + " classify {{ input.ticket }}"},
        {"id": "each", "type": "map", "over": "input.more", "max_concurrency": 1,
         "step": {"type": "llm", "model": "amazon.nova-micro-v1:0", "temperature": 0, "cache": "response", "max_tokens": 30,
                  "prompt": m + " classify {{ item }}"}}]}
    input_ = {"ticket": "late parcel", "more": ["late parcel", "broken lid", "broken lid"]}
    first = wait_for_end(api, token, start(api, token, wf, input_)["run_id"])
    assert first["status"] == "COMPLETED", first.get("error")
    # The map's first item is the top step's call again; its third repeats its second.
    assert len([c for c in devmodel.calls() if m in c["prompt"]]) == 2
    again = wait_for_end(api, token, start(api, token, wf, input_)["run_id"])
    assert again["status"] == "COMPLETED", again.get("error")
    assert len([c for c in devmodel.calls() if m in c["prompt"]]) == 2, "no new model call"
    assert int(again["totals"]["cost_pico_usd"]) == 0 and again["totals"]["model_calls"] == 0
    steps = {s["id"]: s for s in again["steps"]}
    assert steps["classify"]["detail"]["response_cache"] == "hit" and steps["classify"]["attempts"] == 0
    assert steps["each"]["detail"]["cached"] == 3
    assert again["output"] == first["output"] or [s["output"] for s in again["steps"]] == [s["output"] for s in first["steps"]]
    # Another tenant's identical run calls the model.
    other = stack.token("levers-grace")
    theirs = wait_for_end(api, other, start(api, other, wf, input_)["run_id"])
    assert theirs["status"] == "COMPLETED" and int(theirs["totals"]["cost_pico_usd"]) > 0
