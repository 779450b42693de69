"""Tests of `python -m infra.stack`, run as `make up` / `make down` run it.

The first tests share one stack that `up` started in a temp dir (it runs `cargo build
--bins` first, a no-op once built) and check it serves; the last of them stops it with
`down` and checks that every process `up` started is gone. The others check `down`
where there is nothing to stop: no stack at all, or the state of a stack whose
processes are gone while an unrelated process now has one of their pids.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from infra import ROOT
from infra.client import StackClient
from infra.envfile import read_env_file, write_env_file
from infra.net import http, port_open, wait_until
from infra.processes import StackLock, spawn
from infra.stack import CHILD_SLOTS, LOCAL_BATCH_ROLE_ARN, RUNNER_WARMUP_PAYLOAD, STATE_FILES

INVOKE = "/2015-03-31/functions/chainrun-runner/invocations"
# The dev model server, whatever the caller's environment says about Bedrock. The stack
# has the DynamoDB fault proxy (no faults unless a test sets them), so the functions'
# own SDK is seen working through it.
ENV = {k: v for k, v in os.environ.items() if k not in ("BEDROCK", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME")}
ENV["CHAINRUN_STACK_DYNAMODB_FAULTS"] = "1"


def stack_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.stack", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1].split("/", 1)[0])


def children_of(pid: int) -> list[int]:
    """Pids whose parent is pid, from ps (here only to witness what watch started)."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, pp in (line.split() for line in out.splitlines()) if int(pp) == pid]


def gone(pid: int, kill=os.kill) -> bool:
    """No process has pid (kill=os.killpg: no process is in group pid)."""
    try:
        kill(pid, 0)
        return False
    except ProcessLookupError:
        return True


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
              "AWS_ENDPOINT_URL_LAMBDA", "DEVMODEL_URL", "CHAINRUN_LOCAL_JWT_SECRET", "CHAINRUN_RUNS_TABLE",
              "FAULT_PROXY_URL"):
        assert env.get(k), k
    assert env["API_URL"].endswith("/lambda-url/chainrun-api")
    assert env["AWS_ENDPOINT_URL_LAMBDA"] == env["INVOKE_PROXY_URL"]
    assert len(bytes.fromhex(env["CHAINRUN_LOCAL_JWT_SECRET"])) == 32
    stack = StackClient(env)
    assert set(stack.tables.values()) <= set(stack.ddb().list_tables()["TableNames"])

    fe = read_env_file(state / "functions.env")
    assert fe["AWS_ENDPOINT_URL_LAMBDA"] == env["INVOKE_PROXY_URL"]
    # The functions reach moto through the fault proxy; stack.env's endpoint is moto itself.
    assert fe["AWS_ENDPOINT_URL_DYNAMODB"] == env["FAULT_PROXY_URL"] != env["AWS_ENDPOINT_URL_DYNAMODB"]
    assert fe["CHAINRUN_AUTH"] == "local-jwt" and fe["CHAINRUN_RUNNER_FUNCTION"] == "chainrun-runner"

    pids = read_env_file(state / "pids")
    for name, slot in CHILD_SLOTS.items():
        key = name.upper().replace("-", "_")
        assert pids[f"SLOT_{key}"] == str(slot) and pids[f"PID_{key}"] == env[f"PID_{key}"]


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


def test_the_functions_sdk_retries_injected_dynamodb_faults(up):
    # The runner's warm-up payload names a run that does not exist: its claim (UpdateItem)
    # fails its condition, then it reads the run (GetItem). Each fault below fails every
    # attempt; the Rust SDK's standard retry makes three, and the runner reports the fault
    # as retryable (a throttle or a 500 is Unavailable, not a refusal).
    stack = StackClient(up[1])
    assert stack.faults()["operations"]["UpdateItem"]["requests"] >= 1  # the start-up probe went through it
    invoke = f"{stack.watch_url}{INVOKE}"
    try:
        for fault, operation, code in [("throttle", "UpdateItem", "ThrottlingException"),
                                       ("error500", "GetItem", "InternalServerError")]:
            stack.set_faults({"faults": [{"kind": fault, "operations": [operation]}]})
            http("POST", stack.fault_proxy_url + "/_faults/reset", timeout=5)
            _, _, body = http("POST", invoke, body=RUNNER_WARMUP_PAYLOAD, timeout=120)
            assert "chainrun.Retryable" in str(body) and code in str(body), body
            assert stack.faults()["operations"][operation] == {"requests": 3, fault: 3}
    finally:
        stack.set_faults({"faults": []})


