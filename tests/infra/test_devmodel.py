"""Tests for infra/devmodel.py, the scripted Bedrock Runtime stand-in.

The server is exercised through boto3's bedrock-runtime client, so the JSON shapes,
error headers and binary event-stream frames (CRC-checked by botocore) are validated by
a real AWS SDK rather than by hand-written expectations.
"""

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.config
import botocore.eventstream
import botocore.exceptions
import pytest

from infra import INFRA, ROOT, devmodel
from infra.net import http

MODEL = "amazon.nova-micro-v1:0"
PROFILE = "us.anthropic.claude-3-5-haiku-20241022-v1:0"

TEST_RULES = {
    "default": {"text": "OK", "latency_ms": 0},
    "rules": [
        {
            "name": "scripted",
            "match": {"model": MODEL, "prompt_contains": "MARK-scripted"},
            "reply": {"text": "Hello from the scripted rule."},
            "usage": {"input_tokens": 120, "output_tokens": 30,
                      "cache_read_tokens": 7, "cache_write_tokens": 0},
            "latency_ms": 5,
        },
        {
            "name": "json-reply",
            "match": {"prompt_contains": "MARK-json"},
            "reply": {"json": {"issues": ["a", "b"], "n": 2}},
        },
        {
            "name": "profile",
            "match": {"model": PROFILE, "system_contains": "terse analyst"},
            "text": "profile reply",
        },
        {
            "name": "regex",
            "match": {"prompt_regex": r"ticket #\d+"},
            "text": "regex reply",
        },
        {
            "name": "throttle-twice",
            "match": {"prompt_contains": "MARK-throttle"},
            "text": "finally",
            "fail_first": {"count": 2, "error": "ThrottlingException"},
        },
        {
            "name": "always-invalid",
            "match": {"prompt_contains": "MARK-invalid"},
            "error": {"type": "ValidationException", "message": "bad prompt for testing"},
        },
        {
            "name": "stream-breaks",
            "match": {"prompt_contains": "MARK-midstream"},
            "text": "abcdefghijklmnopqrstuvwxyz",
            "stream_chunk_chars": 5,
            "stream_error_after_chunks": 2,
        },
        {
            "name": "storm",
            "match": {"prompt_contains": "MARK-storm"},
            "text": "weathered",
            "fail_rate": {"rate": 0.5, "seed": 7},
        },
        {
            "name": "long",
            "match": {"prompt_contains": "MARK-long"},
            "text": "x" * 400,
            "stream_chunk_chars": 50,
            "latency_ms": 20,
        },
    ],
}


# --------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture
def server_url():
    server, url = devmodel.start_server(json.loads(json.dumps(TEST_RULES)))
    try:
        yield url
    finally:
        server.shutdown()


@pytest.fixture
def client(server_url):
    return bedrock_client(server_url)


def bedrock_client(url):
    return boto3.client(
        "bedrock-runtime", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
        # total_max_attempts counts the first try: 1 means no SDK retries, so every scripted
        # failure reaches the test. (Plain max_attempts=1 would still allow one retry.)
        config=botocore.config.Config(retries={"total_max_attempts": 1}))


def user(text):
    return [{"role": "user", "content": [{"text": text}]}]


def admin(url, method, path, payload=None):
    """Call the admin API; return (status, decoded JSON body)."""
    status, _, body = http(method, url + path, body=payload, timeout=5)
    return status, body


def collect_stream(response):
    """Drain a converse_stream response into (text, list of event names, metadata, stop)."""
    text, names, metadata, stop = "", [], None, None
    for event in response["stream"]:
        (name, body), = event.items()
        names.append(name)
        if name == "contentBlockDelta":
            text += body["delta"]["text"]
        elif name == "metadata":
            metadata = body
        elif name == "messageStop":
            stop = body["stopReason"]
    return text, names, metadata, stop


# --------------------------------------------------------------------------------------
# Converse
# --------------------------------------------------------------------------------------


def test_converse_returns_scripted_text_and_usage(client):
    resp = client.converse(modelId=MODEL, messages=user("hi MARK-scripted"),
                           inferenceConfig={"maxTokens": 100, "temperature": 0})
    assert resp["output"]["message"]["role"] == "assistant"
    assert resp["output"]["message"]["content"] == [{"text": "Hello from the scripted rule."}]
    assert resp["stopReason"] == "end_turn"
    # Bedrock's totalTokens counts cache tokens too: 120 + 30 + 7.
    assert resp["usage"] == {"inputTokens": 120, "outputTokens": 30, "totalTokens": 157,
                             "cacheReadInputTokens": 7, "cacheWriteInputTokens": 0}
    assert resp["metrics"]["latencyMs"] == 5


