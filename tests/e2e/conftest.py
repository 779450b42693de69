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
    A running stack: an infra.client.StackClient. Attributes:
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
      function_env   dict: the environment both functions run with ({} for a stack of
                     CHAINRUN_E2E_STACK_ENV).
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

`api` is infra.net.http with the base URL and token filled in; tests that call other
URLs (the proxy, watch) import http from infra.net.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from infra.client import StackClient
from infra.envfile import read_env_file
from infra.net import http
from infra.stack import Stack, StackError

_kept_logs: list[Path] = []

# The one caller with a daily spend cap on the e2e stack (test_budget.py reads it from
# the functions' environment): room for one call's worst case (a 40-byte prompt,
# max_tokens 100 on Nova Micro: 18,760,000 pico-dollars) after one charge of 50 input
# and 100 output tokens (15,750,000), less one.
DAILY_CAPS = {"e2e-daily-capped": "0.000034509999"}


def pytest_terminal_summary(terminalreporter):
    for path in _kept_logs:
        terminalreporter.write_line(f"chainrun e2e: local stack logs kept in {path}")


@pytest.fixture(scope="session")
def stack(request, caller_env):
    external = os.environ.get("CHAINRUN_E2E_STACK_ENV")
    if external:
        env = read_env_file(external)
        if not env.get("API_URL"):
            pytest.fail(f"CHAINRUN_E2E_STACK_ENV={external}: no API_URL in it (is the stack up?)")
        yield StackClient(env)
        return

    tmp = Path(tempfile.mkdtemp(prefix="chainrun-e2e-"))
    s = Stack(state_dir=tmp, build=True, base_env=dict(caller_env, CHAINRUN_OWNER_DAILY_CAPS=json.dumps(DAILY_CAPS)))
    failed_before = request.session.testsfailed
    try:
        s.start()
    except StackError as e:
        pytest.fail(f"local stack failed to start (logs in {s.logs}):\n{e}", pytrace=False)
    try:
        yield s.client()
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
