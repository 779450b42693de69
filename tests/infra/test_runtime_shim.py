"""Tests of infra/runtime_shim.py: the Runtime API it serves a function between the
function and cargo lambda watch. A fake watch (FakeRuntimeApi, which, like watch 1.9.2,
answers every /next with a deadline of 600000 ms and an id of its own) and a fake
function (FUNCTION below: a Python Lambda runtime loop) stand in for the real ones."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra import ROOT
from infra.invoke_proxy import request_id_marker
from infra.net import wait_until

# A function: takes invocations from AWS_LAMBDA_RUNTIME_API and answers each with what
# it saw. {"sleep": s} sleeps first; {"die": true} SIGKILLs itself mid-invocation.
FUNCTION = r"""
import json, os, signal, sys, time, urllib.request
api = os.environ["AWS_LAMBDA_RUNTIME_API"]
while True:
    with urllib.request.urlopen(api + "/2018-06-01/runtime/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]
        seen = {"request_id": rid, "deadline_ms": int(r.headers["Lambda-Runtime-Deadline-Ms"]),
                "arn": r.headers["Lambda-Runtime-Invoked-Function-Arn"],
                "cognito": r.headers.get("Lambda-Runtime-Cognito-Identity"),
                "pid": os.getpid(), "now_ms": int(time.time() * 1000)}
        event = json.loads(r.read())
    if event.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(event.get("sleep", 0))
    req = urllib.request.Request(api + f"/2018-06-01/runtime/invocation/{rid}/response",
                                 data=json.dumps(seen).encode(), method="POST")
    urllib.request.urlopen(req).read()
"""


class FakeRuntimeApi:
    """watch's Runtime API for one function: invoke(payload) queues an invocation and
    returns a queue that gets (status, body) once the function answers."""

    def __init__(self):
        self.pending: queue.Queue = queue.Queue()
        self.answers: dict[str, queue.Queue] = {}
        self.requests: list[tuple[str, tuple]] = []  # (method, client address) in arrival order
        api = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                api.requests.append(("GET", self.client_address))
                assert self.path == "/.rt/fn/2018-06-01/runtime/invocation/next", self.path
                watch_id, headers, body = api.pending.get()
                self._reply(200, body, [("Lambda-Runtime-Aws-Request-Id", watch_id),
                                        ("Lambda-Runtime-Deadline-Ms", "600000"),
                                        ("Lambda-Runtime-Invoked-Function-Arn", "function-arn")] + headers)

            def do_POST(self):
                api.requests.append(("POST", self.client_address))
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                watch_id, what = self.path.split("/invocation/", 1)[1].rsplit("/", 1)
                api.answers[watch_id].put((what, json.loads(body)))
                self._reply(202)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.rt/fn"

    def invoke(self, payload: dict, request_id: str | None = None) -> queue.Queue:
        watch_id = str(uuid.uuid4())
        self.answers[watch_id] = queue.Queue()
        headers = [("Lambda-Runtime-Cognito-Identity", request_id_marker(request_id))] if request_id else []
        self.pending.put((watch_id, headers, json.dumps(payload).encode()))
        return self.answers[watch_id]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def shim(tmp_path):
    api = FakeRuntimeApi()
    fn = tmp_path / "function.py"
    fn.write_text(FUNCTION)
    config = tmp_path / "lambda-config.json"
    config.write_text(json.dumps({"default": {"timeout_s": 900}, "functions": {"fn": {"timeout_s": 2}},
                                  "shim_state_dir": str(tmp_path / "shims")}))
    env = dict(os.environ, AWS_LAMBDA_RUNTIME_API=api.url, AWS_LAMBDA_FUNCTION_NAME="fn", AWS_REGION="us-east-1")
    p = subprocess.Popen([sys.executable, "-m", "infra.runtime_shim", "--config", str(config), "--",
                          sys.executable, str(fn)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(iter(p.stderr.readline, "")), daemon=True).start()
    yield api, log, tmp_path / "shims"
    p.terminate()
    try:
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
        api.stop()


def answer(q: queue.Queue, timeout: float = 10.0):
    return q.get(timeout=timeout)


def test_deadline_is_now_plus_the_configured_timeout_and_the_arn_is_real(shim):
    api, _, _ = shim
    before = int(time.time() * 1000)
    what, seen = answer(api.invoke({}))
    assert what == "response"
    # the function's timeout is 2 s in the config; watch said 600000 (1970)
    assert 1500 <= seen["deadline_ms"] - seen["now_ms"] <= 2000
    assert seen["deadline_ms"] >= before + 1500
    assert seen["arn"] == "arn:aws:lambda:us-east-1:123456789012:function:fn"


def test_the_function_sees_the_invokers_request_id_and_watch_gets_its_own_back(shim):
    api, _, _ = shim
    what, seen = answer(api.invoke({}, request_id="req-1"))
    assert what == "response"  # delivered to watch under watch's id (the queue is keyed by it)
    assert seen["request_id"] == "req-1"
    assert seen["cognito"] is None  # the marker is taken out
    _, seen = answer(api.invoke({}))
    assert seen["request_id"] != "req-1"  # no marker: watch's id


def test_a_response_is_posted_on_the_kept_connection_that_then_carries_the_next_poll(shim):
    # watch reads a large response body after answering its POST, and fails it when the
    # connection closes at once (Shim.upstream): the shim's next request must follow on it.
    api, _, _ = shim
    assert answer(api.invoke({}))[0] == "response"
    assert answer(api.invoke({}))[0] == "response"
    wait_until(lambda: len(api.requests) >= 5, 5, 0.02)  # GET, POST, GET, POST, GET
    methods = [m for m, _ in api.requests[:5]]
    assert methods == ["GET", "POST", "GET", "POST", "GET"], api.requests
    assert len({addr for _, addr in api.requests[:5]}) == 1, f"one connection throughout: {api.requests}"


def test_a_killed_process_fails_its_invocation_and_a_fresh_one_takes_the_next(shim):
    api, log, _ = shim
    _, first = answer(api.invoke({}))
    t0 = time.monotonic()
    what, err = answer(api.invoke({"die": True}, request_id="req-die"))
    assert what == "error"
    assert err["errorType"] == "Runtime.ExitError"
    assert "req-die" in err["errorMessage"] and "signal: killed" in err["errorMessage"]
    what, after = answer(api.invoke({}))
    recovery = time.monotonic() - t0
    assert what == "response"
    assert after["pid"] != first["pid"]
    assert recovery < 5, recovery
    assert wait_until(lambda: any("starting a fresh one" in line for line in log), 5)


def test_an_invocation_past_its_timeout_is_killed_and_reported_as_timed_out(shim):
    api, _, _ = shim
    _, first = answer(api.invoke({}))
    t0 = time.monotonic()
    what, err = answer(api.invoke({"sleep": 30}, request_id="req-slow"))
    assert what == "error"
    assert err["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 2.00 seconds" in err["errorMessage"]
    assert 1.5 <= time.monotonic() - t0 < 6
    what, after = answer(api.invoke({}))
    assert what == "response" and after["pid"] != first["pid"]


def test_the_state_file_names_the_process_and_the_invocation_it_runs_and_what_a_kill_hit(shim):
    api, _, state_dir = shim
    _, first = answer(api.invoke({}))

    def state():
        files = list(state_dir.glob("fn-*.json"))
        return json.loads(files[0].read_text()) if len(files) == 1 else None

    pending = api.invoke({"sleep": 30, "run_id": "R1"}, request_id="req-slow")
    assert wait_until(lambda: (state() or {}).get("current"), 5)
    s = state()
    assert s["function"] == "fn" and s["pid"] == first["pid"]
    assert s["current"]["request_id"] == "req-slow"
    assert s["current"]["payload"] == {"sleep": 30, "run_id": "R1"}
    os.kill(s["pid"], 9)
    what, err = answer(pending)
    assert what == "error" and err["errorType"] == "Runtime.ExitError"
    assert wait_until(lambda: (state() or {}).get("pid") not in (None, first["pid"]), 5)
    s = state()
    assert s["current"] is None
    assert s["deaths"][-1]["pid"] == first["pid"]
    assert s["deaths"][-1]["request_id"] == "req-slow"
    assert s["deaths"][-1]["how"] == "signal: killed"
