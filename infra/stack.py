"""The local chainrun stack: DynamoDB and SQS (moto), the dev model server, the
async-invoke proxy and `cargo lambda watch` running the functions, all on free loopback
ports — with Lambda's async semantics, so what passes here is what AWS does.

    client ──▶ watch :W /lambda-url/chainrun-api/… ──▶ chainrun-api
                                       │ Invoke(Event) via AWS_ENDPOINT_URL_LAMBDA
                                       ▼
               invoke proxy :P ── 202 now, deliver + retry later ──▶ watch :W ──▶ chainrun-runner
                 │ retries exhausted: invocation record ──▶ SQS chainrun-runner-failures (moto)
                 │ event source mapping: poll it ──▶ Invoke ──▶ chainrun-dead-letter (if it exists)
                 │ schedule: every CHAINRUN_LOCAL_SWEEP_SECS ──▶ Invoke(Event) ──▶ chainrun-sweeper (if it exists)
    functions ──▶ moto :D (AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_SQS)
    runner ──▶ devmodel :M (AWS_ENDPOINT_URL_BEDROCK_RUNTIME, and AWS_ENDPOINT_URL_BEDROCK for
               batch inference jobs, whose records devmodel reads from and answers into moto's S3)

With dynamodb_faults (the chaos suite), the functions reach moto through the fault proxy
(infra/fault_proxy.py), which starts with no faults; tests turn them on with PUT
FAULT_PROXY_URL/_faults, and their own boto3 client still talks to moto directly:
    functions ──▶ fault proxy :F ──▶ moto :D ◀── tests (stack.env's AWS_ENDPOINT_URL_DYNAMODB)

Lambda behaviour (infra/invoke_proxy.py, infra/runtime_shim.py, infra/event_sources.py):
  * the function processes watch starts run under the runtime shim (cargo's target
    runner for watch's `cargo run`): its context deadline is now + its timeout (runner
    900 s, as template.yaml), it is SIGKILLed at that deadline (a timeout), and a
    process that dies is replaced by a fresh one at once, its invocation answered as a
    crash (Runtime.ExitError); the shim also keeps its connection to watch, without
    which a response over ~32 KB (the run view) now and then came back as watch's 500;
  * Event invokes are answered 202 and delivered at least once: retried after a
    function error, crash or timeout (MaximumRetryAttempts 2, delays 1 s and 2 s —
    AWS's ~1 and ~2 min scaled down), with the original request id, then sent to the
    runner's on-failure destination, the SQS queue CHAINRUN_RUNNER_DLQ_URL;
  * the schedule and the SQS event source mapping start only when their function
    (chainrun-sweeper; CHAINRUN_LOCAL_DEAD_LETTER_FUNCTION, default chainrun-dead-letter)
    is a bin target of the workspace.
Each function's timeout, async config and the event sources are in DIR/lambda-config.json.
Each runtime shim keeps a state file in DIR/shims/ naming its function process and the
invocation it runs (infra/runtime_shim.py; the chaos suite kills runners through it).

CLI (from the repository root, with the project venv's python; see the Makefile):
    python -m infra.stack up   [--dir .local] [--no-build] [--timeout 600]
    python -m infra.stack down [--dir .local] [--if-orphaned]
    python -m infra.stack env  [--dir .local]
    python -m infra.stack run  [--dir .local/demo] -- CMD ARGS…   # up, run CMD, always down

`up` returns once both functions answer and leaves the processes running: URLs and the
JWT secret are in DIR/stack.env, pids in DIR/pids, logs in DIR/logs/*.log. `down` stops
them. Every child holds a byte of DIR/stack.lock while it lives (infra/processes.py),
so `down` signals the process groups of exactly those recorded children that are still
alive — never a pid the system has given to another process since — and a stack whose
processes are gone (a crash, a reboot) only has its state removed. `run` exports the
stack.env variables (plus STACK_ENV_FILE) to CMD and returns CMD's exit status.

Library:
    with Stack(state_dir=tmp) as s:      # start() / stop()
        c = s.client()                   # infra.client.StackClient
        c.api_url, c.proxy_url, c.env, c.token("alice", ["eng"]), c.wait_quiescent(), c.ddb()

Environment knobs:
    BEDROCK=aws                           use real Bedrock with the caller's AWS credentials,
                                          profile and region (no dev model server)
    AWS_ENDPOINT_URL_BEDROCK_RUNTIME=URL  use that Bedrock endpoint as is (no dev model server)
    RUST_LOG                              overrides the functions' default info,chainrun=debug
    CHAINRUN_STACK_TIMEOUT                readiness timeout in seconds (default 600)
    CHAINRUN_OWNER_DAILY_CAP_USD          per-caller daily spend cap, passed to the runner
    CHAINRUN_OWNER_DAILY_CAPS             per-user daily caps (JSON), passed to the runner
    CHAINRUN_TENANT_*, CHAINRUN_MAX_REQUEST_BYTES, CHAINRUN_MAX_DEFINITION_BYTES,
    CHAINRUN_PUBLIC_SHARDS                the tenant limits (README, Limits), passed to every function
    CHAINRUN_STACK_DYNAMODB_FAULTS=1      put the fault proxy between the functions and moto
                                          (Stack(dynamodb_faults=True)); stack.env gets
                                          FAULT_PROXY_URL
    CHAINRUN_LOCAL_RUNNER_TIMEOUT_SECS    the runner's timeout (default 900; 1..900)
    CHAINRUN_LOCAL_RUNNER_MAX_RETRY_ATTEMPTS  its MaximumRetryAttempts (default 2; 0..2)
    CHAINRUN_LOCAL_RUNNER_MAX_EVENT_AGE_SECS  its MaximumEventAgeInSeconds (default 3600)
    CHAINRUN_LOCAL_RETRY_DELAYS           seconds before the 1st, 2nd retry (default 1,2)
    CHAINRUN_LOCAL_SWEEP_SECS             the sweeper schedule's period (default 5)
    CHAINRUN_LOCAL_LEASE_SECS             the runner's lease, CHAINRUN_LEASE_SECS (default 6)
    CHAINRUN_LOCAL_QUEUED_GRACE_SECS      CHAINRUN_QUEUED_GRACE_SECS (default 10)
    CHAINRUN_LOCAL_DEADLINE_MARGIN_SECS   the runner's CHAINRUN_DEADLINE_MARGIN_SECS (default: the
                                          runner's own, 90 s, at most a quarter of an invocation)
    CHAINRUN_LOCAL_DEAD_LETTER_FUNCTION   consumer of the runner's failure queue (default
                                          chainrun-dead-letter)
    CHAINRUN_LOCAL_DEAD_LETTER_BATCH_SIZE its event source mapping's batch size (default 10)
    CHAINRUN_LOCAL_DLQ_VISIBILITY_SECS    the failure queue's visibility timeout (default 30)
    CHAINRUN_LOCAL_RUNTIME_SHIM=0         run the functions without the runtime shim (to see
                                          watch's own behaviour: past deadlines, no recovery)

stack.env also holds AWS_ENDPOINT_URL_SQS, CHAINRUN_RUNNER_DLQ_URL,
CHAINRUN_LOCAL_RUNNER_TIMEOUT_SECS, LAMBDA_CONFIG_FILE and SHIM_STATE_DIR; the functions get
AWS_ENDPOINT_URL_SQS and CHAINRUN_RUNNER_DLQ_URL too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import ROOT
from .aws_env import DEFAULT_REGION, local_aws_env
from .client import StackClient
from .envfile import quote_for_cargo_lambda, read_env_file, write_env_file
from .net import LOOPBACK, answers, free_port, http, port_open, wait_until
from .processes import OWNER_SLOT, SlotTaken, StackLock, signal_group, spawn
from .processes import stop as stop_children
from .sqs import Sqs
from .tables import create_bucket, create_schedule_group, create_tables, load_tables

API_FUNCTION = "chainrun-api"
RUNNER_FUNCTION = "chainrun-runner"
FUNCTIONS = (API_FUNCTION, RUNNER_FUNCTION)
# Functions the stack invokes by itself once they exist as bin targets of the workspace.
SWEEPER_FUNCTION = "chainrun-sweeper"
# The functions' CHAINRUN_LEASE_SECS and CHAINRUN_QUEUED_GRACE_SECS here (AWS: 30 and 60).
LOCAL_LEASE_S = 6
# The deployment's tenant limits (README, Limits): passed from the caller to every function.
TENANT_LIMIT_VARS = (
    "CHAINRUN_TENANT_STARTS_PER_MINUTE",
    "CHAINRUN_TENANT_CONCURRENT_RUNS",
    "CHAINRUN_TENANT_TOKENS_PER_MINUTE",
    "CHAINRUN_TENANT_TOKENS_PER_MINUTE_BY_MODEL",
    "CHAINRUN_MAX_REQUEST_BYTES",
    "CHAINRUN_MAX_DEFINITION_BYTES",
    "CHAINRUN_PUBLIC_SHARDS",
)
LOCAL_QUEUED_GRACE_S = 10
DEAD_LETTER_FUNCTION = "chainrun-dead-letter"
SWEEP_PAYLOAD = {"source": "chainrun.schedule", "action": "sweep"}
RUNNER_DLQ_NAME = "chainrun-runner-failures"
# Where outputs too large for one DynamoDB item go (template.yaml: OutputsBucket).
OUTPUTS_BUCKET = "chainrun-outputs-local"
# Review deadlines' one-time schedules (template.yaml: DeadlineScheduleGroup), on moto;
# the invoke proxy fires them when due.
DEADLINE_GROUP = "chainrun-deadlines-local"
LOCAL_ACCOUNT = "123456789012"
# The role batch inference jobs name (template.yaml: BatchInferenceRole).
LOCAL_BATCH_ROLE_ARN = f"arn:aws:iam::{LOCAL_ACCOUNT}:role/chainrun-batch"
API_TIMEOUT_S = 29  # template.yaml's; the runner's (900) and its async config are below
WATCH_CONCURRENCY = 4
DEFAULT_RUST_LOG = "info,chainrun=debug"
# Payload sent to the runner to check it is up: the nil ULID, a run that never exists.
# The runner looks it up in DynamoDB (so this also proves it reaches moto) and answers
# "unknown run"; any answer, even an error, proves the function is up.
RUNNER_WARMUP_PAYLOAD = {"run_id": "00000000000000000000000000"}
# Each child's byte of DIR/stack.lock; byte 0 is the owner's (infra/processes.py).
CHILD_SLOTS = {"moto": 1, "devmodel": 2, "invoke-proxy": 3, "lambda-watch": 4, "fault-proxy": 5}
# What a stack writes into its state dir besides logs/ and stack.lock. stack.lock stays:
# a stack starting there at the same moment may already hold a byte of it.
STATE_FILES = ("stack.env", "pids", "functions.env", "devmodel.port", "invoke-proxy.port", "fault-proxy.port", "lambda-config.json")

_WATCH_FATAL = re.compile(
    r"(error: could not compile|error\[E\d+\]|ERROR command exited|error: no bin target|"
    r"Address already in use|address in use|failed to bind)",
    re.I,
)


class StackError(RuntimeError):
    pass


def venv_bin() -> Path:
    """Directory of the running interpreter's venv scripts (…/.venv/bin)."""
    return Path(sys.executable).parent


