"""Tests for devmodel's Bedrock cost levers: prompt caching (cachePoint), service tiers,
requestMetadata and structured output (outputConfig), as the registry in
shared/models.json says each model offers them.

Like test_devmodel.py, the server is driven through boto3's bedrock-runtime client, so
the request and reply shapes are the ones a real AWS SDK sends and parses. Token
numbers follow devmodel's estimate: ceil(characters / 4).
"""

import json
import subprocess
import sys

import boto3
import botocore.config
import pytest

from infra import INFRA, ROOT, devmodel
from infra.net import http

HAIKU = "anthropic.claude-haiku-4-5-20251001-v1:0"  # cache: min 4096 tokens, 4 points; structured output
NOVA_2_LITE = "amazon.nova-2-lite-v1:0"               # tiers flex and priority
NOVA_MICRO = "amazon.nova-micro-v1:0"                 # cache, no tiers, no structured output
LLAMA = "meta.llama3-3-70b-instruct-v1:0"             # no levers at all
UNKNOWN = "example.not-in-the-registry-v1:0"

CACHE_POINT = {"cachePoint": {"type": "default"}}
SCHEMA = {"type": "object", "properties": {"sentiment": {"type": "string"}}, "required": ["sentiment"]}

RULES = {
    "default": {"text": "OK"},
    "rules": [
        {"name": "structured", "match": {"prompt_contains": "MARK-structured"},
         "json": {"sentiment": "negative"}},
        {"name": "scripted-cache", "match": {"prompt_contains": "MARK-scripted-cache"},
         "usage": {"cache_read_tokens": 11}},
        {"name": "scripted-input", "match": {"prompt_contains": "MARK-scripted-input"},
         "usage": {"input_tokens": 42}},
    ],
}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server_url(clock):
    server, url = devmodel.start_server(json.loads(json.dumps(RULES)), clock=clock)
    try:
        yield url
    finally:
        server.shutdown()


@pytest.fixture
def client(server_url):
    return boto3.client(
        "bedrock-runtime", endpoint_url=server_url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
        config=botocore.config.Config(retries={"total_max_attempts": 1}))


def tokens(n, fill="s"):
    """Text devmodel estimates at exactly n tokens."""
    return fill * (4 * n)


def user(*content):
    return [{"role": "user", "content": [{"text": c} if isinstance(c, str) else c for c in content]}]


def cached_system(n_tokens):
    return [{"text": tokens(n_tokens)}, CACHE_POINT]


def calls(url):
    status, _, body = http("GET", url + "/_dev/calls", timeout=5)
    assert status == 200
    return body["calls"]


def raw_converse(url, model, body):
    """POST a Converse body verbatim (for values boto3 would not let through)."""
    status, headers, reply = http("POST", f"{url}/model/{model}/converse", body=body, timeout=5)
    return status, headers.get("x-amzn-ErrorType"), reply


def collect_metadata(response):
    metadata = None
    for event in response["stream"]:
        (name, body), = event.items()
        if name == "metadata":
            metadata = body
    return metadata


# --------------------------------------------------------------------------------------
# Prompt caching
# --------------------------------------------------------------------------------------


def test_a_shared_5000_token_system_prompt_is_written_then_read(client, server_url):
    # 5,000-token system prefix + "question one" (12 characters): 5,003 input tokens in all.
    first = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("question one"))
    assert first["usage"] == {"inputTokens": 3, "outputTokens": 1, "totalTokens": 5004,
                              "cacheReadInputTokens": 0, "cacheWriteInputTokens": 5000}
    second = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("question two"))
    assert second["usage"] == {"inputTokens": 3, "outputTokens": 1, "totalTokens": 5004,
                               "cacheReadInputTokens": 5000, "cacheWriteInputTokens": 0}
    log = calls(server_url)
    assert [(c["cache_points"], c["cache_read_tokens"], c["cache_write_tokens"]) for c in log] == [
        (1, 0, 5000), (1, 5000, 0)]


