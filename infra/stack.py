#!/usr/bin/env python3
"""The local chainrun stack: DynamoDB (moto), the dev model server, the async-invoke
proxy and `cargo lambda watch` running both functions, all on free loopback ports.

    client ──▶ watch :W /lambda-url/chainrun-api/… ──▶ chainrun-api
                                       │ Invoke(Event) via AWS_ENDPOINT_URL_LAMBDA
                                       ▼
               invoke proxy :P ── 202 now, forward later ──▶ watch :W ──▶ chainrun-runner
    both functions ──▶ moto :D (AWS_ENDPOINT_URL_DYNAMODB)
    runner ──▶ devmodel :M (AWS_ENDPOINT_URL_BEDROCK_RUNTIME)

CLI (run with the project venv's python; see the Makefile):
    python infra/stack.py up   [--dir .local] [--no-build] [--timeout 600]
    python infra/stack.py down [--dir .local]
    python infra/stack.py env  [--dir .local]
    python infra/stack.py run  [--dir .local/demo] -- CMD ARGS…   # up, run CMD, always down

`up` returns once both functions answer and leaves the processes running; their pids,
URLs and the JWT secret are in DIR/stack.env, logs in DIR/logs/*.log. `down` stops
them (also after a crash of `up`, of a supervisor, or of watch itself). `run` exports
the stack.env variables (plus STACK_ENV_FILE) to CMD and returns CMD's exit status.

Library:
    with Stack(state_dir=tmp) as s:      # start() / stop()
        s.api_url, s.proxy_url, s.watch_url, s.dynamodb_url, s.devmodel_url, s.env
        s.token("alice", ["eng"]); s.wait_quiescent()

Environment knobs:
    BEDROCK=aws                           use real Bedrock with the caller's AWS credentials,
                                          profile and region (no dev model server)
    AWS_ENDPOINT_URL_BEDROCK_RUNTIME=URL  use that Bedrock endpoint as is (no dev model server)
    RUST_LOG                              overrides the functions' default info,chainrun=debug
    CHAINRUN_STACK_TIMEOUT                readiness timeout in seconds (default 600)
    CHAINRUN_OWNER_DAILY_CAP_USD          per-caller daily spend cap, passed to the runner
    CHAINRUN_OWNER_DAILY_CAPS             per-user daily caps (JSON), passed to the runner
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

INFRA = Path(__file__).resolve().parent
ROOT = INFRA.parent

API_FUNCTION = "chainrun-api"
RUNNER_FUNCTION = "chainrun-runner"
FUNCTIONS = (API_FUNCTION, RUNNER_FUNCTION)
WATCH_CONCURRENCY = 4
DEFAULT_REGION = "us-east-1"
DEFAULT_RUST_LOG = "info,chainrun=debug"
# Payload sent to the runner to check it is up: the nil ULID, a run that never exists.
# The runner looks it up in DynamoDB (so this also proves it reaches moto) and answers
# "unknown run"; any answer, even an error, proves the function is up.
RUNNER_WARMUP_PAYLOAD = {"run_id": "00000000000000000000000000"}
# Marker put into the environment of every process a stack starts (function processes
# inherit it from watch), so `down` can find orphans after a crash — by this exact
# per-stack value, never by process name.
STACK_ID_VAR = "CR_LOCAL_STACK_ID"

_WATCH_FATAL = re.compile(
    r"(error: could not compile|error\[E\d+\]|ERROR command exited|error: no bin target|"
    r"Address already in use|address in use|failed to bind)",
    re.I,
)


def load_module(path: Path | str, name: str):
    """Import a file under a chosen module name (infra/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _token_mod():
    return load_module(INFRA / "local_token.py", "chainrun_local_token")


class StackError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def read_env_file(path: Path | str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                k, v = line.split("=", 1)
                out[k.strip()] = _unquote(v.strip())
    except FileNotFoundError:
        pass
    return out


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        try:
            return shlex.split(v)[0]
        except ValueError:
            return v[1:-1]
    return v


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _quote_env_value(v: str) -> str:
    # cargo lambda's --env-file parser rejects unquoted values containing '=' (RUST_LOG!);
    # double quotes with \\ \" \$ escapes are accepted.
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def tail(path: Path | str, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url: str, body: bytes, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------------------
# tables


def load_tables(path: Path | str = INFRA / "tables.json") -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["tables"]


@contextlib.contextmanager
def hermetic_aws_env(region: str = DEFAULT_REGION):
    """Temporarily hide the caller's AWS setup (AWS_PROFILE, ~/.aws, endpoint overrides)
    from boto3 in this process; dummy credentials instead."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": region,
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.upper().startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)


def create_tables(endpoint: str, region: str = DEFAULT_REGION, tables_json: Path | str = INFRA / "tables.json",
                  access_key: str = "test", secret_key: str = "test") -> list[str]:
    """Create the tables of tables.json at a DynamoDB endpoint (idempotent). Returns names."""
    with hermetic_aws_env(region):
        return _create_tables(endpoint, region, tables_json, access_key, secret_key)


def _create_tables(endpoint, region, tables_json, access_key, secret_key) -> list[str]:
    import boto3

    ddb = boto3.client("dynamodb", endpoint_url=endpoint, region_name=region,
                       aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    existing = set(ddb.list_tables().get("TableNames", []))
    names = []
    for t in load_tables(tables_json):
        name = t["local_name"]
        names.append(name)
        if name in existing:
            continue
        key = [{"AttributeName": t["key"]["hash"], "KeyType": "HASH"}]
        if t["key"].get("range"):
            key.append({"AttributeName": t["key"]["range"], "KeyType": "RANGE"})
        kwargs = dict(
            TableName=name,
            AttributeDefinitions=[{"AttributeName": a, "AttributeType": ty} for a, ty in t["attributes"].items()],
            KeySchema=key,
            BillingMode="PAY_PER_REQUEST",
        )
        gsis = []
        for g in t.get("gsis") or []:
            gkey = [{"AttributeName": g["hash"], "KeyType": "HASH"}]
            if g.get("range"):
                gkey.append({"AttributeName": g["range"], "KeyType": "RANGE"})
            gsis.append({"IndexName": g["name"], "KeySchema": gkey,
                         "Projection": {"ProjectionType": g.get("projection", "ALL")}})
        if gsis:
            kwargs["GlobalSecondaryIndexes"] = gsis
        ddb.create_table(**kwargs)
        if t.get("ttl"):
            ddb.update_time_to_live(TableName=name, TimeToLiveSpecification={
                "Enabled": True, "AttributeName": t["ttl"]})
    return names


# ---------------------------------------------------------------------------------------
# process helpers


def _proc_env_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _pids_with_marker(stack_id: str) -> list[int]:
    """Processes whose environment carries STACK_ID_VAR=stack_id (Linux /proc)."""
    marker = f"{STACK_ID_VAR}={stack_id}".encode()
    out = []
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if e.isdigit() and int(e) != me and _proc_env_has(int(e), marker):
            out.append(int(e))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def terminate(pids: list[int], stack_id: str | None, grace_s: float = 10.0, log=None) -> None:
    """SIGTERM each pid's process group (children are session leaders), then every
    process still carrying the stack marker; SIGKILL what is left after grace_s."""
    marker = f"{STACK_ID_VAR}={stack_id}".encode() if stack_id else None

    def ours(pid: int) -> bool:
        # Guard against pid reuse: only signal processes carrying our marker.
        return marker is None or _proc_env_has(pid, marker)

    def signal_all(sig: int) -> list[int]:
        hit = []
        for pid in pids:
            if _alive(pid) and ours(pid):
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        continue
                hit.append(pid)
        return hit

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    # cargo lambda watch stops its function instances on SIGTERM; give it a moment first,
    # then TERM any instance left behind (e.g. watch was SIGKILLed earlier).
    while time.monotonic() < deadline and any(_alive(p) and ours(p) for p in pids):
        time.sleep(0.1)
    if stack_id:
        orphans = _pids_with_marker(stack_id)
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        while time.monotonic() < deadline and any(_alive(p) for p in orphans):
            time.sleep(0.1)
    left = [p for p in pids if _alive(p) and ours(p)]
    if stack_id:
        left += [p for p in _pids_with_marker(stack_id) if p not in left]
    for pid in left:
        if log:
            log(f"stack: pid {pid} did not stop, killing it")
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------
# the stack


class Stack:
    """A running local stack. Use as a context manager, or call start()/stop().

    state_dir: where stack.env, pids and logs/ go (the CLI uses .local; tests a temp dir).
    base_env: the caller's environment (default os.environ); only BEDROCK, RUST_LOG,
              AWS_ENDPOINT_URL_BEDROCK_RUNTIME and (with BEDROCK=aws) AWS credentials,
              profile and region are taken from it.
    """

    def __init__(self, state_dir: Path | str | None = None, *, root: Path | str = ROOT,
                 base_env: dict | None = None, build: bool = True,
                 ready_timeout: float | None = None, verbose: bool = True, log=None):
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
        self.region = DEFAULT_REGION
        self.tables = {t["env"]: t["local_name"] for t in load_tables(self.root / "infra" / "tables.json")}
        self.timings: dict[str, float] = {}
        self._started = False

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

    def token(self, user: str, groups=(), ttl_s: int = 43200, **claims) -> str:
        return _token_mod().mint(self.secret, user, groups, ttl_s=ttl_s, **claims)

    def inflight(self) -> dict:
        status, body = http_get(self.proxy_url + "/_proxy/inflight", timeout=5)
        if status != 200:
            raise StackError(f"invoke proxy /_proxy/inflight answered {status}: {body[:200]!r}")
        return json.loads(body)

    def wait_quiescent(self, timeout: float = 60.0, settle_s: float = 0.0) -> bool:
        """Wait until the invoke proxy has no background (Event) forwards in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inflight()["inflight"] == 0:
                if settle_s:
                    time.sleep(settle_s)
                    if self.inflight()["inflight"] != 0:
                        continue
                return True
            time.sleep(0.05)
        return False

    def start(self) -> "Stack":
        if self._started:
            return self
        t_start = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for stale in ("stack.env", "pids", "functions.env", "devmodel.port", "invoke-proxy.port"):
            (self.dir / stale).unlink(missing_ok=True)
        self._started = True
        try:
            self._write_pids()
            if self.build:
                self._cargo_build()
            self._start_moto()
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
        if not self._started:
            return
        pids = [p.pid for p in self.procs.values()]
        terminate(pids, self.stack_id, log=self.log)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for f in ("stack.env", "pids", "functions.env", "devmodel.port", "invoke-proxy.port"):
            (self.dir / f).unlink(missing_ok=True)
        self._started = False

    # -- steps --------------------------------------------------------------------------
    def _child_env(self, extra: dict | None = None) -> dict:
        """Environment for every child: the caller's, minus AWS_*/CHAINRUN_*/RUST_LOG/
        Lambda runtime variables (so nothing of the developer's AWS setup leaks into the
        local stack), plus the stack marker. With BEDROCK=aws the caller's credentials,
        profile and region are kept (endpoint overrides are still dropped)."""
        keep_aws = self.bedrock_mode == "aws"
        env = {}
        for k, v in self.base_env.items():
            ku = k.upper()
            if ku.startswith("AWS_"):
                if not keep_aws or ku.startswith("AWS_ENDPOINT_URL") or ku.startswith("AWS_LAMBDA_"):
                    continue
            if ku.startswith(("CHAINRUN_", "CR_LOCAL_", "_X_AMZN", "LAMBDA_")) or ku == "RUST_LOG":
                continue
            env[k] = v
        vb = str(venv_bin())
        env["PATH"] = vb + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"  # plain log files (cargo, cargo-lambda, tracing-subscriber)
        env["CARGO_TERM_COLOR"] = "never"
        env[STACK_ID_VAR] = self.stack_id
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

    def _spawn(self, name: str, argv: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        logf = open(self.logs / f"{name}.log", "wb", buffering=0)  # each start gets a fresh log
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        try:
            p = subprocess.Popen(argv, cwd=str(cwd or self.root), env=env, stdin=subprocess.DEVNULL,
                                 stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logf.close()
        self.procs[name] = p
        self._write_pids()
        return p

    def _write_pids(self) -> None:
        lines = [f"STACK_ID={self.stack_id}", f"STACK_DIR={self.dir}", f"OWNER_PID={os.getpid()}"]
        lines += [f"PID_{n.upper().replace('-', '_')}={p.pid}" for n, p in self.procs.items()]
        _write_atomic(self.dir / "pids", "\n".join(lines) + "\n")

    def _fail(self, name: str, why: str) -> None:
        log = self.logs / f"{name}.log"
        raise StackError(f"{name}: {why}\n--- tail of {log} ---\n{tail(log)}\n---")

    def _wait_port_file(self, name: str, port_file: Path, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        p = self.procs[name]
        while time.monotonic() < deadline:
            if p.poll() is not None:
                self._fail(name, f"exited with code {p.returncode} during startup")
            try:
                return int(port_file.read_text().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        self._fail(name, f"did not write {port_file} within {timeout:.0f}s")

    def _wait_http(self, name: str, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        p = self.procs[name]
        while time.monotonic() < deadline:
            if p.poll() is not None:
                self._fail(name, f"exited with code {p.returncode} during startup")
            try:
                status, _ = http_get(url, timeout=2)
                if status == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self._fail(name, f"{url} not healthy within {timeout:.0f}s")

    def _cargo_build(self) -> None:
        t0 = time.monotonic()
        self.log("stack: cargo build --bins (debug) …")
        cmd = ["cargo", "build", "--bins"]
        env = self._child_env()
        env.pop(STACK_ID_VAR, None)
        logpath = self.logs / "build.log"
        with open(logpath, "wb") as logf:
            # Stream to our stderr too so a cold compile shows progress.
            p = subprocess.Popen(cmd, cwd=str(self.root), env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
            self.dynamodb_url = f"http://127.0.0.1:{port}"
            p = self._spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            self._child_env())
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                try:
                    status, _ = http_get(self.dynamodb_url + "/moto-api/", timeout=2)
                    if status < 500:
                        break
                except (urllib.error.URLError, OSError):
                    time.sleep(0.1)
            if p.poll() is None:
                break
            if "in use" not in tail(self.logs / "moto.log") or attempt == 2:
                self._fail("moto", f"exited with code {p.returncode} during startup")
        else:  # pragma: no cover
            self._fail("moto", "could not start")
        try:
            create_tables(self.dynamodb_url, self.region, self.root / "infra" / "tables.json")
        except Exception as e:  # noqa: BLE001
            self._fail("moto", f"creating tables failed: {e}")
        self.timings["dynamodb"] = time.monotonic() - t0
        self.log(f"stack: DynamoDB (moto) at {self.dynamodb_url}, tables: {', '.join(self.tables.values())}")

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
        script = self.root / "infra" / "devmodel.py"
        rules = self.root / "infra" / "devmodel-rules.json"
        if not script.exists():
            raise StackError(f"{script} is missing (set AWS_ENDPOINT_URL_BEDROCK_RUNTIME or BEDROCK=aws instead)")
        port_file = self.dir / "devmodel.port"
        port_file.unlink(missing_ok=True)
        self._spawn("devmodel", [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0",
                                 "--rules", str(rules), "--port-file", str(port_file)], self._child_env())
        port = self._wait_port_file("devmodel", port_file)
        self.devmodel_url = self.bedrock_url = f"http://127.0.0.1:{port}"
        self._wait_http("devmodel", self.devmodel_url + "/_dev/health")
        self.timings["devmodel"] = time.monotonic() - t0
        self.log(f"stack: dev model server at {self.devmodel_url}")

    def _function_env(self) -> dict[str, str]:
        fe = {}
        if self.bedrock_mode == "aws":
            fe["AWS_REGION"] = self.region
        else:
            fe.update({
                "AWS_REGION": self.region,
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_EC2_METADATA_DISABLED": "true",
                # keep the developer's ~/.aws (profiles, endpoint_url, retry settings) out
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            })
        fe["AWS_ENDPOINT_URL_DYNAMODB"] = self.dynamodb_url
        fe["AWS_ENDPOINT_URL_LAMBDA"] = self.proxy_url
        if self.bedrock_url:
            fe["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] = self.bedrock_url
        fe.update(self.tables)
        fe["CHAINRUN_RUNNER_FUNCTION"] = RUNNER_FUNCTION
        fe["CHAINRUN_AUTH"] = "local-jwt"
        fe["CHAINRUN_LOCAL_JWT_SECRET"] = self.secret
        # The one deployment setting the local stack takes from its caller (children get no
        # CHAINRUN_* of the caller's otherwise): README, Budgets.
        for name in ("CHAINRUN_OWNER_DAILY_CAP_USD", "CHAINRUN_OWNER_DAILY_CAPS"):
            if self.base_env.get(name):
                fe[name] = self.base_env[name]
        fe["RUST_LOG"] = self.base_env.get("RUST_LOG") or DEFAULT_RUST_LOG
        fe["NO_COLOR"] = "1"
        return fe

    def _start_proxy_and_watch(self) -> None:
        cargo_lambda = find_cargo_lambda()
        for attempt in range(3):
            watch_port = free_port()
            self.watch_url = f"http://127.0.0.1:{watch_port}"
            self.api_url = f"{self.watch_url}/lambda-url/{API_FUNCTION}"

            t0 = time.monotonic()
            port_file = self.dir / "invoke-proxy.port"
            port_file.unlink(missing_ok=True)
            self._spawn("invoke-proxy", [sys.executable, str(self.root / "infra" / "invoke_proxy.py"),
                                         "--backend", self.watch_url, "--host", "127.0.0.1", "--port", "0",
                                         "--port-file", str(port_file)], self._child_env())
            self.proxy_url = f"http://127.0.0.1:{self._wait_port_file('invoke-proxy', port_file)}"
            self._wait_http("invoke-proxy", self.proxy_url + "/_proxy/health")
            self.timings["proxy"] = time.monotonic() - t0

            self.function_env = self._function_env()
            fn_env_file = self.dir / "functions.env"
            _write_atomic(fn_env_file, "".join(f"{k}={_quote_env_value(v)}\n" for k, v in self.function_env.items()))
            fn_env_file.chmod(0o600)

            t0 = time.monotonic()
            argv = cargo_lambda + ["watch", "-A", "127.0.0.1", "-P", str(watch_port),
                                   "--concurrency", str(WATCH_CONCURRENCY), "--ignore-changes",
                                   "--disable-cors", "--env-file", str(fn_env_file)]
            self.log(f"stack: cargo lambda watch on {self.watch_url} (log: {self.logs / 'lambda-watch.log'})")
            self._spawn("lambda-watch", argv, self._child_env())
            try:
                self._wait_functions()
            except StackError as e:
                if "in use" in str(e) and attempt < 2:
                    self.log("stack: port clash, retrying with new ports")
                    # no marker scan here: it would also stop moto and the dev model server
                    terminate([self.procs.pop("lambda-watch").pid, self.procs.pop("invoke-proxy").pid], None)
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
                    status, body = http_get(self.api_url + "/", timeout=self.ready_timeout)
                else:
                    status, body = http_post(
                        f"{self.watch_url}/2015-03-31/functions/{RUNNER_FUNCTION}/invocations",
                        json.dumps(RUNNER_WARMUP_PAYLOAD).encode(), timeout=self.ready_timeout,
                        headers={"Content-Type": "application/json"})
                results[fn] = ("ok", status, body[:300])
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

        # watch needs a moment before it listens; only then send the (single) probes.
        while True:
            if watch.poll() is not None:
                self._fail("lambda-watch", f"exited with code {watch.returncode}")
            check_log()
            try:
                socket.create_connection(("127.0.0.1", int(self.watch_url.rsplit(":", 1)[1])), timeout=1).close()
                break
            except OSError:
                if time.monotonic() >= deadline:
                    self._fail("lambda-watch", f"not listening on {self.watch_url} after {self.ready_timeout:.0f}s")
                time.sleep(0.05)
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
                if status == 404 and b"Missing function" in body:
                    self._fail("lambda-watch", f"watch does not know {fn}: {body!r}")
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
            "AWS_ENDPOINT_URL_LAMBDA": self.proxy_url,
        }
        if self.bedrock_url:
            env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] = self.bedrock_url
        if self.devmodel_url:
            env["DEVMODEL_URL"] = self.devmodel_url
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
        _write_atomic(self.env_file, "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
        self.env_file.chmod(0o600)


# ---------------------------------------------------------------------------------------
# CLI


def stack_status(state_dir: Path) -> tuple[dict, list[int], bool]:
    """(pids-file values, pids, any alive) of a stack dir, from `pids` or stack.env."""
    info = read_env_file(state_dir / "pids") or read_env_file(state_dir / "stack.env")
    pids = [int(v) for k, v in info.items() if k.startswith("PID_") and v.isdigit()]
    sid = info.get("STACK_ID")
    marker = f"{STACK_ID_VAR}={sid}".encode() if sid else None
    alive = any(_alive(p) and (marker is None or _proc_env_has(p, marker)) for p in pids)
    if sid and not alive:
        alive = bool(_pids_with_marker(sid))
    return info, pids, alive


def down(state_dir: Path, quiet: bool = False, only_if_orphaned: bool = False) -> bool:
    info, pids, alive = stack_status(state_dir)
    sid = info.get("STACK_ID")
    if only_if_orphaned:
        owner = info.get("OWNER_PID", "")
        if owner.isdigit() and _alive(int(owner)):
            return False  # its supervisor (e.g. a running `make demo`) is still alive
    if sid or pids:
        if alive and not quiet:
            print(f"stack: stopping {state_dir} (pids {' '.join(map(str, pids))})", file=sys.stderr)
        terminate(pids, sid, log=lambda m: print(m, file=sys.stderr))
    for f in ("stack.env", "pids", "functions.env", "devmodel.port", "invoke-proxy.port"):
        (state_dir / f).unlink(missing_ok=True)
    return alive


def _healthy(env: dict) -> bool:
    try:
        return http_get(env["INVOKE_PROXY_URL"] + "/_proxy/health", timeout=2)[0] == 200
    except (KeyError, urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="chainrun local stack", formatter_class=argparse.RawDescriptionHelpFormatter,
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

    if args.cmd == "down":
        was = down(state_dir, only_if_orphaned=args.if_orphaned)
        print(f"stack: {'stopped' if was else 'nothing running in'} {state_dir}", file=sys.stderr)
        return 0

    if args.cmd == "env":
        info, _, alive = stack_status(state_dir)
        env = read_env_file(state_dir / "stack.env")
        if not env or not alive:
            print(f"stack: not running ({state_dir}); start it with `make up`", file=sys.stderr)
            return 1
        sys.stdout.write((state_dir / "stack.env").read_text())
        return 0

    if args.cmd == "up":
        env = read_env_file(state_dir / "stack.env")
        _, _, alive = stack_status(state_dir)
        if env and alive and _healthy(env):
            print(f"stack: already up — API_URL={env['API_URL']} ({state_dir / 'stack.env'})", file=sys.stderr)
            return 0
        down(state_dir, quiet=True)  # leftovers of a crashed run
        stack = Stack(state_dir, build=not args.no_build, ready_timeout=args.timeout)
        _install_signal_handlers()
        try:
            stack.start()
        except (StackError, KeyboardInterrupt) as e:
            print(f"stack: startup failed: {e}" if isinstance(e, StackError) else "stack: interrupted",
                  file=sys.stderr)
            return 1 if isinstance(e, StackError) else 130
        print(f"stack: up. Environment in {stack.env_file}:", file=sys.stderr)
        sys.stdout.write(stack.env_file.read_text())
        print(f"stack: logs in {stack.logs}; stop with `make down`", file=sys.stderr)
        return 0

    # run
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        ap.error("run needs a command after --")
    down(state_dir, quiet=True)
    stack = Stack(state_dir, build=not args.no_build, ready_timeout=args.timeout)
    _install_signal_handlers()
    child = None
    try:
        stack.start()
        env = dict(os.environ)
        env.update(stack.env)
        env["STACK_ENV_FILE"] = str(stack.env_file)
        child = subprocess.Popen(cmd, env=env)
        return child.wait()
    except StackError as e:
        print(f"stack: startup failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstack: interrupted, stopping …", file=sys.stderr)
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
        print(f"stack: stopped (logs kept in {stack.logs})", file=sys.stderr)


def _install_signal_handlers() -> None:
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)


if __name__ == "__main__":
    sys.exit(main())
