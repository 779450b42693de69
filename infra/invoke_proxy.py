"""Async-invoke proxy for the local stack (stdlib only): Lambda's asynchronous invocation
in front of `cargo lambda watch`.

`cargo lambda watch` serves the Lambda Invoke API, but it runs every invocation
synchronously, `X-Amz-Invocation-Type: Event` included, and never retries. In AWS an
Event invoke is queued, answered with 202 at once, delivered at least once, retried on
failure and finally sent to the function's on-failure destination. This proxy sits
between the functions' Lambda client (AWS_ENDPOINT_URL_LAMBDA) and the watch server and
does that:

* `POST /2015-03-31/functions/{name}/invocations` with `X-Amz-Invocation-Type: Event`
  -> 202 with an empty body and `x-amzn-RequestId` at once; the request (path, query,
  body, headers) is then delivered to the backend as `RequestResponse` in a background
  thread. An attempt fails on a function error (watch's 500 + `{"errorType",
  "errorMessage"}`, or `X-Amz-Function-Error`), any other non-2xx answer, a dropped or
  refused connection, or no answer within the function's timeout + TIMEOUT_GRACE_S. The
  runtime shim (infra/runtime_shim.py) reports a function process that died during an
  invocation as `Runtime.ExitError` (counted as a crash) and one it killed at its
  timeout as `Sandbox.Timedout` (counted as a timeout).
* Retries follow the function's async config, as in AWS: up to MaximumRetryAttempts
  (0–2, default 2) more attempts, the n-th after retry_delays[n-1] seconds (default 1
  and 2 — AWS waits about 1 and 2 minutes), while the event is younger than
  MaximumEventAgeInSeconds (default 21600). Every attempt carries the same request id.
* When the retries are exhausted (condition `RetriesExhausted`) or the next attempt
  would start past the maximum event age (`EventAgeExceeded`), the invocation record
  goes to the function's on-failure destination, an SQS queue URL, in AWS's shape:
      {"version": "1.0", "timestamp": "2019-11-14T18:16:05.568Z",
       "requestContext": {"requestId", "functionArn", "condition", "approximateInvokeCount"},
       "requestPayload": <the event>,
       "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
       "responsePayload": <the last error, e.g. {"errorType", "errorMessage"}>}
  Without a destination the event is dropped (logged), as AWS does.
* any other request -> forwarded synchronously; status, headers and body relayed.
  One translation, to match AWS: watch answers a function error of an invoke with
  500 + `{"errorType","errorMessage"}`; AWS answers 200 + `X-Amz-Function-Error:
  Unhandled` (an SDK would otherwise retry the 500 as a service error). The proxy
  relays the AWS form.
* Request ids: watch gives each invocation a fresh id of its own and lets the caller
  set none. The proxy picks the id (answered as `x-amzn-RequestId`) and passes it in a
  `Lambda-Runtime-Cognito-Identity` header, which watch relays to the function's
  runtime API; the runtime shim takes it out again and hands the function that id
  (context.request_id). Without the shim the function sees watch's id and a harmless
  cognito identity {"cognitoIdentityId": "chainrun-local-invoke:<id>", …}.
* `GET /_proxy/health` -> `{"ok": true, "backend": ...}`
* `GET /_proxy/stats` (alias `/_proxy/inflight`) -> counters: `inflight` (Event invokes
  not settled yet, waiting retries included; tests poll it to wait for quiescence),
  `accepted`, `completed` (settled), `succeeded`, `failed` (settled without success),
  `attempts`, `retries`, `function_errors`, `crashes`, `timeouts`, `connection_errors`,
  `retries_exhausted`, `event_age_exceeded`, `dead_lettered`, `dead_letter_failures`,
  `dropped`, `lost`; and `event_sources` {name: counters} when it runs any (below).
* Lost dispatches (the chaos suite): `POST /_proxy/drops` with
  `{"function": NAME, "match": {...}, "count": N}` makes the next N Event invokes of that
  function whose JSON payload holds every key/value of `match` (default {}: any) be
  answered 202 as usual and then never delivered, as if the invoker had died before
  the event was queued (counted as `lost`). `GET /_proxy/drops` -> `{"drops": [rules
  with what is left of their count], "lost": N}`; `DELETE /_proxy/drops` removes them.
* Event sources (infra/event_sources.py), from the config's "event_sources" section:
  SQS event source mappings (poll a queue, invoke a function synchronously with Lambda's
  SQS event, delete what succeeded) and schedules (invoke a function asynchronously
  every N seconds), both through this proxy's own Invoke API.

Function async config (per function, else the default): `timeout_s` (900),
`maximum_retry_attempts` (2), `maximum_event_age_s` (21600), `on_failure` (SQS queue
URL or null), `max_concurrency` (deliveries in flight at once; the others wait their
turn in the proxy, as in Lambda's async queue; default no limit). Given as a JSON file (`--config`, the stack writes one):
    {"region": "us-east-1", "retry_delays": [1, 2],
     "default": {...}, "functions": {"chainrun-runner": {"timeout_s": 900, "on_failure": URL}},
     "event_sources": {"sqs": [...], "schedules": [...]}}
The runtime shim (infra/runtime_shim.py) reads the same file for each function's timeout_s.

CLI:
    python -m infra.invoke_proxy --backend http://127.0.0.1:9000 [--config FILE] \
        [--retry-delays 1,2] [--host 127.0.0.1] [--port 0] [--port-file PATH]
prints `invoke proxy listening on http://HOST:PORT` once it accepts connections.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import event_sources
from .serve import read_body, serve_until_stopped
from .sqs import DEFAULT_ACCOUNT, Sqs

INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")

# Hop-by-hop headers (RFC 9110 §7.6.1) and ones we recompute.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}

MAX_TIMEOUT_S = 900.0  # Lambda's maximum function timeout
# How long past a function's timeout the proxy waits for an answer before it gives the
# attempt up as timed out itself (the runtime shim normally reports the timeout first).
TIMEOUT_GRACE_S = 10.0
DEFAULT_RETRY_DELAYS = (1.0, 2.0)
# The header watch relays from an invoke request to the function's runtime API
# unchanged (as Lambda-Runtime-Cognito-Identity); it carries the proxy's request id.
REQUEST_ID_HEADER = "Lambda-Runtime-Cognito-Identity"
REQUEST_ID_POOL = "chainrun-local-invoke"


def request_id_marker(request_id: str) -> str:
    """The header value that carries a request id to the runtime shim. It is a valid
    CognitoIdentity, so a function that gets it without the shim still parses it."""
    return json.dumps({"cognitoIdentityId": f"{REQUEST_ID_POOL}:{request_id}",
                       "cognitoIdentityPoolId": REQUEST_ID_POOL}, separators=(",", ":"))


def request_id_from_marker(value: str | None) -> str | None:
    if not value:
        return None
    try:
        obj = json.loads(value)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("cognitoIdentityPoolId") != REQUEST_ID_POOL:
        return None
    ident = str(obj.get("cognitoIdentityId") or "")
    return ident.split(":", 1)[1] if ":" in ident else None


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """A function's timeout and asynchronous invocation config (AWS's
    EventInvokeConfig: MaximumRetryAttempts, MaximumEventAgeInSeconds, OnFailure)."""
    timeout_s: float = MAX_TIMEOUT_S
    maximum_retry_attempts: int = 2
    maximum_event_age_s: float = 21600.0
    on_failure: str | None = None  # SQS queue URL
    runtime_shim: bool = True  # read by infra/runtime_shim.py: False runs the function bare
    # Event deliveries of this function in flight at once (None: no limit). Lambda runs an
    # async event only when the function has concurrency to spare and keeps the rest in
    # its queue; the stack sets watch's --concurrency here, since cargo lambda watch
    # (1.9.2) wedges, every function at once, when some 200 invocations queue up in it.
    max_concurrency: int | None = None

    def __post_init__(self):
        if not 0 <= self.maximum_retry_attempts <= 2:
            raise ValueError(f"maximum_retry_attempts must be 0..2, got {self.maximum_retry_attempts}")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT_S:.0f}], got {self.timeout_s}")
        if self.maximum_event_age_s <= 0:
            raise ValueError(f"maximum_event_age_s must be positive, got {self.maximum_event_age_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")

    @classmethod
    def from_dict(cls, d: dict, base: "AsyncConfig | None" = None) -> "AsyncConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown async config keys {sorted(unknown)} (known: {sorted(known)})")
        return dataclasses.replace(base or cls(), **d)


@dataclasses.dataclass
class Attempt:
    """How one delivery attempt ended. kind: ok | function_error | crash | timeout | connection."""
    kind: str
    status: int = 0
    function_error: str | None = None
    payload: bytes = b""
    detail: str = ""


_KIND_STAT = {"function_error": "function_errors", "crash": "crashes", "timeout": "timeouts",
              "connection": "connection_errors"}
_STAT_KEYS = ("inflight", "accepted", "completed", "succeeded", "failed", "attempts", "retries",
              "function_errors", "crashes", "timeouts", "connection_errors", "retries_exhausted",
              "event_age_exceeded", "dead_lettered", "dead_letter_failures", "dropped", "lost")


def _log(msg: str) -> None:
    ts = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    sys.stderr.write(f"{ts} invoke-proxy {msg}\n")
    sys.stderr.flush()


def _iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Lambda takes a burst of invokes at once (the chaos suite sends 100 together); the
    # socketserver default backlog of 5 had the kernel reset most of such a burst.
    request_queue_size = 256

    def __init__(self, addr, backend: str, verbose: bool = False, *, functions: dict | None = None,
                 default: AsyncConfig | None = None, retry_delays=DEFAULT_RETRY_DELAYS,
                 region: str = "us-east-1", account: str = DEFAULT_ACCOUNT):
        u = urllib.parse.urlsplit(backend)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"backend must be an http:// URL, got {backend!r}")
        delays = tuple(float(d) for d in retry_delays)
        if not delays or any(d < 0 for d in delays):
            raise ValueError(f"retry_delays must be non-negative seconds, got {retry_delays!r}")
        super().__init__(addr, ProxyHandler)
        self.backend = backend.rstrip("/")
        self.backend_host = u.hostname
        self.backend_port = u.port or 80
        self.verbose = verbose
        self.default = default or AsyncConfig()
        self.functions: dict[str, AsyncConfig] = {
            name: c if isinstance(c, AsyncConfig) else AsyncConfig.from_dict(c, self.default)
            for name, c in (functions or {}).items()}
        self.retry_delays = delays
        self.region = region
        self.account = account
        self.closing = threading.Event()
        self.workers: list = []  # event sources started by main(), reported in stats()
        self._lock = threading.Condition()
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self.drops: list[dict] = []  # see "Lost dispatches" in the module docstring
        self._slots: dict[str, threading.BoundedSemaphore] = {}  # per function, see max_concurrency

    def slot(self, function: str) -> threading.BoundedSemaphore | None:
        """The semaphore bounding the function's deliveries in flight (None: unbounded)."""
        limit = self.config(function).max_concurrency
        if limit is None:
            return None
        with self._lock:
            if function not in self._slots:
                self._slots[function] = threading.BoundedSemaphore(limit)
            return self._slots[function]

    # -- lost dispatches ----------------------------------------------------
    def add_drop(self, rule) -> None:
        if not isinstance(rule, dict) or not isinstance(rule.get("function"), str):
            raise ValueError("a drop rule needs \"function\" (a function name)")
        unknown = set(rule) - {"function", "match", "count"}
        if unknown:
            raise ValueError(f"unknown drop rule keys {sorted(unknown)}")
        match = rule.get("match") or {}
        count = rule.get("count", 1)
        if not isinstance(match, dict):
            raise ValueError("match must be an object")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("count must be an integer >= 1")
        with self._lock:
            self.drops.append({"function": rule["function"], "match": match, "count": count})

    def take_drop(self, function: str, body: bytes) -> bool:
        """Whether this Event invoke is to be lost (uses up one of a rule's count)."""
        with self._lock:
            if not self.drops:
                return False
            try:
                payload = json.loads(body or b"null")
            except ValueError:
                payload = None
            for rule in self.drops:
                if rule["function"] != function:
                    continue
                if rule["match"] and not (isinstance(payload, dict)
                                          and all(payload.get(k) == v for k, v in rule["match"].items())):
                    continue
                rule["count"] -= 1
                if rule["count"] <= 0:
                    self.drops.remove(rule)
                self._stats["lost"] += 1
                return True
            return False

    def drops_state(self) -> dict:
        with self._lock:
            return {"drops": [dict(r) for r in self.drops], "lost": self._stats["lost"]}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def config(self, function: str) -> AsyncConfig:
        return self.functions.get(function, self.default)

    def function_arn(self, function: str) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{function}:$LATEST"

    def server_close(self) -> None:
        self.closing.set()  # waiting retries give up instead of delivering to a closed stack
        super().server_close()

    # -- counters ---------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] += v
            self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
        if self.workers:
            out["event_sources"] = {w.name: w.stats() for w in self.workers}
        return out

    def wait_idle(self, timeout: float) -> bool:
        """Block until no Event invoke is in flight (in-process use)."""
        return self.wait_for(lambda s: s["inflight"] == 0, timeout)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until predicate(stats) holds (in-process use); False after timeout s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self._stats):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    # -- forwarding -------------------------------------------------------
    def forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                timeout: float) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.backend_host, self.backend_port, timeout=timeout)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"{self.backend_host}:{self.backend_port}")
            for k, v in headers:
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def attempt(self, function: str, target: str, headers: list[tuple[str, str]], body: bytes,
                request_id: str) -> Attempt:
        """One synchronous delivery to the backend, classified."""
        timeout = self.config(function).timeout_s
        try:
            status, rheaders, data = self.forward("POST", target, headers, body, timeout + TIMEOUT_GRACE_S)
        except (socket.timeout, TimeoutError):
            msg = f"RequestId: {request_id} Error: Task timed out after {timeout:.2f} seconds"
            return Attempt("timeout", payload=json.dumps({"errorType": "Sandbox.Timedout", "errorMessage": msg}).encode(),
                           function_error="Unhandled", detail="no answer within the timeout")
        except ConnectionRefusedError as e:
            return Attempt("connection", detail=f"{type(e).__name__}: {e}", function_error="Unhandled",
                           payload=json.dumps({"errorType": "ServiceException",
                                               "errorMessage": f"backend unreachable: {e}"}).encode())
        except (http.client.HTTPException, OSError) as e:
            # Accepted, then the connection dropped without an answer: the process died.
            msg = f"RequestId: {request_id} Process exited before completing request"
            return Attempt("crash", payload=json.dumps({"errorMessage": msg}).encode(), function_error="Unhandled",
                           detail=f"{type(e).__name__}: {e}")
        ferr = next((v for k, v in rheaders if k.lower() == "x-amz-function-error"), None)
        err = _error_object(data)
        if 200 <= status < 300 and not ferr and err is None:
            return Attempt("ok", status=status, payload=data)
        kind = "function_error"
        etype = (err or {}).get("errorType", "")
        if etype == "Runtime.ExitError":
            kind = "crash"
        elif etype == "Sandbox.Timedout":
            kind = "timeout"
        elif err is None and not ferr:
            # not a function's answer at all (e.g. watch's 404 for an unknown function)
            kind = "connection"
        return Attempt(kind, status=status, function_error=ferr or "Unhandled", payload=data,
                       detail=f"status={status} {_snippet(data)}")

    def forward_async(self, function: str, target: str, headers: list[tuple[str, str]],
                      body: bytes, request_id: str) -> None:
        self._count(inflight=1, accepted=1)
        threading.Thread(target=self._deliver, args=(function, target, headers, body, request_id),
                         name=f"event-{request_id[:8]}", daemon=True).start()

    def _deliver(self, function: str, target: str, headers: list[tuple[str, str]], body: bytes,
                 request_id: str) -> None:
        """Deliver one Event invoke: attempts, retries, then the on-failure destination."""
        cfg = self.config(function)
        born = time.monotonic()
        attempts = 0
        last: Attempt | None = None
        condition = "RetriesExhausted"
        try:
            while True:
                attempts += 1
                self._count(attempts=1, retries=1 if attempts > 1 else 0)
                slot = self.slot(function)
                if slot is not None:
                    while not slot.acquire(timeout=0.5):  # queued until the function has concurrency
                        if self.closing.is_set():
                            _log(f"event {request_id} {function}: proxy closing, queued event abandoned")
                            self._count(dropped=1)
                            return
                t0 = time.monotonic()
                try:
                    last = self.attempt(function, target, headers, body, request_id)
                finally:
                    if slot is not None:
                        slot.release()
                ms = int((time.monotonic() - t0) * 1000)
                if last.kind == "ok":
                    _log(f"event {request_id} {function}: done {last.status} in {ms} ms (attempt {attempts})")
                    self._count(succeeded=1)
                    return
                self._count(**{_KIND_STAT[last.kind]: 1})
                _log(f"event {request_id} {function}: attempt {attempts} FAILED ({last.kind}) in {ms} ms: "
                     f"{last.detail or _snippet(last.payload)}")
                retries_done = attempts - 1
                if retries_done >= cfg.maximum_retry_attempts:
                    condition = "RetriesExhausted"
                    break
                delay = self.retry_delays[min(retries_done, len(self.retry_delays) - 1)]
                if time.monotonic() - born + delay > cfg.maximum_event_age_s:
                    condition = "EventAgeExceeded"
                    break
                _log(f"event {request_id} {function}: retry {retries_done + 1} of "
                     f"{cfg.maximum_retry_attempts} in {delay:g}s")
                if self.closing.wait(delay):
                    _log(f"event {request_id} {function}: proxy closing, retry abandoned")
                    self._count(dropped=1)
                    return
            self._count(**{"retries_exhausted" if condition == "RetriesExhausted" else "event_age_exceeded": 1})
            self._dead_letter(function, cfg, request_id, body, attempts, condition, last)
        except Exception as e:  # noqa: BLE001 - a delivery thread never raises
            _log(f"event {request_id} {function}: delivery failed: {type(e).__name__}: {e}")
            self._count(dropped=1)
        finally:
            ok = last is not None and last.kind == "ok"
            self._count(inflight=-1, completed=1, failed=0 if ok else 1)

    def invocation_record(self, function: str, request_id: str, body: bytes, attempts: int, condition: str,
                          last: Attempt | None) -> dict:
        """The record AWS sends to an asynchronous invocation's on-failure destination."""
        record = {
            "version": "1.0",
            "timestamp": _iso_now(),
            "requestContext": {"requestId": request_id, "functionArn": self.function_arn(function),
                               "condition": condition, "approximateInvokeCount": attempts},
            "requestPayload": _json_or_text(body),
        }
        if last is not None:
            record["responseContext"] = {"statusCode": 200, "executedVersion": "$LATEST",
                                         "functionError": last.function_error or "Unhandled"}
            record["responsePayload"] = _json_or_text(last.payload)
        return record

    def _dead_letter(self, function: str, cfg: AsyncConfig, request_id: str, body: bytes, attempts: int,
                     condition: str, last: Attempt | None) -> None:
        if not cfg.on_failure:
            _log(f"event {request_id} {function}: {condition} after {attempts} attempt(s); "
                 f"no on-failure destination, dropped")
            self._count(dropped=1)
            return
        record = self.invocation_record(function, request_id, body, attempts, condition, last)
        try:
            Sqs.for_queue(cfg.on_failure, self.region).send(cfg.on_failure, json.dumps(record))
        except Exception as e:  # noqa: BLE001
            _log(f"event {request_id} {function}: {condition}; sending to {cfg.on_failure} FAILED: {e}")
            self._count(dead_letter_failures=1)
            return
        _log(f"event {request_id} {function}: {condition} after {attempts} attempt(s); record sent to "
             f"{cfg.on_failure}")
        self._count(dead_lettered=1)


