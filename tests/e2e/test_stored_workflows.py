"""End-to-end: stored workflows through the real API and runner binaries on the local
stack — create, update with optimistic concurrency, run a pinned version, list,
duplicate, delete — and nothing of one user's is visible to another.
"""

from __future__ import annotations

from test_runs import add_rules, follow, marker, workflow


def greeting(m: str, word: str, name: str = "e2e-stored") -> dict:
    return workflow(name, [{"id": "greet", "type": "llm", "prompt": f"{m} {word} {{{{ input.name }}}}"}],
                    input_schema={"type": "object", "required": ["name"]})


def test_a_stored_workflow_is_versioned_run_pinned_listed_duplicated_and_deleted(api, stack, devmodel):
    m = marker("stored")
    add_rules(devmodel,
              {"name": m + "-v1", "match": {"prompt_contains": m + " hello"}, "reply": {"text": "v1 reply"}},
              {"name": m + "-v2", "match": {"prompt_contains": m + " bonjour"}, "reply": {"text": "v2 reply"}})
    alice = stack.token(f"alice-{m}")

    status, headers, created = api("POST", "/workflows", token=alice, body={"workflow": greeting(m, "hello")})
    assert status == 201, created
    wid = created["id"]
    assert (created["version"], headers["Location"], headers["ETag"]) == (1, f"/workflows/{wid}", '"1"')

    # An invalid definition gets POST /runs's 400 and writes nothing.
    status, _, refused = api("POST", "/workflows", token=alice,
                             body={"workflow": workflow("bad", [{"id": "x", "type": "nope"}])})
    assert status == 400 and refused["title"] == "Invalid workflow", refused

    # A new version needs the one it replaces; a lost update is a 409 naming the current one.
    status, _, v2 = api("PUT", f"/workflows/{wid}", token=alice, body={"workflow": greeting(m, "bonjour")},
                        headers={"If-Match": '"1"'})
    assert status == 200 and v2["version"] == 2, v2
    status, _, lost = api("PUT", f"/workflows/{wid}", token=alice, body={"workflow": greeting(m, "hola"), "version": 1})
    assert status == 409 and "version 2" in lost["detail"], lost
    status, _, blind = api("PUT", f"/workflows/{wid}", token=alice, body={"workflow": greeting(m, "hola")})
    assert status == 428, blind

    # A run of version 1 runs version 1's definition, and says so.
    status, _, accepted = api("POST", f"/workflows/{wid}/runs", token=alice, body={"input": {"name": "Ada"}, "version": 1})
    assert status == 202, accepted
    events = follow(api, alice, accepted["run_id"])
    assert events[-1]["type"] == "RUN_COMPLETED", events[-1]
    status, _, run = api("GET", f"/runs/{accepted['run_id']}", token=alice)
    assert run["workflow_ref"] == {"workflow_id": wid, "version": 1}
    assert run["output"] == {"greet": "v1 reply"}

    status, _, latest = api("POST", f"/workflows/{wid}/runs", token=alice, body={"input": {"name": "Ada"}})
    assert status == 202, latest
    assert follow(api, alice, latest["run_id"])[-1]["type"] == "RUN_COMPLETED"
    status, _, run = api("GET", f"/runs/{latest['run_id']}", token=alice)
    assert (run["workflow_ref"]["version"], run["output"]) == (2, {"greet": "v2 reply"})

    status, _, estimate = api("POST", f"/workflows/{wid}/estimate", token=alice, body={"input": {"name": "Ada"}})
    assert status == 200 and estimate["steps"][0]["step_id"] == "greet", estimate

    status, _, copy = api("POST", f"/workflows/{wid}/duplicate", token=alice, body={"name": "e2e-stored-copy"})
    assert status == 201 and copy["version"] == 1 and copy["name"] == "e2e-stored-copy", copy

    status, _, page = api("GET", "/workflows?limit=1", token=alice)
    assert status == 200 and [w["id"] for w in page["items"]] == [copy["id"]] and page["next"], page
    status, _, rest = api("GET", f"/workflows?limit=5&next={page['next']}", token=alice)
    assert [w["id"] for w in rest["items"]] == [wid] and rest["next"] is None, rest

    # Another user sees none of it.
    bob = stack.token(f"bob-{m}")
    for method, path, body in [("GET", f"/workflows/{wid}", None),
                               ("PUT", f"/workflows/{wid}", {"workflow": greeting(m, "mine"), "version": 2}),
                               ("POST", f"/workflows/{wid}/runs", {"input": {"name": "x"}}),
                               ("POST", f"/workflows/{wid}/duplicate", None),
                               ("DELETE", f"/workflows/{wid}", None)]:
        status, _, body_ = api(method, path, token=bob, body=body)
        assert status == 404, (method, path, body_)
    status, _, bobs = api("GET", "/workflows?limit=100", token=bob)
    assert wid not in [w["id"] for w in bobs["items"]], "bob lists only workflows he may see"

    # Deleted: gone, but the runs that ran it keep their snapshots.
    status, _, _ = api("DELETE", f"/workflows/{wid}", token=alice)
    assert status == 204
    assert api("GET", f"/workflows/{wid}", token=alice)[0] == 404
    status, _, run = api("GET", f"/runs/{accepted['run_id']}", token=alice)
    assert status == 200 and run["output"] == {"greet": "v1 reply"}
    status, _, left = api("GET", "/workflows", token=alice)
    assert [w["id"] for w in left["items"]] == [copy["id"]]
