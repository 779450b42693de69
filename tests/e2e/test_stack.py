"""Tests of the local-stack plumbing: the async-invoke proxy, local tokens, table
creation and process cleanup. Everything but the last section is hermetic (in-process
fake backends, in-process moto) and needs no Rust build; the last section checks the
real stack the `stack` fixture starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from infra import INFRA, ROOT, invoke_proxy, local_token
from infra.envfile import quote_for_cargo_lambda
from infra.net import free_port, http
from infra.stack import RUNNER_WARMUP_PAYLOAD, STACK_ID_VAR, _alive, _pids_with_marker, terminate
from infra.tables import create_tables

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
    srv, thread = invoke_proxy.start_in_thread(backend.url)
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
    assert proxy.stats() == {"inflight": 0, "accepted": 1, "completed": 1, "failed": 0}

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
    assert proxy.stats()["failed"] == 1


def test_event_invoke_to_a_dead_backend_is_still_accepted(backend):
    dead = f"http://127.0.0.1:{free_port()}"
    srv, thread = invoke_proxy.start_in_thread(dead)
    try:
        status, _, _ = http("POST", srv.url + INVOKE, raw=b"{}", headers={"X-Amz-Invocation-Type": "Event"})
        assert status == 202
        assert srv.wait_idle(10)
        assert srv.stats()["failed"] == 1
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


# ---------------------------------------------------------------------------------------
# tokens

SECRET = "0123456789abcdef" * 4


def test_token_carries_the_claims():
    tok = local_token.mint(SECRET, "alice", ["eng", "ops"])
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"], audience="chainrun", issuer="chainrun-local")
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["eng", "ops"]
    assert claims["iss"] == "chainrun-local" and claims["aud"] == "chainrun"
    assert claims["exp"] - claims["iat"] == 12 * 3600
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"
    assert local_token.decode(SECRET, tok)["sub"] == "alice"


def test_token_rejects_wrong_secret_and_expiry():
    tok = local_token.mint(SECRET, "bob")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tok, "f" * 64, algorithms=["HS256"], audience="chainrun")
    expired = local_token.mint(SECRET, "bob", ttl_s=-10)
    with pytest.raises(jwt.ExpiredSignatureError):
        local_token.decode(SECRET, expired)
    assert local_token.decode(SECRET, tok)["groups"] == []


def test_token_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "infra.local_token", *a],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
    r = run("--user", "alice", "--groups", "eng, ops", "--secret", SECRET)
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    assert r.stdout == tok + "\n" and tok.count(".") == 2
    assert local_token.decode(SECRET, tok)["groups"] == ["eng", "ops"]

    env_file = tmp_path / "stack.env"
    env_file.write_text(f"API_URL=http://x\nCHAINRUN_LOCAL_JWT_SECRET={SECRET}\n")
    r = run("--user", "carol", "--env-file", str(env_file))
    assert r.returncode == 0, r.stderr
    assert local_token.decode(SECRET, r.stdout.strip())["sub"] == "carol"

    r = run("--user", "dave", "--env-file", str(tmp_path / "missing.env"))
    assert r.returncode == 2 and r.stdout == "" and "no secret" in r.stderr


# ---------------------------------------------------------------------------------------
# tables


@pytest.fixture
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


def test_tables_are_created_as_tables_json_says(moto_endpoint):
    import boto3

    spec = json.loads((INFRA / "tables.json").read_text())["tables"]
    names = create_tables(moto_endpoint, "us-east-1")
    assert names == [t["local_name"] for t in spec]
    assert create_tables(moto_endpoint, "us-east-1") == names  # idempotent

    ddb = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    assert sorted(ddb.list_tables()["TableNames"]) == sorted(names)
    for t in spec:
        d = ddb.describe_table(TableName=t["local_name"])["Table"]
        assert {a["AttributeName"]: a["AttributeType"] for a in d["AttributeDefinitions"]} == t["attributes"]
        key = {k["KeyType"]: k["AttributeName"] for k in d["KeySchema"]}
        assert key == {"HASH": t["key"]["hash"], "RANGE": t["key"]["range"]}
        assert d["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        gsis = {g["IndexName"]: g for g in d.get("GlobalSecondaryIndexes", [])}
        assert set(gsis) == {g["name"] for g in t["gsis"]}
        for g in t["gsis"]:
            gk = {k["KeyType"]: k["AttributeName"] for k in gsis[g["name"]]["KeySchema"]}
            assert gk == {"HASH": g["hash"], "RANGE": g["range"]}
            assert gsis[g["name"]]["Projection"]["ProjectionType"] == "ALL"
        ttl = ddb.describe_time_to_live(TableName=t["local_name"])["TimeToLiveDescription"]
        if t["ttl"]:
            assert ttl["TimeToLiveStatus"] == "ENABLED" and ttl["AttributeName"] == t["ttl"]
        else:
            assert ttl["TimeToLiveStatus"] == "DISABLED"


# ---------------------------------------------------------------------------------------
# process cleanup


def test_terminate_kills_process_groups_and_marked_orphans(tmp_path):
    """A stack child (own session) whose own child lives in yet another session — like
    cargo lambda watch's function instances — both die, found by the stack marker."""
    sid = "test" + os.urandom(4).hex()
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "time.sleep(300)\n"
    )
    env = {**os.environ, STACK_ID_VAR: sid}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        grandchild = int(pid_file.read_text())
        assert sorted(_pids_with_marker(sid)) == sorted([parent.pid, grandchild])

        terminate([parent.pid], sid, grace_s=10)
        parent.wait(10)
        assert not _alive(grandchild)
        assert _pids_with_marker(sid) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_function_env_file_quoting_survives_equals_and_commas():
    # cargo lambda watch's --env-file parser rejects an unquoted RUST_LOG=info,chainrun=debug
    assert quote_for_cargo_lambda("info,chainrun=debug") == '"info,chainrun=debug"'
    assert quote_for_cargo_lambda('a"b\\c$d') == '"a\\"b\\\\c\\$d"'


