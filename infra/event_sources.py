"""What invokes the stack's functions besides their callers (stdlib only): an SQS event
source mapping and an EventBridge schedule, emulated against the invoke proxy's Lambda
Invoke API as AWS's own services call Lambda's. The invoke proxy runs them (its config
file's "event_sources" section, written by infra/stack.py).

SqsEventSource — Lambda's event source mapping for a standard SQS queue:
  * long-polls the queue (ReceiveMessage, up to batch_size messages, default 10) and
    invokes the function synchronously (RequestResponse) with the event Lambda sends:
        {"Records": [{"messageId", "receiptHandle", "body",
                      "attributes": {"ApproximateReceiveCount", "SentTimestamp", "SenderId",
                                     "ApproximateFirstReceiveTimestamp"},
                      "messageAttributes": {NAME: {"stringValue", "binaryValue",
                                            "stringListValues", "binaryListValues", "dataType"}},
                      "md5OfBody", "eventSource": "aws:sqs", "eventSourceARN", "awsRegion"}]}
  * on success deletes the batch; with ReportBatchItemFailures (on by default) an answer
    {"batchItemFailures": [{"itemIdentifier": MESSAGE_ID}]} keeps exactly those (an
    identifier that is empty or not in the batch fails the whole batch, as in AWS);
  * on a function error (or no answer) deletes nothing: the messages come back after the
    queue's visibility timeout, with ApproximateReceiveCount increased.

Schedule — an EventBridge Scheduler schedule `rate(every_s seconds)` whose target is a
function: every every_s seconds (first one every_s after start) an asynchronous
(`X-Amz-Invocation-Type: Event`) invoke with a fixed JSON payload, through the proxy's
Event path, so the invocation gets Lambda's retries like any other async invoke.

Both run in a daemon thread: start() / stop(); stats() gives their counters.
"""

from __future__ import annotations

import calendar
import json
import threading
import time
import urllib.parse

from .net import http
from .sqs import Sqs, queue_arn_from_url


def _log(msg: str) -> None:
    import sys

    ts = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    sys.stderr.write(f"{ts} event-sources {msg}\n")
    sys.stderr.flush()


def invoke_url(lambda_endpoint: str, function: str) -> str:
    return f"{lambda_endpoint.rstrip('/')}/2015-03-31/functions/{urllib.parse.quote(function, safe='')}/invocations"


class _Worker:
    name = "worker"

    def __init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats: dict[str, int] = {}

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] = self._stats.get(k, 0) + v

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


def sqs_record(message: dict, queue_arn: str, region: str) -> dict:
    """One SQS message as Lambda's SQS event shows it."""
    attrs = {}
    for name, a in (message.get("MessageAttributes") or {}).items():
        attrs[name] = {"stringValue": a.get("StringValue"), "binaryValue": a.get("BinaryValue"),
                       "stringListValues": a.get("StringListValues", []),
                       "binaryListValues": a.get("BinaryListValues", []), "dataType": a.get("DataType")}
    record = {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message.get("Body", ""),
        "attributes": dict(message.get("Attributes") or {}),
        "messageAttributes": attrs,
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }
    if message.get("MD5OfMessageAttributes"):
        record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
    return record


