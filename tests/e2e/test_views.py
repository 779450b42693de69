"""End-to-end: the run view (GET /runs/{id}/view) and the cost page (GET /analytics/view)
in a real headless Chromium, against the local stack.

The browser is Debian's `chromium`, installed by the `chromium` fixture when missing
(infra/browser.py), and driven over the DevTools protocol: a test opens a page, waits
until a condition holds in it (the page sets `document.body.dataset.state` to `live` or
`done` once it has caught up with the run), then reads its DOM and takes a full-page
screenshot. Screenshots and DOM dumps go to the test's tmp dir (kept by pytest).

Each test runs as a user of its own, so the runs (and the costs) it looks at are its own.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from infra.browser import BrowserUnavailable, Page, ensure_chromium, png_size

MODEL = "amazon.nova-micro-v1:0"
DRAFT = "A long draft, streamed a few words at a time. "


def marker(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def add_rules(devmodel, *rules):
    status, body = devmodel.admin("POST", "/_dev/rules", {"rules": list(rules)})
    assert status == 200, body


def start(api, token, workflow, input_=None, options=None):
    body = {"workflow": workflow, "input": input_ or {}}
    if options:
        body["options"] = options
    status, _, accepted = api("POST", "/runs", token=token, body=body)
    assert status == 202, accepted
    return accepted["run_id"]


def wait_for_end(api, token, run_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, run = api("GET", f"/runs/{run_id}", token=token)
        assert status == 200, run
        if run["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return run
        time.sleep(0.2)
    pytest.fail(f"run {run_id} did not end in {timeout}s")


@pytest.fixture(scope="session")
def chromium():
    try:
        return ensure_chromium()
    except BrowserUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def page(chromium):
    with Page(width=1280, height=900) as p:
        yield p


def statuses(page) -> dict[str, str]:
    """Each step the graph draws, with the status it is drawn with."""
    return page.evaluate("Object.fromEntries([...document.querySelectorAll('#graph g.step')].map(g => [g.dataset.step, g.dataset.status]))")


def bars(page) -> dict[str, list[list]]:
    """Each step's timeline bars, in order: [attempt, outcome]."""
    return page.evaluate("""(() => {
        const out = {};
        for (const r of document.querySelectorAll('#timeline rect.attempt')) (out[r.dataset.step] = out[r.dataset.step] || []).push([Number(r.dataset.attempt), r.dataset.outcome]);
        return out;
    })()""")


def text(page, selector: str) -> str | None:
    return page.evaluate(f"(() => {{ const n = document.querySelector({selector!r}); return n ? n.textContent : null; }})()")


def snapshot(page, directory: Path, name: str) -> Path:
    """A full-page screenshot and the DOM, under `directory`; checks the PNG is a real one."""
    (directory / f"{name}.html").write_text(page.dom())
    path = page.screenshot(directory / f"{name}.png")
    data = path.read_bytes()
    width, height = png_size(data)
    assert width >= 1280 and height >= 900, (width, height)
    # A blank page of that size compresses to a few kilobytes; a drawn one does not.
    assert len(data) > 40_000, f"{path}: {len(data)} bytes, is anything drawn?"
    return path


def review_workflow(m: str, user: str) -> dict:
    """A retried step, a streamed one, a review, a router choosing one of two branches."""
    return {
        "name": "e2e-views",
        "defaults": {"model": MODEL, "max_tokens": 300, "retry": {"max_attempts": 3, "initial_backoff_ms": 200}},
        "steps": [
            {"id": "plan", "type": "llm", "prompt": m + " PLAN {{ input.topic }}"},
            {"id": "draft", "type": "llm", "stream": True, "prompt": m + " DRAFT {{ steps.plan.text }}"},
            {"id": "check", "type": "review", "show": "Is this plan fine? {{ steps.plan.text }}", "reviewers": [f"user:{user}"]},
            {"id": "route", "type": "router", "depends_on": ["plan"],
             "routes": [{"when": "steps.plan.text.size() > 3", "to": ["summary"]}], "default": ["fallback"]},
            {"id": "summary", "type": "llm", "depends_on": ["route"], "prompt": m + " SUM {{ steps.plan.text }}"},
            {"id": "fallback", "type": "transform", "depends_on": ["route"], "template": "nothing to say"},
            {"id": "final", "type": "transform", "join": "any", "depends_on": ["check", "summary", "fallback"],
             "template": "{{ steps.draft.text }}"},
        ],
    }


