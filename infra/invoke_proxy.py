"""Async-invoke proxy for the local stack (stdlib only).

`cargo lambda watch` serves the Lambda Invoke API, but it runs every invocation
synchronously, `X-Amz-Invocation-Type: Event` included: the caller would wait for
the whole run. In AWS an Event invoke is queued and answered with 202 at once.
This proxy sits between the functions' Lambda client (AWS_ENDPOINT_URL_LAMBDA) and
the watch server and restores that behaviour:

* `POST /2015-03-31/functions/{name}/invocations` with `X-Amz-Invocation-Type: Event`
  -> 202 with an empty body at once; the same request (path, query, body, headers)
  is forwarded to the backend as `RequestResponse` in a background thread. The
  outcome is logged; failures (connection errors, non-2xx, `X-Amz-Function-Error`)
  are logged with the start of the response body.
* any other request -> forwarded synchronously; status, headers and body relayed.
  One translation, to match AWS: watch answers a function error of an invoke with
  500 + `{"errorType","errorMessage"}`; AWS answers 200 + `X-Amz-Function-Error:
  Unhandled` (an SDK would otherwise retry the 500 as a service error). The proxy
  relays the AWS form.
* `GET /_proxy/health` -> `{"ok": true, "backend": ...}`
* `GET /_proxy/inflight` -> `{"inflight": N, "accepted": A, "completed": C, "failed": F}`
  (N = background forwards still running; tests poll it to wait for quiescence).

No retries are emulated: AWS retries a failed async invoke (bounded by the
function's async config); locally a failure is only logged.

CLI:
    python -m infra.invoke_proxy --backend http://127.0.0.1:9000 \
        [--host 127.0.0.1] [--port 0] [--port-file PATH]
prints `invoke proxy listening on http://HOST:PORT` once it accepts connections.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .serve import read_body, serve_until_stopped

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

SYNC_TIMEOUT_S = 900.0  # Lambda's maximum function timeout
ASYNC_TIMEOUT_S = 900.0


def _log(msg: str) -> None:
    ts = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    sys.stderr.write(f"{ts} invoke-proxy {msg}\n")
    sys.stderr.flush()


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, backend: str, verbose: bool = False):
        super().__init__(addr, ProxyHandler)
        u = urllib.parse.urlsplit(backend)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"backend must be an http:// URL, got {backend!r}")
        self.backend = backend.rstrip("/")
        self.backend_host = u.hostname
        self.backend_port = u.port or 80
        self.verbose = verbose
        self._lock = threading.Condition()
        self.inflight = 0
        self.accepted = 0
        self.completed = 0
        self.failed = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # -- counters ---------------------------------------------------------
    def _begin(self) -> None:
        with self._lock:
            self.inflight += 1
            self.accepted += 1

    def _end(self, ok: bool) -> None:
        with self._lock:
            self.inflight -= 1
            self.completed += 1
            if not ok:
                self.failed += 1
            self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {
                "inflight": self.inflight,
                "accepted": self.accepted,
                "completed": self.completed,
                "failed": self.failed,
            }

    def wait_idle(self, timeout: float) -> bool:
        """Block until no background forward is in flight (in-process use)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.inflight:
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

    def forward_async(self, function: str, target: str, headers: list[tuple[str, str]],
                      body: bytes, request_id: str) -> None:
        self._begin()

        def run() -> None:
            t0 = time.monotonic()
            ok = False
            try:
                status, rheaders, data = self.forward("POST", target, headers, body, ASYNC_TIMEOUT_S)
                ms = int((time.monotonic() - t0) * 1000)
                ferr = next((v for k, v in rheaders if k.lower() == "x-amz-function-error"), None)
                if 200 <= status < 300 and not ferr and not _looks_like_error(data):
                    ok = True
                    _log(f"event {request_id} {function}: done {status} in {ms} ms")
                else:
                    _log(f"event {request_id} {function}: FAILED status={status} "
                         f"function_error={ferr} in {ms} ms: {_snippet(data)}")
            except Exception as e:  # noqa: BLE001 - logged, never raised
                ms = int((time.monotonic() - t0) * 1000)
                _log(f"event {request_id} {function}: FAILED after {ms} ms: {type(e).__name__}: {e}")
            finally:
                self._end(ok)

        threading.Thread(target=run, name=f"event-{request_id[:8]}", daemon=True).start()


def _looks_like_error(data: bytes) -> bool:
    # cargo lambda watch relays a function error as a JSON body {"errorType","errorMessage"}.
    if not data or not data.lstrip().startswith(b"{"):
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and "errorType" in obj and "errorMessage" in obj


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
        if path == "/_proxy/inflight":
            return self._json(200, self.server.stats())

        fwd_headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP]
        m = INVOKE_PATH.match(path)
        inv_type = (self.headers.get("X-Amz-Invocation-Type") or "").strip().lower()
        if self.command == "POST" and m and inv_type == "event":
            request_id = str(uuid.uuid4())
            fwd = [(k, v) for k, v in fwd_headers if k.lower() != "x-amz-invocation-type"]
            fwd.append(("X-Amz-Invocation-Type", "RequestResponse"))
            function = urllib.parse.unquote(m.group("name"))
            _log(f"event {request_id} {function}: accepted ({len(body)} bytes), forwarding in background")
            self.server.forward_async(function, self.path, fwd, body, request_id)
            return self._send(202, b"", headers=[("x-amzn-RequestId", request_id)])

        t0 = time.monotonic()
        try:
            status, rheaders, data = self.server.forward(self.command, self.path, fwd_headers, body,
                                                         SYNC_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            _log(f"sync {self.command} {self.path}: backend error {type(e).__name__}: {e}")
            return self._json(502, {"title": "Bad Gateway",
                                    "detail": f"invoke proxy could not reach {self.server.backend}: {e}"})
        relay = [(k, v) for k, v in rheaders if k.lower() not in _HOP]
        if m:
            ms = int((time.monotonic() - t0) * 1000)
            _log(f"sync {urllib.parse.unquote(m.group('name'))}: {status} in {ms} ms")
            if status == 500 and _looks_like_error(data):
                # AWS answers a function error with 200 + X-Amz-Function-Error; cargo lambda
                # watch answers 500, which SDK clients would treat as a retryable service error.
                status = 200
                relay = [(k, v) for k, v in relay if k.lower() != "x-amz-function-error"]
                relay.append(("X-Amz-Function-Error", "Unhandled"))
        self._send(status, data, headers=relay)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


def serve(host: str = "127.0.0.1", port: int = 0, backend: str = "http://127.0.0.1:9000",
          verbose: bool = False) -> ProxyServer:
    """Create a ProxyServer bound to host:port (0 = free port); caller runs serve_forever()."""
    return ProxyServer((host, port), backend, verbose=verbose)


def start_in_thread(backend: str, host: str = "127.0.0.1", port: int = 0,
                    verbose: bool = False) -> tuple[ProxyServer, threading.Thread]:
    """Start a proxy in a daemon thread (for tests). Stop with srv.shutdown(); srv.server_close()."""
    srv = serve(host, port, backend, verbose)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="invoke-proxy",
                         daemon=True)
    t.start()
    return srv, t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, help="cargo lambda watch URL, e.g. http://127.0.0.1:9000")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request line")
    args = ap.parse_args(argv)

    srv = serve(args.host, args.port, args.backend, args.verbose)
    return serve_until_stopped(srv, args.port_file, f"invoke proxy listening on {srv.url} -> {srv.backend}",
                               poll_interval=0.5)

if __name__ == "__main__":
    sys.exit(main())
