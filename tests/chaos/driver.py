"""The chaos suite's hands on a running local stack: start runs through the API, script
the dev model server, read what a run left (events through the API, checkpoints straight
from the runs table in moto), SIGKILL the runner process that runs a given run, wait.

Which process runs which run: every function instance `cargo lambda watch` starts runs
under the runtime shim (infra/runtime_shim.py), which keeps a state file in the stack's
DIR/shims/ naming its live process and the invocation it is running (with its payload,
so its run id). The driver kills that process with SIGKILL, as Lambda's sandbox dies,
and confirms from the same file that the process died during that invocation.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path

from boto3.dynamodb.types import TypeDeserializer

from infra.client import StackClient
from infra.net import http

from .checks import Kill, ts

RUNNER = "chainrun-runner"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


class ChaosError(RuntimeError):
    pass


class Harness:
    """One stack, seen by the chaos driver."""

    def __init__(self, client: StackClient, log=print):
        self.c = client
        self.log = log
        self.user = "chaos"
        self.token = client.token(self.user)
        self.ddb = client.ddb()
        self.runs_table = client.tables["CHAINRUN_RUNS_TABLE"]
        self.events_table = client.tables["CHAINRUN_EVENTS_TABLE"]
        shims = client.env.get("SHIM_STATE_DIR") or str(Path(client.env["STACK_DIR"]) / "shims")
        self.shims = Path(shims)
        self._deser = TypeDeserializer()
        self._lock = threading.Lock()

    # -- the API ----------------------------------------------------------------------------
    def api(self, method: str, path: str, body=None, timeout: float = 30.0):
        return http(method, self.c.api_url + path, body=body, timeout=timeout,
                    headers={"Authorization": f"Bearer {self.token}"})

    def create_run(self, definition: dict, input_: dict, attempts: int = 4) -> str:
        """POST /runs; a 5xx or a dropped connection is tried again (a DynamoDB fault may
        reach the API too), so a run may exist more than once — the callers that fault
        DynamoDB find every run of their workflow by name (runs_of_workflow)."""
        last = None
        for i in range(attempts):
            try:
                status, _, body = self.api("POST", "/runs", {"workflow": definition, "input": input_})
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if status == 202:
                    return body["run_id"]
                last = f"{status} {str(body)[:500]}"
                if status < 500:
                    break
            time.sleep(0.5 * (i + 1))
        raise ChaosError(f"POST /runs failed: {last}")

    def run_view(self, run_id: str) -> dict:
        for i in range(5):
            try:
                status, _, body = self.api("GET", f"/runs/{run_id}")
            except OSError:
                status, body = None, None
            if status == 200:
                return body
            time.sleep(0.3 * (i + 1))
        raise ChaosError(f"GET /runs/{run_id} answered {status}: {str(body)[:300]}")

    def events(self, run_id: str) -> list[dict]:
        """Every event of the run, through the API's cursor."""
        out: list[dict] = []
        after = 0
        while True:
            for i in range(5):
                try:
                    status, _, body = self.api("GET", f"/runs/{run_id}/events?after={after}&limit=100")
                except OSError:
                    status, body = None, None
                if status == 200:
                    break
                time.sleep(0.3 * (i + 1))
            else:
                raise ChaosError(f"GET /runs/{run_id}/events answered {status}: {str(body)[:300]}")
            out.extend(body["events"])
            if not body["events"] or body["last_seq"] == after:
                return out
            after = body["last_seq"]

    # -- the tables (moto, directly: no faults, no API) -----------------------------------
    def _plain(self, item: dict) -> dict:
        return {k: _plain_number(self._deser.deserialize(v)) for k, v in item.items()}

    def run_items(self, run_id: str) -> list[dict]:
        """The run's items in the runs table: META, STEP#…, (ITEM#… once items have checkpoints)."""
        out, start = [], None
        while True:
            kw = {"TableName": self.runs_table, "KeyConditionExpression": "pk = :pk",
                  "ExpressionAttributeValues": {":pk": {"S": f"RUN#{run_id}"}}, "ConsistentRead": True}
            if start:
                kw["ExclusiveStartKey"] = start
            page = self.ddb.query(**kw)
            out.extend(self._plain(i) for i in page.get("Items", []))
            start = page.get("LastEvaluatedKey")
            if not start:
                return out

    def meta(self, run_id: str) -> dict | None:
        got = self.ddb.get_item(TableName=self.runs_table, Key={"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": "META"}},
                                ConsistentRead=True)
        return self._plain(got["Item"]) if "Item" in got else None

    def status(self, run_id: str) -> str | None:
        m = self.meta(run_id)
        return m.get("status") if m else None

    def step_row(self, run_id: str, step: str) -> dict | None:
        got = self.ddb.get_item(TableName=self.runs_table,
                                Key={"pk": {"S": f"RUN#{run_id}"}, "sk": {"S": f"STEP#{step}"}}, ConsistentRead=True)
        return self._plain(got["Item"]) if "Item" in got else None

    def item_count(self, run_id: str, step: str) -> int:
        """How many item checkpoints a map step of the run has (the run as started)."""
        n, start = 0, None
        while True:
            kw = {"TableName": self.runs_table, "Select": "COUNT", "ConsistentRead": True,
                  "KeyConditionExpression": "pk = :pk AND begins_with(sk, :p)",
                  "ExpressionAttributeValues": {":pk": {"S": f"RUN#{run_id}"}, ":p": {"S": f"ITEM#{step}#"}}}
            if start:
                kw["ExclusiveStartKey"] = start
            page = self.ddb.query(**kw)
            n += int(page.get("Count", 0))
            start = page.get("LastEvaluatedKey")
            if not start:
                return n

    def events_after(self, run_id: str, after_seq: int = 0) -> list[dict]:
        """Events straight from the events table (cheap to poll)."""
        page = self.ddb.query(TableName=self.events_table, KeyConditionExpression="pk = :pk AND seq > :s",
                              ExpressionAttributeValues={":pk": {"S": f"RUN#{run_id}"}, ":s": {"N": str(after_seq)}},
                              ConsistentRead=True)
        return [self._plain(i) for i in page.get("Items", [])]

    def runs_of_workflow(self, name: str) -> list[str]:
        """Every run stored for a workflow name (a scan: the chaos tables are small)."""
        out, start = [], None
        while True:
            kw = {"TableName": self.runs_table, "FilterExpression": "sk = :m AND workflow = :w",
                  "ExpressionAttributeValues": {":m": {"S": "META"}, ":w": {"S": name}}}
            if start:
                kw["ExclusiveStartKey"] = start
            page = self.ddb.scan(**kw)
            out.extend(i["pk"]["S"].removeprefix("RUN#") for i in page.get("Items", []))
            start = page.get("LastEvaluatedKey")
            if not start:
                return sorted(out)

    # -- the dev model server -----------------------------------------------------------------
    def add_rules(self, rules: list[dict]) -> None:
        status, _, body = http("POST", self.c.devmodel_url + "/_dev/rules", body={"rules": rules}, timeout=10)
        if status != 200:
            raise ChaosError(f"devmodel POST /_dev/rules answered {status}: {body}")

    def calls(self, tag: str) -> list[dict]:
        q = urllib.parse.urlencode({"prompt_contains": f"[cr:{tag}:"})
        status, _, body = http("GET", f"{self.c.devmodel_url}/_dev/calls?{q}", timeout=10)
        if status != 200:
            raise ChaosError(f"devmodel /_dev/calls answered {status}: {body}")
        return body["calls"] if isinstance(body, dict) else body

    def batch(self) -> dict:
        """GET /_dev/batch: {"timing", "s3_endpoint", "jobs"} (reading it advances the jobs to now)."""
        status, _, body = http("GET", self.c.devmodel_url + "/_dev/batch", timeout=10)
        if status != 200:
            raise ChaosError(f"devmodel GET /_dev/batch answered {status}: {body}")
        return body

    def batch_jobs_of(self, run_id: str) -> list[dict]:
        """The batch jobs submitted for a run: its jobs' idempotency tokens start with its id."""
        return [j for j in self.batch()["jobs"] if str(j.get("clientRequestToken") or "").startswith(run_id)]

    def set_batch_timing(self, timing: dict) -> dict:
        """PUT /_dev/batch (for jobs created afterwards); returns the timing in force before."""
        before = self.batch()["timing"]
        status, _, body = http("PUT", self.c.devmodel_url + "/_dev/batch", body=timing, timeout=10)
        if status != 200:
            raise ChaosError(f"devmodel PUT /_dev/batch answered {status}: {body}")
        return before

    # -- the invoke proxy -----------------------------------------------------------------------
    def proxy_stats(self) -> dict:
        return self.c.inflight()

    def invoke_event(self, function: str, payload: dict) -> int:
        status, _, _ = http("POST", f"{self.c.proxy_url}/2015-03-31/functions/{function}/invocations",
                            raw=json.dumps(payload), headers={"X-Amz-Invocation-Type": "Event"}, timeout=30)
        return status

    def add_drop(self, rule: dict) -> dict:
        status, _, body = http("POST", f"{self.c.proxy_url}/_proxy/drops", body=rule, timeout=10)
        if status != 200:
            raise ChaosError(f"proxy POST /_proxy/drops answered {status}: {body}")
        return body

    def drops(self) -> dict:
        return http("GET", f"{self.c.proxy_url}/_proxy/drops", timeout=10)[2]

    # -- the functions' log ---------------------------------------------------------------------
    @property
    def watch_log(self) -> Path:
        return Path(self.c.logs) / "lambda-watch.log"

    def log_offset(self) -> int:
        try:
            return self.watch_log.stat().st_size
        except OSError:
            return 0

    def wait_log(self, run_id: str, needles: tuple[str, ...], offset: int, timeout: float, poll: float = 0.005,
                 stop=None) -> bool:
        """Whether a line of the functions' log past `offset` names run_id and every needle
        within timeout s (or until stop() is truthy): the quickest sign of a moment inside a
        runner that leaves nothing in the tables."""
        deadline = time.monotonic() + timeout
        rest = b""
        polls = 0
        with open(self.watch_log, "rb") as f:
            f.seek(offset)
            while time.monotonic() < deadline:
                chunk = f.read()
                if chunk:
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        text = line.decode("utf-8", "replace")
                        if run_id in text and all(n in text for n in needles):
                            return True
                    continue
                polls += 1
                if stop is not None and polls % 40 == 0 and stop():
                    return False
                time.sleep(poll)
        return False

    # -- runner processes -----------------------------------------------------------------------
    def runner_states(self) -> list[dict]:
        out = []
        for f in self.shims.glob(f"{RUNNER}-*.json"):
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue  # being replaced right now
        return out

    def process_of(self, run_id: str) -> tuple[int, str] | None:
        """(pid, request id) of the runner process running an invocation for run_id."""
        for s in self.runner_states():
            cur = s.get("current") or {}
            payload = cur.get("payload")
            if s.get("pid") and isinstance(payload, dict) and payload.get("run_id") == run_id:
                return s["pid"], cur.get("request_id")
        return None

    def kill_run(self, run_id: str, phase: str, confirm_s: float = 5.0, find_s: float = 1.0) -> Kill | None:
        """SIGKILL the runner process running run_id now (looking for it up to find_s: the
        run may be between two deliveries); None if no process runs it."""
        deadline = time.monotonic() + find_s
        found = self.process_of(run_id)
        while not found and time.monotonic() < deadline:
            time.sleep(0.05)
            found = self.process_of(run_id)
        if not found:
            return None
        pid, request_id = found
        at = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        kill = Kill(run_id=run_id, at=at, phase=phase, pid=pid, request_id=request_id)
        deadline = time.monotonic() + confirm_s
        while time.monotonic() < deadline:
            for s in self.runner_states():
                for d in s.get("deaths") or []:
                    if d.get("pid") == pid:
                        kill.hit = d.get("request_id") == request_id and request_id is not None
                        return kill
            time.sleep(0.05)
        return kill

    def next_event_after(self, run_id: str, t: float, timeout: float) -> dict | None:
        """The run's first event stamped after t (epoch s), waiting up to timeout s."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for e in self.events_after(run_id, seen):
                seen = max(seen, int(e["seq"]))
                if ts(e["at"]) > t:
                    return e
            time.sleep(0.1)
        return None

    def wait_terminal(self, run_ids: list[str], timeout: float, poll: float = 0.5) -> dict[str, float | None]:
        """{run id: seconds until it was seen terminal, or None if it was not within timeout}."""
        t0 = time.monotonic()
        left = set(run_ids)
        done: dict[str, float | None] = {r: None for r in run_ids}
        while left and time.monotonic() - t0 < timeout:
            for r in list(left):
                if self.status(r) in TERMINAL:
                    done[r] = time.monotonic() - t0
                    left.discard(r)
            if left:
                time.sleep(poll)
        return done


def _plain_number(v):
    """boto3 Decimals as int/float, recursively."""
    from decimal import Decimal

    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, dict):
        return {k: _plain_number(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_number(x) for x in v]
    if isinstance(v, set):
        return {_plain_number(x) for x in v}
    return v