def test_a_prefix_below_min_tokens_is_ignored_without_error(client, server_url):
    for _ in range(2):
        resp = client.converse(modelId=HAIKU, system=cached_system(2000), messages=user("question"))
        # 2,000 < 4,096: nothing cached, all 2,002 tokens billed as input, both fields 0.
        assert resp["usage"] == {"inputTokens": 2002, "outputTokens": 1, "totalTokens": 2003,
                                 "cacheReadInputTokens": 0, "cacheWriteInputTokens": 0}
    assert [c["status"] for c in calls(server_url)] == [200, 200]


def test_the_cache_expires_five_minutes_after_the_last_hit(client, clock):
    def cache_of_call():
        usage = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("q"))["usage"]
        return usage["cacheReadInputTokens"], usage["cacheWriteInputTokens"]

    assert cache_of_call() == (0, 5000)
    clock.now += 299
    assert cache_of_call() == (5000, 0)
    clock.now += 299  # 598 s after the write, but only 299 s after the hit that refreshed it
    assert cache_of_call() == (5000, 0)
    clock.now += 300
    assert cache_of_call() == (0, 5000)
    assert cache_of_call() == (5000, 0)


def test_the_cache_is_per_model_and_per_exact_prefix(client):
    client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("q"))
    other_model = client.converse(modelId="anthropic.claude-opus-4-5-20251101-v1:0",
                                  system=cached_system(5000), messages=user("q"))
    assert other_model["usage"]["cacheWriteInputTokens"] == 5000
    other_text = client.converse(modelId=HAIKU, system=[{"text": tokens(5000, "t")}, CACHE_POINT],
                                 messages=user("q"))
    assert other_text["usage"]["cacheWriteInputTokens"] == 5000


def test_inference_profile_ids_resolve_to_the_registry_model_and_share_its_cache(client, server_url):
    first = client.converse(modelId="global." + HAIKU, system=cached_system(5000), messages=user("q"))
    assert first["usage"]["cacheWriteInputTokens"] == 5000
    second = client.converse(modelId="us." + HAIKU, system=cached_system(5000), messages=user("q"))
    assert second["usage"]["cacheReadInputTokens"] == 5000
    # The profile carries Haiku's limits too: a fifth checkpoint is refused.
    with pytest.raises(client.exceptions.ValidationException):
        client.converse(modelId="global." + HAIKU, system=[{"text": "x"}] + [CACHE_POINT] * 5,
                        messages=user("q"))
    assert [c["model"] for c in calls(server_url)] == ["global." + HAIKU, "us." + HAIKU, "global." + HAIKU]


def test_the_nth_checkpoint_needs_n_times_min_tokens(client):
    # Second checkpoint at 6,000 tokens < 2 x 4,096: ignored; the first one (5,000) is written.
    # Text blocks join with "\n", so "\ntai" after it is one more token: 6,001 in all.
    resp = client.converse(modelId=HAIKU, system=cached_system(5000),
                           messages=user(tokens(1000, "m"), CACHE_POINT, "tai"))
    assert resp["usage"]["cacheWriteInputTokens"] == 5000
    assert resp["usage"]["inputTokens"] == 6001 - 5000


def test_a_shorter_checkpoint_hits_when_the_longest_misses(client):
    # Checkpoints at 5,000 (system) and 9,000 tokens (system + 4,000 of message); "\ntai"
    # after them is the one uncached token.
    first = client.converse(modelId=HAIKU, system=cached_system(5000),
                            messages=user(tokens(4000, "a"), CACHE_POINT, "tai"))
    assert first["usage"] == {"inputTokens": 1, "outputTokens": 1, "totalTokens": 9002,
                              "cacheReadInputTokens": 0, "cacheWriteInputTokens": 9000}
    # Same system, another message: the 5,000-token prefix is read, the 4,000 after it written.
    second = client.converse(modelId=HAIKU, system=cached_system(5000),
                             messages=user(tokens(4000, "b"), CACHE_POINT, "tai"))
    assert second["usage"] == {"inputTokens": 1, "outputTokens": 1, "totalTokens": 9002,
                               "cacheReadInputTokens": 5000, "cacheWriteInputTokens": 4000}
    third = client.converse(modelId=HAIKU, system=cached_system(5000),
                            messages=user(tokens(4000, "b"), CACHE_POINT, "other tail"))
    assert third["usage"]["cacheReadInputTokens"] == 9000
    assert third["usage"]["cacheWriteInputTokens"] == 0


