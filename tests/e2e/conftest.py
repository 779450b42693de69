"""Shared fixtures for chainrun's end-to-end tests.

The tests drive the real binaries (`chainrun-api`, `chainrun-runner`) through
`cargo lambda watch`, against moto's DynamoDB and the dev model server, exactly as
`make up` runs them (infra/stack.py). The stack is started lazily, once per session,
by the first test that asks for the `stack` fixture, in a temp dir (it never touches a
developer's `.local/` stack), and stopped at the end of the session. Its logs are
kept when a test failed (the path is printed); set CHAINRUN_E2E_KEEP=1 to always keep.

Fixtures
--------
stack (session)
    A running stack. Attributes:
      api_url        http://127.0.0.1:W/lambda-url/chainrun-api — the API base; the
                     function sees paths without that prefix (GET {api_url}/runs/X
                     arrives as rawPath "/runs/X").
      proxy_url      the async-invoke proxy (AWS_ENDPOINT_URL_LAMBDA of the functions).
                     GET {proxy_url}/_proxy/inflight -> {"inflight": N, ...}.
      watch_url      cargo lambda watch itself (Invoke API: POST
                     {watch_url}/2015-03-31/functions/chainrun-runner/invocations).
      dynamodb_url   moto (AWS_ENDPOINT_URL_DYNAMODB); credentials "test"/"test".
      devmodel_url   the dev Bedrock server (None if AWS_ENDPOINT_URL_BEDROCK_RUNTIME or
                     BEDROCK=aws was set); admin API under /_dev/.
      region         "us-east-1" (unless BEDROCK=aws with another region)
      env            dict: the stack.env values (API_URL, table names, secret, pids, …).
      function_env   dict: the environment both functions run with.
      tables         dict: CHAINRUN_*_TABLE -> table name.
      secret         the HS256 secret the API verifies local tokens with.
      logs           Path of the log dir (lambda-watch.log has both functions' output).
    Methods:
      token(user, groups=(), ttl_s=43200, **extra_claims) -> bearer token string
      wait_quiescent(timeout=60) -> bool: True once no async (Event) invoke is in flight
      ddb() -> boto3 DynamoDB client for the local tables
    Set CHAINRUN_E2E_STACK_ENV=.local/stack.env to run the tests against an already
    running stack (`make up`) instead of starting one (faster while iterating).

api (session)
    api(method, path, token=None, body=None, raw=None, headers=None, timeout=30)
        -> (status, headers, body)
    `path` is relative to stack.api_url ("/runs", "/runs/ID/events?after=3"); a full
    http:// URL is used as is. `body` is JSON-encoded (Content-Type: application/json);
    `raw` (bytes or str) is sent verbatim instead (give your own Content-Type in
    `headers` if it matters). `token` adds `Authorization: Bearer …`. `headers` is a
    case-insensitive dict-like (email.message.Message); `body` is the parsed JSON
    when the response parses as JSON (application/json and application/problem+json
    both), else the text. Never raises on 4xx/5xx.

devmodel (session)
    Small client for the dev model server's admin API: devmodel.calls() -> list,
    devmodel.reset(), devmodel.set_rules(rules_dict), devmodel.health(),
    devmodel.admin(method, path, body=None) -> (status, body). Skips the test when the
    stack runs without the dev model server.

http(method, url, body=None, raw=None, headers=None, timeout=30) is the plain
function behind `api`, importable as `from conftest import http`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


# The stack gets the caller's environment as it was (BEDROCK=aws needs the real AWS
# setup); the test process itself is made hermetic, so boto3 clients created by tests
# (stack.ddb(), clients for moto/devmodel) never pick up a developer's AWS_PROFILE,
# ~/.aws config or AWS_ENDPOINT_URL overrides.
CALLER_ENV = dict(os.environ)
if (os.environ.get("BEDROCK") or "").lower() != "aws":
    for _k in [k for k in os.environ if k.upper().startswith("AWS_")]:
        del os.environ[_k]
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                       "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"})


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# infra/ is not a package: its modules are loaded by path.
stack_mod = _load(INFRA / "stack.py", "chainrun_stack")
token_mod = _load(INFRA / "local_token.py", "chainrun_local_token")
proxy_mod = _load(INFRA / "invoke_proxy.py", "chainrun_invoke_proxy")


def http(method: str, url: str, body=None, raw=None, headers=None, timeout: float = 30.0):
    """(status, headers, parsed-JSON-or-text) for any response; never raises on 4xx/5xx."""
    hdrs = {"Accept": "application/json"}
    data = None
    if raw is not None:
        data = raw.encode() if isinstance(raw, str) else raw
    elif body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method.upper(), headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, rh, payload = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, rh, payload = e.code, e.headers, e.read()
    text = payload.decode("utf-8", "replace")
    try:
        parsed = json.loads(text) if text.strip() else text
    except ValueError:
        parsed = text
    return status, rh, parsed


class _StackHandle:
    """What the `stack` fixture yields (wraps a Stack or an external stack.env)."""

    def __init__(self, env: dict, function_env: dict | None, logs: Path, stack=None):
        self.env = env
        self.function_env = function_env or {}
        self.api_url = env["API_URL"]
        self.proxy_url = env["INVOKE_PROXY_URL"]
        self.watch_url = env["LAMBDA_WATCH_URL"]
        self.dynamodb_url = env["AWS_ENDPOINT_URL_DYNAMODB"]
        self.devmodel_url = env.get("DEVMODEL_URL")
        self.region = env.get("AWS_REGION", "us-east-1")
        self.secret = env["CHAINRUN_LOCAL_JWT_SECRET"]
        self.tables = {k: v for k, v in env.items() if k.startswith("CHAINRUN_") and k.endswith("_TABLE")}
        self.logs = logs
        self._stack = stack

    def token(self, user: str, groups=(), ttl_s: int = 43200, **claims) -> str:
        return token_mod.mint(self.secret, user, groups, ttl_s=ttl_s, **claims)

    def inflight(self) -> dict:
        status, _, body = http("GET", self.proxy_url + "/_proxy/inflight", timeout=5)
        assert status == 200, body
        return body

    def wait_quiescent(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inflight()["inflight"] == 0:
                return True
            time.sleep(0.05)
        return False

    def ddb(self):
        import boto3

        return boto3.client("dynamodb", endpoint_url=self.dynamodb_url, region_name=self.region,
                            aws_access_key_id="test", aws_secret_access_key="test")


_kept_logs: list[Path] = []

# The one caller with a daily spend cap on the e2e stack (test_budget.py): room for one
# call's worst case (a 40-byte prompt, max_tokens 100 on Nova Micro: 18,760,000
# pico-dollars) after one charge of 50 input and 100 output tokens (15,750,000), less one.
DAILY_CAPPED_USER = "e2e-daily-capped"
DAILY_CAP_USD = "0.000034509999"


def pytest_terminal_summary(terminalreporter):
    for path in _kept_logs:
        terminalreporter.write_line(f"chainrun e2e: local stack logs kept in {path}")


@pytest.fixture(scope="session")
def stack(request):
    external = os.environ.get("CHAINRUN_E2E_STACK_ENV")
    if external:
        env = stack_mod.read_env_file(Path(external))
        if not env.get("API_URL"):
            pytest.fail(f"CHAINRUN_E2E_STACK_ENV={external}: no API_URL in it (is the stack up?)")
        yield _StackHandle(env, None, Path(env.get("STACK_LOGS", ".")))
        return

    tmp = Path(tempfile.mkdtemp(prefix="chainrun-e2e-"))
    base_env = dict(CALLER_ENV, CHAINRUN_OWNER_DAILY_CAPS=json.dumps({DAILY_CAPPED_USER: DAILY_CAP_USD}))
    s = stack_mod.Stack(state_dir=tmp, build=True, base_env=base_env)
    failed_before = request.session.testsfailed
    try:
        s.start()
    except stack_mod.StackError as e:
        s.stop()
        pytest.fail(f"local stack failed to start (logs in {s.logs}):\n{e}", pytrace=False)
    try:
        yield _StackHandle(dict(s.env), dict(s.function_env), s.logs, stack=s)
    finally:
        s.stop()
        keep = os.environ.get("CHAINRUN_E2E_KEEP") == "1" or request.session.testsfailed > failed_before
        if keep:
            _kept_logs.append(s.logs)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def api(stack):
    def call(method: str, path: str, token: str | None = None, body=None, raw=None, headers=None,
             timeout: float = 30.0):
        url = path if path.startswith(("http://", "https://")) else stack.api_url + path
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        return http(method, url, body=body, raw=raw, headers=hdrs, timeout=timeout)

    return call


class _DevModel:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def admin(self, method: str, path: str, body=None):
        status, _, parsed = http(method, self.url + path, body=body, timeout=10)
        return status, parsed

    def health(self):
        return self.admin("GET", "/_dev/health")

    def calls(self):
        status, body = self.admin("GET", "/_dev/calls")
        assert status == 200, body
        return body.get("calls", body) if isinstance(body, dict) else body

    def reset(self):
        status, body = self.admin("POST", "/_dev/reset")
        assert status in (200, 204), body

    def set_rules(self, rules: dict):
        status, body = self.admin("PUT", "/_dev/rules", rules)
        assert status in (200, 204), body


@pytest.fixture(scope="session")
def devmodel(stack):
    if not stack.devmodel_url:
        pytest.skip("stack runs without the dev model server (AWS_ENDPOINT_URL_BEDROCK_RUNTIME or BEDROCK=aws)")
    return _DevModel(stack.devmodel_url)