def _error_object(data: bytes) -> dict | None:
    # cargo lambda watch relays a function error as a JSON body {"errorType","errorMessage"}.
    if not data or not data.lstrip().startswith(b"{"):
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "errorType" in obj and "errorMessage" in obj else None


def _looks_like_error(data: bytes) -> bool:
    return _error_object(data) is not None


def _json_or_text(data: bytes):
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return data.decode("utf-8", "replace")


def _snippet(data: bytes, n: int = 500) -> str:
    s = data[:n].decode("utf-8", "replace")
    return s + ("…" if len(data) > n else "")


class ProxyHandler(BaseHTTPRequestHandler):
    server: ProxyServer
    protocol_version = "HTTP/1.1"
    server_version = "chainrun-invoke-proxy/1"

    def log_message(self, fmt, *args):  # quiet by default; outcomes are logged explicitly
        if self.server.verbose:
            _log(fmt % args)

    def _send(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
              content_type: str | None = None) -> None:
        self.send_response(status)
        for k, v in headers or []:
            self.send_header(k, v)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), content_type="application/json")

    def _handle(self) -> None:
        body = read_body(self)
        path = urllib.parse.urlsplit(self.path).path

        if path == "/_proxy/health":
            return self._json(200, {"ok": True, "backend": self.server.backend})
        if path in ("/_proxy/inflight", "/_proxy/stats"):
            return self._json(200, self.server.stats())
        if path == "/_proxy/drops":
            if self.command == "POST":
                try:
                    self.server.add_drop(json.loads(body or b"null"))
                except ValueError as e:
                    return self._json(400, {"message": str(e)})
            elif self.command == "DELETE":
                with self.server._lock:
                    self.server.drops.clear()
            return self._json(200, self.server.drops_state())

        fwd_headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP]
        m = INVOKE_PATH.match(path)
        request_id = None
        if m and self.command == "POST":
            request_id = str(uuid.uuid4())
            fwd_headers = [(k, v) for k, v in fwd_headers if k.lower() != REQUEST_ID_HEADER.lower()]
            fwd_headers.append((REQUEST_ID_HEADER, request_id_marker(request_id)))
        inv_type = (self.headers.get("X-Amz-Invocation-Type") or "").strip().lower()
        if request_id and inv_type == "event":
            fwd = [(k, v) for k, v in fwd_headers if k.lower() != "x-amz-invocation-type"]
            fwd.append(("X-Amz-Invocation-Type", "RequestResponse"))
            function = urllib.parse.unquote(m.group("name"))
            if self.server.take_drop(function, body):
                _log(f"event {request_id} {function}: accepted ({len(body)} bytes) and LOST (a drop rule)")
                return self._send(202, b"", headers=[("x-amzn-RequestId", request_id)])
            _log(f"event {request_id} {function}: accepted ({len(body)} bytes), delivering in background")
            self.server.forward_async(function, self.path, fwd, body, request_id)
            return self._send(202, b"", headers=[("x-amzn-RequestId", request_id)])

        t0 = time.monotonic()
        timeout = MAX_TIMEOUT_S + TIMEOUT_GRACE_S
        if m:
            timeout = self.server.config(urllib.parse.unquote(m.group("name"))).timeout_s + TIMEOUT_GRACE_S
        try:
            status, rheaders, data = self.server.forward(self.command, self.path, fwd_headers, body, timeout)
        except Exception as e:  # noqa: BLE001
            _log(f"sync {self.command} {self.path}: backend error {type(e).__name__}: {e}")
            return self._json(502, {"title": "Bad Gateway",
                                    "detail": f"invoke proxy could not reach {self.server.backend}: {e}"})
        relay = [(k, v) for k, v in rheaders if k.lower() not in _HOP]
        if m:
            ms = int((time.monotonic() - t0) * 1000)
            _log(f"sync {request_id} {urllib.parse.unquote(m.group('name'))}: {status} in {ms} ms")
            relay = [(k, v) for k, v in relay if k.lower() != "x-amzn-requestid"]
            if request_id:
                relay.append(("x-amzn-RequestId", request_id))
            if status == 500 and _looks_like_error(data):
                # AWS answers a function error with 200 + X-Amz-Function-Error; cargo lambda
                # watch answers 500, which SDK clients would treat as a retryable service error.
                status = 200
                relay = [(k, v) for k, v in relay if k.lower() != "x-amz-function-error"]
                relay.append(("X-Amz-Function-Error", "Unhandled"))
        self._send(status, data, headers=relay)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


