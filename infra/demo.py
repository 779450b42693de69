"""chainrun demo client: start the sample workflow on a running local stack and follow
its progress live.

    python -m infra.demo [--env-file .local/stack.env] [--sample infra/samples/feedback-analysis.json]
                         [--timeout 120]

Reads API_URL and CHAINRUN_LOCAL_JWT_SECRET from the stack's env file (`make up` writes
.local/stack.env; `make demo` starts its own stack and passes its file), mints a token
for user `demo`, POSTs the sample to API_URL/runs, polls API_URL/runs/{id}/events until
the run ends, then prints the run's output and a per-step table.

Exit status: 0 only if the run COMPLETED; 1 otherwise (failed, cancelled, timed out,
API error).

HTTP goes through infra/net.py's `http`, plain urllib.request, so the two files double
as an example of the API with nothing but the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from decimal import Decimal, InvalidOperation

from . import INFRA, ROOT, local_token
from .envfile import read_env_file
from .net import http

TERMINAL = {"RUN_COMPLETED", "RUN_FAILED", "RUN_CANCELLED"}
USER = "demo"

_tty = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None


def c(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if _tty else text


def out(line: str = "") -> None:
    print(line, flush=True)


class ApiError(Exception):
    def __init__(self, method: str, url: str, status: int | None, body, ctype: str = ""):
        self.method, self.url, self.status, self.body, self.ctype = method, url, status, body, ctype
        super().__init__(f"{method} {url} -> {status}")

    def render(self) -> str:
        head = f"{self.method} {self.url}\n  -> HTTP {self.status if self.status is not None else '(no response)'}"
        b = self.body
        if isinstance(b, dict) and ("title" in b or "detail" in b):  # application/problem+json
            lines = [head + f"  {b.get('title', '')}".rstrip()]
            if b.get("detail"):
                lines.append(f"     detail: {b['detail']}")
            if b.get("type") and b.get("type") != "about:blank":
                lines.append(f"     type:   {b['type']}")
            for k, v in b.items():
                if k not in ("type", "title", "status", "detail"):
                    lines.append(f"     {k}: {json.dumps(v) if not isinstance(v, str) else v}")
            return "\n".join(lines)
        if isinstance(b, (dict, list)):
            return head + "\n" + json.dumps(b, indent=2)[:2000]
        text = (b or "").strip() if isinstance(b, str) else repr(b)
        return head + (f" ({self.ctype})" if self.ctype else "") + ("\n  " + text[:2000] if text else " (empty body)")


def request(method: str, url: str, token: str, body=None, timeout: float = 30.0):
    """Return (status, parsed body) for 2xx; raise ApiError for anything else."""
    try:
        status, headers, parsed = http(method, url, body=body, headers={"Authorization": f"Bearer {token}"},
                                       timeout=timeout)
    except OSError as e:  # refused, reset, timed out
        raise ApiError(method, url, None, f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    if not 200 <= status < 300 or not isinstance(parsed, (dict, list)):
        # an error, or 2xx but not JSON: show what came back
        raise ApiError(method, url, status, parsed, headers.get("Content-Type", ""))
    return status, parsed


def money(v) -> str:
    if v is None or v == "":
        return "-"
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        return str(v)
    if not d:
        return "$0"
    return f"${d.normalize():f}"  # exact, as the API gave it (e.g. $0.000006685)


def num(v) -> str:
    return "-" if v is None else str(v)


def describe(ev: dict) -> str:
    t = ev.get("type", "?")
    d = ev.get("data") or {}
    parts = []
    if ev.get("step_id"):
        parts.append(str(ev["step_id"]))
    if ev.get("attempt") is not None:
        parts.append(f"(attempt {ev['attempt']})")
    if t == "STEP_COMPLETED":
        if d.get("input_tokens") is not None or d.get("output_tokens") is not None:
            parts.append(f"in={num(d.get('input_tokens'))} out={num(d.get('output_tokens'))} tokens")
        if d.get("cost_usd") is not None:
            parts.append(money(d.get("cost_usd")))
        if d.get("latency_ms") is not None:
            parts.append(f"{d['latency_ms']} ms")
    elif t == "STEP_RETRYING":
        parts.append(f"reason={d.get('reason', '?')}")
        if d.get("delay_ms") is not None:
            parts.append(f"retry in {d['delay_ms']} ms")
    elif t in ("STEP_FAILED", "RUN_FAILED"):
        err = d.get("error") or {}
        if isinstance(err, dict):
            parts.append(f"{err.get('code', 'ERROR')}: {err.get('message', '')}")
        else:
            parts.append(str(err))
    elif t == "STREAMING":
        delta = d.get("delta") or d.get("text") or ""
        if delta:
            s = str(delta).replace("\n", " ")
            parts.append(repr(s[:60] + ("…" if len(s) > 60 else "")))
    elif t == "STEP_SKIPPED" and d.get("reason"):
        parts.append(f"reason={d['reason']}")
    elif t == "RUN_COMPLETED":
        tot = d.get("totals") if isinstance(d.get("totals"), dict) else d
        if tot.get("total_tokens") is not None:
            parts.append(f"{tot['total_tokens']} tokens")
        if tot.get("cost_usd") is not None:
            parts.append(money(tot["cost_usd"]))
    colour = {"STEP_COMPLETED": "32", "RUN_COMPLETED": "1;32", "STEP_FAILED": "31", "RUN_FAILED": "1;31",
              "STEP_RETRYING": "33", "RUN_CANCELLED": "1;33", "STEP_SKIPPED": "2"}.get(t)
    name = c(f"{t:<15}", colour) if colour else f"{t:<15}"
    return f"#{num(ev.get('seq')):<3} {name} " + "  ".join(parts)


def table(rows: list[list[str]], header: list[str], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def fmt(r):
        return "  ".join(str(v).rjust(widths[i]) if i in right else str(v).ljust(widths[i]) for i, v in enumerate(r))

    sep = "  ".join("-" * w for w in widths)
    return [fmt(header), sep] + [fmt(r) for r in rows[:-1]] + ([sep, fmt(rows[-1])] if rows else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the sample workflow against a local chainrun stack.")
    ap.add_argument("--env-file", default=os.environ.get("STACK_ENV_FILE") or str(ROOT / ".local" / "stack.env"))
    ap.add_argument("--sample", default=str(INFRA / "samples" / "feedback-analysis.json"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the run to end")
    ap.add_argument("--interval", type=float, default=0.25, help="poll interval, s")
    args = ap.parse_args(argv)

    try:
        env = read_env_file(args.env_file, missing_ok=False)
    except FileNotFoundError:
        out(f"demo: {args.env_file} not found — start a stack first (`make up`), or use `make demo`")
        return 1
    api = env.get("API_URL", "").rstrip("/")
    secret = env.get("CHAINRUN_LOCAL_JWT_SECRET")
    if not api or not secret:
        out(f"demo: {args.env_file} lacks API_URL or CHAINRUN_LOCAL_JWT_SECRET")
        return 1
    token = local_token.mint(secret, USER, ["demo"])
    with open(args.sample, encoding="utf-8") as f:
        sample = json.load(f)

    wf = sample.get("workflow", {})
    out(c(f"chainrun demo — workflow '{wf.get('name', '?')}' ({len(wf.get('steps', []))} steps) "
          f"as user '{USER}'", "1"))
    out(f"API {api}")
    if env.get("DEVMODEL_URL"):
        out(f"model: dev model server {env['DEVMODEL_URL']} (scripted replies)")
    elif env.get("BEDROCK_MODE") == "aws":
        out("model: Amazon Bedrock (BEDROCK=aws)")
    out()

    # 1. start the run
    t0 = time.monotonic()
    try:
        status, started = request("POST", f"{api}/runs", token, sample)
    except ApiError as e:
        out(c("POST /runs failed:", "1;31"))
        out(e.render())
        return 1
    took = (time.monotonic() - t0) * 1000
    out(f"POST /runs -> {status} in {took:.0f} ms")
    out("  " + json.dumps(started))
    run_id = started.get("run_id") if isinstance(started, dict) else None
    if status != 202 or not run_id:
        out(c(f"expected 202 with a run_id, got {status}", "1;31"))
        return 1
    if started.get("status") != "QUEUED":
        out(c(f"note: status is {started.get('status')!r}, expected 'QUEUED'", "33"))
    links = started.get("links") or {}
    events_path = links.get("events") or f"/runs/{run_id}/events"
    run_path = links.get("run") or f"/runs/{run_id}"
    out()
    out(c("progress:", "1"))

    # 2. follow events
    last_seq = 0
    final_type = None
    deadline = time.monotonic() + args.timeout
    transient = 0
    while final_type is None:
        if time.monotonic() > deadline:
            out(c(f"timed out after {args.timeout:.0f}s waiting for the run to end (last seq {last_seq})", "1;31"))
            break
        try:
            _, page = request("GET", f"{api}{events_path}?after={last_seq}&limit=100", token)
            transient = 0
        except ApiError as e:
            transient += 1
            if e.status is not None and 400 <= e.status < 500 and e.status != 429 or transient > 20:
                out(c("polling events failed:", "1;31"))
                out(e.render())
                return 1
            time.sleep(args.interval)
            continue
        events = page.get("events", []) if isinstance(page, dict) else []
        for ev in events:
            at = time.monotonic() - t0
            out(f"  +{at:5.2f}s  {describe(ev)}")
            seq = ev.get("seq")
            if isinstance(seq, int):
                last_seq = max(last_seq, seq)
            if ev.get("type") in TERMINAL:
                final_type = ev["type"]
        if isinstance(page, dict) and isinstance(page.get("last_seq"), int):
            last_seq = max(last_seq, page["last_seq"])
        if final_type is None and len(events) < 100:
            time.sleep(args.interval)

    # 3. the run snapshot
    out()
    try:
        _, run = request("GET", f"{api}{run_path}", token)
    except ApiError as e:
        out(c(f"GET {run_path} failed:", "1;31"))
        out(e.render())
        return 1
    if not isinstance(run, dict):
        out(f"unexpected run body: {run!r}")
        return 1

    status = run.get("status")
    out(c(f"run {run.get('run_id', run_id)}: {status}", "1;32" if status == "COMPLETED" else "1;31"))
    for k in ("created_at", "started_at", "finished_at"):
        if run.get(k):
            out(f"  {k:<11} {run[k]}")
    if run.get("error"):
        err = run["error"]
        out(c(f"  error: {err.get('code', '')}: {err.get('message', '')}" if isinstance(err, dict)
              else f"  error: {err}", "31"))
    out()
    out(c("output:", "1"))
    output = run.get("output")
    if isinstance(output, str):
        out("  " + output.replace("\n", "\n  "))
    else:
        out("  " + json.dumps(output, indent=2).replace("\n", "\n  "))
    out()

    steps = run.get("steps") or []
    totals = dict(run.get("totals") or {})
    if totals.get("latency_ms") is None and totals.get("step_latency_ms") is not None:
        totals["latency_ms"] = totals["step_latency_ms"]
    rows = []
    for s in steps:
        err = s.get("error")
        note = ""
        if isinstance(err, dict):
            note = f"{err.get('code', '')}: {err.get('message', '')}"[:60]
        elif err:
            note = str(err)[:60]
        rows.append([s.get("id", "?"), s.get("status", "?"), num(s.get("attempts")),
                     num(s.get("input_tokens")), num(s.get("output_tokens")), money(s.get("cost_usd")),
                     f"{s['latency_ms']} ms" if s.get("latency_ms") is not None else "-", note])
    rows.append(["total", status or "?", "", num(totals.get("input_tokens")), num(totals.get("output_tokens")),
                 money(totals.get("cost_usd")),
                 f"{totals['latency_ms']} ms" if totals.get("latency_ms") is not None else "-",
                 f"{totals['total_tokens']} tokens" if totals.get("total_tokens") is not None else ""])
    for line in table(rows, ["step", "status", "attempts", "in", "out", "cost", "latency", "note"], {2, 3, 4, 5, 6}):
        out("  " + line.rstrip())
    out()
    out(f"wall time {time.monotonic() - t0:.2f}s")
    return 0 if status == "COMPLETED" and final_type in (None, "RUN_COMPLETED") else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        sys.exit(130)
