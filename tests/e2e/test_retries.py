"""End-to-end: how model errors are classified and retried, through the real AWS SDK.

The dev model server answers with Bedrock's own error codes and HTTP statuses, so these
tests cover the whole chain: SDK error → the adapter's classification → the engine's
retry decision. Each counts the calls the server saw, which also proves the SDK does not
retry on its own underneath (its retries are off, so attempts are never multiplied).
"""

from __future__ import annotations

import pytest

from test_runs import add_rules, calls_with, follow, marker, start, workflow


@pytest.mark.parametrize("error", [
    "ThrottlingException",
    "ModelTimeoutException",
    "ServiceUnavailableException",
    "InternalServerException",
])
def test_retryable_errors_are_retried_once_each_and_then_succeed(api, stack, devmodel, error):
    m = marker("retryable")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "fine"},
                         "fail_first": {"count": 1, "error": error, "message": "scripted"}})
    token = stack.token("alice")
    run_id = start(api, token, workflow("e2e-retryable", [{"id": "s", "type": "llm", "prompt": m}]))["run_id"]
    events = follow(api, token, run_id)
    assert events[-1]["type"] == "RUN_COMPLETED", events[-1]
    retrying = [e for e in events if e["type"] == "STEP_RETRYING"]
    assert [(e["attempt"], e["data"]["reason"]) for e in retrying] == [(2, error)]
    assert 0 <= retrying[0]["data"]["delay_ms"] <= 50, "first backoff is at most initial_backoff_ms"
    assert len(calls_with(devmodel, m)) == 2
    completed = next(e for e in events if e["type"] == "STEP_COMPLETED")
    assert completed["data"]["attempts"] == 2


@pytest.mark.parametrize("error", ["ValidationException", "ResourceNotFoundException"])
def test_request_errors_are_terminal_after_one_call(api, stack, devmodel, error):
    m = marker("terminal")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "error": {"type": error, "message": "scripted"}})
    token = stack.token("alice")
    run_id = start(api, token, workflow("e2e-terminal", [{"id": "s", "type": "llm", "prompt": m}]))["run_id"]
    events = follow(api, token, run_id)
    assert events[-1]["type"] == "RUN_FAILED"
    assert not [e for e in events if e["type"] == "STEP_RETRYING"]
    failed = next(e for e in events if e["type"] == "STEP_FAILED")
    assert failed["data"]["error"]["code"] == error and failed["data"]["error"]["retryable"] is False
    assert len(calls_with(devmodel, m)) == 1


def test_an_error_in_the_middle_of_a_stream_is_retried_and_the_text_is_the_successful_attempts(api, stack, devmodel):
    m = marker("midstream")
    text = "A streamed reply that breaks off once and is then sent again in full. " * 3
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": text},
                         "stream_chunk_chars": 10, "stream_error_after_chunks": 3, "latency_ms": 300})
    token = stack.token("alice")
    wf = workflow("e2e-midstream", [{"id": "s", "type": "llm", "prompt": m, "stream": True}])
    run_id = start(api, token, wf)["run_id"]
    events = follow(api, token, run_id)
    assert events[-1]["type"] == "RUN_COMPLETED", events[-1]
    retrying = [e for e in events if e["type"] == "STEP_RETRYING"]
    assert [(e["attempt"], e["data"]["reason"]) for e in retrying] == [(2, "ThrottlingException")]
    calls = calls_with(devmodel, m)
    assert [c["stream"] for c in calls] == [True, True]
    # Deltas carry their attempt, so a client can drop a broken attempt's partial text.
    final = "".join(e["data"]["delta"] for e in events if e["type"] == "STREAMING" and e["attempt"] == 2)
    assert final == text
    _, _, run = api("GET", f"/runs/{run_id}", token=token)
    step = run["steps"][0]
    assert step["text"] == text and step["attempts"] == 2
