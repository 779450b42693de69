"""Tests of infra/fault_proxy.py, the fault-injecting proxy in front of moto.

Every fault is observed the way the functions meet it: through a real AWS SDK (boto3)
talking DynamoDB to moto behind the proxy, while a second client talks to moto directly
to see what was applied. No test sleeps: waits are the client's own timeouts or polls
with a deadline, and held requests end when the proxy shuts down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import boto3
import botocore.config
import botocore.exceptions
import pytest

from infra import ROOT, fault_proxy
from infra.net import http, wait_until

TABLE = "faults"
REGION = "us-east-1"


# --------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    yield url
    # moto's state is per process: leave none behind for the next module's server.
    http("POST", url + "/moto-api/reset")
    srv.stop()


@pytest.fixture
def direct(moto_url):
    """A client of moto itself, with a fresh table: what was really applied."""
    assert http("POST", moto_url + "/moto-api/reset")[0] == 200
    c = client(moto_url)
    c.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST",
                   AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                   KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
    return c


@pytest.fixture
def proxy(moto_url, direct):
    server, url = fault_proxy.start_server(moto_url, seed=0)
    try:
        yield url
    finally:
        server.shutdown()


def client(url, service="dynamodb", attempts=1, read_timeout=10.0):
    # total_max_attempts counts the first try: 1 means no retries, so every fault reaches
    # the test (plain max_attempts=1 would still allow one retry).
    return boto3.client(service, endpoint_url=url, region_name=REGION,
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": attempts},
                                                      read_timeout=read_timeout, connect_timeout=5))


def set_faults(url, *faults, **top):
    status, _, body = http("PUT", url + "/_faults", body={"faults": list(faults), **top}, timeout=5)
    assert status == 200, body
    return body


def faults_state(url):
    status, _, body = http("GET", url + "/_faults", timeout=5)
    assert status == 200
    return body


def item(pk, **attrs):
    return {"pk": {"S": pk}, **{k: {"S": v} for k, v in attrs.items()}}


def stored(direct, pk):
    return direct.get_item(TableName=TABLE, Key={"pk": {"S": pk}}, ConsistentRead=True).get("Item")


def error_of(excinfo):
    err = excinfo.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


# --------------------------------------------------------------------------------------
# transparency
# --------------------------------------------------------------------------------------


def test_without_faults_every_request_passes_through(proxy, direct):
    c = client(proxy)
    c.put_item(TableName=TABLE, Item=item("a", v="1"))
    assert c.get_item(TableName=TABLE, Key={"pk": {"S": "a"}})["Item"] == item("a", v="1")
    assert stored(direct, "a") == item("a", v="1")
    # moto's own headers come back (botocore checks x-amz-crc32 against the body).
    headers = c.describe_table(TableName=TABLE)["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amz-crc32"] and headers["x-amzn-requestid"]
    state = faults_state(proxy)
    assert state["requests"] == 3 and set(state["fired"].values()) == {0}
    assert state["operations"] == {"PutItem": {"requests": 1}, "GetItem": {"requests": 1},
                                   "DescribeTable": {"requests": 1}}


def test_other_services_go_through_unfaulted_unless_named(proxy):
    set_faults(proxy, {"kind": "throttle"})  # every DynamoDB request
    sqs = client(proxy, "sqs")
    queue = sqs.create_queue(QueueName="q")["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody="hello")
    assert sqs.receive_message(QueueUrl=queue)["Messages"][0]["Body"] == "hello"
    s3 = client(proxy, "s3")
    s3.create_bucket(Bucket="fault-bucket")
    s3.put_object(Bucket="fault-bucket", Key="k", Body=b"12345")
    assert s3.head_object(Bucket="fault-bucket", Key="k")["ContentLength"] == 5
    assert s3.get_object(Bucket="fault-bucket", Key="k")["Body"].read() == b"12345"
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client(proxy).list_tables()
    assert error_of(info) == ("ThrottlingException", 400)

    set_faults(proxy, {"kind": "throttle", "operations": ["SendMessage"]})
    with pytest.raises(botocore.exceptions.ClientError) as info:
        sqs.send_message(QueueUrl=queue, MessageBody="again")
    assert error_of(info) == ("ThrottlingException", 400)
    client(proxy).list_tables()  # DynamoDB is spared now: the filter names only SendMessage


# --------------------------------------------------------------------------------------
# fault kinds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["ThrottlingException", "ProvisionedThroughputExceededException"])
def test_throttle_answers_the_throttling_error_without_forwarding(proxy, direct, code):
    set_faults(proxy, {"kind": "throttle", "error": code, "operations": ["PutItem"]})
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client(proxy).put_item(TableName=TABLE, Item=item("t"))
    assert error_of(info) == (code, 400)
    assert stored(direct, "t") is None


def test_an_sdk_retries_throttling_and_500s(proxy):
    # botocore's standard mode classifies both as retryable, as the Rust SDK does: three
    # attempts, each one faulted.
    set_faults(proxy, {"kind": "throttle", "operations": ["GetItem"]}, {"kind": "error500", "operations": ["Query"]})
    c = client(proxy, attempts=3)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        c.get_item(TableName=TABLE, Key={"pk": {"S": "x"}})
    assert error_of(info) == ("ThrottlingException", 400)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        c.query(TableName=TABLE, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": "x"}})
    assert error_of(info) == ("InternalServerError", 500)
    state = faults_state(proxy)
    assert state["operations"]["GetItem"] == {"requests": 3, "throttle": 3}
    assert state["operations"]["Query"] == {"requests": 3, "error500": 3}


def test_error500_answers_internal_server_error_without_forwarding(proxy, direct):
    set_faults(proxy, {"kind": "error500", "message": "boom"})
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client(proxy).put_item(TableName=TABLE, Item=item("e"))
    assert error_of(info) == ("InternalServerError", 500)
    assert info.value.response["Error"]["Message"] == "boom"
    assert stored(direct, "e") is None


def test_lost_reply_applies_the_write_and_its_retry_meets_it(proxy, direct):
    set_faults(proxy, {"kind": "lost_reply", "operations": ["PutItem"], "limit": 1})
    c = client(proxy)
    put = dict(TableName=TABLE, Item=item("l", v="1"), ConditionExpression="attribute_not_exists(pk)")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        c.put_item(**put)
    assert error_of(info) == ("InternalServerError", 500)
    assert stored(direct, "l") == item("l", v="1")  # the write happened
    # The client's retry of a conditional write fails against its own first attempt.
    with pytest.raises(c.exceptions.ConditionalCheckFailedException):
        c.put_item(**put)
    assert faults_state(proxy)["fired"]["lost_reply"] == 1


def transact(c, pk, token, value="1"):
    return c.transact_write_items(ClientRequestToken=token, TransactItems=[
        {"Put": {"TableName": TABLE, "Item": item(pk, v=value), "ConditionExpression": "attribute_not_exists(pk)"}}])


def test_a_retried_transaction_with_its_token_succeeds_as_on_dynamodb(proxy, direct):
    set_faults(proxy, {"kind": "lost_reply", "operations": ["TransactWriteItems"], "limit": 1})
    c = client(proxy, attempts=2)
    token = str(uuid.uuid4())
    transact(c, "tx", token)  # first attempt applied but answered 500; the SDK's retry is a replay
    assert stored(direct, "tx") == item("tx", v="1")
    state = faults_state(proxy)
    assert state["fired"]["lost_reply"] == 1 and state["operations"]["TransactWriteItems"]["requests"] == 2
    assert state["tokens"]["replayed"] == 1
    # The same token with other parameters is refused, as DynamoDB does.
    with pytest.raises(c.exceptions.IdempotentParameterMismatchException):
        transact(c, "tx", token, value="2")


def test_without_token_emulation_the_retry_meets_its_own_write(proxy, direct):
    # What moto alone does (it ignores ClientRequestToken): the retry is cancelled.
    set_faults(proxy, {"kind": "lost_reply", "operations": ["TransactWriteItems"], "limit": 1},
               idempotency_tokens=False)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        transact(client(proxy, attempts=2), "tx2", str(uuid.uuid4()))
    assert error_of(info)[0] == "TransactionCanceledException"
    assert stored(direct, "tx2") == item("tx2", v="1")


@pytest.mark.parametrize("forward", [False, True])
def test_timeout_holds_the_request_past_the_client_read_timeout(proxy, direct, forward):
    set_faults(proxy, {"kind": "timeout", "delay_ms": 30_000, "forward": forward, "operations": ["PutItem"]})
    t0 = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client(proxy, read_timeout=0.3).put_item(TableName=TABLE, Item=item(f"to-{forward}"))
    assert time.monotonic() - t0 < 10
    if forward:  # applied before the hold: moto has it (the proxy forwarded it already)
        assert wait_until(lambda: stored(direct, f"to-{forward}"), 5)
    else:
        assert faults_state(proxy)["fired"]["timeout"] == 1
        assert stored(direct, f"to-{forward}") is None


def test_timeout_ends_by_dropping_the_connection(proxy):
    set_faults(proxy, {"kind": "timeout", "delay_ms": 50})
    with pytest.raises((botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)):
        client(proxy, read_timeout=10).list_tables()


def test_latency_delays_the_request_and_then_forwards_it(proxy, direct):
    set_faults(proxy, {"kind": "latency", "delay_ms": 200, "operations": ["PutItem"]})
    c = client(proxy)
    t0 = time.monotonic()
    c.put_item(TableName=TABLE, Item=item("slow"))
    assert time.monotonic() - t0 >= 0.2
    assert stored(direct, "slow") == item("slow")
    assert faults_state(proxy)["fired"]["latency"] == 1


# --------------------------------------------------------------------------------------
# selection: operations, shares, skip and limit
# --------------------------------------------------------------------------------------


def test_the_operation_filter_spares_other_operations(proxy, direct):
    direct.put_item(TableName=TABLE, Item=item("f"))
    set_faults(proxy, {"kind": "error500", "operations": ["PutItem", "DynamoDB_20120810.DeleteItem"]})
    c = client(proxy)
    assert c.get_item(TableName=TABLE, Key={"pk": {"S": "f"}})["Item"] == item("f")
    c.query(TableName=TABLE, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": "f"}})
    for call in (lambda: c.put_item(TableName=TABLE, Item=item("g")),
                 lambda: c.delete_item(TableName=TABLE, Key={"pk": {"S": "f"}})):
        with pytest.raises(botocore.exceptions.ClientError):
            call()
    ops = faults_state(proxy)["operations"]
    assert ops["GetItem"] == {"requests": 1} and ops["Query"] == {"requests": 1}
    assert ops["PutItem"] == {"requests": 1, "error500": 1} and ops["DeleteItem"] == {"requests": 1, "error500": 1}


def throttled_pattern(url, n=200):
    c = client(url)
    pattern = []
    for _ in range(n):
        try:
            c.get_item(TableName=TABLE, Key={"pk": {"S": "p"}})
            pattern.append(0)
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "ThrottlingException"
            pattern.append(1)
    return pattern


def test_seeded_shares_are_reproducible_and_match_the_rate(proxy):
    set_faults(proxy, {"kind": "throttle", "rate": 0.3}, seed=7)
    first = throttled_pattern(proxy)
    assert 40 <= sum(first) <= 80, sum(first)  # 0.3 of 200 is 60
    assert faults_state(proxy)["fired"]["throttle"] == sum(first)

    http("POST", proxy + "/_faults/reset", timeout=5)
    assert throttled_pattern(proxy) == first  # same seed, same order: same faults
    set_faults(proxy, {"kind": "throttle", "rate": 0.3}, seed=7)  # PUT restarts the stream too
    assert throttled_pattern(proxy) == first
    set_faults(proxy, {"kind": "throttle", "rate": 0.3}, seed=8)
    assert throttled_pattern(proxy) != first


def test_skip_and_limit_pick_exact_requests(proxy, direct):
    set_faults(proxy, {"kind": "lost_reply", "skip": 1, "limit": 1, "operations": ["PutItem"]})
    c = client(proxy)
    outcomes = []
    for i in range(4):
        try:
            c.put_item(TableName=TABLE, Item=item(f"s{i}"))
            outcomes.append("ok")
        except botocore.exceptions.ClientError as e:
            outcomes.append(e.response["Error"]["Code"])
    assert outcomes == ["ok", "InternalServerError", "ok", "ok"]
    assert all(stored(direct, f"s{i}") for i in range(4))
    assert faults_state(proxy)["rules"] == [{"kind": "lost_reply", "matched": 4, "fired": 1}]


def test_the_first_fault_that_hits_decides_and_latency_stacks(proxy):
    set_faults(proxy, {"kind": "latency", "delay_ms": 1}, {"kind": "error500"}, {"kind": "throttle"})
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client(proxy).list_tables()
    assert error_of(info) == ("InternalServerError", 500)
    state = faults_state(proxy)
    assert state["fired"] == {"throttle": 0, "error500": 1, "lost_reply": 0, "timeout": 0, "latency": 1}
    assert [r["matched"] for r in state["rules"]] == [1, 1, 1]


# --------------------------------------------------------------------------------------
# admin API and CLI
# --------------------------------------------------------------------------------------


def test_get_shows_the_normalized_config_and_reset_clears_the_counts(proxy):
    body = set_faults(proxy, {"kind": "timeout", "rate": 0.5})
    assert body["config"] == {"seed": 0, "idempotency_tokens": True, "faults": [
        {"kind": "timeout", "rate": 0.5, "operations": None, "skip": 0, "limit": None, "seed": None,
         "delay_ms": 10000.0, "forward": False}]}
    set_faults(proxy)
    client(proxy).list_tables()
    assert faults_state(proxy)["requests"] == 1
    status, _, body = http("POST", proxy + "/_faults/reset", timeout=5)
    assert status == 200 and body["requests"] == 0 and body["operations"] == {}
    assert http("GET", proxy + "/_faults/nope", timeout=5)[0] == 404


@pytest.mark.parametrize("doc,field", [
    ({"faults": [{"kind": "throttle", "rate": 1.5}]}, "faults[0].rate"),
    ({"faults": [{"kind": "throttle", "rate": True}]}, "faults[0].rate"),
    ({"faults": [{"kind": "explode"}]}, "faults[0].kind"),
    ({"faults": [{"rate": 0.1}]}, "faults[0].kind"),
    ({"faults": [{"kind": "error500"}, {"kind": "latency", "forward": True}]}, "faults[1].forward"),
    ({"faults": [{"kind": "timeout", "forward": "yes"}]}, "faults[0].forward"),
    ({"faults": [{"kind": "timeout", "delay_ms": -1}]}, "faults[0].delay_ms"),
    ({"faults": [{"kind": "throttle", "operations": []}]}, "faults[0].operations"),
    ({"faults": [{"kind": "throttle", "error": "SlowDown"}]}, "faults[0].error"),
    ({"faults": [{"kind": "lost_reply", "limit": -1}]}, "faults[0].limit"),
    ({"faults": {"kind": "throttle"}}, "faults"),
    ({"fualts": []}, "fualts"),
    ({"seed": "seven"}, "seed"),
    ([], "(document)"),
])
def test_an_invalid_config_is_rejected_naming_the_field(proxy, doc, field):
    before = set_faults(proxy, {"kind": "latency", "delay_ms": 1})["config"]
    status, _, body = http("PUT", proxy + "/_faults", body=doc, timeout=5)
    assert status == 400
    assert body["message"].startswith(field + ":"), body["message"]
    assert faults_state(proxy)["config"] == before  # nothing changed


def test_invalid_json_is_rejected(proxy):
    status, _, body = http("PUT", proxy + "/_faults", raw=b"{nope", timeout=5)
    assert status == 400 and body["message"].startswith("(document): invalid JSON")


def test_cli_prints_listening_line_and_port_file(tmp_path, moto_url):
    port_file = tmp_path / "port"
    config = json.dumps({"faults": [{"kind": "throttle", "operations": ["ListTables"]}]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.fault_proxy", "--backend", moto_url, "--port", "0",
         "--port-file", str(port_file), "--seed", "3", "--config", config],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # readline blocks until the server is ready; the timer only guards against a hang.
        watchdog = threading.Timer(20, proc.kill)
        watchdog.start()
        line = proc.stdout.readline()
        watchdog.cancel()
        assert line.startswith("fault proxy listening on http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.strip().rsplit(" ", 1)[1]
        assert port_file.read_text().strip() == url.rsplit(":", 1)[1]
        state = faults_state(url)
        assert state["config"]["seed"] == 3 and state["config"]["faults"][0]["kind"] == "throttle"
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client(url).list_tables()
        assert error_of(info) == ("ThrottlingException", 400)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stdout.read() == ""  # exactly one line on stdout


def test_cli_rejects_an_invalid_config(moto_url):
    r = subprocess.run([sys.executable, "-m", "infra.fault_proxy", "--backend", moto_url,
                        "--config", '{"faults": [{"kind": "throttle", "rate": 2}]}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "faults[0].rate:" in r.stderr
