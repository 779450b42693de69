"""End-to-end: sharing on the local stack — a workflow shared with a group, then made
PUBLIC and run without a token under /public, then made PRIVATE again — through the real
API and runner binaries. Who sees what, whose progress feed shows the run, and that a
narrowed workflow narrows its runs at once.
"""

from __future__ import annotations

from test_runs import add_rules, follow, marker, workflow


def greeting(m: str) -> dict:
    return workflow("e2e-shared", [{"id": "greet", "type": "llm", "prompt": f"{m} hello {{{{ input.name }}}}"}])


def run_ids(page: dict) -> list:
    return [row["run_id"] for row in page["items"]]


def test_a_shared_workflow_is_seen_by_its_group_run_by_anyone_once_public_and_hidden_again_when_private(api, stack, devmodel):
    m = marker("shared")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m + " hello"}, "reply": {"text": "hi"}})
    olivia, gus, oscar = stack.token(f"olivia-{m}"), stack.token(f"gus-{m}", groups=[f"support-{m}"]), stack.token(f"oscar-{m}")
    admin = stack.token(f"ada-{m}", groups=["admin"])

    status, _, created = api("POST", "/workflows", token=olivia, body={
        "workflow": greeting(m), "visibility": "SHARED", "shares": [{"group": f"support-{m}", "role": "run"}]})
    assert status == 201 and created["visibility"] == "SHARED", created
    wid = created["id"]

    # The group runs it; the run is on the group member's, the owner's and the admin feed.
    status, _, accepted = api("POST", f"/workflows/{wid}/runs", token=gus, body={"input": {"name": "Ada"}})
    assert status == 202, accepted
    run = accepted["run_id"]
    assert follow(api, gus, run)[-1]["type"] == "RUN_COMPLETED"
    for token in (gus, olivia, admin):
        status, _, feed = api("GET", "/progress?limit=50", token=token)
        assert status == 200 and run in run_ids(feed), feed
        row = next(r for r in feed["items"] if r["run_id"] == run)
        assert row["status"] == "COMPLETED", row
    # Someone else: nothing, and 404s that read like unknown ids; a viewer may not steer.
    status, _, feed = api("GET", "/progress?limit=50&include=shared", token=oscar)
    assert run not in run_ids(feed)
    for path in (f"/runs/{run}", f"/runs/{run}/events", f"/workflows/{wid}"):
        status, _, problem = api("GET", path, token=oscar)
        assert status == 404, (path, problem)
    # The group holds `run`: it reads olivia's runs of it but may not steer them.
    status, _, hers = api("POST", f"/workflows/{wid}/runs", token=olivia, body={"input": {"name": "Cy"}})
    assert status == 202, hers
    assert follow(api, olivia, hers["run_id"])[-1]["type"] == "RUN_COMPLETED"
    assert api("GET", f"/runs/{hers['run_id']}", token=gus)[0] == 200
    status, _, problem = api("POST", f"/runs/{hers['run_id']}/steps/greet/retry", token=gus, body={})
    assert status == 403 and "control" in problem["detail"], problem
    # Without a token: a 401, and under /public a 404 for what is not PUBLIC.
    assert api("GET", f"/runs/{run}")[0] == 401
    assert api("GET", f"/public/runs/{run}")[0] == 404

    # PUBLIC: anyone runs it without a token, and reads that run under /public.
    status, _, changed = api("PUT", f"/workflows/{wid}/access", token=olivia, body={"visibility": "PUBLIC"})
    assert status == 200 and changed["visibility"] == "PUBLIC", changed
    status, _, anonymous = api("POST", f"/public/workflows/{wid}/runs", body={"input": {"name": "Bo"}})
    assert status == 202, anonymous
    public_run = anonymous["run_id"]
    status, _, page = api("GET", f"/public/runs/{public_run}/events?after=0&limit=100")
    assert status == 200, page
    events = page["events"]
    for _ in range(300):
        if events and events[-1]["type"] in ("RUN_COMPLETED", "RUN_FAILED"):
            break
        status, _, page = api("GET", f"/public/runs/{public_run}/events?after={page['last_seq']}&limit=100")
        events += page["events"]
    assert events[-1]["type"] == "RUN_COMPLETED", events[-1]
    status, _, feed = api("GET", "/public/progress?limit=100")
    assert status == 200 and public_run in run_ids(feed), feed
    status, _, feed = api("GET", "/progress?limit=100&include=shared", token=oscar)
    assert public_run in run_ids(feed), "a PUBLIC workflow's runs are on the shared feeds"
    # A run that ended before the change keeps the feed rows it ended with, but reading it
    # follows the workflow's access now: anyone may.
    assert run not in run_ids(feed)
    assert api("GET", f"/runs/{run}", token=oscar)[0] == 200
    # A token sent under /public vouches for nothing: olivia's own PRIVATE-to-her things stay hidden there.
    assert api("POST", f"/public/runs/{public_run}/cancel", token=olivia)[0] in (404, 405)

    # PRIVATE again: its runs are hidden from everyone but the owner, starters and admins, at once.
    status, _, changed = api("PUT", f"/workflows/{wid}/access", token=olivia, body={"visibility": "PRIVATE"})
    assert status == 200, changed
    assert api("GET", f"/public/runs/{public_run}")[0] == 404
    assert api("GET", f"/runs/{public_run}", token=oscar)[0] == 404
    assert api("GET", f"/runs/{public_run}", token=olivia)[0] == 200
    assert api("GET", f"/runs/{run}", token=gus)[0] == 200, "a starter keeps their run"
    assert api("POST", f"/workflows/{wid}/runs", token=gus, body={"input": {"name": "x"}})[0] == 404
