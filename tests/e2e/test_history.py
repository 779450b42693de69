"""End-to-end: run history (`GET /runs?workflow=`) and cost analytics (`GET /analytics/costs`)
through the real API and runner binaries on the local stack.

A module fixture makes a few runs of two workflows — one of which fails — as a user unique
to this module, plus one run by another user. The tests then check that history lists
exactly those runs, newest first, page by page, and that the analytics (read from the
rollups the runner writes when a run ends) add up exactly to the runs' own totals.

Runs are made one after another on purpose: the local stack's DynamoDB (moto) does not
serialise concurrent writes to one item, so two runs of one workflow finishing at the same
moment could lose an `ADD` there (DynamoDB itself does not).
"""

from __future__ import annotations

import datetime
import types

import pytest

from test_runs import add_rules, follow, marker, start, workflow
from test_workflows import cost_pico, get_run, steps_by_id, ts


def ms_between(start: str, end: str) -> int:
    return (ts(end) - ts(start)) // datetime.timedelta(milliseconds=1)


@pytest.fixture(scope="module")
def made(api, stack, devmodel):
    m = marker("hist")
    add_rules(devmodel,
              {"name": m + "-draft", "match": {"prompt_contains": m + " DRAFT"}, "reply": {"text": "a draft"},
               "usage": {"input_tokens": 400, "output_tokens": 20}, "latency_ms": 120},
              {"name": m + "-polish", "match": {"prompt_contains": m + " POLISH"}, "reply": {"text": "polished"},
               "usage": {"input_tokens": 50, "output_tokens": 150}, "latency_ms": 60},
              {"name": m + "-check", "match": {"prompt_contains": m + " CHECK"}, "reply": {"text": "ok"},
               "usage": {"input_tokens": 30, "output_tokens": 5}},
              {"name": m + "-boom", "match": {"prompt_contains": m + " BOOM"},
               "error": {"type": "ValidationException", "message": "scripted failure"}})
    good = workflow(f"{m}-good", [
        {"id": "draft", "type": "llm", "prompt": m + " DRAFT {{ input.n }}"},
        {"id": "polish", "type": "llm", "prompt": m + " POLISH {{ steps.draft.text }}"},
    ])
    bad = workflow(f"{m}-bad", [
        {"id": "check", "type": "llm", "prompt": m + " CHECK {{ input.n }}"},
        {"id": "boom", "type": "llm", "prompt": m + " BOOM {{ steps.check.text }}"},
    ])
    user, stranger = m, m + "-stranger"
    token = stack.token(user)
    started = []  # (workflow name, run id), in start order
    for wf, n in [(good, 1), (bad, 2), (good, 3), (good, 4)]:
        run_id = start(api, token, wf, {"n": n})["run_id"]
        follow(api, token, run_id)
        started.append((wf["name"], run_id))
    stranger_token = stack.token(stranger)
    stranger_run = start(api, stranger_token, good, {"n": 9})["run_id"]
    follow(api, stranger_token, stranger_run)
    # A run is rolled up after its last event, before the runner's invocation returns.
    assert stack.wait_quiescent(60), "runner invocations still in flight"
    runs = {run_id: get_run(api, token, run_id) for _, run_id in started}
    return types.SimpleNamespace(
        user=user, token=token, good=good["name"], bad=bad["name"], started=started, runs=runs,
        stranger=stranger, stranger_token=stranger_token, stranger_run=stranger_run)


def ids_of(made, name: str) -> list[str]:
    """Run ids of one workflow, newest first."""
    return [run_id for wf, run_id in reversed(made.started) if wf == name]


def walk(api, token, path: str) -> list[dict]:
    """Follows `next` from the first page; returns every page."""
    pages, url = [], path
    for _ in range(50):
        status, _, page = api("GET", url, token=token)
        assert status == 200, page
        pages.append(page)
        if page["next"] is None:
            return pages
        url = f"{path}&next={page['next']}"
    pytest.fail("history never ended")