def test_the_run_view_follows_a_run_live_then_shows_every_step_attempt_token_and_cost(api, stack, devmodel, page, tmp_path):
    m = marker("views")
    user = f"viewer-{m}"
    add_rules(devmodel,
              {"name": m + "-plan", "match": {"prompt_contains": m + " PLAN"}, "reply": {"text": "plan ok"},
               "fail_first": {"count": 1}},
              {"name": m + "-draft", "match": {"prompt_contains": m + " DRAFT"}, "reply": {"text": DRAFT * 8},
               "latency_ms": 20000, "stream_chunk_chars": 12},
              {"name": m + "-sum", "match": {"prompt_contains": m + " SUM"}, "reply": {"text": "in short: fine"}})
    token = stack.token(user)
    run_id = start(api, token, review_workflow(m, user), {"topic": "views"})
    _, _, graph = api("GET", f"/runs/{run_id}/graph", token=token)
    every_step = {s["id"] for s in graph["steps"]}

    page.open(f"{stack.api_url}/runs/{run_id}/view#token={token}")
    # During: the review waits for its decision while the draft streams.
    expected = {"plan": "COMPLETED", "draft": "RUNNING", "check": "WAITING", "route": "COMPLETED",
                "summary": "COMPLETED", "fallback": "SKIPPED", "final": "PENDING"}
    page.wait_for("document.body.dataset.state === 'live'"
                  " && (document.querySelector('.stream[data-step=draft] pre') || {}).textContent.length > 24"
                  " && document.querySelector('#graph g.step[data-step=check][data-status=WAITING]')"
                  " && document.querySelector('#graph g.step[data-step=summary][data-status=COMPLETED]')", timeout_s=45)
    during = snapshot(page, tmp_path, "run-during")
    assert statuses(page) == expected, page.console
    assert set(statuses(page)) == every_step, "every step of the graph is drawn, once"
    # The token left the address bar for this tab's storage.
    assert page.evaluate("location.hash") == ""
    assert page.evaluate("sessionStorage.getItem('chainrun.token')") == token
    # What the review asks, and who may answer.
    assert text(page, ".ask[data-step=check] pre.show") == "Is this plan fine? plan ok"
    assert f"user:{user}" in text(page, ".ask[data-step=check] .reviewers")
    # The streamed text so far is the start of the reply, and it grows while we watch.
    streamed = text(page, ".stream[data-step=draft] pre")
    assert (DRAFT * 8).startswith(streamed), streamed
    page.wait_for(f"document.querySelector('.stream[data-step=draft] pre').textContent.length > {len(streamed)}", timeout_s=15)
    # The retried step has two bars so far; the streaming one has its attempt open.
    drawn = bars(page)
    assert drawn["plan"] == [[1, "retried"], [2, "completed"]], drawn
    assert drawn["draft"] == [[1, "running"]], drawn
    assert "fallback" not in drawn and "final" not in drawn, drawn

    status, _, decided = api("POST", f"/runs/{run_id}/resume", token=token, body={"step": "check", "decision": "approve"})
    assert status == 202, decided
    page.wait_for("document.body.dataset.state === 'done'", timeout_s=60)
    after = snapshot(page, tmp_path, "run-after")
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert run["status"] == "COMPLETED", run
    assert page.evaluate("document.getElementById('run-status').dataset.status") == "COMPLETED"

    # After: every step drawn with its real status, one bar per attempt it made.
    assert statuses(page) == {s["id"]: s["status"] for s in run["steps"]}, page.console
    assert statuses(page)["fallback"] == "SKIPPED" and statuses(page)["plan"] == "COMPLETED"
    drawn = bars(page)
    for step in run["steps"]:
        assert len(drawn.get(step["id"], [])) == step["attempts"], (step["id"], drawn, step["attempts"])
    assert drawn["plan"] == [[1, "retried"], [2, "completed"]]
    assert all(outcome == "completed" for step in drawn.values() for _, outcome in step[-1:]), drawn
    # Tokens and cost per step, as the API counts them (money as its exact string).
    for step in run["steps"]:
        row = f"#steps tr[data-step={step['id']}]"
        assert text(page, f"{row} td.cost") == "$" + step["cost_usd"], step
        assert text(page, f"{row} td.input-tokens").replace("\u2009", "") == str(step["input_tokens"]), step
        assert text(page, f"{row} td.output-tokens").replace("\u2009", "") == str(step["output_tokens"]), step
        tokens = step["input_tokens"] + step["output_tokens"] + step["cache_read_tokens"] + step["cache_write_tokens"]
        node = page.evaluate(f"document.querySelector('#graph g.step[data-step={step['id']}] text.metrics').dataset.tokens")
        assert node == str(tokens), step
    assert text(page, "#total-cost") == "$" + run["totals"]["cost_usd"]
    assert int(run["totals"]["cost_pico_usd"]) > 0
    # The whole streamed reply, and nothing waits any more.
    assert text(page, ".stream[data-step=draft] pre") == DRAFT * 8
    assert page.evaluate("document.getElementById('waiting-section').hidden") is True
    assert page.console == [], page.console
    assert during.exists() and after.exists()

    # The token went to the API in a header only: no log of the stack holds it.
    for log in Path(stack.logs).glob("*.log"):
        assert token not in log.read_text(errors="replace"), f"{log} holds the token"


