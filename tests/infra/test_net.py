"""infra.net.http: a GET that cargo lambda watch fails itself is sent again; nothing else is."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra.net import WATCH_FAULT_TYPE, http

WATCH_FAULT = {"type": WATCH_FAULT_TYPE, "status": 500, "title": "Internal Server Error"}
OURS = {"type": "urn:chainrun:problem:internal", "status": 500, "title": "Internal error"}


class _Handler(BaseHTTPRequestHandler):
    # path → answers still to give before 200, and how many requests came.
    faults: dict[str, list] = {}
    seen: dict[str, int] = {}

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass

    def _answer(self):
        self.seen[self.path] = self.seen.get(self.path, 0) + 1
        queue = self.faults.get(self.path, [])
        status, body = (500, queue.pop(0)) if queue else (200, {"ok": True})
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _answer
    do_POST = _answer


@pytest.fixture
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Handler.faults, _Handler.seen = {}, {}
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_get_the_emulator_fails_itself_is_sent_again_and_noted(site, capsys):
    _Handler.faults["/a"] = [WATCH_FAULT, WATCH_FAULT]
    assert http("GET", site + "/a")[0] == 200
    assert _Handler.seen["/a"] == 3
    assert capsys.readouterr().err.count("cargo lambda watch's own 500") == 2


def test_it_gives_up_after_three_tries_and_returns_the_fault(site):
    _Handler.faults["/b"] = [WATCH_FAULT] * 5
    status, _, body = http("GET", site + "/b")
    assert (status, body["type"], _Handler.seen["/b"]) == (500, WATCH_FAULT_TYPE, 3)


def test_a_functions_own_500_and_any_post_are_returned_as_they_came(site):
    _Handler.faults["/ours"] = [OURS]
    assert http("GET", site + "/ours")[:1] == (500,) and _Handler.seen["/ours"] == 1
    _Handler.faults["/post"] = [WATCH_FAULT]
    assert http("POST", site + "/post", body={})[0] == 500 and _Handler.seen["/post"] == 1