def test_history_lists_exactly_the_workflows_runs_newest_first_page_by_page(api, made):
    expected = ids_of(made, made.good)
    assert len(expected) == 3
    pages = walk(api, made.token, f"/runs?workflow={made.good}&limit=2")
    assert [r["run_id"] for r in pages[0]["items"]] == expected[:2], "a full first page"
    items = [r for p in pages for r in p["items"]]
    assert [r["run_id"] for r in items] == expected, "the stranger's run of the same workflow is not listed"
    created = [ts(r["created_at"]) for r in items]
    assert created == sorted(created, reverse=True)
    for item in items:
        run = made.runs[item["run_id"]]
        assert item["workflow"] == made.good and item["caller"] == made.user
        assert item["status"] == run["status"] == "COMPLETED"
        assert item["totals"] == run["totals"]
        assert (item["started_at"], item["finished_at"]) == (run["started_at"], run["finished_at"])
        assert "input" not in item and "steps" not in item
    one_by_one = [r["run_id"] for p in walk(api, made.token, f"/runs?workflow={made.good}&limit=1") for r in p["items"]]
    assert one_by_one == expected


def test_history_without_a_workflow_lists_the_callers_own_runs(api, made):
    pages = walk(api, made.token, "/runs?limit=100")
    items = [r for p in pages for r in p["items"]]
    assert [r["run_id"] for r in items] == [run_id for _, run_id in reversed(made.started)]
    failed = next(r for r in items if r["workflow"] == made.bad)
    assert failed["status"] == "FAILED"
    assert failed["error"]["code"] == made.runs[failed["run_id"]]["error"]["code"]


def test_another_users_runs_never_appear(api, stack, made):
    _, _, theirs = api("GET", f"/runs?workflow={made.good}", token=made.stranger_token)
    assert [r["run_id"] for r in theirs["items"]] == [made.stranger_run]
    _, _, nobody = api("GET", f"/runs?workflow={made.good}", token=stack.token(made.user + "-nobody"))
    assert nobody == {"items": [], "next": None}
    status, _, _ = api("GET", f"/runs/{made.stranger_run}", token=made.token)
    assert status == 404


def expected_costs(made, name: str) -> dict:
    """What the analytics must say about one workflow, from `GET /runs/{id}` alone."""
    runs = [made.runs[run_id] for run_id in ids_of(made, name)]
    total = sum(r["totals"]["cost_pico_usd"] for r in runs)
    latency = sum(ms_between(r["started_at"], r["finished_at"]) for r in runs)
    failures = sum(r["status"] == "FAILED" for r in runs)
    steps: dict[str, dict] = {}
    for r in runs:
        for s in r["steps"]:
            if s["attempts"] == 0:
                continue
            acc = steps.setdefault(s["id"], {"runs": 0, "failures": 0, "cost": 0, "latency": 0})
            acc["runs"] += 1
            acc["failures"] += s["status"] == "FAILED"
            acc["cost"] += s["cost_pico_usd"]
            acc["latency"] += s["latency_ms"]
    return {"runs": len(runs), "failures": failures, "total": total, "latency": latency, "steps": steps}


