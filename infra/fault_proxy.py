"""fault_proxy: an HTTP proxy in front of moto that injects DynamoDB faults (stdlib only).

The chaos suite puts it between the functions and moto (``Stack(dynamodb_faults=True)``):
the functions' ``AWS_ENDPOINT_URL_DYNAMODB`` points here, while the tests' own boto3
client talks to moto directly. Faults start off; a test turns them on with ``PUT /_faults``.

    functions ──▶ fault proxy :F ──▶ moto :D ◀── tests (boto3)

What is faulted
---------------
The DynamoDB SDKs speak JSON 1.0 over ``POST /`` with ``X-Amz-Target:
DynamoDB_20120810.<Operation>``. A fault without an ``operations`` filter applies to every
DynamoDB request; with one, to the requests whose operation is listed — the name after
the dot of ``X-Amz-Target`` (``PutItem``, ``AmazonSQS``'s ``SendMessage``) or the whole
target, or a query-protocol ``Action``. Everything else moto serves (SQS, S3, its own
``/moto-api``) passes through untouched unless a filter names it. Proxying is
transparent: method, path, query, headers (Host included) and body go to moto; status,
headers and body come back.

Fault kinds (answers are shaped as DynamoDB's, so SDKs classify them as the real thing):

* ``throttle``   — 400 ``{"__type": "com.amazonaws.dynamodb.v20120810#ThrottlingException",
  "message": …}`` (``error`` may pick ``ProvisionedThroughputExceededException`` or
  ``RequestLimitExceeded``) without forwarding. SDKs retry these as throttling.
* ``error500``   — 500 ``InternalServerError`` without forwarding. Retried as transient.
* ``lost_reply`` — forwarded (the write APPLIES in moto), then answered 500
  ``InternalServerError`` as if the reply was lost: the client retries a write that
  already happened.
* ``timeout``    — holds the request ``delay_ms`` (make it longer than the client's read
  or attempt timeout), then drops the connection without an answer. With ``forward:
  true`` the request is forwarded (and applied) first.
* ``latency``    — waits ``delay_ms`` and then proxies normally; stacks with the others.

Error answers carry ``Content-Type: application/x-amz-json-1.0``, ``x-amzn-RequestId``
and ``x-amz-crc32`` (the CRC32 of the body, which botocore checks on DynamoDB answers;
the Rust SDK does not). The Rust SDK reads the code from ``__type`` (namespace stripped)
and its standard retry classifier retries the codes above (THROTTLING_ERRORS in
aws-runtime's retries/classifiers.rs) and 500/502/503/504, and retries a dropped
connection or a timeout as a transient error. A request named by a filter that is not
a JSON (``X-Amz-Target``) request gets a query-protocol XML ``<ErrorResponse>``.

Config (``PUT /_faults``, ``--config``)
---------------------------------------
::

    {
      "seed": 7,                         # default: --seed (0)
      "idempotency_tokens": true,        # see below; default true
      "faults": [
        {"kind": "throttle", "rate": 0.2, "operations": ["PutItem", "TransactWriteItems"],
         "error": "ProvisionedThroughputExceededException", "message": "…"},
        {"kind": "error500", "rate": 0.05},
        {"kind": "lost_reply", "rate": 1.0, "operations": ["TransactWriteItems"],
         "skip": 2, "limit": 1},
        {"kind": "timeout", "rate": 0.01, "delay_ms": 5000, "forward": true},
        {"kind": "latency", "rate": 0.5, "delay_ms": 20}
      ]
    }

* Every fault key but ``kind`` is optional. ``rate`` (default 1) is the share of the
  requests it applies to that it hits; ``skip`` lets that many of them pass first;
  ``limit`` caps how often it fires; ``seed`` overrides its random stream. ``message``
  replaces the error message (throttle, error500, lost_reply). ``delay_ms`` defaults to
  10000 (timeout) and 100 (latency).
* Each fault draws from its own random stream, seeded from (seed, its index), once for
  every request it applies to: its decisions depend only on the order of those requests,
  so a sequential client sees the same faults on every run. Faults are tried in order;
  the first non-latency fault that hits decides the answer (a later one that also hits
  is not counted as fired).
* Unknown keys are rejected (keys starting with ``_`` are ignored, for comments); an
  invalid document is answered 400 with a message naming the field (``faults[1].rate:
  …``) and changes nothing.
* ``PUT`` replaces the config and restarts every fault's stream and skip/limit counts;
  the request counts stay until ``POST /_faults/reset``, which clears them and restarts
  the streams of the current config.

Idempotency tokens (what moto lacks)
------------------------------------
DynamoDB applies a TransactWriteItems with a given ``ClientRequestToken`` once: a repeat
within 10 minutes with the same parameters succeeds without applying anything again,
with other parameters it fails ``IdempotentParameterMismatchException``, and while the
first is still running it fails ``TransactionInProgressException``. moto ignores the token,
so a retried lost reply would meet its own write (a failed condition) where AWS answers
success. With ``idempotency_tokens`` on, the proxy remembers each token whose transaction
moto applied and answers its repeats as DynamoDB does, so the local stack retries as AWS
does. Tokens are kept across ``PUT`` and reset (they are the table's state, not a fault).

Admin API
---------
* ``GET  /_faults``       -> ``{"config", "requests", "fired": {kind: n},
  "operations": {op: {"requests": n, kind: n}}, "rules": [{"kind", "matched", "fired"}],
  "tokens": {"remembered", "replayed", "mismatched", "in_progress"}}``
* ``PUT  /_faults``       -> replace the config (400 naming the bad field); answers as GET
* ``POST /_faults/reset`` -> clear the counts, restart the random streams

CLI
---
``python -m infra.fault_proxy --backend http://127.0.0.1:5000 [--host 127.0.0.1] [--port 0]
[--port-file PATH] [--seed N] [--config JSON|@FILE] [--verbose]`` prints ``fault proxy
listening on http://HOST:PORT`` once it accepts connections. In-process: ``server, url =
start_server(backend, config)``; ``server.shutdown()``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import socket
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from http.server import BaseHTTPRequestHandler

from .serve import StoppableServer, read_body, serve_until_stopped

KINDS = ("throttle", "error500", "lost_reply", "timeout", "latency")
DYNAMODB_TARGET = "DynamoDB_20120810"
DYNAMODB_NAMESPACE = "com.amazonaws.dynamodb.v20120810"
JSON_CONTENT_TYPE = "application/x-amz-json-1.0"

THROTTLE_ERRORS = {
    "ThrottlingException": "Rate of requests exceeds the allowed throughput.",
    "ProvisionedThroughputExceededException": (
        "The level of configured provisioned throughput for the table was exceeded. "
        "Consider increasing your provisioning level with the UpdateTable API."),
    "RequestLimitExceeded": "Throughput exceeds the current throughput limit for your account.",
}
INTERNAL_ERROR = "InternalServerError"
DEFAULT_MESSAGES = {
    "error500": "Internal server error (fault proxy)",
    "lost_reply": "Internal server error (fault proxy: the request was applied, its reply lost)",
}
DEFAULT_DELAY_MS = {"timeout": 10_000, "latency": 100}

COMMON_KEYS = {"kind", "rate", "operations", "skip", "limit", "seed"}
KIND_KEYS = {
    "throttle": {"error", "message"},
    "error500": {"message"},
    "lost_reply": {"message"},
    "timeout": {"delay_ms", "forward"},
    "latency": {"delay_ms"},
}
TOP_KEYS = {"seed", "faults", "idempotency_tokens"}

TOKEN_TTL_S = 600.0  # DynamoDB keeps a client request token for 10 minutes
BACKEND_TIMEOUT_S = 60.0

# Hop-by-hop headers (RFC 9110 §7.6.1), the body framing the proxy recomputes, and Expect
# (the server already answered 100-continue and read the body).
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "trailers", "transfer-encoding", "upgrade", "content-length", "expect"}
# Answer headers this server writes itself (send_response), never twice.
_OWN = {"server", "date"}


def _log(msg: str) -> None:
    ts = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    sys.stderr.write(f"{ts} fault-proxy {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------
# Config: parsing and validation
# --------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A fault config is invalid; the message starts with the offending field path."""


