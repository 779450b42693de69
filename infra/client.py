"""A running local stack as its clients see it: its URLs, tables and secret (the values
of its stack.env), bearer tokens, and a way to wait until no async invoke is in flight.

The same object serves a stack this process started (`Stack.client()`) and one
`make up` left running (`StackClient(read_env_file(".local/stack.env"))`), so the demo
and the end-to-end tests talk to either in one way.
"""

from __future__ import annotations

from pathlib import Path

from . import local_token
from .aws_env import DEFAULT_REGION
from .net import http, wait_until


class StackClient:
    """env: the stack.env values (API_URL, INVOKE_PROXY_URL, …). function_env: the
    environment both functions run with, when known. logs: the stack's log dir."""

    def __init__(self, env: dict[str, str], function_env: dict[str, str] | None = None,
                 logs: Path | None = None):
        self.env = dict(env)
        self.function_env = dict(function_env or {})
        self.api_url = env["API_URL"]
        self.proxy_url = env["INVOKE_PROXY_URL"]
        self.watch_url = env["LAMBDA_WATCH_URL"]
        self.dynamodb_url = env["AWS_ENDPOINT_URL_DYNAMODB"]
        self.devmodel_url = env.get("DEVMODEL_URL")
        self.fault_proxy_url = env.get("FAULT_PROXY_URL")  # a stack with dynamodb_faults only
        self.region = env.get("AWS_REGION", DEFAULT_REGION)
        self.secret = env["CHAINRUN_LOCAL_JWT_SECRET"]
        self.tables = {k: v for k, v in env.items() if k.startswith("CHAINRUN_") and k.endswith("_TABLE")}
        self.sqs_url = env.get("AWS_ENDPOINT_URL_SQS")
        self.dlq_url = env.get("CHAINRUN_RUNNER_DLQ_URL")
        self.logs = Path(logs or env.get("STACK_LOGS") or ".")

    def token(self, user: str, groups=(), ttl_s: int = local_token.DEFAULT_TTL_S, **claims) -> str:
        return local_token.mint(self.secret, user, groups, ttl_s=ttl_s, **claims)

    def inflight(self) -> dict:
        """The invoke proxy's counters (infra/invoke_proxy.py): "inflight", "accepted",
        "completed", "succeeded", "failed", "retries", "crashes", "timeouts",
        "dead_lettered", … and "event_sources" when it runs any."""
        status, _, body = http("GET", self.proxy_url + "/_proxy/inflight", timeout=5)
        if status != 200:
            raise RuntimeError(f"invoke proxy /_proxy/inflight answered {status}: {str(body)[:200]}")
        return body

    def wait_quiescent(self, timeout: float = 60.0) -> bool:
        """True once no async (Event) invoke is in flight, retries included; False after
        timeout seconds."""
        return bool(wait_until(lambda: self.inflight()["inflight"] == 0, timeout))

    def set_faults(self, config: dict) -> dict:
        """Replace the DynamoDB fault proxy's config (infra/fault_proxy.py); its state after."""
        return self._faults("PUT", "/_faults", config)

    def faults(self) -> dict:
        """The DynamoDB fault proxy's config and counts."""
        return self._faults("GET", "/_faults")

    def _faults(self, method: str, path: str, body=None) -> dict:
        if not self.fault_proxy_url:
            raise RuntimeError("this stack has no fault proxy: start it with dynamodb_faults=True "
                               "(CHAINRUN_STACK_DYNAMODB_FAULTS=1)")
        status, _, answer = http(method, self.fault_proxy_url + path, body=body, timeout=5)
        if status != 200:
            raise RuntimeError(f"fault proxy {method} {path} answered {status}: {str(answer)[:300]}")
        return answer

    def ddb(self):
        """A boto3 DynamoDB client for the stack's tables."""
        import boto3

        return boto3.client("dynamodb", endpoint_url=self.dynamodb_url, region_name=self.region,
                            aws_access_key_id="test", aws_secret_access_key="test")

    def s3(self):
        """A boto3 S3 client for the stack's outputs bucket (self.env["CHAINRUN_OUTPUTS_BUCKET"])."""
        import boto3

        return boto3.client("s3", endpoint_url=self.env.get("AWS_ENDPOINT_URL_S3") or self.dynamodb_url,
                            region_name=self.region, aws_access_key_id="test", aws_secret_access_key="test")
