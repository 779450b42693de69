"""End-to-end: templates on the local stack. A workflow is created from each built-in
(`POST /workflows {"template": …}`) and run to completion through the real binaries, its
review decided and its input answered over the API; a stored workflow is saved as a
template, seen by its owner only, and a workflow is created from it.

The dev model server plays every step: each test puts a marker in the run's input and in
every scripted reply, so each of the template's prompts (which quote the input or an
upstream reply) carries it, and rules match a prompt's wording together with the marker.
"""

from __future__ import annotations

import re

from test_control import wait_for, wait_for_status
from test_runs import add_rules, calls_with, follow, marker


def rule(m: str, name: str, wording: str, reply: dict) -> dict:
    """A rule for the prompt that has `wording` and this test's marker, in any order."""
    pattern = f"(?s)^(?=.*{re.escape(wording)})(?=.*{re.escape(m)})"
    return {"name": f"{m}-{name}", "match": {"prompt_regex": pattern}, "reply": reply}


def create_from(api, token, template: str, **extra) -> dict:
    status, headers, created = api("POST", "/workflows", token=token, body={"template": template, **extra})
    assert status == 201, created
    assert headers["Location"] == f"/workflows/{created['id']}" and created["version"] == 1
    return created


def run_of(api, token, workflow_id: str, input_: dict) -> str:
    status, _, accepted = api("POST", f"/workflows/{workflow_id}/runs", token=token, body={"input": input_})
    assert status == 202, accepted
    return accepted["run_id"]


def statuses(api, token, run_id: str) -> dict:
    status, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert status == 200, run
    return {s["id"]: s["status"] for s in run["steps"]}


def finish(api, token, run_id: str) -> dict:
    events = follow(api, token, run_id, timeout=60, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED", events[-1]
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    return run


def test_the_builtins_are_listed_and_read_whole(api, stack):
    token = stack.token("tpl-reader")
    status, _, page = api("GET", "/templates?limit=3", token=token)
    assert status == 200 and [t["id"] for t in page["items"]] == ["feedback-analysis", "code-review", "sentiment-routing"], page
    status, _, rest = api("GET", f"/templates?limit=3&next={page['next']}", token=token)
    assert [t["id"] for t in rest["items"]] == ["content-pipeline", "support-intake"] and rest["next"] is None, rest
    status, _, whole = api("GET", "/templates/code-review", token=token)
    assert status == 200 and whole["workflow"]["name"] == "code-review" and whole["example_input"]["diff"], whole
    status, headers, problem = api("GET", "/templates/no-such-template", token=token)
    assert status == 404 and headers["Content-Type"] == "application/problem+json", problem


def test_feedback_analysis_from_its_template_runs_to_completion(api, stack, devmodel):
    m = marker("tpl-feedback")
    add_rules(devmodel,
              rule(m, "extract", "List the distinct issues", {"json": {"issues": [f"{m} logout", f"{m} csv"]}}),
              rule(m, "sentiment", "Classify the sentiment", {"json": {"label": "negative"}}),
              rule(m, "summary", "Summarise this customer feedback", {"text": f"{m} two bugs"}),
              rule(m, "fix", "Suggest one concrete fix", {"text": "a fix"}),
              rule(m, "reply", "Write a short, kind reply", {"text": "sorry"}))
    alice = stack.token("tpl-alice")
    wf = create_from(api, alice, "feedback-analysis")
    run = finish(api, alice, run_of(api, alice, wf["id"], {"feedback": f"{m}: logged out on every network switch; CSV drops a row"}))
    assert set(statuses(api, alice, run["run_id"]).values()) == {"COMPLETED"}
    assert run["output"].startswith(f"Sentiment: negative\nSummary: {m} two bugs"), run["output"]
    assert len([c for c in calls_with(devmodel, m) if "Suggest one concrete fix" in c["prompt"]]) == 2, "one fix per issue"


def test_code_review_from_its_template_runs_both_checks_in_parallel_and_summarises(api, stack, devmodel):
    m = marker("tpl-review")
    add_rules(devmodel,
              {**rule(m, "correctness", "diff for correctness", {"json": {"findings": []}}), "latency_ms": 800},
              {**rule(m, "security", "diff for security problems",
                      {"json": {"findings": [{"severity": "blocker", "message": f"{m} SQL injection"}]}}), "latency_ms": 800},
              {**rule(m, "style", "readability and naming", {"text": f"{m} fine"}), "latency_ms": 800},
              rule(m, "summary", "Write one code review", {"json": {"verdict": "request_changes", "review": "Bind the parameter."}}))
    alice = stack.token("tpl-alice")
    wf = create_from(api, alice, "code-review", name="e2e-code-review")
    assert wf["name"] == "e2e-code-review"
    run_id = run_of(api, alice, wf["id"], {"language": "Python", "diff": f"+ db.query(f'{m} SELECT {{user_id}}')"})
    run = finish(api, alice, run_id)
    assert set(statuses(api, alice, run_id).values()) == {"COMPLETED"}
    assert run["output"] == "Verdict: request_changes (1 blocking findings)\n\nBind the parameter.", run["output"]
    _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=alice)
    kinds = [(e["type"], e.get("step_id")) for e in page["events"]]
    first_done = next(i for i, (kind, _) in enumerate(kinds) if kind == "STEP_COMPLETED")
    started = {step for kind, step in kinds[:first_done] if kind == "STEP_STARTED"}
    assert started == {"correctness", "security", "style"}, kinds


