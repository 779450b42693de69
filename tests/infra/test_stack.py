"""Tests of `python -m infra.stack`, run as `make up` runs it, and of its process cleanup.

The first tests share one stack that `up` started in a temp dir (it runs `cargo build
--bins` first, a no-op once built) and check it serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from infra import ROOT
from infra.client import StackClient
from infra.envfile import read_env_file
from infra.net import http
from infra.stack import RUNNER_WARMUP_PAYLOAD, STACK_ID_VAR, _alive, _pids_with_marker, terminate

INVOKE = "/2015-03-31/functions/chainrun-runner/invocations"
# The dev model server, whatever the caller's environment says about Bedrock.
ENV = {k: v for k, v in os.environ.items() if k not in ("BEDROCK", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME")}


def stack_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.stack", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """(state dir, stack.env values) of a stack `up` started."""
    state = tmp_path_factory.mktemp("stack")
    r = stack_cli("up", "--dir", str(state))
    assert r.returncode == 0, r.stderr[-4000:]
    yield state, read_env_file(state / "stack.env")
    stack_cli("down", "--dir", str(state))  # after a failure on the way; a no-op otherwise


def test_up_writes_the_endpoints_and_pids_and_creates_the_tables(up):
    state, env = up
    for k in ("API_URL", "INVOKE_PROXY_URL", "LAMBDA_WATCH_URL", "AWS_ENDPOINT_URL_DYNAMODB",
              "AWS_ENDPOINT_URL_LAMBDA", "DEVMODEL_URL", "CHAINRUN_LOCAL_JWT_SECRET", "CHAINRUN_RUNS_TABLE"):
        assert env.get(k), k
    assert env["API_URL"].endswith("/lambda-url/chainrun-api")
    assert env["AWS_ENDPOINT_URL_LAMBDA"] == env["INVOKE_PROXY_URL"]
    assert len(bytes.fromhex(env["CHAINRUN_LOCAL_JWT_SECRET"])) == 32
    stack = StackClient(env)
    assert set(stack.tables.values()) <= set(stack.ddb().list_tables()["TableNames"])

    fe = read_env_file(state / "functions.env")
    assert fe["AWS_ENDPOINT_URL_LAMBDA"] == env["INVOKE_PROXY_URL"]
    assert fe["AWS_ENDPOINT_URL_DYNAMODB"] == env["AWS_ENDPOINT_URL_DYNAMODB"]
    assert fe["CHAINRUN_AUTH"] == "local-jwt" and fe["CHAINRUN_RUNNER_FUNCTION"] == "chainrun-runner"

    pids = read_env_file(state / "pids")
    for name in ("moto", "devmodel", "invoke-proxy", "lambda-watch"):
        key = f"PID_{name.upper().replace('-', '_')}"
        assert pids[key] == env[key]


def test_the_api_is_served_by_the_function(up):
    # Whatever the API answers, it must come from chainrun-api, not from watch itself
    # (watch's own errors are {"title": "Missing function", ...}).
    stack = StackClient(up[1])
    status, _, body = http("GET", stack.api_url + "/runs/does-not-exist",
                           headers={"Authorization": f"Bearer {stack.token('alice')}"})
    assert status != 502
    assert not (isinstance(body, dict) and body.get("title") == "Missing function"), body


def test_an_event_invoke_through_the_proxy_is_accepted_at_once(up):
    # An Event invoke for a run that does not exist: 202 at once, the runner shrugs later.
    stack = StackClient(up[1])
    status, _, body = http("POST", stack.proxy_url + INVOKE, raw=json.dumps(RUNNER_WARMUP_PAYLOAD),
                           headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 202 and body == ""
    assert stack.wait_quiescent(120)


def test_up_again_finds_the_stack_up_and_env_prints_it(up):
    state, env = up
    r = stack_cli("up", "--dir", str(state), "--no-build")
    assert r.returncode == 0 and "already up" in r.stderr, r.stderr
    assert read_env_file(state / "stack.env") == env
    r = stack_cli("env", "--dir", str(state))
    assert r.returncode == 0 and r.stdout == (state / "stack.env").read_text()


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