def test_json_reply_is_serialised_compactly(client):
    resp = client.converse(modelId=MODEL, messages=user("MARK-json"))
    assert resp["output"]["message"]["content"][0]["text"] == '{"issues":["a","b"],"n":2}'


def test_inference_profile_model_id_and_system_matching(client):
    resp = client.converse(modelId=PROFILE, messages=user("anything"),
                           system=[{"text": "You are a terse analyst."}])
    assert resp["output"]["message"]["content"][0]["text"] == "profile reply"
    # Same system text on another model falls through to the default.
    resp = client.converse(modelId=MODEL, messages=user("anything"),
                           system=[{"text": "You are a terse analyst."}])
    assert resp["output"]["message"]["content"][0]["text"] == "OK"


def test_prompt_regex_and_multi_message_prompt(client):
    messages = [
        {"role": "user", "content": [{"text": "about ticket"}]},
        {"role": "assistant", "content": [{"text": "which one?"}]},
        {"role": "user", "content": [{"text": "ticket #42"}]},
    ]
    resp = client.converse(modelId=MODEL, messages=messages)
    assert resp["output"]["message"]["content"][0]["text"] == "regex reply"


def test_default_reply_estimates_usage(client):
    resp = client.converse(modelId=MODEL, messages=user("x" * 10), system=[{"text": "y" * 7}])
    assert resp["output"]["message"]["content"][0]["text"] == "OK"
    # ceil(17 / 4) input tokens, ceil(2 / 4) -> at least 1 output token; no cache fields.
    assert resp["usage"] == {"inputTokens": 5, "outputTokens": 1, "totalTokens": 6}


def test_max_tokens_truncates_reply(client):
    resp = client.converse(modelId=MODEL, messages=user("MARK-long"),
                           inferenceConfig={"maxTokens": 10})
    assert resp["stopReason"] == "max_tokens"
    assert resp["output"]["message"]["content"][0]["text"] == "x" * 40
    assert resp["usage"]["outputTokens"] == 10


def test_scripted_usage_truncates_proportionally(client):
    # 29 characters scripted as 30 tokens; maxTokens 15 keeps half the characters.
    resp = client.converse(modelId=MODEL, messages=user("MARK-scripted"),
                           inferenceConfig={"maxTokens": 15})
    assert resp["stopReason"] == "max_tokens"
    assert resp["output"]["message"]["content"][0]["text"] == "Hello from the"
    assert resp["usage"]["outputTokens"] == 15


def test_stop_sequences_cut_the_reply(client):
    resp = client.converse(modelId=MODEL, messages=user("MARK-scripted"),
                           inferenceConfig={"stopSequences": [" the", "rule"]})
    assert resp["stopReason"] == "stop_sequence"
    assert resp["output"]["message"]["content"][0]["text"] == "Hello from"


def test_fail_first_throttles_twice_then_succeeds(client, server_url):
    for _ in range(2):
        with pytest.raises(client.exceptions.ThrottlingException) as info:
            client.converse(modelId=MODEL, messages=user("MARK-throttle"))
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    resp = client.converse(modelId=MODEL, messages=user("MARK-throttle"))
    assert resp["output"]["message"]["content"][0]["text"] == "finally"

    _, log = admin(server_url, "GET", "/_dev/calls?rule=throttle-twice")
    assert [(c["status"], c["error"]) for c in log["calls"]] == [
        (429, "ThrottlingException"), (429, "ThrottlingException"), (200, None)]


def test_fail_first_counter_is_thread_safe(server_url):
    client = bedrock_client(server_url)

    def call(_):
        try:
            client.converse(modelId=MODEL, messages=user("MARK-throttle"))
            return "ok"
        except client.exceptions.ThrottlingException:
            return "throttled"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(call, range(8)))
    assert outcomes.count("throttled") == 2
    assert outcomes.count("ok") == 6


def storm_outcomes(client, n, prompt="MARK-storm"):
    """1 for each of n converse calls that was throttled, 0 for each that succeeded."""
    outcomes = []
    for _ in range(n):
        try:
            client.converse(modelId=MODEL, messages=user(prompt))
            outcomes.append(0)
        except client.exceptions.ThrottlingException:
            outcomes.append(1)
    return outcomes