def test_sentiment_routing_from_its_template_escalates_a_negative_message(api, stack, devmodel):
    m = marker("tpl-route")
    add_rules(devmodel,
              rule(m, "note", "hand-off note", {"text": f"{m} refund it"}),
              rule(m, "auto", "friendly reply", {"text": "thanks"}),
              rule(m, "classify", "Classify this customer message",
                   {"json": {"sentiment": "negative", "urgent": True, "topic": "broken order"}}))
    alice = stack.token("tpl-alice")
    wf = create_from(api, alice, "sentiment-routing")
    run = finish(api, alice, run_of(api, alice, wf["id"], {"message": f"{m}: my order arrived broken, again"}))
    assert statuses(api, alice, run["run_id"]) == {"classify": "COMPLETED", "route": "COMPLETED", "escalate": "COMPLETED",
                                               "auto_reply": "SKIPPED", "outcome": "COMPLETED"}
    assert run["output"] == f"ESCALATED to a human agent.\n\n{m} refund it"
    assert not [c for c in calls_with(devmodel, m) if "friendly reply" in c["prompt"]], "the other branch made no call"


def test_content_pipeline_from_its_template_waits_for_the_editor_then_finishes(api, stack, devmodel):
    m = marker("tpl-content")
    add_rules(devmodel,
              rule(m, "outline", "Outline a short blog post", {"text": f"{m} outline"}),
              rule(m, "draft", "Write a blog post of about 400 words", {"text": f"{m} draft"}),
              rule(m, "headline", "Write one headline", {"text": "A headline"}),
              rule(m, "social", "three short social media posts", {"json": {"posts": ["one", "two"]}}))
    alice = stack.token("tpl-alice")
    wf = create_from(api, alice, "content-pipeline")
    run_id = run_of(api, alice, wf["id"], {"topic": f"{m} serverless"})
    waiting = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert waiting["waiting"]["kind"] == "review" and waiting["waiting"]["steps"] == ["editor"], waiting["waiting"]
    status, _, decided = api("POST", f"/runs/{run_id}/resume", token=alice,
                             body={"step": "editor", "decision": "edit", "output": f"{m} edited post", "comment": "tighter"})
    assert status == 202, decided
    run = finish(api, alice, run_id)
    assert set(statuses(api, alice, run_id).values()) == {"COMPLETED"}
    assert run["output"] == f"# A headline\n\n{m} edited post\n\n---\n- one\n- two\n", run["output"]