class SqsEventSource(_Worker):
    """An event source mapping from queue_url to function, invoked through lambda_endpoint."""

    def __init__(self, queue_url: str, function: str, lambda_endpoint: str, *, batch_size: int = 10,
                 report_batch_item_failures: bool = True, region: str = "us-east-1", wait_s: int = 1,
                 invoke_timeout_s: float = 910.0):
        super().__init__()
        if not 1 <= batch_size <= 10:
            raise ValueError(f"batch_size must be 1..10 (one ReceiveMessage), got {batch_size}")
        self.queue_url = queue_url
        self.function = function
        self.url = invoke_url(lambda_endpoint, function)
        self.batch_size = batch_size
        self.report_batch_item_failures = report_batch_item_failures
        self.region = region
        self.wait_s = wait_s
        self.invoke_timeout_s = invoke_timeout_s
        self.sqs = Sqs.for_queue(queue_url, region)
        self.queue_arn = queue_arn_from_url(queue_url, region)
        self.name = f"esm-{function}"
        self._stats = dict.fromkeys(("batches", "messages", "deleted", "kept", "function_errors", "poll_errors"), 0)

    def _run(self) -> None:
        _log(f"{self.function}: polling {self.queue_url} (batch size {self.batch_size})")
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # noqa: BLE001 - the mapping keeps polling, as AWS's does
                self._count(poll_errors=1)
                _log(f"{self.function}: poll failed: {type(e).__name__}: {e}")
                self._stop.wait(1.0)

    def poll_once(self) -> int:
        """Receive one batch and deliver it; the number of messages received."""
        messages = self.sqs.receive(self.queue_url, self.batch_size, wait_s=self.wait_s)
        if not messages:
            return 0
        self._count(batches=1, messages=len(messages))
        event = {"Records": [sqs_record(m, self.queue_arn, self.region) for m in messages]}
        handles = {m["MessageId"]: m["ReceiptHandle"] for m in messages}
        try:
            status, headers, body = http("POST", self.url, body=event, timeout=self.invoke_timeout_s,
                                         headers={"X-Amz-Invocation-Type": "RequestResponse"})
            ferr = headers.get("X-Amz-Function-Error")
        except OSError as e:
            status, ferr, body = None, "Unhandled", f"{type(e).__name__}: {e}"
        if status != 200 or ferr:
            self._count(function_errors=1, kept=len(messages))
            _log(f"{self.function}: batch of {len(messages)} failed (status {status}, {ferr}): {str(body)[:300]}; "
                 f"left for redelivery after the visibility timeout")
            return len(messages)
        keep = self._failed_items(body, handles)
        done = [h for mid, h in handles.items() if mid not in keep]
        if done:
            self.sqs.delete(self.queue_url, done)
        self._count(deleted=len(done), kept=len(keep))
        _log(f"{self.function}: batch of {len(messages)} done; deleted {len(done)}, kept {len(keep)}")
        return len(messages)

    def _failed_items(self, body, handles: dict[str, str]) -> set[str]:
        if not self.report_batch_item_failures or not isinstance(body, dict):
            return set()
        failures = body.get("batchItemFailures")
        if not failures:
            return set()
        ids = {f.get("itemIdentifier") if isinstance(f, dict) else None for f in failures}
        if not all(isinstance(i, str) and i in handles for i in ids):
            _log(f"{self.function}: batchItemFailures names unknown or empty ids {sorted(map(str, ids))}; "
                 f"the whole batch counts as failed")
            return set(handles)
        return ids


class Schedule(_Worker):
    """rate(every_s seconds) -> async invoke of function with payload."""

    def __init__(self, function: str, lambda_endpoint: str, every_s: float, payload: dict):
        super().__init__()
        if every_s <= 0:
            raise ValueError(f"every_s must be positive, got {every_s}")
        self.function = function
        self.url = invoke_url(lambda_endpoint, function)
        self.every_s = every_s
        self.payload = payload
        self.name = f"schedule-{function}"
        self._stats = {"fired": 0, "failed": 0}

    def _run(self) -> None:
        _log(f"{self.function}: scheduled every {self.every_s:g}s with {json.dumps(self.payload)}")
        next_at = time.monotonic() + self.every_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.every_s
            try:
                status, _, body = http("POST", self.url, body=self.payload, timeout=10,
                                       headers={"X-Amz-Invocation-Type": "Event"})
            except OSError as e:
                status, body = None, f"{type(e).__name__}: {e}"
            if status == 202:
                self._count(fired=1)
            else:
                self._count(failed=1)
                _log(f"{self.function}: scheduled invoke refused ({status}): {str(body)[:200]}")