def _fail(path: str, message: str):
    raise ConfigError(f"{path}: {message}")


def _check_keys(obj: dict, allowed: set, path: str) -> None:
    for key in obj:
        if not key.startswith("_") and key not in allowed:
            _fail(f"{path}.{key}" if path else key, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _int(value, path: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        _fail(path, "must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    return value


def _number(value, path: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
        _fail(path, f"must be a number in [{low:g}, {high:g}]" if high is not None else f"must be a number >= {low:g}")
    return float(value)


class Fault:
    """One validated fault with its random stream and counters (guarded by the state lock)."""

    def __init__(self, spec: dict, index: int, seed: int):
        self.spec = spec  # normalized: every key with its value or default
        self.kind: str = spec["kind"]
        self.rate: float = spec["rate"]
        self.operations = frozenset(spec["operations"]) if spec["operations"] is not None else None
        self.skip: int = spec["skip"]
        self.limit: int | None = spec["limit"]
        self.delay_s: float = spec.get("delay_ms", 0) / 1000
        self.seed_text = str(spec["seed"]) if spec["seed"] is not None else f"{seed}:{index}"
        self.restart()

    def restart(self) -> None:
        self.rng = random.Random(self.seed_text)
        self.matched = 0
        self.fired = 0

    def applies(self, target: str | None, operation: str | None) -> bool:
        if self.operations is None:
            return target == DYNAMODB_TARGET
        return operation in self.operations or (target is not None and f"{target}.{operation}" in self.operations)

    def draw(self) -> bool:
        """Whether this fault hits the request it applies to (consumes one draw)."""
        self.matched += 1
        if self.matched <= self.skip or (self.limit is not None and self.fired >= self.limit):
            return False
        return self.rng.random() < self.rate


def parse_fault(obj, path: str) -> dict:
    """Validate one fault object; return it normalized (defaults filled in)."""
    if not isinstance(obj, dict):
        _fail(path, "must be an object")
    kind = obj.get("kind")
    if "kind" not in obj:
        _fail(f"{path}.kind", f"is required (one of: {', '.join(KINDS)})")
    if kind not in KINDS:
        _fail(f"{path}.kind", f"unknown fault kind {kind!r} (expected one of: {', '.join(KINDS)})")
    _check_keys(obj, COMMON_KEYS | KIND_KEYS[kind], path)
    spec = {"kind": kind,
            "rate": _number(obj.get("rate", 1.0), f"{path}.rate", 0.0, 1.0),
            "operations": None,
            "skip": _int(obj.get("skip", 0), f"{path}.skip", 0),
            "limit": None,
            "seed": None}
    if obj.get("operations") is not None:
        ops = obj["operations"]
        if not isinstance(ops, list) or not ops or not all(isinstance(o, str) and o for o in ops):
            _fail(f"{path}.operations", "must be a non-empty list of operation names (e.g. \"PutItem\")")
        spec["operations"] = list(ops)
    if obj.get("limit") is not None:
        spec["limit"] = _int(obj["limit"], f"{path}.limit", 0)
    if obj.get("seed") is not None:
        spec["seed"] = _int(obj["seed"], f"{path}.seed")
    if kind == "throttle":
        error = obj.get("error", "ThrottlingException")
        if error not in THROTTLE_ERRORS:
            _fail(f"{path}.error", f"unknown throttling error {error!r} (expected one of: {', '.join(THROTTLE_ERRORS)})")
        spec["error"] = error
    if kind in ("throttle", "error500", "lost_reply"):
        message = obj.get("message", THROTTLE_ERRORS.get(spec.get("error")) or DEFAULT_MESSAGES.get(kind))
        if not isinstance(message, str):
            _fail(f"{path}.message", "must be a string")
        spec["message"] = message
    if kind in ("timeout", "latency"):
        spec["delay_ms"] = _number(obj.get("delay_ms", DEFAULT_DELAY_MS[kind]), f"{path}.delay_ms", 0.0)
    if kind == "timeout":
        forward = obj.get("forward", False)
        if not isinstance(forward, bool):
            _fail(f"{path}.forward", "must be true or false")
        spec["forward"] = forward
    return spec


def parse_config(doc, default_seed: int = 0) -> tuple[dict, list[Fault]]:
    """Validate a whole config; return (normalized config, faults)."""
    if not isinstance(doc, dict):
        _fail("(document)", "must be a JSON object")
    _check_keys(doc, TOP_KEYS, "")
    seed = _int(doc.get("seed", default_seed), "seed")
    tokens = doc.get("idempotency_tokens", True)
    if not isinstance(tokens, bool):
        _fail("idempotency_tokens", "must be true or false")
    faults = doc.get("faults", [])
    if not isinstance(faults, list):
        _fail("faults", "must be a list")
    specs = [parse_fault(f, f"faults[{i}]") for i, f in enumerate(faults)]
    config = {"seed": seed, "idempotency_tokens": tokens, "faults": specs}
    return config, [Fault(spec, i, seed) for i, spec in enumerate(specs)]


# --------------------------------------------------------------------------------------
# Shared state: config, counts, remembered tokens
# --------------------------------------------------------------------------------------


class FaultState:
    def __init__(self, config: dict | None = None, seed: int = 0):
        self.lock = threading.Lock()
        self.default_seed = seed
        self.config, self.faults = parse_config(config or {}, seed)
        self.tokens = TokenLog()
        self._clear_counts()

    def _clear_counts(self) -> None:
        self.requests = 0
        self.fired = {k: 0 for k in KINDS}
        self.operations: dict[str, dict[str, int]] = {}

    def replace(self, doc) -> None:
        config, faults = parse_config(doc, self.default_seed)  # validate before touching state
        with self.lock:
            self.config, self.faults = config, faults

    def reset(self) -> None:
        with self.lock:
            self._clear_counts()
            for f in self.faults:
                f.restart()

    def decide(self, target: str | None, operation: str | None) -> tuple[float, Fault | None]:
        """Count one request and decide its fate: (latency to add in s, the fault that
        decides the answer or None)."""
        with self.lock:
            self.requests += 1
            op_counts = self.operations.setdefault(operation or "(other)", {"requests": 0})
            op_counts["requests"] += 1
            latency, chosen = 0.0, None
            for fault in self.faults:
                if not fault.applies(target, operation) or not fault.draw():
                    continue
                if fault.kind == "latency":
                    latency += fault.delay_s
                elif chosen is not None:
                    continue
                else:
                    chosen = fault
                fault.fired += 1
                self.fired[fault.kind] += 1
                op_counts[fault.kind] = op_counts.get(fault.kind, 0) + 1
            return latency, chosen

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "config": json.loads(json.dumps(self.config)),
                "requests": self.requests,
                "fired": dict(self.fired),
                "operations": {op: dict(c) for op, c in self.operations.items()},
                "rules": [{"kind": f.kind, "matched": f.matched, "fired": f.fired} for f in self.faults],
                "tokens": self.tokens.stats(),
            }

    @property
    def idempotency_tokens(self) -> bool:
        with self.lock:
            return self.config["idempotency_tokens"]


class TokenLog:
    """ClientRequestTokens of TransactWriteItems calls moto applied (see the module doc)."""

    def __init__(self):
        self.lock = threading.Lock()
        # token -> (parameters digest, None while in flight | (status, headers, body), expiry)
        self.entries: dict[str, tuple[str, tuple | None, float]] = {}
        self.counts = {"replayed": 0, "mismatched": 0, "in_progress": 0}

    def begin(self, token: str, digest: str):
        """("new", None) if the caller should apply the transaction (it then calls
        finish), else ("replay", answer) / ("mismatch", None) / ("in_progress", None)."""
        now = time.monotonic()
        with self.lock:
            for t in [t for t, (_, answer, expiry) in self.entries.items() if answer is not None and expiry <= now]:
                del self.entries[t]
            entry = self.entries.get(token)
            if entry is None:
                self.entries[token] = (digest, None, float("inf"))
                return "new", None
            stored_digest, answer, _ = entry
            if stored_digest != digest:
                self.counts["mismatched"] += 1
                return "mismatch", None
            if answer is None:
                self.counts["in_progress"] += 1
                return "in_progress", None
            self.counts["replayed"] += 1
            return "replay", answer

    def finish(self, token: str, answer: tuple | None) -> None:
        """Remember the applied transaction's answer, or forget a token that did not apply."""
        with self.lock:
            if answer is None:
                self.entries.pop(token, None)
            else:
                digest = self.entries.get(token, ("", None, 0))[0]
                self.entries[token] = (digest, answer, time.monotonic() + TOKEN_TTL_S)

    def stats(self) -> dict:
        with self.lock:
            return {"remembered": len(self.entries), **self.counts}


# --------------------------------------------------------------------------------------
# Error answers
# --------------------------------------------------------------------------------------


def error_answer(target: str | None, code: str, message: str, status: int) -> tuple[int, list, bytes]:
    """An AWS error answer: JSON 1.0 for X-Amz-Target requests (DynamoDB's namespace on the
    type for DynamoDB), a query-protocol XML ErrorResponse otherwise."""
    request_id = str(uuid.uuid4())
    if target is not None:
        error_type = f"{DYNAMODB_NAMESPACE}#{code}" if target == DYNAMODB_TARGET else code
        body = json.dumps({"__type": error_type, "message": message}).encode()
        headers = [("Content-Type", JSON_CONTENT_TYPE), ("x-amzn-RequestId", request_id),
                   ("x-amz-crc32", str(zlib.crc32(body)))]
        return status, headers, body
    side = "Receiver" if status >= 500 else "Sender"
    body = (f"<ErrorResponse><Error><Type>{side}</Type><Code>{code}</Code><Message>{_xml(message)}</Message>"
            f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>").encode()
    return status, [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)], body


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fault_answer(fault: Fault, target: str | None) -> tuple[int, list, bytes]:
    if fault.kind == "throttle":
        return error_answer(target, fault.spec["error"], fault.spec["message"], 400)
    return error_answer(target, INTERNAL_ERROR, fault.spec["message"], 500)


def operation_of(headers, path: str, body: bytes) -> tuple[str | None, str | None]:
    """(X-Amz-Target service part or None, operation name or None) of a request."""
    target = headers.get("X-Amz-Target")
    if target:
        service, _, operation = target.rpartition(".")
        return (service or None), operation
    query = urllib.parse.urlsplit(path).query
    params = urllib.parse.parse_qs(query)
    if "Action" not in params and "x-www-form-urlencoded" in (headers.get("Content-Type") or ""):
        params = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    action = params.get("Action")
    return None, (action[0] if action else None)


def transaction_token(target: str | None, operation: str | None, body: bytes) -> tuple[str, str] | None:
    """(ClientRequestToken, digest of the other parameters) of a TransactWriteItems call."""
    if target != DYNAMODB_TARGET or operation != "TransactWriteItems":
        return None
    try:
        params = json.loads(body)
    except ValueError:
        return None
    if not isinstance(params, dict) or not isinstance(params.get("ClientRequestToken"), str):
        return None
    token = params.pop("ClientRequestToken")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return token, digest


# --------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------


class FaultProxyServer(StoppableServer):
    def __init__(self, address, backend: str, state: FaultState, verbose: bool = False, log_faults: bool = False):
        u = urllib.parse.urlsplit(backend)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"backend must be an http:// URL, got {backend!r}")
        self.backend = backend.rstrip("/")
        self.backend_host = u.hostname
        self.backend_port = u.port or 80
        self.state = state
        self.verbose = verbose
        self.log_faults = log_faults or verbose
        super().__init__(address, FaultProxyHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.backend_host, self.backend_port, timeout=BACKEND_TIMEOUT_S)
        try:
            # Host goes through as the client sent it (moto builds URLs, e.g. SQS queue URLs, from it).
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


class FaultProxyHandler(BaseHTTPRequestHandler):
    server: FaultProxyServer
    protocol_version = "HTTP/1.1"
    server_version = "chainrun-fault-proxy/1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms a request).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # noqa: A002 - signature fixed by the base class
        if self.server.verbose:
            _log(fmt % args)

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        keep_length = self.command == "HEAD"  # a HEAD answer's Content-Length describes the GET body
        for k, v in headers:
            if (k.lower() not in _HOP and k.lower() not in _OWN) or (keep_length and k.lower() == "content-length"):
                self.send_header(k, v)
        if not keep_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, [("Content-Type", "application/json")], json.dumps(obj).encode())

    def _handle(self) -> None:
        body = read_body(self)
        path = urllib.parse.urlsplit(self.path).path
        if path == "/_faults" or path.startswith("/_faults/"):
            return self._admin(path, body)

        state = self.server.state
        target, operation = operation_of(self.headers, self.path, body)
        latency, fault = state.decide(target, operation)
        if fault and self.server.log_faults:
            _log(f"{fault.kind} {target or '-'}.{operation or '-'}")
        if latency and self.server.stopping.wait(latency):
            return self._drop()
        if fault is None:
            return self._send(*self._forward(target, operation, body))
        if fault.kind in ("throttle", "error500"):
            return self._send(*fault_answer(fault, target))
        if fault.kind == "lost_reply":
            self._forward(target, operation, body)
            return self._send(*fault_answer(fault, target))
        # timeout: hold the request past the client's patience, then hang up
        if fault.spec["forward"]:
            self._forward(target, operation, body)
        self.server.stopping.wait(fault.delay_s)
        return self._drop()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def _drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client is gone already

    def _forward(self, target: str | None, operation: str | None, body: bytes) -> tuple[int, list, bytes]:
        """Forward the request to moto — through the token log for a TransactWriteItems
        with a ClientRequestToken — and return moto's (or DynamoDB's) answer."""
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP]
        token = transaction_token(target, operation, body) if self.server.state.idempotency_tokens else None
        if token is None:
            return self._forward_raw(headers, body)
        tokens = self.server.state.tokens
        outcome, answer = tokens.begin(*token)
        if outcome == "replay":
            return answer
        if outcome == "mismatch":
            return error_answer(target, "IdempotentParameterMismatchException",
                                "The request uses the same client token as a previous, but non-identical request.", 400)
        if outcome == "in_progress":
            return error_answer(target, "TransactionInProgressException",
                                "The transaction with the given request token is already in progress.", 400)
        answer = None
        try:
            answer = self._forward_raw(headers, body)
        finally:
            tokens.finish(token[0], answer if answer is not None and answer[0] == 200 else None)
        return answer

    def _forward_raw(self, headers: list[tuple[str, str]], body: bytes) -> tuple[int, list, bytes]:
        try:
            return self.server.forward(self.command, self.path, headers, body)
        except (OSError, http.client.HTTPException) as e:
            _log(f"{self.command} {self.path}: backend error {type(e).__name__}: {e}")
            payload = json.dumps({"message": f"fault proxy could not reach {self.server.backend}: {e}"}).encode()
            return 502, [("Content-Type", "application/json")], payload

    def _admin(self, path: str, body: bytes) -> None:
        state = self.server.state
        if path == "/_faults" and self.command == "GET":
            return self._json(200, state.snapshot())
        if path == "/_faults" and self.command == "PUT":
            try:
                doc = json.loads(body or b"null")
            except ValueError as exc:
                return self._json(400, {"message": f"(document): invalid JSON: {exc}"})
            try:
                state.replace(doc)
            except ConfigError as exc:
                return self._json(400, {"message": str(exc)})
            if self.server.log_faults:
                _log(f"config: {json.dumps(state.config)}")
            return self._json(200, state.snapshot())
        if path == "/_faults/reset" and self.command == "POST":
            state.reset()
            return self._json(200, state.snapshot())
        return self._json(404, {"message": f"fault proxy: no admin route for {self.command} {path}"})


