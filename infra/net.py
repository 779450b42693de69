"""Loopback networking for the local stack, its demo client and its tests: picking a
free port, one HTTP call, and waiting for something to come up.

`http` is plain urllib.request so that it also shows how to call the API with nothing
but the standard library. It never raises on a 4xx/5xx answer (callers look at the
status); a refused or timed-out connection raises OSError (URLError is one).
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now. Another process may take it before the
    caller binds it, so whoever starts a server on it retries on "address in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 1.0) -> bool:
    """True if something accepts connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# The problem document `cargo lambda watch` answers with when it fails itself, before or
# after the function (its ServerError: a message between its own tasks lost): never a
# function's answer, which is chainrun's problem+json or Lambda's {"errorType", …}.
WATCH_FAULT_TYPE = "https://httpstatuses.com/500"


def is_watch_fault(status: int, parsed) -> bool:
    return status == 500 and isinstance(parsed, dict) and parsed.get("type") == WATCH_FAULT_TYPE


def http(method: str, url: str, body=None, raw=None, headers=None, timeout: float = 30.0):
    """(status, headers, parsed JSON or text) of one request.

    `body` is sent as JSON (Content-Type: application/json); `raw` (bytes or str) is sent
    verbatim instead. `headers` are added last and win. The response headers are a
    case-insensitive email.message.Message; the body is parsed when it is JSON
    (application/json and application/problem+json alike), else returned as text.

    A GET that the local stack's `cargo lambda watch` fails itself (see is_watch_fault;
    seen now and then in CI, with nothing logged by the function) is sent again, up to
    three times in all, and each fault is noted on stderr: a GET changes nothing, and the
    fault is the emulator's, not an answer of chainrun's. A 500 from a function is
    returned as it came.
    """
    for attempt in range(1, 4):
        answer = _http_once(method, url, body, raw, headers, timeout)
        if method.upper() != "GET" or not is_watch_fault(answer[0], answer[2]) or attempt == 3:
            return answer
        print(f"net: GET {url} met cargo lambda watch's own 500 ({answer[2]}); sending it again", file=sys.stderr)
        time.sleep(0.5 * attempt)
    return answer


def _http_once(method: str, url: str, body, raw, headers, timeout: float):
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


def answers(url: str, timeout: float = 2.0) -> int | None:
    """The status a GET of url gets, or None if nothing answers."""
    try:
        return http("GET", url, timeout=timeout)[0]
    except OSError:
        return None


def wait_until(check, timeout: float, interval: float = 0.05):
    """Call check() until it returns something truthy and return that; None once
    timeout seconds have passed. check may raise to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