def test_a_failed_run_shows_each_failed_attempt_the_map_items_retried_and_what_never_ran(api, stack, devmodel, page, tmp_path):
    m = marker("views-failed")
    user = f"viewer-{m}"
    token = stack.token(user)
    add_rules(devmodel,
              {"name": m + "-b", "match": {"prompt_contains": m + " ITEM b"}, "reply": {"text": "fixed b"}, "fail_first": {"count": 1}},
              {"name": m + "-item", "match": {"prompt_contains": m + " ITEM"}, "reply": {"text": "fixed"}},
              {"name": m + "-broken", "match": {"prompt_contains": m + " BROKEN"},
               "error": {"type": "ThrottlingException", "message": "slow down"}})
    workflow = {"name": "e2e-views-failed",
                "defaults": {"model": MODEL, "max_tokens": 100, "retry": {"max_attempts": 3, "initial_backoff_ms": 50}},
                "steps": [
                    {"id": "items", "type": "transform", "expression": "['a', 'b', 'c']"},
                    {"id": "per_item", "type": "map", "over": "steps.items.output", "max_concurrency": 1,
                     "step": {"type": "llm", "prompt": m + " ITEM {{ item }}"}},
                    {"id": "broken", "type": "llm", "depends_on": ["per_item"], "prompt": m + " BROKEN"},
                    {"id": "after", "type": "transform", "template": "{{ steps.broken.text }}"},
                ]}
    run_id = start(api, token, workflow)
    run = wait_for_end(api, token, run_id)
    assert run["status"] == "FAILED", run

    page.open(f"{stack.api_url}/runs/{run_id}/view#token={token}")
    page.wait_for("document.body.dataset.state === 'done'", timeout_s=30)
    snapshot(page, tmp_path, "failed-run")
    assert statuses(page) == {s["id"]: s["status"] for s in run["steps"]}
    assert statuses(page)["broken"] == "FAILED" and statuses(page)["per_item"] == "COMPLETED"
    drawn = bars(page)
    assert drawn["broken"] == [[1, "retried"], [2, "retried"], [3, "failed"]], drawn
    assert "after" not in drawn, "a step that never ran has no bar"
    # A map item's retry is a mark on its map's row, not an attempt of the map.
    assert drawn["per_item"] == [[1, "completed"]], drawn
    marks = page.evaluate("[...document.querySelectorAll('#timeline line.item-retry')].map(l => [l.dataset.step, l.dataset.item])")
    assert marks == [["per_item", "1"]], marks
    assert "3 items" in text(page, "#graph g.step[data-step=per_item] text.status"), "how many items the map ran over"
    # Coloured by status: the same status, the same colour, wherever the run's own status is.
    fills = page.evaluate("Object.fromEntries([...document.querySelectorAll('#graph g.step')].map(g => [g.dataset.step, getComputedStyle(g.querySelector('rect.node')).fill]))")
    badges = page.evaluate("Object.fromEntries([...document.querySelectorAll('#steps tbody tr')].map(tr => [tr.dataset.step, getComputedStyle(tr.querySelector('.badge')).color]))")
    for colours in (fills, badges):
        assert colours["items"] == colours["per_item"], colours
        assert len({colours["items"], colours["broken"], colours["after"]}) == 3, colours
    assert "ThrottlingException" in text(page, "#steps tr[data-step=broken] td.error")
    assert text(page, "#run-error"), "the run's error is shown"
    assert page.console == [], page.console


