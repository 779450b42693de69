"""Runtime shim for the local stack (stdlib only): what the Lambda service does around a
function process that `cargo lambda watch` does not.

cargo lambda watch (1.9.2) starts a function as `cargo run --bin NAME` and serves it the
Lambda Runtime API, but:
  * it answers every `GET …/invocation/next` with `Lambda-Runtime-Deadline-Ms: 600000`
    — a fixed number, i.e. 1970-01-01T00:10:00Z — so every deadline is in the past;
  * it gives each invocation a request id of its own (a fresh UUID per poll); an
    invoker cannot choose it, so a retry of an async invoke would get a new one;
  * it never times an invocation out;
  * when a function process dies (SIGKILL, OOM, panic=abort), watch only logs
    "command killed": the instance stays in its pool, so it starts no replacement
    until its pool is full of dead ones, and the invocation that was running never
    gets an answer — the invoker waits forever.

The stack makes this shim cargo's target runner for watch's `cargo run`
(CARGO_TARGET_<HOST_TRIPLE>_RUNNER), so each function instance watch starts is
    python -m infra.runtime_shim --config DIR/lambda-config.json -- target/debug/NAME
The shim serves the Runtime API to the function itself, on a loopback port of its own
(the function's AWS_LAMBDA_RUNTIME_API), and relays it to watch's, so that:
  * `Lambda-Runtime-Deadline-Ms` is now + the function's configured timeout
    (`timeout_s` in the config, per function, default 900) when the invocation is
    handed to the function;
  * the request id is the one the invoke proxy chose (infra/invoke_proxy.py passes it
    in Lambda-Runtime-Cognito-Identity, which watch relays; the shim removes it), so
    a retry carries the original's id, as in Lambda; the id is mapped back to watch's
    when the function posts its response or error;
  * `Lambda-Runtime-Invoked-Function-Arn` is a real-looking ARN of the function;
  * an invocation still running at its deadline gets its process SIGKILLed, as Lambda
    does, and is answered as the error `Sandbox.Timedout`;
  * when the function process dies during an invocation, that invocation is answered
    as the error `Runtime.ExitError` ("Runtime exited with error: signal: killed"),
    which the invoke proxy counts as a crash and retries;
  * a dead function process is replaced at once by a fresh one (same binary, same
    environment): watch keeps seeing one live instance — this shim — so it never
    wedges. An invocation watch handed out while no process was alive waits for the
    next one. A process that keeps dying without an invocation is restarted with a
    growing delay (up to RESTART_BACKOFF_MAX_S);
  * the shim talks to watch on one kept-alive connection, as Lambda's runtime clients do:
    a function's own client (lambda_runtime's pool) now and then closes the connection
    that carried a large response, and watch then answers the invoker with its own 500
    (see Shim.upstream).
With "shim_state_dir" in the config, each shim keeps a JSON file there,
FUNCTION-SHIMPID.json, saying what its function process is doing (written atomically on
every change): {"function", "shim_pid", "pid" (the live process, or null), "current"
(the invocation it runs: {"request_id", "payload" (the event, parsed when JSON), "since"}
or null), "deaths" (the last few processes that died: {"pid", "how", "request_id",
"at"})}. The chaos suite (tests/chaos) reads them to SIGKILL the process that runs a
given run, as a crash would, and to confirm what the kill hit.
A function whose entry in the config says "runtime_shim": false is exec'd bare.
The shim exits when watch's Runtime API goes away, and passes SIGTERM/SIGINT on to the
function (then exits with it), so watch's own stop and restart work as before.
Bodies are relayed buffered (no response streaming; neither function streams).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .invoke_proxy import request_id_from_marker
from .serve import read_body

DEFAULT_TIMEOUT_S = 900.0
DEATHS_KEPT = 20  # dead processes remembered in the state file
RESTART_BACKOFF_MAX_S = 5.0
# A process that ran at least this long before it died is restarted at once.
HEALTHY_RUN_S = 2.0
STOP_GRACE_S = 3.0
POST_LINGER_S = 10.0  # see Shim.upstream
NEXT_PATH = "/2018-06-01/runtime/invocation/next"
INVOCATION_PREFIX = "/2018-06-01/runtime/invocation/"


def _log(msg: str) -> None:
    ts = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    sys.stderr.write(f"{ts} runtime-shim[{os.getpid()}] {msg}\n")
    sys.stderr.flush()



def function_timeout(config: dict, function: str) -> float:
    """The function's timeout_s from a lambda-config.json (invoke_proxy's format)."""
    per = (config.get("functions") or {}).get(function) or {}
    default = (config.get("default") or {}).get("timeout_s", DEFAULT_TIMEOUT_S)
    return float(per.get("timeout_s", default))


class Invocation:
    def __init__(self, watch_id: str, request_id: str, headers: list[tuple[str, str]], body: bytes):
        self.watch_id = watch_id
        self.request_id = request_id
        self.headers = headers
        self.body = body
        self.deadline = 0.0  # wall clock, s
        self.since = 0.0  # wall clock, s: when the function took it
        self.generation = 0


class Shim:
    def __init__(self, upstream: str, function: str, timeout_s: float, command: list[str],
                 region: str = "us-east-1", account: str = "123456789012", state_dir: str | None = None):
        if "://" not in upstream:
            upstream = "http://" + upstream
        u = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.up_prefix = u.path.rstrip("/")
        self.function = function
        self.timeout_s = timeout_s
        self.command = command
        self.arn = f"arn:aws:lambda:{region}:{account}:function:{function}"
        self.cond = threading.Condition()
        self.queue: deque[Invocation] = deque()  # fetched from watch, not yet handed out
        self.polling = False
        self.current: Invocation | None = None
        self.ids: dict[str, str] = {}  # request id the function sees -> watch's
        self.generation = 0
        self.child: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.upstream_gone = False
        self.kept: http.client.HTTPConnection | None = None  # see upstream
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.state_file = None
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            self.state_file = os.path.join(state_dir, f"{function}-{os.getpid()}.json")
        self.deaths: deque[dict] = deque(maxlen=DEATHS_KEPT)

    # -- the state file (see the module docstring) ----------------------------------------
    def write_state(self) -> None:
        """Called with self.cond held (or before other threads start)."""
        if not self.state_file:
            return
        child = self.child
        inv = self.current
        current = None
        if inv is not None:
            try:
                payload = json.loads(inv.body or b"null")
            except ValueError:
                payload = inv.body.decode("utf-8", "replace")[:1000]
            current = {"request_id": inv.request_id, "payload": payload, "since": inv.since}
        state = {"function": self.function, "shim_pid": os.getpid(),
                 "pid": child.pid if child is not None and child.poll() is None else None,
                 "current": current, "deaths": list(self.deaths)}
        tmp = f"{self.state_file}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, self.state_file)
        except OSError as e:
            _log(f"could not write {self.state_file}: {e}")

    def remove_state(self) -> None:
        if self.state_file:
            try:
                os.unlink(self.state_file)
            except OSError:
                pass

    # -- upstream (watch's Runtime API) ----------------------------------------------------
    def upstream(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                 timeout: float | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request to watch's Runtime API, on the shim's kept connection when it is free.

        Why one kept connection, as Lambda's own runtime clients keep theirs: watch answers a
        response or error POST at once and reads its body afterwards, for the invoker. A body
        longer than hyper's first read (about 32 KB: the run view's page is 52 KB) is read to
        its end after that answer went out, and hyper then leaves it open until the next
        request arrives on the connection. If the connection closes instead, the body ends in
        an "incomplete message" error and watch answers the invoker with its own 500 (traced
        with strace: every such close within a few ms was a 500; every reuse for the next
        /next was fine; a close 10 s later was a 10 s hang, then the 500). The function's next
        request after a POST is its /next, which this connection then carries. A request made
        while it is busy (a timeout reported while a poll is out) gets a connection of its
        own, closed only POST_LINGER_S later."""
        with self.cond:
            conn, self.kept = self.kept, None
        kept = conn is not None
        if conn is None:
            conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=timeout)
        for attempt in (1, 2):
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.putrequest(method, self.up_prefix + path, skip_accept_encoding=True)
                for k, v in headers:
                    if k.lower() not in ("host", "content-length", "transfer-encoding", "connection"):
                        conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                out = resp.status, resp.getheaders(), resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if not kept or attempt == 2:
                    raise
                # watch closed the kept connection while it was idle: nothing was processed.
                conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=timeout)
            except BaseException:
                conn.close()
                raise
        if resp.will_close:
            conn.close()
            return out
        with self.cond:
            if self.kept is None:
                self.kept, conn = conn, None
        if conn is not None:
            t = threading.Timer(POST_LINGER_S, conn.close)
            t.daemon = True
            t.start()
        return out

    def _poll(self) -> None:
        """One long poll of watch's /next; the invocation goes to the queue."""
        failures = 0
        while not self.stopping.is_set():
            try:
                status, headers, body = self.upstream("GET", NEXT_PATH, [], b"")
            except OSError as e:
                failures += 1
                if failures >= 3:
                    _log(f"watch's runtime API is gone ({e}); exiting")
                    with self.cond:
                        self.upstream_gone = True
                        self.polling = False
                        self.cond.notify_all()
                    self.stopping.set()
                    return
                time.sleep(0.2)
                continue
            failures = 0
            if status != 200:
                time.sleep(0.05)
                continue
            h = {k.lower(): v for k, v in headers}
            watch_id = h.get("lambda-runtime-aws-request-id", "")
            marker = request_id_from_marker(h.get("lambda-runtime-cognito-identity"))
            keep = [(k, v) for k, v in headers
                    if k.lower() not in ("lambda-runtime-aws-request-id", "lambda-runtime-deadline-ms",
                                         "lambda-runtime-invoked-function-arn", "content-length",
                                         "transfer-encoding", "connection", "date")
                    and not (marker and k.lower() == "lambda-runtime-cognito-identity")]
            inv = Invocation(watch_id, marker or watch_id, keep, body)
            with self.cond:
                self.queue.append(inv)
                self.polling = False
                self.cond.notify_all()
            return

    # -- the function's side ---------------------------------------------------------------
    def next_invocation(self) -> Invocation | None:
        """Block until an invocation is there for the live process (None: shutting down)."""
        with self.cond:
            generation = self.generation
            while True:
                if self.stopping.is_set() or self.upstream_gone:
                    return None
                if generation != self.generation:  # the process that asked has died
                    return None
                if self.queue:
                    inv = self.queue.popleft()
                    inv.since = time.time()
                    inv.deadline = inv.since + self.timeout_s
                    inv.generation = generation
                    self.current = inv
                    self.ids[inv.request_id] = inv.watch_id
                    self.write_state()
                    return inv
                if not self.polling:
                    self.polling = True
                    threading.Thread(target=self._poll, name="poll-next", daemon=True).start()
                self.cond.wait(0.5)

    def give_back(self, inv: Invocation) -> None:
        """The process could not take inv (its connection broke): keep it for the next one."""
        with self.cond:
            if self.current is inv:
                self.current = None
                self.ids.pop(inv.request_id, None)
                self.queue.appendleft(inv)
                self.write_state()
                self.cond.notify_all()

    def finished(self, request_id: str) -> str:
        """The function answered request_id; watch's id for it."""
        with self.cond:
            watch_id = self.ids.pop(request_id, request_id)
            if self.current is not None and self.current.request_id == request_id:
                self.current = None
                self.write_state()
            return watch_id

    def report_error(self, inv: Invocation, error_type: str, message: str) -> None:
        body = json.dumps({"errorType": error_type, "errorMessage": message}).encode()
        try:
            self.upstream("POST", f"{INVOCATION_PREFIX}{inv.watch_id}/error",
                          [("Content-Type", "application/json"), ("Lambda-Runtime-Function-Error-Type", error_type)],
                          body, timeout=10)
        except OSError as e:
            _log(f"could not report {error_type} of {inv.request_id} to watch: {e}")

    # -- the process -------------------------------------------------------------------------
    def child_env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("CARGO_TARGET_") and k.endswith("_RUNNER"))}
        env["AWS_LAMBDA_RUNTIME_API"] = f"http://127.0.0.1:{self.server.server_address[1]}"
        return env

    def run(self) -> int:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                         name="runtime-api").start()
        backoff = 0.0
        rc = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            with self.cond:
                self.generation += 1
                self.child = subprocess.Popen(self.command, env=self.child_env())
                self.write_state()
                self.cond.notify_all()
            _log(f"{self.function}: process {self.child.pid} started (timeout {self.timeout_s:g}s)")
            timed_out = None
            stop_at = None
            while True:
                try:
                    rc = self.child.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.stopping.is_set():
                    if stop_at is None:
                        stop_at = time.monotonic()
                    elif time.monotonic() - stop_at > STOP_GRACE_S:
                        self.child.kill()
                    continue
                with self.cond:
                    inv = self.current
                if inv is not None and timed_out is None and time.time() >= inv.deadline:
                    timed_out = inv
                    _log(f"{self.function}: {inv.request_id} still running at its {self.timeout_s:g}s timeout; "
                         f"killing process {self.child.pid}")
                    self.child.kill()
            how = f"signal: {_signal_name(-rc)}" if rc < 0 else f"exit status {rc}"
            with self.cond:
                self.generation += 1  # a /next of the dead process must not take an invocation
                inv, self.current = self.current, None
                if inv is not None:
                    self.ids.pop(inv.request_id, None)
                self.deaths.append({"pid": self.child.pid, "how": how, "at": time.time(),
                                    "request_id": inv.request_id if inv is not None else None})
                self.write_state()
                self.cond.notify_all()
            if self.stopping.is_set():
                break
            if inv is not None:
                if timed_out is inv:
                    self.report_error(inv, "Sandbox.Timedout",
                                      f"RequestId: {inv.request_id} Error: Task timed out after {self.timeout_s:.2f} seconds")
                else:
                    self.report_error(inv, "Runtime.ExitError",
                                      f"RequestId: {inv.request_id} Error: Runtime exited with error: {how}")
            _log(f"{self.function}: process {self.child.pid} died ({how})"
                 + (f" during {inv.request_id}" if inv else "") + "; starting a fresh one")
            if time.monotonic() - started >= HEALTHY_RUN_S or inv is not None:
                backoff = 0.0
            else:
                backoff = min(RESTART_BACKOFF_MAX_S, max(0.2, backoff * 2))
                self.stopping.wait(backoff)
        self.server.shutdown()
        self.remove_state()
        return 128 - rc if rc < 0 else rc

    def stop(self, sig: int) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
            child = self.child
        if child and child.poll() is None:
            try:
                child.send_signal(sig)
            except ProcessLookupError:
                pass