def test_fail_rate_fails_a_seeded_share_of_calls_reproducibly(client, server_url):
    first = storm_outcomes(client, 200)
    assert 75 <= sum(first) <= 125, sum(first)  # rate 0.5 of 200
    # The call log records each failure like any scripted error: attempts are countable.
    _, log = admin(server_url, "GET", "/_dev/calls?prompt_contains=MARK-storm")
    assert len(log["calls"]) == 200
    assert [c["status"] for c in log["calls"]] == [429 if f else 200 for f in first]
    assert {c["error"] for c in log["calls"] if c["status"] == 429} == {"ThrottlingException"}

    admin(server_url, "POST", "/_dev/reset")  # restarts the stream: the same calls fail
    assert storm_outcomes(client, 200) == first
    admin(server_url, "POST", "/_dev/rules", {"rules": [
        {"name": "other-seed", "match": {"prompt_contains": "MARK-storm"}, "text": "x",
         "fail_rate": {"rate": 0.5, "seed": 8}}]})
    assert storm_outcomes(client, 200) != first


def test_fail_rate_extremes_and_custom_error(client, server_url):
    admin(server_url, "POST", "/_dev/rules", {"rules": [
        {"name": "never", "match": {"prompt_contains": "MARK-never"}, "fail_rate": {"rate": 0}},
        {"name": "always", "match": {"prompt_contains": "MARK-always"},
         "fail_rate": {"rate": 1, "error": "ServiceUnavailableException", "message": "storm"}}]})
    assert storm_outcomes(client, 20, "MARK-never") == [0] * 20
    with pytest.raises(client.exceptions.ServiceUnavailableException) as info:
        client.converse(modelId=MODEL, messages=user("MARK-always"))
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert info.value.response["Error"]["Message"] == "storm"


def test_fail_rate_fails_converse_stream_before_the_stream(client, server_url):
    admin(server_url, "PUT", "/_dev/rules", {"default": {"text": "OK", "fail_rate": {"rate": 1}}})
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse_stream(modelId=MODEL, messages=user("anything"))
    _, log = admin(server_url, "GET", "/_dev/calls")
    assert [(c["stream"], c["rule"], c["status"], c["error"]) for c in log["calls"]] == [
        (True, None, 429, "ThrottlingException")]


def test_fail_rate_draws_are_thread_safe(server_url):
    # Concurrent calls share one stream: as many failures as a sequential run of 40 calls.
    client = bedrock_client(server_url)
    expected = storm_outcomes(client, 40)
    admin(server_url, "POST", "/_dev/reset")

    def call(_):
        return storm_outcomes(client, 1)[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert sum(pool.map(call, range(40))) == sum(expected)


def test_always_error_maps_to_http_error(client):
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=MODEL, messages=user("MARK-invalid"))
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert info.value.response["Error"]["Message"] == "bad prompt for testing"


def test_malformed_request_is_a_validation_error_and_logged(server_url):
    status, headers, _ = http("POST", server_url + "/model/m/converse", raw=b"{not json", timeout=5)
    assert status == 400
    assert headers["x-amzn-ErrorType"] == "ValidationException"
    _, log = admin(server_url, "GET", "/_dev/calls")
    assert log["calls"][-1]["status"] == 400 and log["calls"][-1]["model"] == "m"


# --------------------------------------------------------------------------------------
# ConverseStream
# --------------------------------------------------------------------------------------


def test_converse_stream_yields_reply_and_metadata(client):
    resp = client.converse_stream(modelId=MODEL, messages=user("MARK-scripted"))
    text, names, metadata, stop = collect_stream(resp)
    assert text == "Hello from the scripted rule."
    # 29 characters in chunks of 12 -> 3 deltas.
    assert names == ["messageStart"] + ["contentBlockDelta"] * 3 + [
        "contentBlockStop", "messageStop", "metadata"]
    assert stop == "end_turn"
    assert metadata["usage"] == {"inputTokens": 120, "outputTokens": 30, "totalTokens": 157,
                                 "cacheReadInputTokens": 7, "cacheWriteInputTokens": 0}
    assert metadata["metrics"]["latencyMs"] == 5


def test_converse_stream_honours_chunk_size_and_max_tokens(client):
    resp = client.converse_stream(modelId=MODEL, messages=user("MARK-long"),
                                  inferenceConfig={"maxTokens": 60})
    text, names, metadata, stop = collect_stream(resp)
    assert text == "x" * 240
    assert names.count("contentBlockDelta") == 240 // 50 + 1
    assert stop == "max_tokens"
    assert metadata["usage"]["outputTokens"] == 60