def test_the_runner_gets_batch_inference_on_devmodel_which_answers_jobs_into_motos_bucket(up):
    state, env = up
    fe = read_env_file(state / "functions.env")
    assert fe["AWS_ENDPOINT_URL_BEDROCK"] == fe["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] == env["DEVMODEL_URL"]
    assert fe["CHAINRUN_BATCH_ROLE_ARN"] == LOCAL_BATCH_ROLE_ARN == "arn:aws:iam::123456789012:role/chainrun-batch"
    assert fe["CHAINRUN_BATCH_POLL_SECONDS"] == "1"
    # A job of the outputs bucket's records, as the runner submits one: devmodel reads the
    # input from moto and writes the answers back (moto takes its signed requests).
    stack = StackClient(env)
    dev = env["DEVMODEL_URL"]
    bucket = fe["CHAINRUN_OUTPUTS_BUCKET"]
    records = "".join(json.dumps({"recordId": f"R{i:010}", "modelInput": {
        "messages": [{"role": "user", "content": [{"text": f"stack batch {i}"}]}], "inferenceConfig": {"maxTokens": 20}}}) + "\n"
        for i in range(100))
    stack.s3().put_object(Bucket=bucket, Key="batches/stack/test/t1/input.jsonl", Body=records.encode())
    status, _, timing = http("PUT", dev + "/_dev/batch", body={"start_delay_ms": 0, "validate_ms": 0, "run_ms_per_record": 0})
    assert status == 200, timing
    status, _, created = http("POST", dev + "/model-invocation-job", body={
        "jobName": "stack-t1", "clientRequestToken": "stack-t1", "roleArn": fe["CHAINRUN_BATCH_ROLE_ARN"],
        "modelId": "amazon.nova-micro-v1:0", "modelInvocationType": "Converse",
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": f"s3://{bucket}/batches/stack/test/t1/input.jsonl"}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/batches/stack/test/t1/output/"}}})
    assert status == 200, created
    job_id = created["jobArn"].rsplit("/", 1)[1]
    _, _, job = http("GET", f"{dev}/model-invocation-job/{job_id}")
    assert job["status"] == "Completed", job
    out = stack.s3().get_object(Bucket=bucket, Key=f"batches/stack/test/t1/output/{job_id}/input.jsonl.out")["Body"].read()
    assert len(out.decode().splitlines()) == 100


def test_down_stops_every_process_up_started(up):
    # Runs last of the tests on this stack: it stops it.
    state, env = up
    ports = [port_of(env[k]) for k in ("AWS_ENDPOINT_URL_DYNAMODB", "DEVMODEL_URL", "INVOKE_PROXY_URL",
                                       "LAMBDA_WATCH_URL", "FAULT_PROXY_URL")]
    assert all(port_open(p) for p in ports)
    pids = {name: int(env[f"PID_{name.upper().replace('-', '_')}"]) for name in CHILD_SLOTS}
    # watch runs each function instance in a session of its own, out of reach of its group.
    instances = children_of(pids["lambda-watch"]) if shutil.which("ps") else []
    assert instances or not shutil.which("ps"), "watch runs no function instance after both answered?"

    r = stack_cli("down", "--dir", str(state))
    assert r.returncode == 0, r.stderr
    assert f"stack: stopped {state}" in r.stderr

    assert [p for p in ports if port_open(p)] == []
    with StackLock(state) as lock:
        assert [name for name, slot in CHILD_SLOTS.items() if lock.held(slot)] == []
    assert wait_until(lambda: all(gone(pid, os.killpg) for pid in pids.values()), 10), "a process group is left"
    assert wait_until(lambda: all(gone(pid) for pid in instances), 10), "a function instance is left"
    assert [f for f in STATE_FILES if (state / f).exists()] == []

    r = stack_cli("env", "--dir", str(state))
    assert r.returncode == 1 and "not running" in r.stderr


def test_down_with_nothing_running_says_so_and_does_nothing(tmp_path):
    for _ in range(2):
        r = stack_cli("down", "--dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert r.stderr == f"stack: nothing running in {tmp_path}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def bystander():
    """An unrelated process leading its own session and group: what a recycled pid may
    belong to, and the worst case for a stale killpg."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    yield p
    p.kill()
    p.wait()


def write_state(state, children: dict[str, tuple[int, int]]) -> None:
    """The pids and stack.env files a stack with these {name: (pid, slot)} children writes."""
    owner = next(iter(children.values()))[0]
    pids = {"STACK_ID": "0123456789abcdef", "STACK_DIR": str(state), "OWNER_PID": str(owner)}
    env = {"API_URL": "http://127.0.0.1:1/lambda-url/chainrun-api"}
    for name, (pid, slot) in children.items():
        key = name.upper().replace("-", "_")
        pids[f"PID_{key}"] = env[f"PID_{key}"] = str(pid)
        pids[f"SLOT_{key}"] = str(slot)
    write_env_file(state / "pids", pids)
    write_env_file(state / "stack.env", env)


def test_down_removes_the_state_of_a_stack_that_is_gone_and_spares_whoever_has_its_pids(tmp_path, bystander):
    # The stack crashed long ago; its pids (even its owner's) now belong to the bystander.
    StackLock(tmp_path).close()  # the lock file it left behind, held by nobody
    write_state(tmp_path, {name: (bystander.pid, slot) for name, slot in CHILD_SLOTS.items()})

    r = stack_cli("down", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "nothing running" in r.stderr and "removed their state" in r.stderr
    assert bystander.poll() is None
    assert [f for f in STATE_FILES if (tmp_path / f).exists()] == []


def test_down_stops_what_still_runs_of_a_stack_but_not_a_reused_pid_of_what_died(tmp_path, bystander):
    # moto still runs; devmodel died and its pid went to the bystander.
    with StackLock(tmp_path) as lock:
        moto = spawn([sys.executable, "-c", "import time; time.sleep(300)"], lock=lock, slot=CHILD_SLOTS["moto"],
                     log_path=tmp_path / "moto.log", env=dict(os.environ), cwd=tmp_path)
    try:
        write_state(tmp_path, {"moto": (moto.pid, CHILD_SLOTS["moto"]),
                               "devmodel": (bystander.pid, CHILD_SLOTS["devmodel"])})
        r = stack_cli("down", "--dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert f"stack: stopped {tmp_path}" in r.stderr
        assert moto.wait(10) == -signal.SIGTERM
        assert bystander.poll() is None
    finally:
        if moto.poll() is None:
            moto.kill()
            moto.wait()


def test_down_if_orphaned_leaves_a_stack_whose_owner_lives_alone(tmp_path):
    with StackLock(tmp_path) as lock:
        assert lock.take(0)  # this test process owns the stack, as `make demo` would
        child = spawn([sys.executable, "-c", "import time; time.sleep(300)"], lock=lock, slot=1,
                      log_path=tmp_path / "moto.log", env=dict(os.environ), cwd=tmp_path)
        try:
            write_state(tmp_path, {"moto": (child.pid, 1)})
            r = stack_cli("down", "--dir", str(tmp_path), "--if-orphaned")
            assert r.returncode == 0 and "left" in r.stderr and "is alive" in r.stderr, r.stderr
            assert child.poll() is None and (tmp_path / "pids").exists()
        finally:
            child.kill()
            child.wait()


def test_up_refuses_a_directory_whose_stack_has_a_live_owner(tmp_path):
    with StackLock(tmp_path) as lock:
        assert lock.take(0)  # another `make demo`, say, runs a stack from here
        write_env_file(tmp_path / "pids", {"STACK_ID": "0123456789abcdef", "OWNER_PID": str(os.getpid())})
        r = stack_cli("up", "--dir", str(tmp_path), "--no-build")
        assert r.returncode == 1, r.stderr
        assert f"another process (pid {os.getpid()}) runs a stack from {tmp_path}" in r.stderr


def test_down_reports_state_it_cannot_verify_and_signals_nobody(tmp_path, bystander):
    # pids written by the stack.py before lock bytes: no SLOT_* and no stack.lock.
    write_env_file(tmp_path / "pids", {"STACK_ID": "0123456789abcdef", "PID_MOTO": str(bystander.pid)})
    r = stack_cli("down", "--dir", str(tmp_path))
    assert r.returncode == 1 and "older infra/stack.py" in r.stderr and str(bystander.pid) in r.stderr
    assert bystander.poll() is None
    assert not (tmp_path / "pids").exists()
