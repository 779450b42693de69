"""Headless Chromium for the page tests: find it (installing Debian's `chromium` when it
is missing), and drive it.

Two ways to drive it:

* `dump_dom(url, budget_ms)` and `screenshot(url, path, ...)` run Chromium's own headless
  commands once (`--dump-dom`, `--screenshot`) under a virtual-time budget: the page's
  timers run on virtual time, which does not advance while a fetch is pending, so a page
  that polls an API is seen after it has made `budget_ms` of progress. Good for a page
  that settles by itself.
* `Page` speaks the DevTools protocol over a websocket: open a URL, wait until a script
  expression holds (`document.body.dataset.state === 'done'`) on real time with a
  timeout, then read the DOM, evaluate expressions, and take a full-page screenshot. The
  tests use it for a page that follows a live run, where "ready" is a condition, not an
  amount of time. It also collects the page's console errors and uncaught exceptions,
  so a test failure shows what the script said.

Installing: `ensure_chromium()` looks for `chromium`, `chromium-browser`, `google-chrome`
(or `$CHROMIUM`), and when none is there runs `apt-get update && apt-get install -y
chromium` (with `sudo -n` when not root). When that is impossible it raises
`BrowserUnavailable` saying how to install it. Tests call it from a session fixture, so
`make test` on a fresh clone installs Chromium itself.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .net import LOOPBACK, http, wait_until

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Root in a container cannot use Chromium's sandbox; the GPU is never there.
BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
              "--disable-dev-shm-usage", "--mute-audio")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BrowserUnavailable(RuntimeError):
    """No Chromium here, and it could not be installed."""


class BrowserError(RuntimeError):
    """Chromium did not do what was asked (it exited, a command failed, a wait timed out)."""


def find_chromium() -> str | None:
    """The path of a Chromium-like browser on this machine, or None."""
    override = os.environ.get("CHROMIUM")
    if override:
        return shutil.which(override) or (override if os.access(override, os.X_OK) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium(log=print) -> str:
    """Chromium's path, installing Debian's `chromium` package first when none is found."""
    found = find_chromium()
    if found:
        return found
    how = "install it with `sudo apt-get install -y chromium` (or set CHROMIUM to a Chromium or Chrome binary)"
    if not shutil.which("apt-get"):
        raise BrowserUnavailable(f"no Chromium found ({', '.join(CANDIDATES)}) and no apt-get to install it: {how}")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise BrowserUnavailable(f"no Chromium found, and installing it needs root (no sudo here): {how}")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("chromium not found: installing Debian's chromium package (apt-get; a few minutes, once)")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        done = subprocess.run(prefix + argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise BrowserUnavailable(f"`{' '.join(prefix + argv)}` failed ({done.returncode}): {tail}\n{how}")
    found = find_chromium()
    if not found:
        raise BrowserUnavailable(f"apt-get installed chromium but no binary named {', '.join(CANDIDATES)} is on PATH: {how}")
    return found


def _run_headless(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    chromium = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="chainrun-chromium-") as profile:
        argv = [chromium, *BASE_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise BrowserError(f"chromium did not finish in {timeout_s}s: {' '.join(argv)}") from e


def dump_dom(url: str, budget_ms: int = 5000, timeout_s: float = 60.0) -> str:
    """The page's DOM as HTML after `budget_ms` of virtual time."""
    done = _run_headless([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout_s)
    if done.returncode != 0 or not done.stdout.strip():
        raise BrowserError(f"chromium --dump-dom {url} exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode("utf-8", "replace")


def screenshot(url: str, path: str | Path, width: int = 1280, height: int = 900, budget_ms: int = 5000,
               timeout_s: float = 60.0) -> Path:
    """A PNG of the page's first `width` x `height` pixels after `budget_ms` of virtual time."""
    path = Path(path).resolve()
    done = _run_headless([f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}",
                          f"--screenshot={path}", url], timeout_s)
    if done.returncode != 0 or not path.exists():
        raise BrowserError(f"chromium --screenshot {url} exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return path


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, read from its IHDR chunk; ValueError if it is not one."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class Page:
    """One headless Chromium with one tab, driven over the DevTools protocol.

    Use as a context manager: the browser (and its temporary profile) go when it closes.
    """

    def __init__(self, width: int = 1280, height: int = 900, start_timeout_s: float = 30.0):
        # Imported here: only the DevTools path needs it (infra/requirements.txt has it).
        from websockets.sync.client import connect

        self.chromium = ensure_chromium()
        self.profile = tempfile.mkdtemp(prefix="chainrun-chromium-")
        self.width, self.height = width, height
        self.log_path = Path(self.profile) / "chromium.log"
        argv = [self.chromium, *BASE_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                f"--remote-debugging-address={LOOPBACK}", f"--window-size={width},{height}", "about:blank"]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.console: list[str] = []
        self._next_id = 0
        self._resources = contextlib.ExitStack()
        self.ws = None
        try:
            # Chromium writes the port it chose (and the browser target's path) here.
            port_file = Path(self.profile) / "DevToolsActivePort"
            ready = wait_until(lambda: self.process.poll() is not None or (port_file.exists() and port_file.read_text().strip()),
                               start_timeout_s, 0.05)
            if self.process.poll() is not None or not ready:
                raise BrowserError(f"chromium did not open its DevTools port in {start_timeout_s}s: {self._log_tail()}")
            port = int(port_file.read_text().split()[0])
            status, _, targets = http("GET", f"http://{LOOPBACK}:{port}/json/list", timeout=10)
            pages = [t for t in targets if t.get("type") == "page"] if status == 200 else []
            if not pages:
                raise BrowserError(f"chromium has no page target: {status} {targets}")
            self.ws = self._resources.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
            self.send("Page.enable")
            self.send("Runtime.enable")
            # The browser's own messages: a script the policy blocked, a failed request.
            self.send("Log.enable")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        self._resources.close()
        self.ws = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _note(self, message: dict) -> None:
        """Keeps what the page said that a failing test wants to see."""
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"exception: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            entry = params["entry"]
            self.console.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".rstrip())
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params['type']}: {args}")

    def send(self, method: str, timeout_s: float = 30.0, **params):
        """One DevTools command's result; events arriving meanwhile are noted."""
        self._next_id += 1
        ident = self._next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"DevTools {method} got no answer in {timeout_s}s")
            try:
                message = json.loads(self.ws.recv(timeout=left))
            except TimeoutError as e:
                raise BrowserError(f"DevTools {method} got no answer in {timeout_s}s") from e
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self._note(message)

    def open(self, url: str, tries: int = 8) -> None:
        """Loads `url`. A document answered with a 5xx is loaded again (up to `tries` in all,
        waiting 0.5 s longer each time, about 14 s in all), as a user's reload would. The
        local stack's `cargo lambda watch` used to answer its own 500 for the run view (a
        52 KB response whose function closed its connection at once; the runtime shim now
        keeps that connection, see infra/runtime_shim.py Shim.upstream); a 5xx that still
        comes is noted in `console` with the start of its body, so a failed run shows it."""
        for attempt in range(1, tries + 1):
            result = self.send("Page.navigate", url=url)
            if result.get("errorText"):
                raise BrowserError(f"navigating to {url} failed: {result['errorText']}")
            wait_until(self._loaded, 30, 0.05)
            status = self.evaluate("(performance.getEntriesByType('navigation')[0] || {}).responseStatus || 0")
            if not (isinstance(status, int) and status >= 500) or attempt == tries:
                return
            body = self.evaluate("document.body ? document.body.innerText.slice(0, 300) : ''")
            self.console.append(f"open: {url.split('#')[0]} answered {status} ({body!r}); loading it again")
            time.sleep(0.5 * attempt)

    def _loaded(self) -> bool:
        try:
            return self.evaluate("document.readyState") == "complete"
        except BrowserError:  # between two documents
            return False

    def evaluate(self, expression: str):
        """The JSON value of a script expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, interval_s: float = 0.1) -> None:
        """Evaluates `expression` until it is truthy (as the page's script sees it)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(f"Boolean({expression})")
            except BrowserError as e:
                # The document may be between two navigations.
                last = str(e)
            else:
                if last is True:
                    return
            time.sleep(interval_s)
        state = self.evaluate("JSON.stringify({href: location.href, title: document.title, "
                              "dataset: document.body ? document.body.dataset : null})")
        raise BrowserError(f"{expression!r} did not hold in {timeout_s}s (last: {last!r}; body: {state}; console: {self.console})")

    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the whole page (not only the window), written to `path`."""
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics.get("contentSize")
        width = max(self.width, int(size["width"]))
        height = max(self.height, int(size["height"]))
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path = Path(path)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


if __name__ == "__main__":  # pragma: no cover
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "ensure":
        print(ensure_chromium())
    elif len(sys.argv) > 2 and sys.argv[1] == "dom":
        print(dump_dom(sys.argv[2]))
    elif len(sys.argv) > 3 and sys.argv[1] == "screenshot":
        print(screenshot(sys.argv[2], sys.argv[3]))
    else:
        print("usage: python -m infra.browser ensure | dom URL | screenshot URL PATH", file=sys.stderr)
        sys.exit(2)