class OneTimeSchedules(_Worker):
    """EventBridge Scheduler's one-time schedules, `at(yyyy-mm-ddThh:mm:ss)` in UTC, of one
    schedule group on moto (which stores them but fires nothing): every poll_s seconds, each
    schedule that is due is fired — an async invoke of its target function with its Input,
    through the proxy's Event path — and, with ActionAfterCompletion DELETE, deleted."""

    def __init__(self, endpoint: str, group: str, lambda_endpoint: str, poll_s: float = 1.0, region: str = "us-east-1"):
        super().__init__()
        self.endpoint = endpoint.rstrip("/")
        self.group = group
        self.lambda_endpoint = lambda_endpoint
        self.poll_s = poll_s
        self.region = region
        self.name = f"one-time-schedules-{group}"
        self._stats = {"fired": 0, "failed": 0}

    def _call(self, method: str, path: str, query: dict) -> dict:
        # moto routes by the service named in the credential scope; it checks no signature.
        auth = f"AWS4-HMAC-SHA256 Credential=test/20240101/{self.region}/scheduler/aws4_request, SignedHeaders=host, Signature=0"
        url = f"{self.endpoint}{path}?{urllib.parse.urlencode(query)}"
        status, _, body = http(method, url, headers={"Authorization": auth}, timeout=10)
        if status != 200:
            raise OSError(f"scheduler {method} {path} answered {status}: {str(body)[:200]}")
        return body if isinstance(body, dict) else {}

    def poll_once(self, now: float | None = None) -> int:
        """Fires every schedule due by `now` (epoch seconds); returns how many fired."""
        now = time.time() if now is None else now
        fired = 0
        for listed in self._call("GET", "/schedules", {"ScheduleGroup": self.group}).get("Schedules") or []:
            expression = listed.get("ScheduleExpression") or ""
            if not (expression.startswith("at(") and expression.endswith(")")):
                continue
            due = calendar.timegm(time.strptime(expression[3:-1], "%Y-%m-%dT%H:%M:%S"))
            if due > now:
                continue
            name = urllib.parse.quote(listed["Name"], safe="")
            schedule = self._call("GET", f"/schedules/{name}", {"groupName": self.group})
            target = schedule.get("Target") or {}
            function = (target.get("Arn") or "").rsplit(":function:", 1)[-1]
            payload = json.loads(target.get("Input") or "{}")
            try:
                status, _, body = http("POST", invoke_url(self.lambda_endpoint, function), body=payload, timeout=10,
                                       headers={"X-Amz-Invocation-Type": "Event"})
            except OSError as e:
                status, body = None, f"{type(e).__name__}: {e}"
            if status != 202:
                self._count(failed=1)
                _log(f"{listed['Name']}: invoke of {function} refused ({status}): {str(body)[:200]}")
                continue
            self._count(fired=1)
            fired += 1
            _log(f"{listed['Name']}: fired {function} with {json.dumps(payload)}")
            if schedule.get("ActionAfterCompletion") == "DELETE":
                self._call("DELETE", f"/schedules/{name}", {"groupName": self.group})
        return fired

    def _run(self) -> None:
        _log(f"one-time schedules of group {self.group}: polled every {self.poll_s:g}s")
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except (OSError, ValueError, KeyError) as e:
                self._count(failed=1)
                _log(f"one-time schedules of group {self.group}: {type(e).__name__}: {e}")


def from_config(config: dict, lambda_endpoint: str, region: str = "us-east-1") -> list[_Worker]:
    """The workers of an "event_sources" config section:
        {"sqs": [{"queue_url", "function", "batch_size"?, "report_batch_item_failures"?}],
         "schedules": [{"function", "every_s", "payload"}],
         "one_time_schedules": [{"endpoint", "group", "poll_s"?}]}"""
    workers: list[_Worker] = []
    for m in config.get("sqs") or []:
        workers.append(SqsEventSource(m["queue_url"], m["function"], lambda_endpoint,
                                      batch_size=int(m.get("batch_size", 10)),
                                      report_batch_item_failures=bool(m.get("report_batch_item_failures", True)),
                                      region=region))
    for s in config.get("schedules") or []:
        workers.append(Schedule(s["function"], lambda_endpoint, float(s["every_s"]), s.get("payload") or {}))
    for o in config.get("one_time_schedules") or []:
        workers.append(OneTimeSchedules(o["endpoint"], o["group"], lambda_endpoint, float(o.get("poll_s", 1.0)), region))
    return workers