# ---------------------------------------------------------------------------------------
# the real stack (starts it: cargo build + moto + devmodel + proxy + cargo lambda watch)


def test_stack_env_and_tables(stack):
    for k in ("API_URL", "INVOKE_PROXY_URL", "LAMBDA_WATCH_URL", "AWS_ENDPOINT_URL_DYNAMODB",
              "AWS_ENDPOINT_URL_LAMBDA", "CHAINRUN_LOCAL_JWT_SECRET", "CHAINRUN_RUNS_TABLE"):
        assert stack.env.get(k), k
    assert stack.api_url.endswith("/lambda-url/chainrun-api")
    assert stack.env["AWS_ENDPOINT_URL_LAMBDA"] == stack.proxy_url
    assert len(bytes.fromhex(stack.secret)) == 32
    names = set(stack.ddb().list_tables()["TableNames"])
    assert set(stack.tables.values()) <= names
    if stack.function_env:
        fe = stack.function_env
        assert fe["AWS_ENDPOINT_URL_LAMBDA"] == stack.proxy_url
        assert fe["AWS_ENDPOINT_URL_DYNAMODB"] == stack.dynamodb_url
        assert fe["CHAINRUN_AUTH"] == "local-jwt"
        assert fe["CHAINRUN_RUNNER_FUNCTION"] == "chainrun-runner"


def test_stack_api_is_served_by_the_function(stack, api):
    # Whatever the API answers, it must come from chainrun-api, not from watch itself
    # (watch's own errors are {"title": "Missing function", ...}).
    status, _, body = api("GET", "/runs/does-not-exist", token=stack.token("alice"))
    assert status != 502
    assert not (isinstance(body, dict) and body.get("title") == "Missing function"), body


def test_stack_event_invoke_through_the_proxy(stack):
    # An Event invoke for a run that does not exist: 202 at once, the runner shrugs later.
    status, _, body = http("POST", stack.proxy_url + INVOKE, raw=json.dumps(RUNNER_WARMUP_PAYLOAD),
                           headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 202 and body == ""
    assert stack.wait_quiescent(120)
