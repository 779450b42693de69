"""Tests of infra/invoke_proxy.py, the async-invoke proxy in front of cargo lambda
watch's Invoke API, against a scriptable in-process backend that stands in for watch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra import ROOT, invoke_proxy
from infra.net import free_port, http

INVOKE = "/2015-03-31/functions/chainrun-runner/invocations"


# ---------------------------------------------------------------------------------------
# a scriptable fake backend (stands in for cargo lambda watch)


class FakeBackend:
    """Records every request. While `gate` is closed, invoke requests block (the scripted
    delay); `answer` says what to reply."""

    def __init__(self):
        self.requests: list[dict] = []
        self.received = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.answered = threading.Event()
        self.answer = (200, {"Content-Type": "application/json", "X-Backend": "fake"}, b'{"ok": true}')
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                backend.requests.append({"method": self.command, "path": self.path,
                                         "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": body})
                backend.received.set()
                assert backend.gate.wait(30), "test never released the fake backend"
                status, headers, data = backend.answer
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                backend.answered.set()

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def backend():
    b = FakeBackend()
    yield b
    b.stop()


@pytest.fixture
def proxy(backend):
    srv, thread = invoke_proxy.start_in_thread(backend.url, retry_delays=(0.05, 0.1))
    yield srv
    backend.gate.set()
    srv.wait_idle(10)
    srv.shutdown()
    srv.server_close()
    thread.join(5)


# ---------------------------------------------------------------------------------------
# invoke proxy


def test_event_invoke_answers_202_before_the_backend_finishes(proxy, backend):
    backend.gate.clear()  # the backend will hold the forwarded invoke until released
    payload = b'{"run_id": "01TESTRUN"}'
    status, headers, body = http("POST", proxy.url + INVOKE + "?Qualifier=live", raw=payload,
                                 headers={"X-Amz-Invocation-Type": "Event",
                                          "Content-Type": "application/x-amz-json-1.1",
                                          "X-Custom": "kept"})
    assert status == 202
    assert body == ""
    assert headers.get("x-amzn-RequestId")

    # The forward reached the backend, which is still blocked: the 202 did not wait for it.
    assert backend.received.wait(10)
    assert not backend.answered.is_set()
    assert proxy.stats()["inflight"] == 1
    status, _, stats = http("GET", proxy.url + "/_proxy/inflight")
    assert status == 200 and stats["inflight"] == 1 and stats["accepted"] == 1

    backend.gate.set()
    assert proxy.wait_idle(10)
    # The backend sets `answered` just after writing its reply, so the proxy can see the
    # reply (and go idle) a moment before: wait for it rather than read it at once.
    assert backend.answered.wait(5)
    stats = proxy.stats()
    assert {k: stats[k] for k in ("inflight", "accepted", "completed", "succeeded", "failed", "attempts")} == \
        {"inflight": 0, "accepted": 1, "completed": 1, "succeeded": 1, "failed": 0, "attempts": 1}

    [req] = backend.requests
    assert req["method"] == "POST"
    assert req["path"] == INVOKE + "?Qualifier=live"
    assert req["body"] == payload
    assert req["headers"]["x-amz-invocation-type"] == "RequestResponse"
    assert req["headers"]["x-custom"] == "kept"
    assert req["headers"]["content-type"] == "application/x-amz-json-1.1"


def test_event_invoke_failures_are_counted_not_raised(proxy, backend):
    backend.answer = (500, {"Content-Type": "application/json"},
                      b'{"errorType":"chainrun.Terminal","errorMessage":"boom"}')
    status, _, _ = http("POST", proxy.url + INVOKE, raw=b"{}", headers={"X-Amz-Invocation-Type": "event"})
    assert status == 202
    assert proxy.wait_idle(10)
    stats = proxy.stats()
    assert stats["failed"] == 1 and stats["attempts"] == 3 and stats["function_errors"] == 3
    assert stats["dropped"] == 1  # no on-failure destination configured


def test_a_drop_rule_loses_the_matching_event_invokes_it_counts(proxy, backend):
    status, _, state = http("POST", proxy.url + "/_proxy/drops",
                            body={"function": "chainrun-runner", "match": {"cause": "start"}, "count": 1})
    assert status == 200 and state["drops"] == [{"function": "chainrun-runner", "match": {"cause": "start"}, "count": 1}]
    event = {"X-Amz-Invocation-Type": "Event"}
    lost = json.dumps({"run_id": "R1", "cause": "start"}).encode()
    other = json.dumps({"run_id": "R2", "cause": "sweep"}).encode()
    for payload in (other, lost, lost):
        status, headers, _ = http("POST", proxy.url + INVOKE, raw=payload, headers=event)
        assert status == 202 and headers.get("x-amzn-RequestId")
    assert proxy.wait_idle(10)
    # the first "start" is lost; the rule is used up, so the second is delivered
    assert sorted(r["body"] for r in backend.requests) == sorted([other, lost])
    stats = proxy.stats()
    assert stats["lost"] == 1 and stats["accepted"] == 2 and stats["succeeded"] == 2
    status, _, state = http("GET", proxy.url + "/_proxy/drops")
    assert state == {"drops": [], "lost": 1}
    status, _, answer = http("POST", proxy.url + "/_proxy/drops", body={"function": "fn", "count": 0})
    assert status == 400 and "count" in answer["message"]
    http("POST", proxy.url + "/_proxy/drops", body={"function": "fn"})
    status, _, state = http("DELETE", proxy.url + "/_proxy/drops")
    assert status == 200 and state["drops"] == []


def test_a_burst_of_100_event_invokes_is_accepted_whole(proxy, backend):
    from concurrent.futures import ThreadPoolExecutor

    def invoke(i):
        return http("POST", proxy.url + INVOKE, raw=json.dumps({"run_id": f"R{i}"}),
                    headers={"X-Amz-Invocation-Type": "Event"})[0]

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(invoke, range(100)))
    assert statuses == [202] * 100
    assert proxy.wait_idle(30)
    assert proxy.stats()["succeeded"] == 100


def test_max_concurrency_bounds_the_deliveries_in_flight_and_queues_the_rest(backend):
    srv, thread = invoke_proxy.start_in_thread(backend.url, retry_delays=(0.05,),
                                               functions={"chainrun-runner": {"max_concurrency": 2}})
    try:
        backend.gate.clear()  # the backend holds every delivery
        for i in range(5):
            assert http("POST", srv.url + INVOKE, raw=f'{{"i": {i}}}', headers={"X-Amz-Invocation-Type": "Event"})[0] == 202
        assert backend.received.wait(5)
        time.sleep(0.5)
        assert len(backend.requests) == 2  # the other three wait in the proxy
        assert srv.stats()["inflight"] == 5
        backend.gate.set()
        assert srv.wait_idle(10)
        assert len(backend.requests) == 5 and srv.stats()["succeeded"] == 5
    finally:
        backend.gate.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_event_invoke_to_a_dead_backend_is_still_accepted(backend):
    dead = f"http://127.0.0.1:{free_port()}"
    srv, thread = invoke_proxy.start_in_thread(dead, retry_delays=(0.05,))
    try:
        status, _, _ = http("POST", srv.url + INVOKE, raw=b"{}", headers={"X-Amz-Invocation-Type": "Event"})
        assert status == 202
        assert srv.wait_idle(10)
        assert srv.stats()["failed"] == 1 and srv.stats()["connection_errors"] == 3
        # a synchronous request to a dead backend is a 502, not a hang
        status, _, body = http("POST", srv.url + INVOKE, raw=b"{}")
        assert status == 502 and "could not reach" in body["detail"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_request_response_invoke_is_relayed(proxy, backend):
    backend.answer = (200, {"Content-Type": "application/json", "X-Backend": "fake"}, b'{"result": 42}')
    status, headers, body = http("POST", proxy.url + INVOKE, raw=b'{"q": 1}',
                                 headers={"X-Amz-Invocation-Type": "RequestResponse"})
    assert status == 200
    assert body == {"result": 42}
    assert headers["X-Backend"] == "fake"
    [req] = backend.requests
    assert req["body"] == b'{"q": 1}'
    assert req["headers"]["x-amz-invocation-type"] == "RequestResponse"
    assert proxy.stats()["accepted"] == 0  # nothing went to the background


def test_invoke_without_invocation_type_is_synchronous(proxy, backend):
    status, _, body = http("POST", proxy.url + INVOKE, raw=b"{}")
    assert status == 200 and body == {"ok": True}
    assert "x-amz-invocation-type" not in backend.requests[0]["headers"]


def test_function_error_is_relayed_the_aws_way(proxy, backend):
    # cargo lambda watch: 500 + {"errorType","errorMessage"}; AWS: 200 + X-Amz-Function-Error.
    err = b'{"errorType":"chainrun.Terminal","errorMessage":"boom"}'
    backend.answer = (500, {"Content-Type": "application/json"}, err)
    status, headers, body = http("POST", proxy.url + INVOKE, raw=b"{}")
    assert status == 200
    assert headers["X-Amz-Function-Error"] == "Unhandled"
    assert body == json.loads(err)


def test_other_requests_are_forwarded_verbatim(proxy, backend):
    backend.answer = (404, {"Content-Type": "application/problem+json"}, b'{"title": "Not Found"}')
    status, _, body = http("GET", proxy.url + "/lambda-url/chainrun-api/runs/x?after=3")
    assert status == 404 and body == {"title": "Not Found"}
    assert backend.requests[0]["path"] == "/lambda-url/chainrun-api/runs/x?after=3"
    # an Event header on a non-invoke path is not special
    status, _, _ = http("PUT", proxy.url + "/other", raw=b"x", headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 404 and proxy.stats()["accepted"] == 0


def test_proxy_health(proxy, backend):
    status, _, body = http("GET", proxy.url + "/_proxy/health")
    assert status == 200 and body == {"ok": True, "backend": backend.url}
    assert backend.requests == []


def test_proxy_cli_writes_port_file_and_serves(tmp_path, backend):
    port_file = tmp_path / "port"
    p = subprocess.Popen([sys.executable, "-m", "infra.invoke_proxy", "--backend", backend.url,
                          "--port", "0", "--port-file", str(port_file)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("invoke proxy listening on http://127.0.0.1:"), line
        port = int(port_file.read_text())
        assert f":{port} " in line
        status, _, body = http("POST", f"http://127.0.0.1:{port}{INVOKE}", raw=b'{"a":1}',
                               headers={"X-Amz-Invocation-Type": "Event"})
        assert status == 202
        assert backend.answered.wait(10)
        assert backend.requests[0]["body"] == b'{"a":1}'
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
