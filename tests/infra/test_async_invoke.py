"""Lambda's asynchronous invocation as the local stack emulates it: the invoke proxy's
retries and on-failure destination (infra/invoke_proxy.py), and the event sources that
consume a destination queue and fire schedules (infra/event_sources.py).

A scripted stub plays the Lambda Invoke API behind the proxy (as cargo lambda watch
does in the stack) and the consumer of the SQS event source; SQS is a moto server on a
free loopback port. Waits poll the proxy's counters with deadlines; nothing sleeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra import ROOT, invoke_proxy
from infra.event_sources import Schedule, SqsEventSource
from infra.invoke_proxy import AsyncConfig, request_id_from_marker
from infra.net import answers, free_port, http, wait_until
from infra.sqs import Sqs

INVOKE = "/2015-03-31/functions/chainrun-runner/invocations"
ERROR = (500, {"Content-Type": "application/json"},
         b'{"errorType":"chainrun.Retryable","errorMessage":"lease busy"}')
OK = (200, {"Content-Type": "application/json"}, b'{"ok":true}')
DROP = "drop"  # close the connection without an answer, as a dying process's watch would


class ScriptedLambda:
    """Answers invokes from `script` in order (then `then`); records each request with
    its arrival time."""

    def __init__(self, script=(), then=OK):
        self.script = list(script)
        self.then = then
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        stub = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with stub._lock:
                    stub.requests.append({"at": time.monotonic(), "path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                    answer = stub.script.pop(0) if stub.script else stub.then
                if callable(answer):
                    answer = answer(json.loads(body or b"null"))
                if answer == DROP:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, data = answer
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the caller gave up waiting (the timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def moto_url():
    for _ in range(3):
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        if wait_until(lambda: p.poll() is not None or answers(url + "/moto-api/") is not None, 60) and p.poll() is None:
            break
    else:
        pytest.fail("moto server did not start")
    yield url
    p.terminate()
    p.wait(10)


@pytest.fixture
def queue(moto_url):
    sqs = Sqs(moto_url)
    url = sqs.create_queue(f"failures-{uuid.uuid4().hex[:8]}", {"VisibilityTimeout": "1"})
    return sqs, url


@pytest.fixture
def stubs():
    made = []

    def make(*a, **kw):
        made.append(ScriptedLambda(*a, **kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def proxies():
    made = []

    def make(backend: str, **config):
        config.setdefault("retry_delays", (0.2, 0.4))
        srv, thread = invoke_proxy.start_in_thread(backend, **config)
        made.append((srv, thread))
        return srv

    yield make
    for srv, thread in made:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def event(proxy, payload: dict) -> str:
    status, headers, _ = http("POST", proxy.url + INVOKE, body=payload, headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 202
    return headers["x-amzn-RequestId"]


def receive_all(sqs: Sqs, url: str, n: int, timeout: float = 10) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += sqs.receive(url, 10, wait_s=1)
    return got


# ---------------------------------------------------------------------------------------
# retries


def test_a_function_error_is_retried_after_the_configured_delays_with_the_same_request_id(proxies, stubs):
    stub = stubs([ERROR, ERROR], then=OK)
    proxy = proxies(stub.url, retry_delays=(0.3, 0.6))
    rid = event(proxy, {"run_id": "R1"})
    assert proxy.wait_idle(10)
    s = proxy.stats()
    assert (s["attempts"], s["retries"], s["function_errors"], s["succeeded"], s["failed"]) == (3, 2, 2, 1, 0)
    at = [r["at"] for r in stub.requests]
    assert 0.3 <= at[1] - at[0] < 0.3 + 1.0
    assert 0.6 <= at[2] - at[1] < 0.6 + 1.0
    assert [r["body"] for r in stub.requests] == [b'{"run_id": "R1"}'] * 3
    ids = {request_id_from_marker(r["headers"]["lambda-runtime-cognito-identity"]) for r in stub.requests}
    assert ids == {rid}
    assert {r["headers"]["x-amz-invocation-type"] for r in stub.requests} == {"RequestResponse"}


def test_no_retry_when_maximum_retry_attempts_is_zero(proxies, stubs):
    stub = stubs(then=ERROR)
    proxy = proxies(stub.url, functions={"chainrun-runner": AsyncConfig(maximum_retry_attempts=0)})
    event(proxy, {"run_id": "R2"})
    assert proxy.wait_idle(10)
    s = proxy.stats()
    assert (s["attempts"], s["retries"], s["retries_exhausted"], s["failed"]) == (1, 0, 1, 1)
    assert len(stub.requests) == 1


def test_a_crash_is_retried(proxies, stubs):
    stub = stubs([DROP], then=OK)
    proxy = proxies(stub.url)
    event(proxy, {"run_id": "R3"})
    assert proxy.wait_idle(10)
    s = proxy.stats()
    assert (s["crashes"], s["retries"], s["succeeded"]) == (1, 1, 1)


def test_crashes_and_timeouts_reported_by_the_runtime_shim_are_counted_as_such(proxies, stubs):
    exit_error = (500, {}, b'{"errorType":"Runtime.ExitError","errorMessage":"Runtime exited with error: signal: killed"}')
    timed_out = (500, {}, b'{"errorType":"Sandbox.Timedout","errorMessage":"Task timed out after 2.00 seconds"}')
    stub = stubs([exit_error, timed_out], then=OK)
    proxy = proxies(stub.url, retry_delays=(0.05,))
    event(proxy, {})
    assert proxy.wait_idle(10)
    s = proxy.stats()
    assert (s["crashes"], s["timeouts"], s["function_errors"], s["succeeded"]) == (1, 1, 0, 1)


def test_an_attempt_without_an_answer_past_the_timeout_is_a_timeout(proxies, stubs, monkeypatch):
    gate = threading.Event()

    def hang(_):
        gate.wait(10)
        return OK

    monkeypatch.setattr(invoke_proxy, "TIMEOUT_GRACE_S", 0.2)
    stub = stubs([hang], then=OK)
    proxy = proxies(stub.url, functions={"chainrun-runner": AsyncConfig(timeout_s=0.3)})
    try:
        event(proxy, {})
        assert proxy.wait_idle(10)
        s = proxy.stats()
        assert (s["timeouts"], s["retries"], s["succeeded"]) == (1, 1, 1)
    finally:
        gate.set()


# ---------------------------------------------------------------------------------------
# on-failure destination


def test_exhausted_retries_send_aws_invocation_record_to_the_queue(proxies, stubs, queue):
    sqs, url = queue
    stub = stubs(then=ERROR)
    proxy = proxies(stub.url,
                    functions={"chainrun-runner": AsyncConfig(maximum_retry_attempts=1, on_failure=url)})
    rid = event(proxy, {"run_id": "R4"})
    assert proxy.wait_idle(10)
    assert proxy.stats()["dead_lettered"] == 1
    [msg] = receive_all(sqs, url, 1)
    record = json.loads(msg["Body"])
    assert set(record) == {"version", "timestamp", "requestContext", "requestPayload", "responseContext",
                           "responsePayload"}
    assert record["version"] == "1.0"
    assert time.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert record["requestContext"] == {
        "requestId": rid,
        "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:chainrun-runner:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 2,
    }
    assert record["requestPayload"] == {"run_id": "R4"}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"}
    assert record["responsePayload"] == {"errorType": "chainrun.Retryable", "errorMessage": "lease busy"}


def test_an_event_older_than_its_maximum_age_is_not_retried_but_dead_lettered(proxies, stubs, queue):
    sqs, url = queue
    stub = stubs(then=ERROR)
    proxy = proxies(stub.url, retry_delays=(0.5,),
                    functions={"chainrun-runner": AsyncConfig(maximum_event_age_s=0.3, on_failure=url)})
    event(proxy, {"run_id": "R5"})
    assert proxy.wait_idle(10)
    assert len(stub.requests) == 1
    [msg] = receive_all(sqs, url, 1)
    ctx = json.loads(msg["Body"])["requestContext"]
    assert (ctx["condition"], ctx["approximateInvokeCount"]) == ("EventAgeExceeded", 1)
    assert proxy.stats()["event_age_exceeded"] == 1


def test_a_crash_record_says_the_process_exited(proxies, stubs, queue):
    sqs, url = queue
    stub = stubs(then=DROP)
    proxy = proxies(stub.url, functions={"chainrun-runner": AsyncConfig(maximum_retry_attempts=0, on_failure=url)})
    rid = event(proxy, {})
    assert proxy.wait_idle(10)
    [msg] = receive_all(sqs, url, 1)
    record = json.loads(msg["Body"])
    assert record["responsePayload"] == {"errorMessage": f"RequestId: {rid} Process exited before completing request"}


# ---------------------------------------------------------------------------------------
# the destination's consumer (SQS event source mapping)


def _send(sqs, url, bodies):
    return [sqs.send(url, b, {"kind": {"DataType": "String", "StringValue": "test"}}) for b in bodies]


def _left(sqs, url) -> int:
    a = sqs.attributes(url, ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
    return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])


def test_the_poller_delivers_lambdas_sqs_event_and_deletes_on_success(stubs, queue):
    sqs, url = queue
    ids = _send(sqs, url, ["a", "b", "c"])
    consumer = stubs(then=(200, {}, b"null"))
    esm = SqsEventSource(url, "chainrun-dead-letter", consumer.url, batch_size=10, region="us-east-1").start()
    try:
        assert wait_until(lambda: esm.stats()["deleted"] == 3, 15)
    finally:
        esm.stop()
    records = [r for req in consumer.requests for r in json.loads(req["body"])["Records"]]
    assert sorted(r["messageId"] for r in records) == sorted(ids)
    r = records[0]
    assert consumer.requests[0]["path"] == "/2015-03-31/functions/chainrun-dead-letter/invocations"
    assert consumer.requests[0]["headers"]["x-amz-invocation-type"] == "RequestResponse"
    assert r["eventSource"] == "aws:sqs" and r["awsRegion"] == "us-east-1"
    assert r["eventSourceARN"] == f"arn:aws:sqs:us-east-1:123456789012:{url.rsplit('/', 1)[1]}"
    assert r["receiptHandle"] and r["md5OfBody"]
    assert {"ApproximateReceiveCount", "SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp"} <= set(r["attributes"])
    assert r["attributes"]["ApproximateReceiveCount"] == "1"
    assert r["messageAttributes"]["kind"]["stringValue"] == "test"
    assert r["messageAttributes"]["kind"]["dataType"] == "String"
    assert _left(sqs, url) == 0


def test_batch_item_failures_keep_only_those_and_they_come_back(stubs, queue):
    sqs, url = queue
    ids = _send(sqs, url, ["keep", "drop1", "drop2"])
    seen: list[dict] = []

    def answer(event):
        seen.extend(event["Records"])
        failed = [{"itemIdentifier": r["messageId"]} for r in event["Records"] if r["body"] == "keep"]
        return 200, {}, json.dumps({"batchItemFailures": failed}).encode()

    consumer = stubs(then=answer)
    esm = SqsEventSource(url, "chainrun-dead-letter", consumer.url, batch_size=2).start()
    try:
        # the kept message comes back after the 1 s visibility timeout, until the poller stops
        assert wait_until(lambda: any(r["body"] == "keep" and r["attributes"]["ApproximateReceiveCount"] == "2"
                                      for r in seen), 15)
    finally:
        esm.stop()
    assert all(len(json.loads(req["body"])["Records"]) <= 2 for req in consumer.requests)
    assert esm.stats()["deleted"] == 2
    left = receive_all(sqs, url, 1, timeout=5)
    assert [m["MessageId"] for m in left] == [ids[0]]


def test_a_function_error_leaves_the_batch_for_redelivery(stubs, queue):
    sqs, url = queue
    [mid] = _send(sqs, url, ["x"])
    consumer = stubs([ERROR], then=(200, {}, b"{}"))
    esm = SqsEventSource(url, "chainrun-dead-letter", consumer.url).start()
    try:
        assert wait_until(lambda: esm.stats()["deleted"] == 1, 15)
    finally:
        esm.stop()
    assert esm.stats()["function_errors"] == 1
    counts = [json.loads(r["body"])["Records"][0]["attributes"]["ApproximateReceiveCount"] for r in consumer.requests]
    assert counts == ["1", "2"]
    assert _left(sqs, url) == 0


def test_the_dead_letter_queue_is_consumed_end_to_end(proxies, stubs, queue):
    sqs, url = queue
    runner = stubs(then=ERROR)
    proxy = proxies(runner.url, functions={"chainrun-runner": AsyncConfig(maximum_retry_attempts=0, on_failure=url)})
    consumer = stubs(then=(200, {}, b"{}"))
    esm = SqsEventSource(url, "chainrun-dead-letter", consumer.url).start()
    try:
        rid = event(proxy, {"run_id": "R6"})
        assert wait_until(lambda: esm.stats()["deleted"] == 1, 15)
    finally:
        esm.stop()
    record = json.loads(json.loads(consumer.requests[0]["body"])["Records"][0]["body"])
    assert record["requestContext"]["requestId"] == rid and record["requestPayload"] == {"run_id": "R6"}


# ---------------------------------------------------------------------------------------
# schedule


def test_the_schedule_fires_async_invokes_with_its_payload(proxies, stubs):
    sweeper = stubs(then=OK)
    proxy = proxies(sweeper.url)
    payload = {"source": "chainrun.schedule", "action": "sweep"}
    sched = Schedule("chainrun-sweeper", proxy.url, 0.2, payload).start()
    try:
        assert proxy.wait_for(lambda s: s["succeeded"] >= 3, 10)
    finally:
        sched.stop()
    assert sched.stats()["fired"] >= 3
    req = sweeper.requests[0]
    assert req["path"] == "/2015-03-31/functions/chainrun-sweeper/invocations"
    assert json.loads(req["body"]) == payload
    gaps = [b["at"] - a["at"] for a, b in zip(sweeper.requests, sweeper.requests[1:])]
    assert all(0.1 <= g <= 1.0 for g in gaps), gaps


def test_the_proxy_cli_runs_the_event_sources_of_its_config(tmp_path, stubs):
    sweeper = stubs(then=OK)
    config = tmp_path / "lambda-config.json"
    config.write_text(json.dumps({"functions": {"chainrun-sweeper": {"timeout_s": 5, "maximum_retry_attempts": 0}},
                                  "event_sources": {"schedules": [{"function": "chainrun-sweeper", "every_s": 0.2,
                                                                   "payload": {"action": "sweep"}}]}}))
    port_file = tmp_path / "port"
    p = subprocess.Popen([sys.executable, "-m", "infra.invoke_proxy", "--backend", sweeper.url, "--config", str(config),
                          "--port-file", str(port_file)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 10)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert wait_until(lambda: http("GET", url + "/_proxy/stats")[2]["succeeded"] >= 2, 10)
        stats = http("GET", url + "/_proxy/stats")[2]
        assert stats["event_sources"]["schedule-chainrun-sweeper"]["fired"] >= 2
    finally:
        p.terminate()
        p.wait(10)


def test_one_time_schedules_fire_when_due_once_and_are_deleted(moto_url, proxies, stubs):
    """The local stand-in for EventBridge Scheduler's at() schedules, against moto."""
    import boto3

    from infra.event_sources import OneTimeSchedules
    from infra.tables import create_schedule_group

    runner = stubs(then=OK)
    proxy = proxies(runner.url)
    group = f"g-{uuid.uuid4().hex[:6]}"
    create_schedule_group(moto_url, group)
    client = boto3.client("scheduler", endpoint_url=moto_url, region_name="us-east-1",
                          aws_access_key_id="t", aws_secret_access_key="t")
    for name, at in (("past", "2020-01-01T00:00:00"), ("future", "2999-01-01T00:00:00")):
        client.create_schedule(Name=name, GroupName=group, ScheduleExpression=f"at({at})", ScheduleExpressionTimezone="UTC",
                               FlexibleTimeWindow={"Mode": "OFF"}, ActionAfterCompletion="DELETE",
                               Target={"Arn": "arn:aws:lambda:us-east-1:123456789012:function:chainrun-runner",
                                       "RoleArn": "arn:aws:iam::123456789012:role/r",
                                       "Input": json.dumps({"run_id": name, "cause": "deadline"})})
    worker = OneTimeSchedules(moto_url, group, proxy.url)
    assert worker.poll_once() == 1
    assert worker.poll_once() == 0, "fired once, then deleted"
    assert proxy.wait_for(lambda st: st["succeeded"] >= 1, 10)
    req = runner.requests[0]
    assert req["path"] == "/2015-03-31/functions/chainrun-runner/invocations"
    assert json.loads(req["body"]) == {"run_id": "past", "cause": "deadline"}
    assert [x["Name"] for x in client.list_schedules(GroupName=group)["Schedules"]] == ["future"]