def start_server(backend: str, config: dict | None = None, seed: int = 0, host: str = "127.0.0.1",
                 port: int = 0, verbose: bool = False) -> tuple[FaultProxyServer, str]:
    """Start a fault proxy in a daemon thread; return (server, base URL). Stop with
    server.shutdown(). An invalid config raises ConfigError."""
    server = FaultProxyServer((host, port), backend, FaultState(config, seed), verbose=verbose)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="fault-proxy", daemon=True)
    thread.start()
    return server, server.url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fault-injecting proxy in front of moto's DynamoDB.")
    ap.add_argument("--backend", required=True, help="moto server URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--seed", type=int, default=0, help="seed of the faults' random streams")
    ap.add_argument("--config", help="initial fault config: JSON, or @FILE (default: no faults)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request line")
    args = ap.parse_args(argv)

    try:
        config = None
        if args.config:
            text = open(args.config[1:], encoding="utf-8").read() if args.config.startswith("@") else args.config
            config = json.loads(text)
        state = FaultState(config, args.seed)
        server = FaultProxyServer((args.host, args.port), args.backend, state, verbose=args.verbose, log_faults=True)
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"fault proxy: {exc}", file=sys.stderr)
        return 2
    return serve_until_stopped(server, args.port_file, f"fault proxy listening on {server.url}", poll_interval=0.5)


if __name__ == "__main__":
    sys.exit(main())