def test_more_checkpoints_than_the_model_allows_are_refused_and_logged(client, server_url):
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=HAIKU, system=[{"text": "a"}, CACHE_POINT, {"text": "b"}, CACHE_POINT],
                        messages=user("c", CACHE_POINT, "d", CACHE_POINT, "e", CACHE_POINT))
    message = info.value.response["Error"]["Message"]
    assert "5 cachePoint" in message and "maximum of 4" in message and HAIKU in message
    (entry,) = calls(server_url)
    assert entry["status"] == 400 and entry["error"] == "ValidationException"
    assert entry["rule"] is None and entry["cache_points"] == 5 and entry["prompt"] == "c\nd\ne"
    assert entry["cache_read_tokens"] is None and entry["cache_write_tokens"] is None


@pytest.mark.parametrize("model", [LLAMA, UNKNOWN, "us." + LLAMA])
def test_a_model_without_caching_refuses_cache_points(client, model):
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=model, system=cached_system(5000), messages=user("q"))
    assert info.value.response["Error"]["Message"] == (
        f"The model {model} does not support prompt caching (cachePoint)")
    # Without a cache point the same model is served as always.
    resp = client.converse(modelId=model, system=[{"text": "sys"}], messages=user("q"))
    assert resp["usage"] == {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}


def test_a_cache_point_of_another_type_is_malformed(server_url):
    status, error, reply = raw_converse(server_url, HAIKU, {
        "messages": user("q"), "system": [{"text": "s"}, {"cachePoint": {"type": "forever"}}]})
    assert (status, error) == (400, "ValidationException")
    assert "system[1].cachePoint.type" in reply["message"]


def test_stream_metadata_carries_cache_usage(client):
    def stream_usage():
        resp = client.converse_stream(modelId=HAIKU, system=cached_system(5000), messages=user("q"))
        return collect_metadata(resp)["usage"]

    assert stream_usage() == {"inputTokens": 1, "outputTokens": 1, "totalTokens": 5002,
                              "cacheReadInputTokens": 0, "cacheWriteInputTokens": 5000}
    assert stream_usage() == {"inputTokens": 1, "outputTokens": 1, "totalTokens": 5002,
                              "cacheReadInputTokens": 5000, "cacheWriteInputTokens": 0}


def test_a_rule_scripting_cache_tokens_wins_and_leaves_the_cache_alone(client):
    resp = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("MARK-scripted-cache"))
    # Both fields appear with a cache point; the unscripted one is 0. 5,005 - 11 = 4,994 input.
    assert resp["usage"] == {"inputTokens": 4994, "outputTokens": 1, "totalTokens": 5006,
                             "cacheReadInputTokens": 11, "cacheWriteInputTokens": 0}
    # Nothing was stored by the scripted call, so the same prefix is still a miss.
    resp = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("MARK-scripted-cach"))
    assert resp["usage"]["cacheWriteInputTokens"] == 5000


def test_a_scripted_input_count_wins_over_the_cache_arithmetic(client):
    resp = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("MARK-scripted-input"))
    assert resp["usage"] == {"inputTokens": 42, "outputTokens": 1, "totalTokens": 5043,
                             "cacheReadInputTokens": 0, "cacheWriteInputTokens": 5000}


def test_reset_clears_the_cache(client, server_url):
    client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("q"))
    assert http("POST", server_url + "/_dev/reset", timeout=5)[0] == 200
    resp = client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("q"))
    assert resp["usage"]["cacheWriteInputTokens"] == 5000