def find_cargo_lambda() -> list[str]:
    for cand in (venv_bin() / "cargo-lambda", ROOT / ".venv" / "bin" / "cargo-lambda"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return [str(cand), "lambda"]
    exe = shutil.which("cargo-lambda")
    if exe:
        return [exe, "lambda"]
    raise StackError("cargo-lambda not found: run `make venv` (it installs cargo-lambda into .venv)")


def tail(path: Path | str, lines: int = 40) -> str:
    """The last lines of a log, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


def host_triple() -> str:
    out = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("host:"))


def _env_number(env: dict, name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        v = float(raw)
    except ValueError:
        raise StackError(f"{name}={raw!r} is not a number") from None
    if not lo <= v <= hi:
        raise StackError(f"{name}={raw!r} must be between {lo:g} and {hi:g}")
    return v


def remove_state_files(state_dir: Path) -> None:
    for f in STATE_FILES:
        (state_dir / f).unlink(missing_ok=True)


def _read_port(port_file: Path) -> int | None:
    try:
        return int(port_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# the stack


class Stack:
    """A running local stack. Use as a context manager, or call start()/stop(). The
    process that calls start() owns the stack: it holds byte 0 of DIR/stack.lock until
    stop(), so no second stack starts in the same directory meanwhile.

    state_dir: where stack.env, pids, stack.lock and logs/ go (the CLI uses .local; tests
              a temp dir).
    base_env: the caller's environment (default os.environ); only BEDROCK, RUST_LOG,
              AWS_ENDPOINT_URL_BEDROCK_RUNTIME, CHAINRUN_STACK_DYNAMODB_FAULTS and (with
              BEDROCK=aws) AWS credentials, profile and region are taken from it.
    dynamodb_faults: put the fault proxy between the functions and moto (default: whether
              CHAINRUN_STACK_DYNAMODB_FAULTS is 1/true in base_env).
    """

    def __init__(self, state_dir: Path | str | None = None, *, root: Path | str = ROOT,
                 base_env: dict | None = None, build: bool = True,
                 ready_timeout: float | None = None, verbose: bool = True, log=None,
                 dynamodb_faults: bool | None = None):
        self.root = Path(root).resolve()
        self.dir = Path(state_dir or self.root / ".local").resolve()
        self.logs = self.dir / "logs"
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.build = build
        self.ready_timeout = float(ready_timeout or self.base_env.get("CHAINRUN_STACK_TIMEOUT") or 600)
        self.verbose = verbose
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.stack_id = secrets.token_hex(8)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.function_env: dict[str, str] = {}
        self.secret = secrets.token_hex(32)
        self.api_url = self.proxy_url = self.watch_url = self.dynamodb_url = None
        self.devmodel_url = self.bedrock_url = None
        self.fault_proxy_url = None
        if dynamodb_faults is None:
            dynamodb_faults = (self.base_env.get("CHAINRUN_STACK_DYNAMODB_FAULTS") or "").lower() in ("1", "true", "yes")
        self.dynamodb_faults = dynamodb_faults
        self.region = DEFAULT_REGION
        self.tables = {t["env"]: t["local_name"] for t in load_tables(self.root / "infra" / "tables.json")}
        self.timings: dict[str, float] = {}
        self._lock: StackLock | None = None
        e = self.base_env
        self.runner_timeout_s = _env_number(e, "CHAINRUN_LOCAL_RUNNER_TIMEOUT_SECS", 900, 1, 900)
        self.runner_retries = int(_env_number(e, "CHAINRUN_LOCAL_RUNNER_MAX_RETRY_ATTEMPTS", 2, 0, 2))
        self.runner_max_event_age_s = _env_number(e, "CHAINRUN_LOCAL_RUNNER_MAX_EVENT_AGE_SECS", 3600, 1, 21600)
        try:
            self.retry_delays = [float(x) for x in (e.get("CHAINRUN_LOCAL_RETRY_DELAYS") or "1,2").split(",")]
        except ValueError:
            raise StackError(f"CHAINRUN_LOCAL_RETRY_DELAYS={e['CHAINRUN_LOCAL_RETRY_DELAYS']!r}: "
                             f"give seconds before each retry, e.g. 1,2") from None
        self.sweep_s = _env_number(e, "CHAINRUN_LOCAL_SWEEP_SECS", 5, 0.1, 86400)
        self.dead_letter_function = e.get("CHAINRUN_LOCAL_DEAD_LETTER_FUNCTION") or DEAD_LETTER_FUNCTION
        self.dead_letter_batch = int(_env_number(e, "CHAINRUN_LOCAL_DEAD_LETTER_BATCH_SIZE", 10, 1, 10))
        self.dlq_visibility_s = int(_env_number(e, "CHAINRUN_LOCAL_DLQ_VISIBILITY_SECS", 30, 0, 43200))
        self.dlq_url: str | None = None
        self.bins: set[str] = set()

    # -- public -------------------------------------------------------------------------
    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env_file(self) -> Path:
        return self.dir / "stack.env"

    def log(self, msg: str) -> None:
        if self.verbose:
            self._log(msg)

    def client(self) -> StackClient:
        if not self.env:
            raise StackError("the stack is not up")
        return StackClient(self.env, self.function_env, self.logs)

    def start(self) -> "Stack":
        if self._lock:
            return self
        t_start = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        lock = StackLock(self.dir)
        if not lock.take(OWNER_SLOT):
            lock.close()
            raise StackError(f"another process runs a stack from {self.dir} (see {self.dir / 'pids'}); "
                             f"stop it first, or use another directory")
        self._lock = lock
        remove_state_files(self.dir)
        try:
            self._write_pids()
            if self.build:
                self._cargo_build()
            self._start_moto()
            if self.dynamodb_faults:
                self._start_fault_proxy()
            self._start_bedrock()
            self._start_proxy_and_watch()
            self._write_env_file()
            self.timings["total"] = time.monotonic() - t_start
            self.log(f"stack: up in {self.timings['total']:.1f}s — API_URL={self.api_url}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if not self._lock:
            return
        self._stop(*self.procs)
        remove_state_files(self.dir)
        self._lock.close()
        self._lock = None

    # -- steps --------------------------------------------------------------------------
    def _child_env(self, extra: dict | None = None) -> dict:
        """Environment for every child: the caller's, minus AWS_*/CHAINRUN_*/RUST_LOG/
        Lambda runtime variables (so nothing of the developer's AWS setup leaks into the
        local stack). With BEDROCK=aws the caller's credentials, profile and region are
        kept (endpoint overrides are still dropped)."""
        keep_aws = self.bedrock_mode == "aws"
        env = {}
        for k, v in self.base_env.items():
            ku = k.upper()
            if ku.startswith("AWS_"):
                if not keep_aws or ku.startswith("AWS_ENDPOINT_URL") or ku.startswith("AWS_LAMBDA_"):
                    continue
            if ku.startswith(("CHAINRUN_", "_X_AMZN", "LAMBDA_")) or ku == "RUST_LOG":
                continue
            env[k] = v
        vb = str(venv_bin())
        env["PATH"] = vb + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"  # plain log files (cargo, cargo-lambda, tracing-subscriber)
        env["CARGO_TERM_COLOR"] = "never"
        if extra:
            env.update(extra)
        return env

    @property
    def bedrock_mode(self) -> str:
        if self.base_env.get("AWS_ENDPOINT_URL_BEDROCK_RUNTIME"):
            return "endpoint"
        if (self.base_env.get("BEDROCK") or "").lower() == "aws":
            return "aws"
        return "devmodel"

    def _spawn(self, name: str, argv: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        try:
            p = spawn(argv, lock=self._lock, slot=CHILD_SLOTS[name], log_path=self.logs / f"{name}.log",
                      env=self._child_env(extra_env), cwd=self.root)
        except SlotTaken as e:
            raise StackError(f"{name}: {e}; stop it with `python -m infra.stack down --dir {self.dir}`") from None
        self.procs[name] = p
        self._write_pids()
        return p

    def _stop(self, *names: str) -> None:
        """Stop these children. As their parent, this process may also clear what a child
        left behind in its group: the child's pid stays ours until it is reaped here."""
        stop_children({n: (self.procs[n].pid, CHILD_SLOTS[n]) for n in names}, self._lock, log=self.log)
        for n in names:
            p = self.procs.pop(n)
            if p.returncode is None:
                signal_group(p.pid, signal.SIGKILL)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:  # stuck in the kernel; nothing more to send
                    self.log(f"stack: {n} (pid {p.pid}) did not exit after SIGKILL")
        self._write_pids()

    def _write_pids(self) -> None:
        values = {"STACK_ID": self.stack_id, "STACK_DIR": str(self.dir), "OWNER_PID": str(os.getpid())}
        for n, p in self.procs.items():
            key = n.upper().replace("-", "_")
            values[f"PID_{key}"] = str(p.pid)
            values[f"SLOT_{key}"] = str(CHILD_SLOTS[n])
        write_env_file(self.dir / "pids", values)

    def _fail(self, name: str, why: str) -> None:
        log = self.logs / f"{name}.log"
        raise StackError(f"{name}: {why}\n--- tail of {log} ---\n{tail(log)}\n---")

    def _wait_for(self, name: str, what: str, check, timeout: float = 30.0):
        """check() until it returns something truthy (and return that) while child `name`
        runs; fail with the tail of its log if it exits or `what` takes over timeout s."""
        p = self.procs[name]

        def step():
            if p.poll() is not None:
                self._fail(name, f"exited with code {p.returncode} during startup")
            return check()

        got = wait_until(step, timeout)
        if not got:
            self._fail(name, f"{what} within {timeout:.0f}s")
        return got

    def _cargo_build(self) -> None:
        t0 = time.monotonic()
        self.log("stack: cargo build --bins (debug) …")
        logpath = self.logs / "build.log"
        with open(logpath, "wb") as logf:
            # Stream to our stderr too so a cold compile shows progress.
            p = subprocess.Popen(["cargo", "build", "--bins"], cwd=str(self.root), env=self._child_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in p.stdout:
                logf.write(line)
                if self.verbose:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
            rc = p.wait()
        if rc != 0:
            raise StackError(f"cargo build --bins failed (exit {rc}); see {logpath}\n{tail(logpath, 30)}")
        self.timings["build"] = time.monotonic() - t0

    def _start_moto(self) -> None:
        t0 = time.monotonic()
        if self.bedrock_mode == "aws":
            self.region = self.base_env.get("AWS_REGION") or self.base_env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        for attempt in range(3):
            port = free_port()
            self.dynamodb_url = f"http://{LOOPBACK}:{port}"
            p = self._spawn("moto", [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)])

            def ready_or_exited():
                if p.poll() is not None:
                    return "exited"
                status = answers(self.dynamodb_url + "/moto-api/")
                return "ready" if status is not None and status < 500 else None

            outcome = wait_until(ready_or_exited, 60, interval=0.1)
            if outcome == "ready":
                break
            if outcome is None:
                self._fail("moto", f"{self.dynamodb_url} did not answer within 60s")
            # Another process took the port between free_port() and moto's bind: try another.
            if "in use" not in tail(self.logs / "moto.log") or attempt == 2:
                self._fail("moto", f"exited with code {p.returncode} during startup")
        try:
            create_tables(self.dynamodb_url, self.region, self.root / "infra" / "tables.json")
        except Exception as e:  # noqa: BLE001
            self._fail("moto", f"creating tables failed: {e}")
        try:
            # The runner's on-failure destination (template.yaml: RunnerDeadLetterQueue).
            self.dlq_url = Sqs(self.dynamodb_url, self.region).create_queue(
                RUNNER_DLQ_NAME, {"VisibilityTimeout": str(self.dlq_visibility_s), "MessageRetentionPeriod": "1209600"})
        except Exception as e:  # noqa: BLE001
            self._fail("moto", f"creating the SQS queue {RUNNER_DLQ_NAME} failed: {e}")
        try:
            create_bucket(self.dynamodb_url, OUTPUTS_BUCKET, self.region)
        except Exception as e:  # noqa: BLE001
            self._fail("moto", f"creating the S3 bucket {OUTPUTS_BUCKET} failed: {e}")
        try:
            create_schedule_group(self.dynamodb_url, DEADLINE_GROUP, self.region)
        except Exception as e:  # noqa: BLE001
            self._fail("moto", f"creating the schedule group {DEADLINE_GROUP} failed: {e}")
        self.timings["dynamodb"] = time.monotonic() - t0
        self.log(f"stack: DynamoDB (moto) at {self.dynamodb_url}, tables: {', '.join(self.tables.values())}")

    def _start_fault_proxy(self) -> None:
        t0 = time.monotonic()
        port_file = self.dir / "fault-proxy.port"
        port_file.unlink(missing_ok=True)
        self._spawn("fault-proxy", [sys.executable, "-m", "infra.fault_proxy", "--backend", self.dynamodb_url,
                                    "--host", LOOPBACK, "--port", "0", "--port-file", str(port_file)])
        port = self._wait_for("fault-proxy", f"no port in {port_file}", lambda: _read_port(port_file))
        self.fault_proxy_url = f"http://{LOOPBACK}:{port}"
        self._wait_for("fault-proxy", f"{self.fault_proxy_url} not healthy",
                       lambda: answers(self.fault_proxy_url + "/_faults") == 200)
        self.timings["fault-proxy"] = time.monotonic() - t0
        self.log(f"stack: DynamoDB fault proxy at {self.fault_proxy_url} (no faults until PUT /_faults)")

    def _start_bedrock(self) -> None:
        mode = self.bedrock_mode
        if mode == "endpoint":
            self.bedrock_url = self.base_env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"]
            self.log(f"stack: Bedrock endpoint from the environment: {self.bedrock_url}")
            return
        if mode == "aws":
            self.log(f"stack: BEDROCK=aws — real Bedrock in {self.region} with your AWS credentials")
            return
        t0 = time.monotonic()
        rules = self.root / "infra" / "devmodel-rules.json"
        port_file = self.dir / "devmodel.port"
        port_file.unlink(missing_ok=True)
        # Batch jobs read their records from, and write their answers to, the outputs
        # bucket on moto (moto itself, not the fault proxy, which only fronts DynamoDB).
        self._spawn("devmodel", [sys.executable, "-m", "infra.devmodel", "--host", LOOPBACK, "--port", "0",
                                 "--rules", str(rules), "--port-file", str(port_file),
                                 "--s3-endpoint", self.dynamodb_url],
                    extra_env=local_aws_env(self.region))  # what it signs its S3 requests with
        port = self._wait_for("devmodel", f"no port in {port_file}", lambda: _read_port(port_file))
        self.devmodel_url = self.bedrock_url = f"http://{LOOPBACK}:{port}"
        self._wait_for("devmodel", f"{self.devmodel_url} not healthy",
                       lambda: answers(self.devmodel_url + "/_dev/health") == 200)
        self.timings["devmodel"] = time.monotonic() - t0
        self.log(f"stack: dev model server at {self.devmodel_url}")

    def _function_env(self) -> dict[str, str]:
        if self.bedrock_mode == "aws":
            fe = {"AWS_REGION": self.region}
        else:
            fe = local_aws_env(self.region)  # keeps the developer's ~/.aws (profiles, endpoint_url) out
        fe["AWS_ENDPOINT_URL_DYNAMODB"] = self.fault_proxy_url or self.dynamodb_url
        fe["AWS_ENDPOINT_URL_SQS"] = self.dynamodb_url  # moto serves both
        fe["AWS_ENDPOINT_URL_S3"] = self.dynamodb_url  # and S3
        fe["AWS_ENDPOINT_URL_SCHEDULER"] = self.dynamodb_url  # and EventBridge Scheduler
        fe["CHAINRUN_OUTPUTS_BUCKET"] = OUTPUTS_BUCKET
        fe["CHAINRUN_DEADLINE_SCHEDULE_GROUP"] = DEADLINE_GROUP
        fe["CHAINRUN_DEADLINE_TARGET_ARN"] = f"arn:aws:lambda:{self.region}:{LOCAL_ACCOUNT}:function:{RUNNER_FUNCTION}"
        fe["CHAINRUN_DEADLINE_ROLE_ARN"] = f"arn:aws:iam::{LOCAL_ACCOUNT}:role/chainrun-deadlines-local"
        fe["AWS_ENDPOINT_URL_LAMBDA"] = self.proxy_url
        fe["CHAINRUN_RUNNER_DLQ_URL"] = self.dlq_url
        if self.bedrock_url:
            fe["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] = self.bedrock_url
        if self.devmodel_url:
            # Batch inference against devmodel's control plane: the role is only passed
            # along (devmodel checks its shape), and a job is asked about every second.
            # Real Bedrock could not read moto's bucket, so BEDROCK=aws runs maps online.
            fe["AWS_ENDPOINT_URL_BEDROCK"] = self.devmodel_url
            fe["CHAINRUN_BATCH_ROLE_ARN"] = LOCAL_BATCH_ROLE_ARN
            fe["CHAINRUN_BATCH_POLL_SECONDS"] = "1"
        fe.update(self.tables)
        fe["CHAINRUN_RUNNER_FUNCTION"] = RUNNER_FUNCTION
        fe["CHAINRUN_AUTH"] = "local-jwt"
        fe["CHAINRUN_LOCAL_JWT_SECRET"] = self.secret
        # The one deployment setting the local stack takes from its caller (children get no
        # CHAINRUN_* of the caller's otherwise): README, Budgets.
        for name in ("CHAINRUN_OWNER_DAILY_CAP_USD", "CHAINRUN_OWNER_DAILY_CAPS", *TENANT_LIMIT_VARS):
            if self.base_env.get(name):
                fe[name] = self.base_env[name]
        # Recovery timings scaled down like the retry delays and the sweep period: a crashed
        # runner's lease lapses in seconds, a lost dispatch is swept soon after.
        fe["CHAINRUN_LEASE_SECS"] = self.base_env.get("CHAINRUN_LOCAL_LEASE_SECS") or str(LOCAL_LEASE_S)
        fe["CHAINRUN_QUEUED_GRACE_SECS"] = self.base_env.get("CHAINRUN_LOCAL_QUEUED_GRACE_SECS") or str(LOCAL_QUEUED_GRACE_S)
        if self.base_env.get("CHAINRUN_LOCAL_DEADLINE_MARGIN_SECS"):
            fe["CHAINRUN_DEADLINE_MARGIN_SECS"] = self.base_env["CHAINRUN_LOCAL_DEADLINE_MARGIN_SECS"]
        fe["RUST_LOG"] = self.base_env.get("RUST_LOG") or DEFAULT_RUST_LOG
        fe["NO_COLOR"] = "1"
        return fe

    @property
    def lambda_config_file(self) -> Path:
        return self.dir / "lambda-config.json"

    @property
    def shim_state_dir(self) -> Path:
        return self.dir / "shims"

    def _bin_targets(self) -> set[str]:
        """The bin targets of the workspace (what watch can run)."""
        r = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
                           cwd=str(self.root), env=self._child_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise StackError(f"cargo metadata failed: {r.stderr.strip()[-2000:]}")
        return {t["name"] for p in json.loads(r.stdout)["packages"] for t in p["targets"] if "bin" in t["kind"]}

    def lambda_config(self) -> dict:
        """Each function's timeout and async config, and the event sources (the invoke
        proxy's --config; the runtime shim reads the timeouts from it too)."""
        runner = {"timeout_s": self.runner_timeout_s, "maximum_retry_attempts": self.runner_retries,
                  "maximum_event_age_s": self.runner_max_event_age_s, "on_failure": self.dlq_url,
                  "max_concurrency": WATCH_CONCURRENCY}
        sources: dict[str, list] = {"sqs": [], "schedules": [],
                                    "one_time_schedules": [{"endpoint": self.dynamodb_url, "group": DEADLINE_GROUP, "poll_s": 1.0}]}
        if self.dead_letter_function in self.bins:
            sources["sqs"].append({"queue_url": self.dlq_url, "function": self.dead_letter_function,
                                   "batch_size": self.dead_letter_batch, "report_batch_item_failures": True})
        if SWEEPER_FUNCTION in self.bins:
            sources["schedules"].append({"function": SWEEPER_FUNCTION, "every_s": self.sweep_s,
                                         "payload": SWEEP_PAYLOAD})
        return {"region": self.region, "retry_delays": self.retry_delays,
                "shim_state_dir": str(self.shim_state_dir),
                # watch runs at most WATCH_CONCURRENCY instances of a function and wedges when
                # a few hundred invocations queue up in it (infra/invoke_proxy.py)
                "default": {"timeout_s": 900, "max_concurrency": WATCH_CONCURRENCY},
                "functions": {API_FUNCTION: {"timeout_s": API_TIMEOUT_S}, RUNNER_FUNCTION: runner},
                "event_sources": sources}

    def _start_proxy_and_watch(self) -> None:
        cargo_lambda = find_cargo_lambda()
        self.bins = self._bin_targets()
        config = self.lambda_config()
        shutil.rmtree(self.shim_state_dir, ignore_errors=True)  # a previous stack's
        self.shim_state_dir.mkdir(parents=True, exist_ok=True)
        self.lambda_config_file.write_text(json.dumps(config, indent=2) + "\n")
        for kind, what in (("sqs", "polls {queue_url} for {function}"), ("schedules", "invokes {function} every {every_s:g}s")):
            for source in config["event_sources"][kind]:
                self.log("stack: event source " + what.format(**source))
        # Every function instance watch starts (`cargo run --bin NAME`) runs under the
        # runtime shim: real deadlines, request ids, timeouts, a fresh process after a crash.
        shim = f"{sys.executable} -m infra.runtime_shim --config {self.lambda_config_file} --"
        if " " in sys.executable or " " in str(self.lambda_config_file):
            raise StackError(f"cargo splits a target runner at spaces: use a venv and --dir without spaces ({shim})")
        watch_env = {f"CARGO_TARGET_{host_triple().upper().replace('-', '_')}_RUNNER": shim}
        if self.base_env.get("CHAINRUN_LOCAL_RUNTIME_SHIM") == "0":  # to see watch's own behaviour
            self.log("stack: CHAINRUN_LOCAL_RUNTIME_SHIM=0 — functions run without the runtime shim")
            watch_env = {}
        for attempt in range(3):
            watch_port = free_port()
            self.watch_url = f"http://{LOOPBACK}:{watch_port}"
            self.api_url = f"{self.watch_url}/lambda-url/{API_FUNCTION}"

            t0 = time.monotonic()
            port_file = self.dir / "invoke-proxy.port"
            port_file.unlink(missing_ok=True)
            self._spawn("invoke-proxy", [sys.executable, "-m", "infra.invoke_proxy", "--backend", self.watch_url,
                                         "--config", str(self.lambda_config_file),
                                         "--host", LOOPBACK, "--port", "0", "--port-file", str(port_file)])
            port = self._wait_for("invoke-proxy", f"no port in {port_file}", lambda: _read_port(port_file))
            self.proxy_url = f"http://{LOOPBACK}:{port}"
            self._wait_for("invoke-proxy", f"{self.proxy_url} not healthy",
                           lambda: answers(self.proxy_url + "/_proxy/health") == 200)
            self.timings["proxy"] = time.monotonic() - t0

            self.function_env = self._function_env()
            fn_env_file = self.dir / "functions.env"
            write_env_file(fn_env_file, self.function_env, quote=quote_for_cargo_lambda)

            t0 = time.monotonic()
            argv = cargo_lambda + ["watch", "-A", LOOPBACK, "-P", str(watch_port),
                                   "--concurrency", str(WATCH_CONCURRENCY), "--ignore-changes",
                                   "--disable-cors", "--env-file", str(fn_env_file)]
            self.log(f"stack: cargo lambda watch on {self.watch_url} (log: {self.logs / 'lambda-watch.log'})")
            self._spawn("lambda-watch", argv, extra_env=watch_env)
            try:
                self._wait_functions()
            except StackError as e:
                if "in use" in str(e) and attempt < 2:
                    self.log("stack: port clash, retrying with new ports")
                    self._stop("lambda-watch", "invoke-proxy")
                    continue
                raise
            self.timings["functions"] = time.monotonic() - t0
            return

    def _wait_functions(self) -> None:
        """Block until both functions answer through watch. The first request to a
        function may hang while watch compiles and starts it, so each function gets ONE
        probe request (in a thread, long timeout — watch queues every request, so
        retrying on a short timeout would pile up invocations), while this thread scans
        the watch log for fatal errors and prints progress."""
        watch = self.procs["lambda-watch"]
        logpath = self.logs / "lambda-watch.log"
        deadline = time.monotonic() + self.ready_timeout
        t0 = time.monotonic()
        results: dict[str, tuple] = {}
        done = threading.Event()

        def probe(fn: str) -> None:
            try:
                if fn == API_FUNCTION:
                    status, _, body = http("GET", self.api_url + "/", timeout=self.ready_timeout)
                else:
                    status, _, body = http("POST", f"{self.watch_url}/2015-03-31/functions/{RUNNER_FUNCTION}/invocations",
                                           body=RUNNER_WARMUP_PAYLOAD, timeout=self.ready_timeout)
                results[fn] = ("ok", status, str(body)[:300])
            except Exception as e:  # noqa: BLE001 - reported by the main loop
                results[fn] = ("error", None, f"{type(e).__name__}: {e}")
            done.set()

        def check_log() -> None:
            try:
                with open(logpath, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                return
            m = _WATCH_FATAL.search(text)
            if m:
                self._fail("lambda-watch", f"failed while starting the functions ({m.group(0)!r})")

        def listening() -> bool:
            check_log()
            return port_open(int(self.watch_url.rsplit(":", 1)[1]))

        # watch needs a moment before it listens; only then send the (single) probes.
        self._wait_for("lambda-watch", f"not listening on {self.watch_url}", listening, self.ready_timeout)
        for fn in FUNCTIONS:
            threading.Thread(target=probe, args=(fn,), name=f"probe-{fn}", daemon=True).start()
        reported: set[str] = set()
        last_note = time.monotonic()
        while True:
            done.wait(0.2)
            done.clear()
            for fn, (kind, status, body) in list(results.items()):
                if fn in reported:
                    continue
                reported.add(fn)
                if kind == "error":
                    if watch.poll() is None:
                        check_log()
                    self._fail("lambda-watch", f"probing {fn} failed: {body}")
                if status == 404 and "Missing function" in body:
                    self._fail("lambda-watch", f"watch does not know {fn}: {body}")
                self.log(f"stack: {fn} answered after {time.monotonic() - t0:.1f}s (status {status})")
            if len(reported) == len(FUNCTIONS):
                return
            if watch.poll() is not None:
                self._fail("lambda-watch", f"exited with code {watch.returncode}")
            check_log()
            waiting = ", ".join(f for f in FUNCTIONS if f not in results)
            if time.monotonic() >= deadline:
                self._fail("lambda-watch", f"{waiting} did not answer within {self.ready_timeout:.0f}s")
            if time.monotonic() - last_note >= 10:
                last_note = time.monotonic()
                self.log(f"stack: waiting for {waiting} ({time.monotonic() - t0:.0f}s; "
                         f"watch may be compiling — see {logpath})")

    def _write_env_file(self) -> None:
        env = {
            "API_URL": self.api_url,
            "INVOKE_PROXY_URL": self.proxy_url,
            "LAMBDA_WATCH_URL": self.watch_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,  # boto3 / aws CLI read this one
            "AWS_ENDPOINT_URL_DYNAMODB": self.dynamodb_url,
            "AWS_ENDPOINT_URL_SQS": self.dynamodb_url,
            "AWS_ENDPOINT_URL_S3": self.dynamodb_url,
            "AWS_ENDPOINT_URL_SCHEDULER": self.dynamodb_url,
            "CHAINRUN_OUTPUTS_BUCKET": OUTPUTS_BUCKET,
            "AWS_ENDPOINT_URL_LAMBDA": self.proxy_url,
            "CHAINRUN_RUNNER_DLQ_URL": self.dlq_url,
            "CHAINRUN_LOCAL_RUNNER_TIMEOUT_SECS": f"{self.runner_timeout_s:g}",
            "LAMBDA_CONFIG_FILE": str(self.lambda_config_file),
            "SHIM_STATE_DIR": str(self.shim_state_dir),
        }
        if self.bedrock_url:
            env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] = self.bedrock_url
        if self.devmodel_url:
            env["DEVMODEL_URL"] = self.devmodel_url
        if self.fault_proxy_url:
            env["FAULT_PROXY_URL"] = self.fault_proxy_url
        env["BEDROCK_MODE"] = self.bedrock_mode
        env["CHAINRUN_LOCAL_JWT_SECRET"] = self.secret
        env.update(self.tables)
        env["CHAINRUN_RUNNER_FUNCTION"] = RUNNER_FUNCTION
        env["STACK_DIR"] = str(self.dir)
        env["STACK_ID"] = self.stack_id
        env["STACK_LOGS"] = str(self.logs)
        for n, p in self.procs.items():
            env[f"PID_{n.upper().replace('-', '_')}"] = str(p.pid)
        self.env = env
        # shell-sourceable (`set -a; . .local/stack.env`): values quoted only when needed
        write_env_file(self.env_file, env)


# ---------------------------------------------------------------------------------------
# a stack seen from another process (the CLI)


def recorded_children(state_dir: Path) -> tuple[dict, dict[str, tuple[int, int]]]:
    """(the pids file's values, {child: (pid, lock byte)}) of a state dir."""
    info = read_env_file(state_dir / "pids")
    children = {}
    for key, pid in info.items():
        if not key.startswith("PID_"):
            continue
        name = key.removeprefix("PID_")
        slot = info.get(f"SLOT_{name}", "")
        if pid.isdigit() and slot.isdigit():
            children[name.lower().replace("_", "-")] = (int(pid), int(slot))
    return info, children


def running_children(state_dir: Path) -> list[str]:
    """The recorded children of the stack in state_dir that are still alive."""
    _, children = recorded_children(state_dir)
    lock = StackLock.existing(state_dir)
    if lock is None:
        return []
    with lock:
        return [name for name, (_, slot) in children.items() if lock.held(slot)]


def down(state_dir: Path, only_if_orphaned: bool = False, log=None) -> str:
    """Stop the stack of state_dir and remove its state; what happened, for the message:
    "stopped", "gone" (state of a stack whose processes had all exited), "absent" (no
    state), "owned" (only_if_orphaned, and the process that started it is alive),
    "unknown" (processes of a stack hold the lock, but its pids file is gone) or
    "legacy" (pids written before stacks had a lock file: nothing can be verified).

    Not for the process that owns the stack (Stack.stop is): closing the lock file here
    would drop its locks."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    info, children = recorded_children(state_dir)
    lock = StackLock.existing(state_dir)
    if lock is None:
        remove_state_files(state_dir)
        if any(k.startswith("PID_") for k in info) and not children:
            return "legacy"
        return "gone" if info else "absent"
    with lock:
        if only_if_orphaned and lock.held(OWNER_SLOT):
            return "owned"
        stopped = stop_children(children, lock, log=log)
        unknown = [n for n, slot in CHILD_SLOTS.items() if n not in children and lock.held(slot)]
    if unknown:
        return "unknown"
    remove_state_files(state_dir)
    return "stopped" if stopped else "gone" if info else "absent"


def _healthy(env: dict) -> bool:
    return "INVOKE_PROXY_URL" in env and answers(env["INVOKE_PROXY_URL"] + "/_proxy/health") == 200


DOWN_MESSAGES = {
    "stopped": "stopped {dir}",
    "gone": "nothing running in {dir} (its processes had exited; removed their state)",
    "absent": "nothing running in {dir}",
    "owned": "left {dir} running: the process that started it (pid {owner}) is alive",
    "unknown": "processes of a stack still hold {dir}/stack.lock, but {dir}/pids is gone, so they "
               "cannot be told apart from others; stop them by hand",
    "legacy": "{dir}/pids was written by an older infra/stack.py that recorded no lock bytes, so its "
              "pids ({pids}) cannot be told apart from reused ones; removed it — stop any of them "
              "that still run by hand",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.stack", description="chainrun local stack",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("CLI", 1)[1].split("Library:")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "env", "run"):
        sp = sub.add_parser(name)
        sp.add_argument("--dir", default=str(ROOT / ".local"), help="state dir (stack.env, pids, logs/)")
        if name in ("up", "run"):
            sp.add_argument("--no-build", action="store_true", help="skip cargo build --bins")
            sp.add_argument("--timeout", type=float, default=None, help="readiness timeout, s (default 600)")
        if name == "down":
            sp.add_argument("--if-orphaned", action="store_true",
                            help="only stop it if the process that started it is gone")
        if name == "run":
            sp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS…")
    args = ap.parse_args(argv)
    state_dir = Path(args.dir).resolve()

    def say(msg: str) -> None:
        print(f"stack: {msg}", file=sys.stderr, flush=True)

    if args.cmd == "down":
        info = read_env_file(state_dir / "pids")
        outcome = down(state_dir, only_if_orphaned=args.if_orphaned, log=print_err)
        pids = " ".join(v for k, v in info.items() if k.startswith("PID_"))
        say(DOWN_MESSAGES[outcome].format(dir=state_dir, owner=info.get("OWNER_PID", "?"), pids=pids))
        return 1 if outcome in ("unknown", "legacy") else 0

    if args.cmd == "env":
        env = read_env_file(state_dir / "stack.env")
        if not env or not running_children(state_dir):
            say(f"not running ({state_dir}); start it with `make up`")
            return 1
        sys.stdout.write((state_dir / "stack.env").read_text())
        return 0

    if args.cmd == "up":
        env = read_env_file(state_dir / "stack.env")
        if env and running_children(state_dir) and _healthy(env):
            say(f"already up — API_URL={env['API_URL']} ({state_dir / 'stack.env'})")
            return 0
    else:  # run
        cmd = list(args.command)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            ap.error("run needs a command after --")

    # Leftovers of a stack whose starter crashed; a live starter keeps its stack.
    if down(state_dir, only_if_orphaned=True, log=print_err) == "owned":
        owner = read_env_file(state_dir / "pids").get("OWNER_PID", "?")
        say(f"another process (pid {owner}) runs a stack from {state_dir}; use another --dir")
        return 1
    stack = Stack(state_dir, build=not args.no_build, ready_timeout=args.timeout)
    _install_signal_handlers()
    if args.cmd == "up":
        try:
            stack.start()
        except (StackError, KeyboardInterrupt) as e:
            say(f"startup failed: {e}" if isinstance(e, StackError) else "interrupted")
            return 1 if isinstance(e, StackError) else 130
        say(f"up. Environment in {stack.env_file}:")
        sys.stdout.write(stack.env_file.read_text())
        say(f"logs in {stack.logs}; stop with `make down`")
        return 0

    child = None
    try:
        stack.start()
        env = dict(os.environ)
        env.update(stack.env)
        env["STACK_ENV_FILE"] = str(stack.env_file)
        child = subprocess.Popen(cmd, env=env)
        return child.wait()
    except StackError as e:
        say(f"startup failed: {e}")
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        say("interrupted, stopping …")
        if child and child.poll() is None:
            try:
                child.send_signal(signal.SIGINT)
                child.wait(timeout=5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                child.kill()
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        say(f"stopped (logs kept in {stack.logs})")


def print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _install_signal_handlers() -> None:
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)


if __name__ == "__main__":
    sys.exit(main())