def test_mid_stream_exception_surfaces_while_iterating(client, server_url):
    resp = client.converse_stream(modelId=MODEL, messages=user("MARK-midstream"))
    received = ""
    with pytest.raises(botocore.exceptions.EventStreamError) as info:
        for event in resp["stream"]:
            if "contentBlockDelta" in event:
                received += event["contentBlockDelta"]["delta"]["text"]
    assert info.value.response["Error"]["Code"] == "throttlingException"
    assert received == "abcdefghij"  # exactly two 5-character deltas before the failure

    # Only the first matching call breaks; the retry streams the whole reply.
    text, _, _, stop = collect_stream(
        client.converse_stream(modelId=MODEL, messages=user("MARK-midstream")))
    assert text == "abcdefghijklmnopqrstuvwxyz" and stop == "end_turn"

    _, log = admin(server_url, "GET", "/_dev/calls?rule=stream-breaks")
    assert [(c["stream"], c["error"]) for c in log["calls"]] == [
        (True, "throttlingException"), (True, None)]


def test_stream_error_before_first_frame_is_an_http_error(client):
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse_stream(modelId=MODEL, messages=user("MARK-throttle"))


def test_event_frames_round_trip_through_botocore_parser():
    frame = devmodel.event_frame("contentBlockDelta",
                                 {"contentBlockIndex": 0, "delta": {"text": "héllo"}})
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(frame + devmodel.exception_frame("validationException", "nope"))
    first, second = list(buffer)
    assert first.headers == {":event-type": "contentBlockDelta",
                             ":content-type": "application/json", ":message-type": "event"}
    assert json.loads(first.payload)["delta"]["text"] == "héllo"
    assert second.headers[":message-type"] == "exception"
    assert second.headers[":exception-type"] == "validationException"


# --------------------------------------------------------------------------------------
# Admin API
# --------------------------------------------------------------------------------------


def test_health(server_url):
    assert admin(server_url, "GET", "/_dev/health") == (200, {"ok": True})


def test_call_log_and_reset(client, server_url):
    client.converse(modelId=MODEL, messages=user("MARK-scripted"), system=[{"text": "sys"}])
    client.converse_stream(modelId=PROFILE, messages=user("nothing matches"))["stream"]
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId=MODEL, messages=user("MARK-throttle"))

    status, log = admin(server_url, "GET", "/_dev/calls")
    assert status == 200
    calls = log["calls"]
    assert [c["seq"] for c in calls] == [1, 2, 3]
    assert calls[0]["model"] == MODEL and calls[0]["rule"] == "scripted"
    assert calls[0]["prompt"] == "MARK-scripted" and calls[0]["system"] == "sys"
    assert calls[0]["stream"] is False and calls[0]["status"] == 200
    assert calls[0]["error"] is None and calls[0]["at"].endswith("+00:00")
    assert calls[1]["model"] == PROFILE and calls[1]["rule"] is None and calls[1]["stream"] is True
    assert calls[2]["status"] == 429 and calls[2]["error"] == "ThrottlingException"

    assert admin(server_url, "POST", "/_dev/reset") == (200, {"ok": True})
    assert admin(server_url, "GET", "/_dev/calls") == (200, {"calls": []})
    # The fail_first counter was reset too: the next call is throttled again.
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId=MODEL, messages=user("MARK-throttle"))


def test_post_rules_prepends_and_put_replaces(client, server_url):
    status, body = admin(server_url, "POST", "/_dev/rules", {"rules": [
        {"name": "mine", "match": {"prompt_contains": "MARK-scripted"}, "text": "overridden"}]})
    assert status == 200 and body["rules"] == len(TEST_RULES["rules"]) + 1
    resp = client.converse(modelId=MODEL, messages=user("MARK-scripted"))
    assert resp["output"]["message"]["content"][0]["text"] == "overridden"

    status, _ = admin(server_url, "PUT", "/_dev/rules", {"default": {"text": "new default"}})
    assert status == 200
    resp = client.converse(modelId=MODEL, messages=user("MARK-scripted"))
    assert resp["output"]["message"]["content"][0]["text"] == "new default"
    assert admin(server_url, "GET", "/_dev/rules")[1] == {
        "default": {"text": "new default"}, "rules": []}


