"""Tests for infra/browser.py: finding (or failing to install) Chromium, and driving it.

A small page served on a loopback port stands in for chainrun's pages: it polls a JSON
endpoint with fetch and marks the body when it has what it waited for, as the run view does.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra import browser
from infra.net import LOOPBACK

PAGE = b"""<!doctype html><html><body data-state="loading"><h1>polling</h1><p id="seen"></p>
<script>
let polls = 0;
async function poll() {
  polls += 1;
  const answer = await (await fetch('/data')).json();
  document.getElementById('seen').textContent = answer.value + ' after ' + polls + ' polls';
  if (polls >= 3) { document.body.dataset.state = 'done'; return; }
  setTimeout(poll, 500);
}
poll();
</script></body></html>"""


class _Handler(BaseHTTPRequestHandler):
    # `/flaky/N`: answers 500 to the first N loads of that path, then the page.
    failures: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        status = 200
        if self.path.startswith("/flaky/"):
            seen = _Handler.failures.get(self.path, 0)
            _Handler.failures[self.path] = seen + 1
            status = 500 if seen < int(self.path.rsplit("/", 1)[1]) else 200
        page = self.path == "/" or self.path.startswith("/flaky/")
        body, kind = (PAGE, "text/html") if page else (json.dumps({"value": "forty-two"}).encode(), "application/json")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def chromium():
    try:
        return browser.ensure_chromium()
    except browser.BrowserUnavailable as e:
        pytest.fail(str(e), pytrace=False)


def test_a_page_is_waited_for_on_a_condition_then_read_and_photographed(chromium, site, tmp_path):
    with browser.Page(width=800, height=600) as page:
        page.open(site)
        page.wait_for("document.body.dataset.state === 'done'", timeout_s=20)
        assert page.evaluate("document.getElementById('seen').textContent") == "forty-two after 3 polls"
        assert 'data-state="done"' in page.dom()
        shot = page.screenshot(tmp_path / "page.png")
        assert browser.png_size(shot.read_bytes()) == (800, 600)
        with pytest.raises(browser.BrowserError, match="did not hold"):
            page.wait_for("document.body.dataset.state === 'never'", timeout_s=0.5)
        page.evaluate("console.error('something broke'); true")
        page.evaluate("1")  # the console event arrives with the next answer
        assert any("something broke" in line for line in page.console), page.console


def test_a_document_answered_with_a_5xx_is_loaded_again_a_bounded_number_of_times(chromium, site):
    with browser.Page(width=800, height=600) as page:
        page.open(site + "flaky/1")
        assert _Handler.failures["/flaky/1"] == 2
        assert any("answered 500 (" in line and "loading it again" in line for line in page.console), page.console
        page.wait_for("document.body.dataset.state === 'done'", timeout_s=20)
        page.open(site + "flaky/9", tries=3)
        assert _Handler.failures["/flaky/9"] == 3, "three loads, then the 500 is left for the test to see"


def test_the_headless_commands_see_the_page_after_its_virtual_time(chromium, site, tmp_path):
    # Three polls 500 ms apart fit in 5 s of virtual time; fetches pause the clock.
    dom = browser.dump_dom(site, budget_ms=5000)
    assert "forty-two after 3 polls" in dom and 'data-state="done"' in dom
    shot = browser.screenshot(site, tmp_path / "shot.png", width=640, height=480, budget_ms=2000)
    assert browser.png_size(shot.read_bytes()) == (640, 480)


def test_png_size_refuses_what_is_not_a_png():
    with pytest.raises(ValueError):
        browser.png_size(b"GIF89a" + b"\0" * 30)


def test_chromium_override_names_the_binary(monkeypatch, tmp_path):
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(fake))
    assert browser.find_chromium() == str(fake)
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "missing"))
    assert browser.find_chromium() is None


def test_without_chromium_or_apt_get_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(browser.BrowserUnavailable, match="apt-get install -y chromium"):
        browser.ensure_chromium()