def load_config(path: str | None) -> dict:
    """The proxy's keyword arguments from a JSON config file (see the module docstring)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    default = AsyncConfig.from_dict(raw.get("default") or {})
    out = {"default": default,
           "functions": {n: AsyncConfig.from_dict(c, default) for n, c in (raw.get("functions") or {}).items()}}
    if raw.get("retry_delays") is not None:
        out["retry_delays"] = tuple(raw["retry_delays"])
    if raw.get("region"):
        out["region"] = raw["region"]
    if raw.get("event_sources"):
        out["event_sources"] = raw["event_sources"]
    return out


def serve(host: str = "127.0.0.1", port: int = 0, backend: str = "http://127.0.0.1:9000",
          verbose: bool = False, **config) -> ProxyServer:
    """Create a ProxyServer bound to host:port (0 = free port); caller runs serve_forever().
    config: functions={name: AsyncConfig | dict}, default=AsyncConfig, retry_delays, region."""
    return ProxyServer((host, port), backend, verbose=verbose, **config)


def start_in_thread(backend: str, host: str = "127.0.0.1", port: int = 0,
                    verbose: bool = False, **config) -> tuple[ProxyServer, threading.Thread]:
    """Start a proxy in a daemon thread (for tests). Stop with srv.shutdown(); srv.server_close()."""
    srv = serve(host, port, backend, verbose, **config)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="invoke-proxy",
                         daemon=True)
    t.start()
    return srv, t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, help="cargo lambda watch URL, e.g. http://127.0.0.1:9000")
    ap.add_argument("--config", help="JSON file: region, retry_delays, default and per-function async config")
    ap.add_argument("--retry-delays", help="seconds before the 1st, 2nd retry, e.g. 1,2 (overrides --config)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request line")
    args = ap.parse_args(argv)

    config = load_config(args.config)
    if args.retry_delays:
        config["retry_delays"] = tuple(float(x) for x in args.retry_delays.split(","))
    sources = config.pop("event_sources", None) or {}
    srv = serve(args.host, args.port, args.backend, args.verbose, **config)
    # The event sources call the Invoke API this process serves, as AWS's services call Lambda's.
    srv.workers = event_sources.from_config(sources, srv.url, srv.region)
    for w in srv.workers:
        w.start()
    try:
        return serve_until_stopped(srv, args.port_file, f"invoke proxy listening on {srv.url} -> {srv.backend}",
                                   poll_interval=0.5)
    finally:
        for w in srv.workers:
            w.stop(timeout=2)


if __name__ == "__main__":
    sys.exit(main())
