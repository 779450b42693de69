"""End-to-end: what the functions print for operators, read from the local stack's function
log (lambda-watch.log holds every function's stdout, as CloudWatch Logs would).

A real run through the API and the runner: every line the runner prints about it is a JSON
object carrying its run id, lines printed inside a step carry the step (and a model call's
attempt), and for each settled step and for the run's end there is one CloudWatch embedded
metric format (EMF) line whose numbers are exactly what GET /runs/{id} reports. The sweeper
publishes StuckRuns every sweep. See README "Operating chainrun".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from test_runs import add_rules, follow, marker, start, workflow

METRICS = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "metrics.json").read_text())
PUBLISHED = {m["name"] for d in METRICS["directives"] for m in d["metrics"]}


def json_lines(stack) -> list[dict]:
    """Every line of the function log that is a JSON object (cargo lambda's own lines are not)."""
    found = []
    for line in (stack.logs / "lambda-watch.log").read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"a line that starts like JSON but is not: {line[:300]}")
    return found


def metric_names(doc: dict) -> set[str]:
    return {m["Name"] for d in doc["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}


def wait_for_lines(stack, want, timeout: float = 15.0) -> list[dict]:
    """The log's JSON lines once `want(lines)` holds (the log is written a moment after the API answers)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = json_lines(stack)
        if want(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_a_runs_log_lines_carry_it_and_its_metric_lines_match_what_the_api_reports(api, stack, devmodel):
    m = marker("ops")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha"}, "latency_ms": 200,
               "fail_first": {"count": 1, "error": "ThrottlingException", "message": "scripted"}},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "beta"}, "latency_ms": 100})
    token = stack.token("alice")
    wf = workflow("e2e-operations", [
        {"id": "a", "type": "llm", "prompt": m + " A"},
        {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
        {"id": "c", "type": "transform", "template": "{{ steps.b.text }}!"},
    ])
    run_id = start(api, token, wf)["run_id"]
    assert follow(api, token, run_id)[-1]["type"] == "RUN_COMPLETED"
    _, _, run = api("GET", f"/runs/{run_id}", token=token)

    def about_run(lines):
        return [line for line in lines if line.get("run_id") == run_id]

    lines = about_run(wait_for_lines(stack, lambda ls: any("Runs" in l and l.get("run_id") == run_id for l in ls)))
    metrics = [line for line in lines if "_aws" in line]
    logs = [line for line in lines if "_aws" not in line]

    # The API's line for the start, printed inside its request's span.
    queued = [line for line in logs if line.get("message") == "run queued"]
    assert len(queued) == 1, queued
    assert "request" in queued[0]["spans"] and (queued[0]["method"], queued[0]["path"]) == ("POST", "/runs")

    # The runner's lines: inside the invocation's span, so each carries the run; inside a
    # step, the step; a model call's, its attempt.
    runner = [line for line in logs if "invocation" in line["spans"]]
    assert len(runner) >= 10, f"{len(runner)} runner lines"
    for line in runner:
        assert line["level"] in ("TRACE", "DEBUG", "INFO", "WARN", "ERROR") and line["timestamp"], line
        if "run" in line["spans"]:
            assert (line["workflow"], line["revision"]) == ("e2e-operations", 0), line
        if "step" in line["spans"]:
            assert line["step_id"] in ("a", "b", "c"), line
    retried = [line for line in runner if line.get("message") == "attempt failed; retrying"]
    assert [(line["step_id"], line["attempt"], line["code"]) for line in retried] == [("a", 1, "ThrottlingException")]
    calls = sorted((line["step_id"], line["attempt"]) for line in runner if line.get("message") == "model call finished")
    assert calls == [("a", 2), ("b", 1)]
    # A line that names no attempt itself gets it from the step's span.
    (announced,) = [line for line in runner if line.get("message") == "event published"
                    and line.get("event") == "StepCompleted" and line.get("step_id") == "a"]
    assert announced["attempt"] == 2, announced
    assert any("xrayTraceId" in line for line in runner), "the runtime's invoke span carries the trace id"

    # One metric line per settled step, with the step's numbers as the API reports them.
    for doc in metrics:
        assert metric_names(doc) <= PUBLISHED, doc
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == METRICS["namespace"]
            for name in (m["Name"] for m in directive["Metrics"]):
                assert isinstance(doc[name], int), (name, doc)
    steps = [doc for doc in metrics if "StepLatency" in doc]
    assert sorted(doc["Step"] for doc in steps) == ["a", "b", "c"]
    for step in run["steps"]:
        (doc,) = [d for d in steps if d["Step"] == step["id"]]
        assert doc["Workflow"] == "e2e-operations"
        published = [doc["StepLatency"], doc["StepInputTokens"], doc["StepOutputTokens"], doc["StepCostPicoUsd"], doc["StepAttempts"]]
        reported = [step["latency_ms"], step["input_tokens"], step["output_tokens"], int(step["cost_pico_usd"]), step["attempts"]]
        assert published == reported, step["id"]
        assert doc["StepFailures"] == 0
    assert next(d for d in steps if d["Step"] == "a")["StepAttempts"] == 2

    # One for the run's end: its totals and status.
    (end,) = [doc for doc in metrics if "Runs" in doc]
    totals = run["totals"]
    assert (end["Runs"], end["Status"], end["Workflow"]) == (1, "COMPLETED", "e2e-operations")
    assert [end["RunInputTokens"], end["RunOutputTokens"], end["RunCostPicoUsd"], end["RunModelCalls"]] == \
        [totals["input_tokens"], totals["output_tokens"], int(totals["cost_pico_usd"]), totals["model_calls"]]
    assert (end["RunSteps"], end["RunTakeovers"]) == (3, 0)
    assert end["RunLatency"] >= sum(s["latency_ms"] for s in run["steps"] if s["id"] != "c")


def test_the_sweeper_reports_stuck_runs_every_sweep(stack):
    def sweeps(lines):
        return [line for line in lines if "_aws" in line and "StuckRuns" in line]

    before = len(sweeps(json_lines(stack)))
    # The local stack sweeps every few seconds (CHAINRUN_LOCAL_SWEEP_SECS).
    lines = wait_for_lines(stack, lambda ls: len(sweeps(ls)) >= before + 2, timeout=30)
    reports = sweeps(lines)
    assert len(reports) >= before + 2, "no new sweep reports"
    for report in reports[before:]:
        assert isinstance(report["StuckRuns"], int) and report["StuckRuns"] >= 0
        assert len(report["stuck_run_ids"]) == report["StuckRuns"]
        (directive,) = report["_aws"]["CloudWatchMetrics"]
        assert directive["Dimensions"] == [[]]
    sweeper_lines = [line for line in lines if line.get("message") == "sweep done"]
    assert sweeper_lines and all("stuck" in line for line in sweeper_lines)