def test_a_registry_given_by_path_decides_the_levers(tmp_path):
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": {
        "tiny.cacher-v1:0": {"cache": {"min_tokens": 2, "max_points": 1}, "tiers": {"flex": 50}}}}))
    server, url = devmodel.start_server({}, models_path=registry)
    try:
        client = boto3.client("bedrock-runtime", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id="x", aws_secret_access_key="x")
        resp = client.converse(modelId="tiny.cacher-v1:0", system=[{"text": "12345678"}, CACHE_POINT],
                               messages=user("q"), serviceTier={"type": "flex"})
        assert resp["usage"]["cacheWriteInputTokens"] == 2
        assert resp["serviceTier"] == {"type": "flex"}
        # Haiku is not in this registry: no caching for it here.
        with pytest.raises(client.exceptions.ValidationException):
            client.converse(modelId=HAIKU, system=cached_system(5000), messages=user("q"))
    finally:
        server.shutdown()


@pytest.mark.parametrize("doc,field", [
    ({"models": []}, "models"),
    ({"models": {"m": {"cache": {"min_tokens": 0, "max_points": 4}}}}, "models.m.cache.min_tokens"),
    ({"models": {"m": {"tiers": {"turbo": 200}}}}, "models.m.tiers"),
    ({"models": {"m": {"structured_output": "yes"}}}, "models.m.structured_output"),
])
def test_an_invalid_registry_is_refused_naming_the_field(tmp_path, doc, field):
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps(doc))
    with pytest.raises(devmodel.RegistryError, match=rf": {field}:"):
        devmodel.start_server({}, models_path=registry)


def test_cli_refuses_a_missing_registry(tmp_path):
    missing = tmp_path / "absent.json"
    proc = subprocess.run(
        [sys.executable, "-m", "infra.devmodel", "--port", "0", "--quiet",
         "--rules", str(INFRA / "devmodel-rules.json"), "--models", str(missing)],
        cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "model registry" in proc.stderr


# --------------------------------------------------------------------------------------
# Service tiers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["flex", "priority", "default"])
def test_an_offered_tier_is_accepted_and_echoed(client, server_url, tier):
    resp = client.converse(modelId=NOVA_2_LITE, messages=user("q"), serviceTier={"type": tier})
    assert resp["serviceTier"] == {"type": tier}
    metadata = collect_metadata(client.converse_stream(
        modelId="global." + NOVA_2_LITE, messages=user("q"), serviceTier={"type": tier}))
    assert metadata["serviceTier"] == {"type": tier}
    assert [c["service_tier"] for c in calls(server_url)] == [tier, tier]


def test_no_tier_asked_means_none_echoed(client):
    resp = client.converse(modelId=NOVA_2_LITE, messages=user("q"))
    assert "serviceTier" not in resp
    assert "serviceTier" not in collect_metadata(client.converse_stream(modelId=NOVA_2_LITE, messages=user("q")))


def test_default_tier_is_accepted_on_any_model(client):
    assert client.converse(modelId=UNKNOWN, messages=user("q"),
                           serviceTier={"type": "default"})["serviceTier"] == {"type": "default"}


@pytest.mark.parametrize("model,tier", [(HAIKU, "flex"), (NOVA_MICRO, "priority"), (UNKNOWN, "flex")])
def test_a_tier_the_model_lacks_is_refused_naming_model_and_tier(client, server_url, model, tier):
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=model, messages=user("q"), serviceTier={"type": tier})
    assert info.value.response["Error"]["Message"] == (
        f"The model {model} does not support the {tier} service tier")
    (entry,) = calls(server_url)
    assert entry["status"] == 400 and entry["service_tier"] == tier


@pytest.mark.parametrize("service_tier", [{"type": "reserved"}, {"type": "turbo"}, {}, "flex"])
def test_an_unknown_tier_is_refused(server_url, service_tier):
    status, error, reply = raw_converse(server_url, NOVA_2_LITE,
                                        {"messages": user("q"), "serviceTier": service_tier})
    assert (status, error) == (400, "ValidationException")
    assert reply["message"].startswith("serviceTier.type must be one of default, flex, priority")


# --------------------------------------------------------------------------------------
# requestMetadata
# --------------------------------------------------------------------------------------


def test_request_metadata_is_accepted_and_logged(client, server_url):
    metadata = {"run_id": "run-01J9/x", "step_id": "extract", "note": "a b:c_d@e$f#g=h+i,j.k", "empty": ""}
    client.converse(modelId=LLAMA, messages=user("q"), requestMetadata=metadata)
    assert calls(server_url)[0]["request_metadata"] == metadata