def test_a_public_run_opens_without_a_token_and_a_private_one_asks_for_it(api, stack, devmodel, page, tmp_path):
    m = marker("views-public")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "hello"}})
    user = f"viewer-{m}"
    token = stack.token(user)
    workflow = {"name": "e2e-views-public", "defaults": {"model": MODEL, "max_tokens": 100},
                "steps": [{"id": "greet", "type": "llm", "prompt": m + " greet {{ input.who }}"},
                          {"id": "shout", "type": "transform", "template": "{{ steps.greet.text | upper }}"}]}
    public = start(api, token, workflow, {"who": "you"}, options={"visibility": "PUBLIC"})
    private = start(api, token, workflow, {"who": "me"})
    wait_for_end(api, token, public)
    run = wait_for_end(api, token, private)

    # A fresh browser: no token anywhere.
    page.open(f"{stack.api_url}/runs/{public}/view")
    page.wait_for("document.body.dataset.state === 'done'", timeout_s=30)
    snapshot(page, tmp_path, "public-run")
    assert statuses(page) == {"greet": "COMPLETED", "shout": "COMPLETED"}
    assert bars(page) == {"greet": [[1, "completed"]], "shout": [[1, "completed"]]}
    assert page.evaluate("document.getElementById('auth').hidden") is True
    assert page.evaluate("sessionStorage.getItem('chainrun.token')") is None

    # A run that is not public: the page asks for a token, and opens the run with it.
    page.open(f"{stack.api_url}/runs/{private}/view")
    page.wait_for("document.body.dataset.state === 'auth'", timeout_s=30)
    assert "not public" in text(page, "#auth .why")
    page.evaluate(f"document.querySelector('#auth input').value = {token!r}; document.querySelector('#auth button').click(); true")
    page.wait_for("document.body.dataset.state === 'done'", timeout_s=30)
    assert statuses(page) == {s["id"]: s["status"] for s in run["steps"]}
    assert page.evaluate("sessionStorage.getItem('chainrun.token')") == token

    # Someone else's token does not open it: the page says there is no such run for them.
    page.evaluate("sessionStorage.clear()")
    page.open(f"{stack.api_url}/runs/{private}/view#token={stack.token('mallory-' + m)}")
    page.wait_for("document.body.dataset.state === 'error'", timeout_s=30)
    assert "no run" in text(page, "#problem")