def _signal_name(n: int) -> str:
    try:
        return {signal.SIGKILL: "killed", signal.SIGSEGV: "segmentation fault",
                signal.SIGABRT: "aborted", signal.SIGTERM: "terminated"}.get(n) or signal.Signals(n).name
    except ValueError:
        return str(n)


def _handler(shim: Shim):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path != NEXT_PATH:
                return self._relay(b"")
            inv = shim.next_invocation()
            if inv is None:
                self.close_connection = True
                return self._send(503, [], b'{"errorMessage":"runtime shim stopping"}')
            headers = inv.headers + [
                ("Lambda-Runtime-Aws-Request-Id", inv.request_id),
                ("Lambda-Runtime-Deadline-Ms", str(int(inv.deadline * 1000))),
                ("Lambda-Runtime-Invoked-Function-Arn", shim.arn),
            ]
            try:
                self._send(200, headers, inv.body)
                self.wfile.flush()
            except OSError:
                shim.give_back(inv)

        def do_POST(self):
            body = read_body(self)
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith(INVOCATION_PREFIX) and path.rsplit("/", 1)[-1] in ("response", "error"):
                request_id, what = path[len(INVOCATION_PREFIX):].rsplit("/", 1)
                watch_id = shim.finished(request_id)
                return self._relay(body, f"{INVOCATION_PREFIX}{watch_id}/{what}")
            return self._relay(body)

        do_PUT = do_POST

        def _relay(self, body: bytes, path: str | None = None) -> None:
            try:
                status, headers, data = shim.upstream(self.command, path or self.path, list(self.headers.items()), body)
            except OSError as e:
                return self._send(502, [], json.dumps({"errorMessage": f"watch unreachable: {e}"}).encode())
            self._send(status, headers, data)

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Lambda runtime shim (cargo target runner for cargo lambda watch)")
    ap.add_argument("--config", help="lambda-config.json (per-function timeout_s)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="[--] BINARY ARGS…")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no function binary given")
    upstream = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME") or os.path.basename(command[0])
    config = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
    shimmed = ((config.get("functions") or {}).get(function) or {}).get("runtime_shim", True)
    if not upstream or not shimmed:  # not started by watch, or configured to run bare
        env = {k: v for k, v in os.environ.items() if not (k.startswith("CARGO_TARGET_") and k.endswith("_RUNNER"))}
        os.execve(command[0], command, env)
    shim = Shim(upstream, function, function_timeout(config, function), command,
                region=os.environ.get("AWS_REGION") or config.get("region") or "us-east-1",
                state_dir=config.get("shim_state_dir"))

    def on_signal(signum, frame):
        shim.stop(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    return shim.run()


if __name__ == "__main__":
    sys.exit(main())