@pytest.mark.parametrize("metadata,named", [
    ({"run_id": "ok", "step!": "x"}, "'step!'"),
    ({"run_id": "caf\u00e9"}, "'run_id'"),
    ({"": "x"}, "''"),
    ({"k" * 257: "x"}, "'" + "k" * 257 + "'"),
    ({"run_id": "v" * 257}, "'run_id'"),
    ({"run_id": 7}, "'run_id'"),
])
def test_bad_request_metadata_is_refused_naming_the_key(server_url, metadata, named):
    status, error, reply = raw_converse(server_url, LLAMA, {"messages": user("q"), "requestMetadata": metadata})
    assert (status, error) == (400, "ValidationException")
    assert named in reply["message"]
    (entry,) = calls(server_url)
    assert entry["status"] == 400 and entry["request_metadata"] == metadata


def test_more_than_16_metadata_pairs_are_refused(server_url):
    metadata = {f"k{i}": "v" for i in range(17)}
    status, error, reply = raw_converse(server_url, LLAMA, {"messages": user("q"), "requestMetadata": metadata})
    assert (status, error) == (400, "ValidationException")
    assert "17 pairs" in reply["message"] and "16" in reply["message"]
    del metadata["k16"]
    assert raw_converse(server_url, LLAMA, {"messages": user("q"), "requestMetadata": metadata})[0] == 200


# --------------------------------------------------------------------------------------
# Structured output
# --------------------------------------------------------------------------------------


def output_config(schema_text):
    return {"textFormat": {"type": "json_schema",
                           "structure": {"jsonSchema": {"schema": schema_text, "name": "verdict"}}}}


def test_structured_output_is_accepted_and_the_schema_logged(client, server_url):
    resp = client.converse(modelId="global." + HAIKU, messages=user("MARK-structured"),
                           outputConfig=output_config(json.dumps(SCHEMA)))
    assert json.loads(resp["output"]["message"]["content"][0]["text"]) == {"sentiment": "negative"}
    (entry,) = calls(server_url)
    assert entry["rule"] == "structured" and entry["output_schema"] == SCHEMA


def test_structured_output_on_a_model_without_it_is_refused(client):
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=NOVA_MICRO, messages=user("MARK-structured"),
                        outputConfig=output_config(json.dumps(SCHEMA)))
    assert info.value.response["Error"]["Message"] == (
        f"The model {NOVA_MICRO} does not support structured output (outputConfig.textFormat)")


def test_a_schema_that_is_not_json_is_refused(client, server_url):
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=HAIKU, messages=user("MARK-structured"), outputConfig=output_config("{type: object"))
    assert "jsonSchema.schema is not valid JSON" in info.value.response["Error"]["Message"]
    assert calls(server_url)[0]["output_schema"] is None


# --------------------------------------------------------------------------------------
# Call log
# --------------------------------------------------------------------------------------


def test_calls_list_every_lever_of_every_call(client, server_url):
    client.converse(modelId=LLAMA, messages=user("plain"))
    client.converse(modelId="global." + HAIKU, system=cached_system(5000), messages=user("MARK-structured"),
                    serviceTier={"type": "default"}, requestMetadata={"run_id": "r1", "step_id": "s1"},
                    outputConfig=output_config(json.dumps(SCHEMA)))
    http("POST", f"{server_url}/model/{LLAMA}/converse", raw=b"{not json", timeout=5)
    lever_fields = ("cache_points", "cache_read_tokens", "cache_write_tokens", "service_tier",
                    "request_metadata", "output_schema")
    plain, levered, malformed = ({k: c[k] for k in lever_fields} for c in calls(server_url))
    assert plain == {"cache_points": 0, "cache_read_tokens": None, "cache_write_tokens": None,
                     "service_tier": None, "request_metadata": None, "output_schema": None}
    assert levered == {"cache_points": 1, "cache_read_tokens": 0, "cache_write_tokens": 5000,
                       "service_tier": "default", "request_metadata": {"run_id": "r1", "step_id": "s1"},
                       "output_schema": SCHEMA}
    assert malformed == plain