@pytest.mark.parametrize("method,doc,field", [
    ("PUT", {"rules": [{"match": {}, "fail_first": {"count": 1, "error": "Nope"}}]},
     "rules[0].fail_first.error"),
    ("PUT", {"rules": [{"match": {"prompt_regex": "("}}]}, "rules[0].match.prompt_regex"),
    ("PUT", {"rules": [{"match": {"promt_contains": "typo"}}]}, "rules[0].match.promt_contains"),
    ("PUT", {"default": {"latency_ms": -1}}, "default.latency_ms"),
    ("PUT", {"rulez": []}, "rulez"),
    ("POST", {"rules": [{"match": {}}, {"text": "no match key"}]}, "rules[1].match"),
    ("POST", {"rules": [{"match": {}, "stream_chunk_chars": 0}]}, "rules[0].stream_chunk_chars"),
    ("POST", {"rules": [{"match": {}, "reply": {"text": "a", "json": {}}}]}, "rules[0].reply"),
    ("POST", {"rules": [{"match": {}, "stream_error": {"type": "boom"}}]},
     "rules[0].stream_error.type"),
    ("POST", {"rules": [{"match": {}, "fail_rate": {"rate": 1.5}}]}, "rules[0].fail_rate.rate"),
    ("POST", {"rules": [{"match": {}, "fail_rate": {"rate": True}}]}, "rules[0].fail_rate.rate"),
    ("POST", {"rules": [{"match": {}, "fail_rate": {"error": "ThrottlingException"}}]},
     "rules[0].fail_rate.rate"),
    ("POST", {"rules": [{"match": {}, "fail_rate": {"rate": 0.1, "eror": "x"}}]}, "rules[0].fail_rate.eror"),
    ("POST", {"rules": [{"match": {}, "fail_rate": {"rate": 0.1, "error": "Nope"}}]},
     "rules[0].fail_rate.error"),
    ("PUT", {"default": {"fail_rate": {"rate": 0.1, "seed": "7"}}}, "default.fail_rate.seed"),
    ("PUT", {"default": {"fail_rate": 0.5}}, "default.fail_rate"),
])
def test_invalid_rules_are_rejected_naming_the_field(client, server_url, method, doc, field):
    status, body = admin(server_url, method, "/_dev/rules", doc)
    assert status == 400
    assert body["message"].startswith(field + ":"), body["message"]
    # The rejected document changed nothing.
    resp = client.converse(modelId=MODEL, messages=user("MARK-json"))
    assert resp["output"]["message"]["content"][0]["text"] == '{"issues":["a","b"],"n":2}'


def test_start_server_rejects_invalid_rules():
    with pytest.raises(devmodel.RulesError, match=r"^rules\[0\]\.usage\.input_tokens:"):
        devmodel.start_server({"rules": [{"match": {}, "usage": {"input_tokens": "many"}}]})


# --------------------------------------------------------------------------------------
# Demo rules and CLI
# --------------------------------------------------------------------------------------


def test_demo_rules_answer_every_sample_step():
    rules = json.loads((INFRA / "devmodel-rules.json").read_text(encoding="utf-8"))
    sample = json.loads((INFRA / "samples" / "feedback-analysis.json").read_text(encoding="utf-8"))
    # The demo's latencies would slow the test down without testing anything more.
    for rule in rules["rules"]:
        rule["latency_ms"] = 0
    server, url = devmodel.start_server(rules)
    try:
        client = bedrock_client(url)
        replies = {}
        for step in sample["workflow"]["steps"]:
            # Template placeholders are left unrendered; the rules match on fixed wording.
            resp = client.converse(
                modelId=step.get("model", sample["workflow"]["defaults"]["model"]),
                messages=user(step["prompt"]),
                system=[{"text": step["system"]}] if "system" in step else [],
                inferenceConfig={"maxTokens": step.get("max_tokens", 400)})
            assert resp["stopReason"] == "end_turn", step["id"]
            replies[step["id"]] = resp["output"]["message"]["content"][0]["text"]
        _, log = admin(url, "GET", "/_dev/calls")
        assert [c["rule"] for c in log["calls"]] == ["extract", "sentiment", "summary", "reply"]
    finally:
        server.shutdown()
    assert json.loads(replies["extract"])["issues"] == [
        "logged out when switching networks", "CSV export drops the last row",
        "slow support response"]
    assert replies["sentiment"] == "negative"
    assert 3 <= replies["reply"].count(". ") + 1 <= 5


def test_cli_prints_listening_line_and_port_file(tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.devmodel", "--host", "127.0.0.1",
         "--port", "0", "--rules", str(INFRA / "devmodel-rules.json"),
         "--port-file", str(port_file), "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # readline blocks until the server is ready; the timer only guards against a hang.
        watchdog = threading.Timer(20, proc.kill)
        watchdog.start()
        line = proc.stdout.readline()
        watchdog.cancel()
        assert line.startswith("devmodel listening on http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.strip().rsplit(" ", 1)[1]
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        assert port_file.read_text().strip() == str(port)
        assert admin(url, "GET", "/_dev/health") == (200, {"ok": True})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stdout.read() == ""  # exactly one line on stdout