def test_cost_analytics_match_the_runs_made_exactly(api, made):
    status, _, report = api("GET", "/analytics/costs?days=2", token=made.token)
    assert status == 200, report
    assert report["days"] == 2 and report["scope"] == f"USER#{made.user}"
    by_name = {w["workflow"]: w for w in report["workflows"]}
    assert set(by_name) == {made.good, made.bad}, "only this user's workflows"

    for name in (made.good, made.bad):
        got, want = by_name[name], expected_costs(made, name)
        assert (got["runs"], got["failures"]) == (want["runs"], want["failures"])
        assert got["total_cost_pico_usd"] == want["total"], "rollups add up to the runs' totals"
        assert got["avg_cost_pico_usd"] == want["total"] // want["runs"]
        assert got["total_latency_ms"] == want["latency"]
        assert got["avg_latency_ms"] == want["latency"] // want["runs"]
        assert {s["step_id"] for s in got["steps"]} == set(want["steps"])
        for step in got["steps"]:
            w = want["steps"][step["step_id"]]
            assert (step["runs"], step["failures"]) == (w["runs"], w["failures"]), step
            assert step["total_cost_pico_usd"] == w["cost"] and step["avg_cost_pico_usd"] == w["cost"] // w["runs"]
            assert step["avg_latency_ms"] == w["latency"] // w["runs"]
        avg_costs = [s["avg_cost_pico_usd"] for s in got["steps"]]
        assert avg_costs == sorted(avg_costs, reverse=True), "most expensive step first"

    good = by_name[made.good]
    assert good["failure_rate"] == "0.0000"
    # Priced independently from shared/models.json: 150 output tokens cost more than 400 input.
    assert [s["step_id"] for s in good["steps"]] == ["polish", "draft"]
    steps = {s["step_id"]: s for s in good["steps"]}
    assert steps["draft"]["avg_cost_pico_usd"] == cost_pico(400, 20)
    assert steps["polish"]["total_cost_pico_usd"] == 3 * cost_pico(50, 150)
    assert good["total_cost_pico_usd"] == 3 * (cost_pico(400, 20) + cost_pico(50, 150))

    bad = by_name[made.bad]
    assert (bad["runs"], bad["failures"], bad["failure_rate"]) == (1, 1, "1.0000")
    bad_steps = {s["step_id"]: s for s in bad["steps"]}
    assert (bad_steps["boom"]["failures"], bad_steps["boom"]["total_cost_pico_usd"]) == (1, 0)
    assert bad["total_cost_pico_usd"] == cost_pico(30, 5)
    failed_run = made.runs[ids_of(made, made.bad)[0]]
    assert steps_by_id(failed_run)["boom"]["status"] == "FAILED"


def test_each_user_sees_only_their_own_costs(api, stack, made):
    _, _, theirs = api("GET", "/analytics/costs", token=made.stranger_token)
    assert [(w["workflow"], w["runs"]) for w in theirs["workflows"]] == [(made.good, 1)]
    _, _, nobody = api("GET", "/analytics/costs?days=90", token=stack.token(made.user + "-nobody"))
    assert nobody["workflows"] == []


def test_rollups_are_keyed_per_owner_and_day_and_expire(stack, made):
    table = stack.tables["CHAINRUN_ROLLUPS_TABLE"]
    items = stack.ddb().query(TableName=table, KeyConditionExpression="pk = :pk",
                              ExpressionAttributeValues={":pk": {"S": f"ROLLUP#USER#{made.user}"}})["Items"]
    assert {i["workflow"]["S"] for i in items} == {made.good, made.bad}
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    for item in items:
        assert item["sk"]["S"].startswith(f"DAY#{item['day']['S']}#WF#{item['workflow']['S']}#P#")
        assert 399 * 86400 < int(item["expires_at"]["N"]) - now < 401 * 86400
    for _, run_id in made.started:
        marker_item = stack.ddb().get_item(TableName=table, Key={"pk": {"S": f"RUN#{run_id}"},
                                                                 "sk": {"S": f"ROLLED_UP#USER#{made.user}"}})
        assert "Item" in marker_item, f"run {run_id} has no rollup marker"


@pytest.mark.parametrize(("path", "name"), [
    ("/runs?limit=0", "limit"),
    ("/runs?next=garbage", "next"),
    ("/analytics/costs?days=0", "days"),
    ("/analytics/costs?days=91", "days"),
    ("/analytics/costs?days=week", "days"),
    ("/analytics/costs?scope=group:nope", "scope"),
])
def test_bad_parameters_are_400_problems_naming_them(api, stack, path, name):
    status, headers, problem = api("GET", path, token=stack.token("hist-params"))
    assert status == 400, problem
    assert headers["Content-Type"] == "application/problem+json"
    assert name in problem["detail"]