def test_support_intake_from_its_template_collects_its_slots_over_two_answers_then_finishes(api, stack, devmodel):
    m = marker("tpl-intake")
    add_rules(devmodel,
              rule(m, "urgency", "Rate the urgency", {"json": {"urgency": "high"}}),
              rule(m, "extract", f"{m} order ORD-12345 never came", {"json": {"order_id": "ORD-12345", "issue_type": "delivery"}}),
              rule(m, "ticket", "File a support ticket", {"json": {"title": f"{m} missing parcel", "summary": "Never arrived."}}),
              rule(m, "ack", "Write a two-sentence message", {"text": "Ticket open."}))
    alice = stack.token("tpl-alice")
    wf = create_from(api, alice, "support-intake")
    run_id = run_of(api, alice, wf["id"], {"message": f"{m} my parcel is missing", "customer_name": "Ada"})
    waiting = wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    assert waiting["waiting"]["kind"] == "input" and waiting["waiting"]["steps"] == ["details"], waiting["waiting"]

    status, _, answered = api("POST", f"/runs/{run_id}/resume", token=alice,
                              body={"step": "details", "text": f"{m} order ORD-12345 never came"})
    assert status == 202 and answered["state"] == "reading", answered

    def email_asked():
        _, _, page = api("GET", f"/runs/{run_id}/events?limit=1000", token=alice)
        asked = [e for e in page["events"] if e["type"] == "AWAITING_INPUT" and e.get("step_id") == "details"]
        return len(asked) == 2 and asked[-1]["data"]["missing"] == ["email"]

    wait_for("the step to ask for the email", email_asked, timeout=30)
    wait_for_status(api, alice, run_id, "AWAITING_INPUT")
    status, _, answered = api("POST", f"/runs/{run_id}/resume", token=alice, body={"step": "details", "values": {"email": "ada@example.com"}})
    assert status == 202 and answered["state"] == "complete", answered
    run = finish(api, alice, run_id)
    assert set(statuses(api, alice, run_id).values()) == {"COMPLETED"}
    assert run["output"].startswith(f"Ticket: {m} missing parcel (order ORD-12345, delivery, high priority)"), run["output"]


def test_a_stored_workflow_saved_as_a_template_is_its_owners_and_creates_workflows(api, stack, devmodel):
    m = marker("tpl-saved")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "hi"}})
    alice, bob = stack.token(f"alice-{m}"), stack.token(f"bob-{m}")
    definition = {"name": "e2e-greet", "defaults": {"model": "amazon.nova-micro-v1:0"},
                  "steps": [{"id": "greet", "type": "llm", "prompt": f"{m} hello"}]}
    status, _, wf = api("POST", "/workflows", token=alice, body={"workflow": definition})
    assert status == 201, wf

    # Refusals name what is wrong and write nothing.
    status, _, problem = api("POST", "/templates", token=alice, body={"workflow_id": wf["id"], "title": ""})
    assert status == 400 and "title" in problem["detail"], problem
    status, _, problem = api("POST", "/templates", token=bob, body={"workflow_id": wf["id"]})
    assert status == 404, problem

    status, headers, saved = api("POST", "/templates", token=alice, body={"workflow_id": wf["id"], "title": "Greeter"})
    assert status == 201 and headers["Location"] == f"/templates/{saved['id']}", saved
    assert saved["source"] == {"workflow_id": wf["id"], "version": 1} and saved["workflow"] == definition
    _, _, listed = api("GET", "/templates?limit=100", token=alice)
    assert [t["id"] for t in listed["items"]][-1] == saved["id"]
    _, _, theirs = api("GET", "/templates?limit=100", token=bob)
    assert saved["id"] not in [t["id"] for t in theirs["items"]]
    status, _, _ = api("GET", f"/templates/{saved['id']}", token=bob)
    assert status == 404

    created = create_from(api, alice, saved["id"], name="e2e-greet-copy")
    assert created["workflow"]["steps"] == definition["steps"]
    run = finish(api, alice, run_of(api, alice, created["id"], {}))
    assert run["output"] == {"greet": "hi"}
    status, _, _ = api("DELETE", f"/templates/{saved['id']}", token=alice)
    assert status == 204