def test_the_cost_page_draws_one_bar_per_workflow_day_and_lists_the_priciest_step(api, stack, devmodel, page, tmp_path):
    m = marker("views-costs")
    user = f"viewer-{m}"
    token = stack.token(user)
    add_rules(devmodel,
              {"name": m + "-cheap", "match": {"prompt_contains": m + " CHEAP"}, "reply": {"text": "ok"},
               "usage": {"input_tokens": 10, "output_tokens": 5}},
              {"name": m + "-dear", "match": {"prompt_contains": m + " DEAR"}, "reply": {"text": "a long answer"},
               "usage": {"input_tokens": 2000, "output_tokens": 3000}})
    cheap = {"name": "e2e-views-cheap", "defaults": {"model": MODEL, "max_tokens": 3000},
             "steps": [{"id": "tiny", "type": "llm", "prompt": m + " CHEAP"}]}
    dear = {"name": "e2e-views-dear", "defaults": {"model": MODEL, "max_tokens": 3000},
            "steps": [{"id": "small", "type": "llm", "prompt": m + " CHEAP again"},
                      {"id": "big", "type": "llm", "prompt": m + " DEAR {{ steps.small.text }}"}]}
    runs = [start(api, token, cheap), start(api, token, cheap), start(api, token, dear)]
    for run_id in runs:
        wait_for_end(api, token, run_id)
    # Runs roll up when they end; wait until all three are counted.
    deadline = time.monotonic() + 30
    while True:
        status, _, report = api("GET", "/analytics/costs?days=7", token=token)
        assert status == 200, report
        if sum(w["runs"] for w in report["workflows"]) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(w["runs"] for w in report["workflows"]) == 3, report

    page.open(f"{stack.api_url}/analytics/view?days=7#token={token}")
    page.wait_for("document.body.dataset.state === 'done'", timeout_s=30)
    snapshot(page, tmp_path, "costs")
    drawn = page.evaluate("[...document.querySelectorAll('#daily rect.day-cost')].map(r => [r.dataset.day, r.dataset.workflow, r.dataset.usd])")
    assert sorted(drawn) == sorted([d["day"], d["workflow"], d["total_cost_usd"]] for d in report["daily"]), drawn
    assert {w for _, w, _ in drawn} == {"e2e-views-cheap", "e2e-views-dear"}
    legend = page.evaluate("[...document.querySelectorAll('#daily g.legend-item')].map(g => g.dataset.workflow)")
    assert legend == [w["workflow"] for w in report["workflows"]]
    # The priciest step of the period comes first.
    steps = [(int(s["total_cost_pico_usd"]), w["workflow"], s["step_id"]) for w in report["workflows"] for s in w["steps"]]
    priciest = max(steps)
    first = page.evaluate("(() => { const g = document.querySelector('#top-steps g.top-step'); return [g.dataset.workflow, g.dataset.step, g.dataset.rank]; })()")
    assert first == [priciest[1], priciest[2], "1"], (first, steps)
    assert (priciest[1], priciest[2]) == ("e2e-views-dear", "big")
    # The figures, exact.
    total = sum(int(w["total_cost_pico_usd"]) for w in report["workflows"])
    shown = text(page, "#total-cost")
    assert shown.startswith("$") and Decimal(shown[1:]) * 10**12 == total, (shown, total)
    assert page.console == [], page.console


def test_the_run_view_shows_prompt_cache_reads_and_writes_and_response_cache_hits(api, stack, devmodel, page):
    m = marker("view-cache")
    user = f"viewer-{m}"
    rules = "Rule: answer in one line and cite the ticket. " * 400  # about 4,500 tokens: Haiku 4.5 caches it
    add_rules(devmodel, {"name": m, "match": {"system_contains": m}, "reply": {"text": "noted"}},
              {"name": m + "-det", "match": {"prompt_contains": m + " DET"}, "reply": {"text": "shipping"}})
    wf = {"name": "e2e-views-cache", "steps": [
        {"id": "answers", "type": "map", "over": "input.tickets", "max_concurrency": 1,
         "step": {"type": "llm", "model": "global.anthropic.claude-haiku-4-5-20251001-v1:0", "max_tokens": 20,
                  "system": m + " " + rules, "prompt": "Ticket: {{ item }}"}},
        {"id": "label", "type": "llm", "model": "amazon.nova-micro-v1:0", "temperature": 0, "cache": "response",
         "max_tokens": 20, "prompt": m + " DET label"}]}
    token = stack.token(user)
    first = wait_for_end(api, token, start(api, token, wf, {"tickets": ["a", "b", "c"]}))
    assert first["status"] == "COMPLETED", first
    second_id = start(api, token, wf, {"tickets": ["a", "b", "c"]})
    run = wait_for_end(api, token, second_id)
    assert run["status"] == "COMPLETED", run
    page.open(f"{stack.api_url}/runs/{second_id}/view#token={token}")
    page.wait_for("document.body.dataset.state === 'done'", timeout_s=30)
    answers = {s["id"]: s for s in run["steps"]}["answers"]
    assert answers["cache_read_tokens"] > 0, answers
    shown = text(page, "#steps tr[data-step=answers] td.cache-tokens").replace("\u2009", "")
    assert f"read {answers['cache_read_tokens']}" in shown, shown
    assert text(page, "#steps tr[data-step=label] td.cache-tokens") == "response cache hit"
    assert text(page, "#steps tr[data-step=label] td.cost") == "$0"
