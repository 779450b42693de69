"""devmodel: a scripted stand-in for Amazon Bedrock Runtime (Converse / ConverseStream)
and for Bedrock batch inference (model invocation jobs).

chainrun's runner talks to Bedrock through aws-sdk-bedrockruntime, and runs large map
steps as batch jobs through aws-sdk-bedrock. Pointing the SDKs at this server
(``AWS_ENDPOINT_URL_BEDROCK_RUNTIME`` and ``AWS_ENDPOINT_URL_BEDROCK`` =
``http://127.0.0.1:PORT``, one port for both) lets the whole engine run hermetically: every model call gets a reply, token usage, latency and
(optionally) failures scripted by a rules file. Only the Python standard library is used,
so the server runs from any Python 3.11 without installing anything.

Wire protocol (restJson1, as the AWS SDKs speak it)
---------------------------------------------------
* ``POST /model/{modelId}/converse``        -> JSON response.
* ``POST /model/{modelId}/converse-stream`` -> ``application/vnd.amazon.eventstream``
  body of binary event-stream frames sent with ``Transfer-Encoding: chunked``:
  ``messageStart``, ``contentBlockDelta`` x N, ``contentBlockStop``, ``messageStop``,
  ``metadata``. A mid-stream failure is a frame with ``:message-type: exception``.
* Errors before any response byte: HTTP status + ``x-amzn-ErrorType`` header + JSON
  ``{"message": ...}``.
* SigV4 signatures are ignored; any credentials work.
* Cost levers in the request body, each optional (see "Cost levers" below):
  ``{"cachePoint": {"type": "default"}}`` as an element of ``system`` or of a message's
  ``content``; ``"serviceTier": {"type": "default" | "flex" | "priority"}``;
  ``"requestMetadata": {"run_id": "...", ...}``; ``"outputConfig": {"textFormat": {"type":
  "json_schema", "structure": {"jsonSchema": {"schema": "<JSON Schema as a string>",
  "name": "..."}}}}``.
* Levers in the reply: ``usage.cacheReadInputTokens`` / ``usage.cacheWriteInputTokens``
  (both, 0 when not applicable, whenever the request had a cachePoint) and
  ``"serviceTier": {"type": ...}`` (when the request asked for one), at the top level of
  the converse JSON and in the stream's ``metadata`` event alike.

Batch inference (restJson1, the bedrock control plane)
------------------------------------------------------
* ``POST /model-invocation-job`` (CreateModelInvocationJob) with ``{"jobName",
  "roleArn", "modelId", "clientRequestToken"?, "inputDataConfig": {"s3InputDataConfig":
  {"s3Uri": "s3://bucket/key.jsonl", "s3InputFormat": "JSONL"?}}, "outputDataConfig":
  {"s3OutputDataConfig": {"s3Uri": "s3://bucket/prefix/"}}, "timeoutDurationInHours"?
  (24-168, default 24), "modelInvocationType"? ("Converse"), "tags"?}`` -> ``{"jobArn":
  "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/<id>"}``, the id 12
  characters of [a-z0-9]. The same clientRequestToken with the same body answers the
  same job; with a different body, ConflictException (400).
* ``GET /model-invocation-job/{jobIdentifier}`` (GetModelInvocationJob; the ARN
  URL-encoded, or the bare id) -> ``{jobArn, jobName, modelId, roleArn, status, message?,
  submitTime, lastModifiedTime, endTime?, inputDataConfig, outputDataConfig,
  timeoutDurationInHours, jobExpirationTime, clientRequestToken?, modelInvocationType?,
  totalRecordCount?, processedRecordCount?, successRecordCount?, errorRecordCount?}``;
  timestamps ISO 8601 in UTC with milliseconds (``2026-12-06T10:00:00.150Z``), the
  record counts once the input has been validated.
* ``POST /model-invocation-job/{jobIdentifier}/stop`` (StopModelInvocationJob) -> ``{}``.
  A job that has finished, or is already Stopping, is answered ValidationException.
* ``GET /model-invocation-jobs`` (ListModelInvocationJobs) -> ``{"invocationJobSummaries":
  [...], "nextToken"?}``, each summary as GetModelInvocationJob's reply, newest first.
  Query: ``statusEquals``, ``nameContains``, ``submitTimeAfter`` / ``submitTimeBefore``,
  ``sortOrder`` (Ascending | Descending), ``sortBy`` (CreationTime), ``maxResults``
  (1-1000) and ``nextToken``.
* Errors: HTTP status + ``x-amzn-ErrorType`` + ``{"message"}``: ValidationException
  (400), ConflictException (400), ResourceNotFoundException (404, unknown job).
* Refused at create (ValidationException, no job made): a missing or malformed field
  (jobName, roleArn, clientRequestToken and the S3 URIs by the service model's
  patterns; the input URI must name an object), a model not in the registry (``The
  model M is not in the model registry``) or without a ``batch`` entry (``The model M
  does not support batch inference``), modelInvocationType InvokeModel (devmodel reads
  every record as a Converse request), and a server started without an S3 endpoint.
* Input: the JSONL object at the input URI, one record a line, ``{"recordId"?,
  "modelInput": <a Converse request body>}`` (blank lines skipped; a record without
  recordId gets its line number, 11 digits).
* Output, once the job ends after validating (Completed, PartiallyCompleted, Stopped,
  Expired), at ``<output prefix><jobId>/`` (a prefix without a trailing "/" gets one):
  ``<input file name>.out`` with one line per processed record in input order,
  ``{"recordId", "modelInput", "modelOutput": {"output": {"message": {"role":
  "assistant", "content": [{"text"}]}}, "stopReason", "usage", "serviceTier"?}}`` or
  ``{"recordId", "modelInput", "error": {"errorCode": <HTTP status>, "errorMessage"}}``;
  and ``manifest.json.out`` = ``{"totalRecordCount", "processedRecordCount",
  "successRecordCount", "errorRecordCount", "inputTokenCount", "outputTokenCount"}``
  (token counts: the sums of the successful records' inputTokens / outputTokens).
* S3 is reached with urllib, path-style (``ENDPOINT/bucket/key``), at ``--s3-endpoint
  URL`` / ``start_server(s3_endpoint=...)``, requests SigV4-signed with the environment's
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and AWS_REGION (read
  once; "test" / us-east-1 when unset). moto refuses an unsigned GET (403) and stores
  an empty object for a PUT with urllib's default form Content-Type, hence both.

Batch job lifecycle
-------------------
Time is the server clock (``start_server(clock=...)``, monotonic seconds) and each job
keeps the timing in force when it was created (``PUT /_dev/batch``):

* ``Submitted`` for ``start_delay_ms``, then ``Validating`` for ``validate_ms``. At the
  end of validation the input is read: a missing object, a line that is not JSON or not
  an object with a ``modelInput`` object (``Line N of s3://...``), or fewer records than
  the model's ``batch.min_records`` (``... has N records; model M needs at least K
  records per batch job``) make the job ``Failed`` with that ``message`` and no output.
* ``InProgress``: record i (0-based) is answered ``(i + 1) x run_ms_per_record`` after
  validation ended (all at once when it is 0), by the same rules engine as a converse
  call on the job's modelId (``stream`` false): Bedrock's lever checks, match, reply,
  usage (scripted or estimated; cache fields only if scripted or the record has a
  cachePoint), ``maxTokens`` / stop sequences, and ``error`` / ``fail_first`` /
  ``fail_rate`` counting records as calls. ``latency_ms`` is not slept. A record whose
  modelInput is not a valid Converse body, that a lever check refuses or whose rule
  fails becomes an ``error`` line with the HTTP status of that error type.
* After the last record: ``Completed`` if every record succeeded, else
  ``PartiallyCompleted`` (even if all failed; ``Failed`` is for the job itself: input
  validation, or writing the output failing).
* Stop before the end: ``Stopping`` at once (no further record is processed), then
  ``Stopped`` ``stop_ms`` later, writing the records processed so far (nothing if it
  was stopped before validation ended).
* ``Expired`` at submitTime + timeoutDurationInHours if not finished by then, writing
  the records processed by then. ``Scheduled`` is never used.
* Jobs advance lazily, each transition at the clock time it fell due: whenever they are
  read (Get, List, Stop, ``GET /_dev/calls``, ``GET /_dev/batch``), so a fake clock
  makes the lifecycle deterministic. A job nobody reads does not move (the runner polls).

Rules file
----------
::

    {
      "default": {"text": "OK", "latency_ms": 0},
      "rules": [
        {
          "name": "extract",
          "match": {"model": "amazon.nova-micro-v1:0",
                    "prompt_contains": "List the distinct issues",
                    "system_contains": "support analyst",
                    "prompt_regex": "issues?",
                    "stream": true},
          "reply": {"text": "plain text"},      # or {"json": {...}} -> compact JSON text
          "usage": {"input_tokens": 120, "output_tokens": 30,
                    "cache_read_tokens": 0, "cache_write_tokens": 0},
          "latency_ms": 400,
          "fail_first": {"count": 2, "error": "ThrottlingException", "message": "..."},
          "fail_rate": {"rate": 0.5, "error": "ThrottlingException", "message": "...", "seed": 7},
          "error": {"type": "ValidationException", "message": "..."},
          "stream_error_after_chunks": 2,
          "stream_error": {"type": "throttlingException", "message": "..."},
          "stream_chunk_chars": 12
        }
      ]
    }

* Every field except ``match`` is optional, and every ``match`` key is optional; match
  keys are ANDed. ``model`` is an exact match on the URL-decoded model id;
  ``prompt_contains`` / ``system_contains`` are substring matches; ``prompt_regex`` is
  ``re.search`` over the prompt (add ``(?s)`` yourself if you need DOTALL); ``stream``
  restricts a rule to streaming (true) or non-streaming (false) calls.
* The *prompt* is the ``text`` of every content block of every message joined with
  "\\n"; the *system text* is the ``text`` of every system block joined with "\\n".
* The first matching rule wins; otherwise ``default`` is used (which takes the same
  fields as a rule, minus ``match``). ``text`` / ``json`` at the top level of a rule are
  shorthand for ``reply: {"text"|"json": ...}``.
* Keys starting with ``_`` are ignored anywhere in a rule, so JSON files can carry
  ``"_comment"`` entries. Any other unknown key is rejected, to catch typos.
* ``usage`` defaults: input = ceil(len(system + prompt) / 4) minus the cache tokens
  reported (never below 0), output = ceil(len(reply) / 4), each estimate at least 1.
  Cache fields come from the simulated cache (see "Cost levers") unless the rule sets
  ``cache_read_tokens`` or ``cache_write_tokens``: then the rule's numbers are reported
  (even 0; the other one as 0 when the request had a cachePoint, else left out) and the
  simulated cache is neither read nor written. A scripted ``input_tokens`` is reported
  as is. ``totalTokens`` = input + output + cache read + cache write, as Bedrock counts.
* ``inferenceConfig.stopSequences``: the reply is cut before the earliest stop sequence
  (stopReason ``stop_sequence``). ``inferenceConfig.maxTokens``: when the output tokens
  exceed it, the reply is cut to the same fraction of its characters, output tokens
  become maxTokens and stopReason is ``max_tokens``.
* Failure scripting shares one per-rule counter, n = how many calls have matched this
  rule since the last reset (1-based, streaming or not):
    - ``error``: every call fails with that HTTP error.
    - ``fail_first``: calls with n <= count fail with that HTTP error (default
      ThrottlingException); later calls succeed.
    - ``fail_rate``: a throttling storm. Each call fails with that HTTP error (default
      ThrottlingException) with probability ``rate`` (required, 0..1), drawn from the
      rule's own random stream seeded with ``seed`` (default 0): one draw per matching
      call, in arrival order, so a given call order fails the same calls on every run.
      ``error`` and ``fail_first`` take precedence (the draw is still made). Reset and
      replacing the rules restart the stream. Applies to converse and converse-stream
      alike (the stream then fails before its first byte).
    - ``stream_error_after_chunks: K``: the one call with n == fail_first.count + 1
      (i.e. the first call that gets past ``fail_first``; n == 1 without it), if it is a
      converse-stream call, sends messageStart and K text deltas (at most all of them)
      and then an exception frame of ``stream_error.type`` (default
      throttlingException). If that call is a plain converse call, it simply succeeds.
* ``latency_ms`` is slept before a converse reply and reported as ``metrics.latencyMs``.
  For converse-stream, half of it passes before the first byte and the rest is spread
  evenly after each text delta. Scripted errors are returned immediately.

Cost levers
-----------
Which model offers which lever is read from the model registry, ``shared/models.json``
(``--models PATH`` / ``start_server(models_path=...)`` to use another): per bare model
id, ``cache: {min_tokens, max_points}``, ``tiers: {"flex": pct, "priority": pct}``,
``structured_output: true`` and ``batch: {min_records}`` (batch inference, above). A profile id (``global.``, ``us.``, ``us-gov.``, ``eu.``,
``apac.``, ``jp.``, ``au.`` + bare id) has its model's levers; a model not in the
registry has none (and is otherwise served as any other). Bedrock's checks run before
any rule: a refused call is answered 400 ValidationException, logged with ``rule`` null,
and advances no rule's counter.

* Prompt caching. The request's text in order is the system blocks, then every
  message's content blocks; a cachePoint marks the prefix before it (system text and
  prompt text so far, joined as the whole request's are), of ceil(len / 4) tokens.
    - A cachePoint on a model without ``cache`` is refused (``The model M does not
      support prompt caching (cachePoint)``), so are more than ``max_points`` of them,
      a ``type`` other than ``default`` and a ``ttl`` other than ``5m``.
    - The n-th cachePoint (1-based, in request order) counts only if its prefix has at
      least n x ``min_tokens`` tokens; one that falls short is ignored silently.
    - From the longest counting prefix down, the first one cached for the same bare
      model id within the TTL is read: ``cacheReadInputTokens`` = its tokens. Every
      counting prefix longer than it is written (stored), and ``cacheWriteInputTokens``
      = longest prefix tokens - read tokens. The TTL is 5 minutes from the last write
      or hit, on a monotonic clock (``start_server(clock=...)`` to control it).
    - The cache is per server; ``POST /_dev/reset`` empties it. A call failed by a
      scripted error neither reads nor writes it; a stream broken by
      ``stream_error_after_chunks`` has already settled it.
* Service tiers. ``serviceTier.type`` must be default, flex or priority; flex or
  priority on a model whose ``tiers`` lack it is refused (``The model M does not support
  the T service tier``). The reply echoes the tier asked for.
* ``requestMetadata``: at most 16 pairs; keys 1-256 and values 0-256 characters of
  ``[a-zA-Z0-9\\s:_@$#=/+,.-]``; else refused naming the key.
* Structured output. ``outputConfig.textFormat`` (type ``json_schema``) on a model
  without ``structured_output`` is refused; otherwise its ``schema`` string must parse as
  JSON. The reply is the rule's as scripted, conforming or not (so a client's
  validate-and-retry path can be tested). ``outputConfig`` without ``textFormat`` is
  accepted as is.

Admin API
---------
* ``GET  /_dev/health`` -> ``{"ok": true}``
* ``GET  /_dev/calls``  -> ``{"calls": [{seq, model, rule, prompt, system, stream, status,
  error, at, ...}]}`` in arrival order (optional query filters: ``rule``, ``model``,
  ``prompt_contains``). ``rule`` is null when the default answered or Bedrock's checks
  refused the call. Every call also carries its levers: ``cache_points`` (how many
  cachePoint blocks), ``cache_read_tokens`` / ``cache_write_tokens`` (as reported in
  the usage; null when the usage had none or no usage was sent), ``service_tier`` (the
  type asked for, or null), ``request_metadata`` (the map sent, or null) and
  ``output_schema`` (the parsed JSON Schema, or null). ``batch_job`` (the job id) and
  ``record_id`` say which batch record a call answered (both null for a converse call).
  The listing first advances the batch jobs to now.
* ``POST /_dev/reset``  -> clears the call log, all per-rule counters, the prompt
  cache and the batch jobs (the batch timing stays).
* ``GET  /_dev/batch``  -> ``{"timing": {...}, "s3_endpoint": URL | null, "jobs":
  [GetModelInvocationJob replies]}``.
* ``PUT  /_dev/batch``  with any of ``{"start_delay_ms": 0, "validate_ms": 100,
  "run_ms_per_record": 2, "stop_ms": 50}`` (the defaults; numbers >= 0) -> changes those
  for jobs created afterwards; answers ``{"ok": true, "timing": {...}}``, or 400 naming
  the bad field.
* ``GET  /_dev/rules``  -> the current rules document.
* ``PUT  /_dev/rules``  -> replaces the whole rules document (and resets counters).
* ``POST /_dev/rules``  with ``{"rules": [...]}`` -> prepends those rules, so parallel
  tests can add rules keyed on unique prompt markers without clobbering each other.
  Invalid documents are answered 400 with a message naming the bad field.

Usage
-----
``python -m infra.devmodel --host 127.0.0.1 --port 0 --rules infra/devmodel-rules.json
[--models shared/models.json] [--s3-endpoint URL] [--batch-timing JSON] [--port-file
PATH] [--quiet]`` prints ``devmodel listening on http://HOST:PORT`` once ready
(``--batch-timing`` takes what ``PUT /_dev/batch`` takes). In-process: ``server, url =
start_server(rules_dict, models_path=None, clock=None, s3_endpoint=None,
batch_timing=None)``; ``server.shutdown()``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import hmac
import json
import math
import os
import random
import re
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from http.server import BaseHTTPRequestHandler

from . import INFRA, ROOT
from .serve import StoppableServer, read_body, serve_until_stopped

# HTTP status for each error Converse / ConverseStream can return before the body starts
# (taken from the bedrock-runtime service model).
HTTP_ERRORS = {
    "ThrottlingException": 429,
    "ServiceUnavailableException": 503,
    "InternalServerException": 500,
    "ModelTimeoutException": 408,
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ModelNotReadyException": 429,
    "ModelErrorException": 424,
}

# Exception members of the ConverseStreamOutput union, i.e. what may appear as the
# `:exception-type` of a mid-stream exception frame.
STREAM_ERRORS = (
    "throttlingException",
    "internalServerException",
    "serviceUnavailableException",
    "modelStreamErrorException",
    "validationException",
)

DEFAULT_CHUNK_CHARS = 12
CHARS_PER_TOKEN = 4

RULE_KEYS = {
    "name", "match", "reply", "text", "json", "usage", "latency_ms", "fail_first", "fail_rate",
    "error", "stream_error_after_chunks", "stream_error", "stream_chunk_chars",
}
MATCH_KEYS = {"model", "prompt_contains", "system_contains", "prompt_regex", "stream"}
USAGE_KEYS = {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"}

# The model registry chainrun prices and validates with; the cost levers a model offers
# live there and nowhere else.
DEFAULT_MODELS = ROOT / "shared" / "models.json"
# Cross-region inference profile prefixes (the registry's `_doc` lists the same).
PROFILE_PREFIXES = ("global.", "us-gov.", "us.", "eu.", "apac.", "jp.", "au.")
# Bedrock's default cache checkpoint lives 5 minutes, refreshed by every hit.
CACHE_TTL_S = 300.0
SERVICE_TIERS = ("default", "flex", "priority")
METADATA_MAX_PAIRS = 16
METADATA_MAX_CHARS = 256
# The service model's pattern for requestMetadata keys and values. re.ASCII: Smithy's
# \s is ASCII whitespace, Python's would also take Unicode spaces.
METADATA_CHARS = re.compile(r"[a-zA-Z0-9\s:_@$#=/+,.-]*", re.ASCII)


class RulesError(ValueError):
    """A rules document is invalid; the message starts with the offending field path."""


class RegistryError(ValueError):
    """The model registry is unreadable; the message names the file and the bad field."""


# --------------------------------------------------------------------------------------
# Model registry: which cost levers each model offers
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Levers:
    """What one model offers beyond a plain on-demand call."""

    cache_min_tokens: int | None = None  # None: no explicit prompt caching
    cache_max_points: int = 0
    tiers: frozenset = frozenset()       # tiers beyond default
    structured_output: bool = False
    batch_min_records: int | None = None  # None: no batch inference


NO_LEVERS = Levers()


def load_registry(path) -> dict[str, Levers]:
    """Read the levers of every model in models.json; raise RegistryError naming the field."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot read the model registry: {exc}") from exc
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise RegistryError(f"{path}: models: must be an object")
    registry = {}
    for model_id, entry in models.items():
        where = f"{path}: models.{model_id}"
        if not isinstance(entry, dict):
            raise RegistryError(f"{where}: must be an object")
        cache = entry.get("cache")
        min_tokens, max_points = None, 0
        if cache is not None:
            if not isinstance(cache, dict):
                raise RegistryError(f"{where}.cache: must be an object")
            for key in ("min_tokens", "max_points"):
                value = cache.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise RegistryError(f"{where}.cache.{key}: must be an integer >= 1")
            min_tokens, max_points = cache["min_tokens"], cache["max_points"]
        tiers = entry.get("tiers", {})
        if not isinstance(tiers, dict) or any(t not in SERVICE_TIERS[1:] for t in tiers):
            raise RegistryError(f"{where}.tiers: must be an object keyed by {' / '.join(SERVICE_TIERS[1:])}")
        structured = entry.get("structured_output", False)
        if not isinstance(structured, bool):
            raise RegistryError(f"{where}.structured_output: must be true or false")
        batch = entry.get("batch")
        batch_min = None
        if batch is not None:
            value = batch.get("min_records") if isinstance(batch, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RegistryError(f"{where}.batch.min_records: must be an integer >= 1")
            batch_min = value
        registry[model_id] = Levers(min_tokens, max_points, frozenset(tiers), structured, batch_min)
    return registry


def bare_model_id(model_id: str) -> str:
    """The registry key of a model id: an inference profile id without its prefix."""
    for prefix in PROFILE_PREFIXES:
        if model_id.startswith(prefix):
            return model_id[len(prefix):]
    return model_id


# --------------------------------------------------------------------------------------
# Rules: parsing and validation
# --------------------------------------------------------------------------------------


class Rule:
    """One validated rule plus its per-rule call counter (guarded by the state lock)."""

    def __init__(self, source: dict, name: str | None, match: dict, regex,
                 reply_text: str, usage: dict, latency_ms: float,
                 fail_first: tuple[int, str, str], fail_rate: tuple[float, str, str, int] | None,
                 error: tuple[str, str] | None,
                 stream_error_after: int | None, stream_error: tuple[str, str],
                 chunk_chars: int):
        self.source = source
        self.name = name
        self.match = match
        self.regex = regex
        self.reply_text = reply_text
        self.usage = usage
        self.latency_ms = latency_ms
        self.fail_first = fail_first
        self.fail_rate = fail_rate
        self.error = error
        self.stream_error_after = stream_error_after
        self.stream_error = stream_error
        self.chunk_chars = chunk_chars
        self.restart()

    def restart(self) -> None:
        """Back to the first call: counter at 0, fail_rate's random stream from its seed."""
        self.calls = 0
        self.rng = random.Random(self.fail_rate[3] if self.fail_rate else 0)

    def draw_failure(self) -> bool:
        """Whether fail_rate fails this call (one draw per call; no draw without fail_rate)."""
        return self.fail_rate is not None and self.rng.random() < self.fail_rate[0]

    def matches(self, model: str, prompt: str, system: str, stream: bool) -> bool:
        m = self.match
        if "model" in m and m["model"] != model:
            return False
        if "prompt_contains" in m and m["prompt_contains"] not in prompt:
            return False
        if "system_contains" in m and m["system_contains"] not in system:
            return False
        if self.regex is not None and not self.regex.search(prompt):
            return False
        if "stream" in m and m["stream"] != stream:
            return False
        return True


def _fail(path: str, message: str):
    raise RulesError(f"{path}: {message}")


def _check_keys(obj: dict, allowed: set, path: str):
    for key in obj:
        if key.startswith("_"):
            continue  # documentation entries such as "_comment"
        if key not in allowed:
            _fail(f"{path}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _require_object(value, path: str) -> dict:
    if not isinstance(value, dict):
        _fail(path, "must be an object")
    return value


def _require_str(value, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, "must be a string")
    return value


def _require_int(value, path: str, minimum: int) -> int:
    # bool is an int subclass in Python; `true` is never a sensible count.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(path, f"must be an integer >= {minimum}")
    return value


def _require_error_type(value, path: str) -> str:
    if value not in HTTP_ERRORS:
        _fail(path, f"unknown error type {value!r} (expected one of: {', '.join(HTTP_ERRORS)})")
    return value


def _parse_reply_text(rule: dict, path: str) -> str:
    """Resolve `reply: {text|json}` or the top-level `text` / `json` shorthand to text."""
    sources = [k for k in ("reply", "text", "json") if k in rule]
    if len(sources) > 1:
        _fail(f"{path}.{sources[1]}", f"conflicts with {path}.{sources[0]}; give the reply once")
    if not sources:
        return "OK"
    if sources[0] == "reply":
        reply = _require_object(rule["reply"], f"{path}.reply")
        _check_keys(reply, {"text", "json"}, f"{path}.reply")
        inner = [k for k in ("text", "json") if k in reply]
        if len(inner) != 1:
            _fail(f"{path}.reply", "must have exactly one of 'text' or 'json'")
        holder, key, where = reply, inner[0], f"{path}.reply.{inner[0]}"
    else:
        holder, key, where = rule, sources[0], f"{path}.{sources[0]}"
    if key == "text":
        return _require_str(holder[key], where)
    # Compact separators: the runner should see what a terse model would emit.
    return json.dumps(holder[key], separators=(",", ":"), ensure_ascii=False)


def parse_rule(obj, path: str, is_default: bool = False) -> Rule:
    """Validate one rule object and build a Rule; raise RulesError naming the bad field."""
    rule = _require_object(obj, path)
    _check_keys(rule, RULE_KEYS - {"match"} if is_default else RULE_KEYS, path)

    name = None
    if "name" in rule:
        name = _require_str(rule["name"], f"{path}.name")

    match: dict = {}
    regex = None
    if not is_default:
        if "match" not in rule:
            _fail(f"{path}.match", "is required (use {} to match every call)")
        match = _require_object(rule["match"], f"{path}.match")
        _check_keys(match, MATCH_KEYS, f"{path}.match")
        for key in ("model", "prompt_contains", "system_contains", "prompt_regex"):
            if key in match:
                _require_str(match[key], f"{path}.match.{key}")
        if "stream" in match and not isinstance(match["stream"], bool):
            _fail(f"{path}.match.stream", "must be true or false")
        if "prompt_regex" in match:
            try:
                regex = re.compile(match["prompt_regex"])
            except re.error as exc:
                _fail(f"{path}.match.prompt_regex", f"invalid regular expression: {exc}")

    reply_text = _parse_reply_text(rule, path)

    usage: dict = {}
    if "usage" in rule:
        usage = _require_object(rule["usage"], f"{path}.usage")
        _check_keys(usage, USAGE_KEYS, f"{path}.usage")
        for key, value in usage.items():
            if not key.startswith("_"):
                _require_int(value, f"{path}.usage.{key}", 0)

    latency_ms: float = 0
    if "latency_ms" in rule:
        latency_ms = rule["latency_ms"]
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or latency_ms < 0:
            _fail(f"{path}.latency_ms", "must be a number >= 0")

    fail_first = (0, "ThrottlingException", "Too many requests, please wait before trying again.")
    if "fail_first" in rule:
        ff = _require_object(rule["fail_first"], f"{path}.fail_first")
        _check_keys(ff, {"count", "error", "message"}, f"{path}.fail_first")
        if "count" not in ff:
            _fail(f"{path}.fail_first.count", "is required")
        count = _require_int(ff["count"], f"{path}.fail_first.count", 0)
        err_type = _require_error_type(ff.get("error", fail_first[1]), f"{path}.fail_first.error")
        message = _require_str(ff.get("message", f"devmodel: scripted {err_type}"),
                               f"{path}.fail_first.message")
        fail_first = (count, err_type, message)

    fail_rate = None
    if "fail_rate" in rule:
        fr = _require_object(rule["fail_rate"], f"{path}.fail_rate")
        _check_keys(fr, {"rate", "error", "message", "seed"}, f"{path}.fail_rate")
        if "rate" not in fr:
            _fail(f"{path}.fail_rate.rate", "is required")
        rate = fr["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            _fail(f"{path}.fail_rate.rate", "must be a number in [0, 1]")
        err_type = _require_error_type(fr.get("error", "ThrottlingException"), f"{path}.fail_rate.error")
        message = _require_str(fr.get("message", f"devmodel: scripted {err_type} (fail_rate)"),
                               f"{path}.fail_rate.message")
        seed = fr.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            _fail(f"{path}.fail_rate.seed", "must be an integer")
        fail_rate = (float(rate), err_type, message, seed)

    error = None
    if "error" in rule:
        err = _require_object(rule["error"], f"{path}.error")
        _check_keys(err, {"type", "message"}, f"{path}.error")
        if "type" not in err:
            _fail(f"{path}.error.type", "is required")
        err_type = _require_error_type(err["type"], f"{path}.error.type")
        message = _require_str(err.get("message", f"devmodel: scripted {err_type}"),
                               f"{path}.error.message")
        error = (err_type, message)

    stream_error_after = None
    if "stream_error_after_chunks" in rule:
        stream_error_after = _require_int(rule["stream_error_after_chunks"],
                                          f"{path}.stream_error_after_chunks", 0)

    stream_error = ("throttlingException", "devmodel: scripted mid-stream throttlingException")
    if "stream_error" in rule:
        se = _require_object(rule["stream_error"], f"{path}.stream_error")
        _check_keys(se, {"type", "message"}, f"{path}.stream_error")
        se_type = _require_str(se.get("type", stream_error[0]), f"{path}.stream_error.type")
        # Accept the HTTP-style spelling ("ThrottlingException") too: the event-stream
        # member name is the same word with a lower-case first letter.
        se_type = se_type[:1].lower() + se_type[1:]
        if se_type not in STREAM_ERRORS:
            _fail(f"{path}.stream_error.type",
                  f"unknown stream exception {se.get('type')!r} (expected one of: {', '.join(STREAM_ERRORS)})")
        message = _require_str(se.get("message", f"devmodel: scripted mid-stream {se_type}"),
                               f"{path}.stream_error.message")
        stream_error = (se_type, message)

    chunk_chars = DEFAULT_CHUNK_CHARS
    if "stream_chunk_chars" in rule:
        chunk_chars = _require_int(rule["stream_chunk_chars"], f"{path}.stream_chunk_chars", 1)

    return Rule(rule, name, match, regex, reply_text, usage, latency_ms, fail_first, fail_rate, error,
                stream_error_after, stream_error, chunk_chars)


def parse_rule_list(value, path: str = "rules") -> list[Rule]:
    if not isinstance(value, list):
        _fail(path, "must be a list")
    return [parse_rule(item, f"{path}[{i}]") for i, item in enumerate(value)]


def parse_rules_document(doc) -> tuple[Rule, list[Rule]]:
    """Validate a full rules document; return (default rule, ordered rules)."""
    doc = _require_object(doc, "(document)")
    for key in doc:
        if not key.startswith("_") and key not in ("default", "rules"):
            _fail(key, "unknown top-level field (allowed: default, rules)")
    default = parse_rule(doc.get("default", {"text": "OK"}), "default", is_default=True)
    rules = parse_rule_list(doc.get("rules", []))
    return default, rules


# --------------------------------------------------------------------------------------
# Shared server state
# --------------------------------------------------------------------------------------


def batch_fields(batch: tuple[str, str] | None) -> dict:
    """The call log's batch fields: which batch job and record a call answered, or nulls."""
    job_id, record_id = batch or (None, None)
    return {"batch_job": job_id, "record_id": record_id}


@dataclasses.dataclass
class Answer:
    """The outcome of one call through the rules engine: a scripted error, or a reply."""

    rule: "Rule"            # the rule that answered (the default when none matched)
    call_number: int        # the rule's 1-based call counter for this call
    entry: dict             # the call's log entry
    error: tuple[str, str] | None = None  # (error type, message)
    text: str = ""
    stop_reason: str = ""
    usage: dict | None = None
    tier: dict = dataclasses.field(default_factory=dict)


class DevModelState:
    """Rules, per-rule counters, the call log and the prompt cache, shared by all handler
    threads."""

    def __init__(self, rules_doc: dict, models_path=None, clock=None, s3_endpoint: str | None = None,
                 batch_timing: dict | None = None):
        self.lock = threading.Lock()
        self.default, self.rules = parse_rules_document(rules_doc)
        self.registry = load_registry(DEFAULT_MODELS if models_path is None else models_path)
        # Monotonic seconds; tests pass their own to expire cache entries without waiting.
        self.clock = clock or time.monotonic
        # Prompt cache: digest of (bare model id, prefix) -> clock time it expires.
        self.cache: dict[bytes, float] = {}
        self.calls: list[dict] = []
        self.seq = 0
        self.batch = BatchJobs(self, s3_endpoint, batch_timing)

    def levers(self, model_id: str) -> Levers:
        return self.registry.get(bare_model_id(model_id), NO_LEVERS)

    def settle_cache(self, model_id: str, levers: Levers, checkpoints: list) -> tuple[int, int]:
        """(cache read tokens, cache write tokens) of a call, as Bedrock counts them, and
        the cache updated accordingly.

        A checkpoint counts only if its prefix reaches n x min_tokens (n its 1-based
        position). From the longest counting prefix down, the first one cached (and
        unexpired) is read and its TTL refreshed; every counting prefix longer than it is
        written, and the write is reported as the tokens between the read prefix and the
        longest one (the model processes those once, at the write price).
        """
        bare = bare_model_id(model_id)
        counting = []  # (prefix tokens, cache key), shortest first
        for n, (system, prompt) in enumerate(checkpoints, 1):
            tokens = estimate_tokens(system + prompt)
            if tokens >= n * levers.cache_min_tokens:
                counting.append((tokens, self._cache_key(bare, system, prompt)))
        if not counting:
            return 0, 0
        with self.lock:
            now = self.clock()
            for key in [k for k, expires in self.cache.items() if expires <= now]:
                del self.cache[key]  # keeps a long-lived stack's cache bounded
            hit = next((i for i in range(len(counting) - 1, -1, -1)
                        if counting[i][1] in self.cache), None)
            read = 0 if hit is None else counting[hit][0]
            # Refresh the hit's TTL and write every longer prefix.
            for _, key in counting[hit or 0:]:
                self.cache[key] = now + CACHE_TTL_S
        return read, counting[-1][0] - read

    @staticmethod
    def _cache_key(bare_model: str, system: str, prompt: str) -> bytes:
        digest = hashlib.sha256()
        for part in (bare_model, system, prompt):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "big") + data)
        return digest.digest()

    def replace_rules(self, doc) -> None:
        default, rules = parse_rules_document(doc)  # validate before touching state
        with self.lock:
            self.default, self.rules = default, rules  # fresh Rule objects: counters at 0

    def prepend_rules(self, doc) -> int:
        doc = _require_object(doc, "(document)")
        _check_keys(doc, {"rules"}, "(document)")
        if "rules" not in doc:
            _fail("rules", "is required")
        new_rules = parse_rule_list(doc["rules"])
        with self.lock:
            self.rules = new_rules + self.rules
            return len(self.rules)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.cache.clear()
            self.seq = 0
            for rule in [self.default, *self.rules]:
                rule.restart()
        self.batch.clear()

    def rules_document(self) -> dict:
        with self.lock:
            return {"default": copy.deepcopy(self.default.source),
                    "rules": [copy.deepcopy(r.source) for r in self.rules]}

    def record_call(self, model: str, request: ConverseRequest, stream: bool,
                    batch: tuple[str, str] | None = None) -> tuple[Rule | None, int, bool, dict]:
        """Log an incoming model call, pick its rule, bump that rule's counter and draw
        its fail_rate.

        Returns (rule or None for the default, the rule's 1-based call number, whether
        fail_rate fails it, log entry). Matching, counting and drawing happen under one
        lock so concurrent retries of the same rule see distinct call numbers and draws.
        batch is (job id, record id) for a batch inference record.
        """
        prompt, system = request.prompt, request.system
        with self.lock:
            rule = next((r for r in self.rules if r.matches(model, prompt, system, stream)), None)
            chosen = rule or self.default
            chosen.calls += 1
            rate_failure = chosen.draw_failure()
            self.seq += 1
            entry = {
                "seq": self.seq,
                "model": model,
                "rule": None if rule is None else (rule.name or f"#{self.rules.index(rule)}"),
                "prompt": prompt,
                "system": system,
                "stream": stream,
                "max_tokens": request.inference.get("maxTokens"),
                "status": None,  # filled in once the outcome is known
                "error": None,
                "stop_reason": None,
                "usage": None,
                **request.log_fields(),
                "cache_read_tokens": None,  # as reported, once the usage is known
                "cache_write_tokens": None,
                **batch_fields(batch),
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            }
            self.calls.append(entry)
            return rule, chosen.calls, rate_failure, entry

    def record_rejected_call(self, model: str, stream: bool, message: str,
                             request: ConverseRequest | None,
                             batch: tuple[str, str] | None = None) -> None:
        """Log a call Bedrock would refuse before the model runs (it still counts as
        received, but no rule sees it); request is None when the body was unreadable."""
        asked = request.log_fields() if request else {
            "cache_points": 0, "service_tier": None, "request_metadata": None, "output_schema": None}
        with self.lock:
            self.seq += 1
            self.calls.append({
                "seq": self.seq, "model": model, "rule": None,
                "prompt": request.prompt if request else "",
                "system": request.system if request else "",
                "stream": stream,
                "max_tokens": request.inference.get("maxTokens") if request else None,
                "status": 400, "error": "ValidationException", "error_message": message,
                "stop_reason": None, "usage": None,
                **asked, "cache_read_tokens": None, "cache_write_tokens": None,
                **batch_fields(batch),
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            })

    def answer(self, model_id: str, request: ConverseRequest, stream: bool,
               batch: tuple[str, str] | None = None) -> "Answer":
        """Run the rules engine on a request Bedrock's checks accepted: log the call, pick
        its rule, apply the scripted failures, settle the prompt cache and shape the reply.
        A scripted failure is already recorded in the log entry; a reply is not yet (the
        caller records it once it is sent)."""
        rule, call_number, rate_failure, entry = self.record_call(model_id, request, stream, batch)
        chosen = rule or self.default

        scripted_error = chosen.error
        fail_count, fail_type, fail_message = chosen.fail_first
        if scripted_error is None and call_number <= fail_count:
            scripted_error = (fail_type, fail_message)
        if scripted_error is None and rate_failure:
            scripted_error = chosen.fail_rate[1:3]
        if scripted_error is not None:
            self.update_call(entry, status=HTTP_ERRORS[scripted_error[0]], error=scripted_error[0])
            return Answer(chosen, call_number, entry, error=scripted_error)

        cache = None
        if request.checkpoints:
            if {"cache_read_tokens", "cache_write_tokens"} & chosen.usage.keys():
                # The rule scripts what the cache did; the simulated cache is left alone.
                cache = (chosen.usage.get("cache_read_tokens", 0), chosen.usage.get("cache_write_tokens", 0))
            else:
                cache = self.settle_cache(model_id, self.levers(model_id), request.checkpoints)
        text, stop_reason, usage = shape_reply(chosen, request, cache)
        self.update_call(entry, cache_read_tokens=usage.get("cacheReadInputTokens"),
                         cache_write_tokens=usage.get("cacheWriteInputTokens"))
        # Bedrock echoes the tier only when one was asked for.
        tier = {} if request.service_tier is None else {"serviceTier": {"type": request.service_tier["type"]}}
        return Answer(chosen, call_number, entry, text=text, stop_reason=stop_reason, usage=usage,
                      tier=tier)

    def update_call(self, entry: dict, **fields) -> None:
        with self.lock:
            entry.update(fields)

    def snapshot_calls(self, filters: dict) -> list[dict]:
        with self.lock:
            calls = [dict(c) for c in self.calls]
        if "rule" in filters:
            calls = [c for c in calls if c["rule"] == filters["rule"]]
        if "model" in filters:
            calls = [c for c in calls if c["model"] == filters["model"]]
        if "prompt_contains" in filters:
            calls = [c for c in calls if filters["prompt_contains"] in c["prompt"]]
        return calls


# --------------------------------------------------------------------------------------
# Request interpretation and reply shaping
# --------------------------------------------------------------------------------------


class BadRequest(Exception):
    """The model call body is not a valid Converse request (-> ValidationException)."""


@dataclasses.dataclass
class ConverseRequest:
    """What devmodel reads from a Converse body: the text, the inference settings and the
    cost levers as sent (checked against the model by `check_levers`)."""

    prompt: str
    system: str
    inference: dict
    # (system text, prompt text) before each cachePoint, in request order.
    checkpoints: list
    service_tier: object = None      # body["serviceTier"] as sent
    request_metadata: object = None  # body["requestMetadata"] as sent
    output_config: object = None     # body["outputConfig"] as sent
    output_schema: object = None     # the parsed JSON Schema once check_levers accepted it

    def log_fields(self) -> dict:
        """The levers as the call log shows them (what was asked, even when refused)."""
        tier = self.service_tier.get("type") if isinstance(self.service_tier, dict) else None
        return {
            "cache_points": len(self.checkpoints),
            "service_tier": tier,
            "request_metadata": self.request_metadata if isinstance(self.request_metadata, dict) else None,
            "output_schema": self.output_schema,
        }


def _read_blocks(blocks, where: str) -> list[str | None]:
    """The text of each text block and None for each cachePoint, in order."""
    if not isinstance(blocks, list):
        raise BadRequest(f"{where} must be a list")
    items: list[str | None] = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue  # lenient, as before: only text and cache points matter here
        if isinstance(block.get("text"), str):
            items.append(block["text"])
        elif "cachePoint" in block:
            point = block["cachePoint"]
            if not isinstance(point, dict) or point.get("type") != "default":
                raise BadRequest(f'{where}[{index}].cachePoint.type must be "default"')
            if point.get("ttl", "5m") != "5m":
                # Bedrock also has a 1-hour TTL for some models; the registry prices only
                # the 5-minute write, so devmodel refuses what it would simulate wrongly.
                raise BadRequest(f'{where}[{index}].cachePoint.ttl: devmodel serves only "5m"')
            items.append(None)
        # Other blocks (images, tool use) carry no prompt text.
    return items


def parse_request(body) -> ConverseRequest:
    """Read a Converse request body; raise BadRequest for a body Bedrock would refuse
    whatever the model."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    # Each checkpoint's prefix keeps its system and prompt parts apart, joined exactly as
    # the whole request's are, so a prefix's estimate is comparable with the total's.
    checkpoints: list[tuple[str, str]] = []
    system_texts: list[str] = []
    for item in _read_blocks(body.get("system") or [], "system"):
        if item is None:
            checkpoints.append(("\n".join(system_texts), ""))
        else:
            system_texts.append(item)
    system = "\n".join(system_texts)
    texts: list[str] = []
    for m_index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        for item in _read_blocks(message.get("content") or [], f"messages[{m_index}].content"):
            if item is None:
                checkpoints.append((system, "\n".join(texts)))
            else:
                texts.append(item)
    inference = body.get("inferenceConfig") or {}
    if not isinstance(inference, dict):
        raise BadRequest("inferenceConfig must be an object")
    max_tokens = inference.get("maxTokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise BadRequest("inferenceConfig.maxTokens must be an integer >= 1")
    return ConverseRequest(
        prompt="\n".join(texts), system=system, inference=inference, checkpoints=checkpoints,
        service_tier=body.get("serviceTier"), request_metadata=body.get("requestMetadata"),
        output_config=body.get("outputConfig"))


def check_levers(request: ConverseRequest, model_id: str, levers: Levers) -> None:
    """Refuse what Bedrock refuses about the cost levers (raise BadRequest with its reason);
    on success fill in request.output_schema."""
    if request.checkpoints:
        if levers.cache_min_tokens is None:
            raise BadRequest(f"The model {model_id} does not support prompt caching (cachePoint)")
        if len(request.checkpoints) > levers.cache_max_points:
            raise BadRequest(f"{len(request.checkpoints)} cachePoint blocks exceed the maximum of "
                             f"{levers.cache_max_points} for model {model_id}")

    if request.service_tier is not None:
        tier = request.service_tier.get("type") if isinstance(request.service_tier, dict) else None
        if tier not in SERVICE_TIERS:
            raise BadRequest(f"serviceTier.type must be one of {', '.join(SERVICE_TIERS)} (got {tier!r})")
        if tier != "default" and tier not in levers.tiers:
            raise BadRequest(f"The model {model_id} does not support the {tier} service tier")

    metadata = request.request_metadata
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadRequest("requestMetadata must be a map of strings")
        if len(metadata) > METADATA_MAX_PAIRS:
            raise BadRequest(f"requestMetadata has {len(metadata)} pairs; at most {METADATA_MAX_PAIRS} are allowed")
        for key, value in metadata.items():
            if not 1 <= len(key) <= METADATA_MAX_CHARS or not METADATA_CHARS.fullmatch(key):
                raise BadRequest(f"requestMetadata key {key!r} must be 1-{METADATA_MAX_CHARS} characters "
                                 "of [a-zA-Z0-9\\s:_@$#=/+,.-]")
            if (not isinstance(value, str) or len(value) > METADATA_MAX_CHARS
                    or not METADATA_CHARS.fullmatch(value)):
                raise BadRequest(f"requestMetadata value of key {key!r} must be 0-{METADATA_MAX_CHARS} "
                                 "characters of [a-zA-Z0-9\\s:_@$#=/+,.-]")

    config = request.output_config
    if config is not None:
        if not isinstance(config, dict):
            raise BadRequest("outputConfig must be an object")
        text_format = config.get("textFormat")
        if text_format is not None:
            if not isinstance(text_format, dict) or text_format.get("type") != "json_schema":
                raise BadRequest('outputConfig.textFormat.type must be "json_schema"')
            if not levers.structured_output:
                raise BadRequest(f"The model {model_id} does not support structured output "
                                 "(outputConfig.textFormat)")
            structure = text_format.get("structure")
            json_schema = structure.get("jsonSchema") if isinstance(structure, dict) else None
            schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
            if not isinstance(schema, str):
                raise BadRequest("outputConfig.textFormat.structure.jsonSchema.schema must be a string")
            try:
                request.output_schema = json.loads(schema)
            except ValueError as exc:
                raise BadRequest("outputConfig.textFormat.structure.jsonSchema.schema is not valid "
                                 f"JSON: {exc}") from exc


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def shape_reply(rule: Rule, request: ConverseRequest,
                cache: tuple[int, int] | None) -> tuple[str, str, dict]:
    """Apply stop sequences and maxTokens to the scripted reply.

    cache is (read, write) tokens to report, or None to report only what the rule scripts.
    Returns (reply text, stopReason, usage in Bedrock's camelCase shape).
    """
    inference = request.inference
    text = rule.reply_text
    stop_reason = "end_turn"
    usage = rule.usage

    stops = [s for s in inference.get("stopSequences") or [] if isinstance(s, str) and s]
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        text, stop_reason = text[:cut], "stop_sequence"

    output_tokens = usage.get("output_tokens", estimate_tokens(text))
    max_tokens = inference.get("maxTokens")
    if max_tokens is not None and output_tokens > max_tokens:
        # Keep the share of characters that maxTokens allows, whatever the scripted count.
        text = text[: (len(text) * max_tokens) // output_tokens]
        output_tokens, stop_reason = max_tokens, "max_tokens"

    reported = {}
    if cache is not None:
        reported = {"cacheReadInputTokens": cache[0], "cacheWriteInputTokens": cache[1]}
    else:
        for key, wire in (("cache_read_tokens", "cacheReadInputTokens"),
                          ("cache_write_tokens", "cacheWriteInputTokens")):
            if key in usage:
                reported[wire] = usage[key]
    # Bedrock's inputTokens leaves out what was read from or written to the cache, and
    # its totalTokens counts them all.
    cached = sum(reported.values())
    input_tokens = usage.get("input_tokens",
                             max(0, estimate_tokens(request.system + request.prompt) - cached))
    wire_usage = {"inputTokens": input_tokens, "outputTokens": output_tokens,
                  "totalTokens": input_tokens + output_tokens + cached, **reported}
    return text, stop_reason, wire_usage


def split_chunks(text: str, size: int) -> list[str]:
    # An empty reply still gets one (empty) delta so clients see a content block.
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


# --------------------------------------------------------------------------------------
# Batch inference (Bedrock control plane: model invocation jobs)
# --------------------------------------------------------------------------------------

# HTTP status of each error the control-plane operations devmodel serves can return
# (from the bedrock service model: ConflictException is a 400 there).
CONTROL_ERRORS = {"ValidationException": 400, "ResourceNotFoundException": 404, "ConflictException": 400}

BATCH_REGION = "us-east-1"
BATCH_ACCOUNT = "123456789012"
JOB_ARN_PREFIX = f"arn:aws:bedrock:{BATCH_REGION}:{BATCH_ACCOUNT}:model-invocation-job/"
JOB_STATUSES = ("Submitted", "Validating", "Scheduled", "InProgress", "Completed",
                "PartiallyCompleted", "Failed", "Stopping", "Stopped", "Expired")
FINISHED = ("Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired")
# Milliseconds each phase lasts on the server clock; PUT /_dev/batch changes them for
# jobs created afterwards.
DEFAULT_BATCH_TIMING = {"start_delay_ms": 0, "validate_ms": 100, "run_ms_per_record": 2, "stop_ms": 50}
DEFAULT_TIMEOUT_HOURS = 24
CLOCK_TOLERANCE_S = 1e-6
# Patterns from the bedrock service model, so a request the real service would refuse
# is refused here too.
JOB_NAME = re.compile(r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9+\-.]){0,63}")
ROLE_ARN = re.compile(r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+")
REQUEST_TOKEN = re.compile(r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}")
S3_URI = re.compile(r"s3://([a-z0-9][-.a-z0-9]{1,61}[a-z0-9])(?:/(.*))?")
JOB_PATH = re.compile(r"^/model-invocation-job/([^/]+)(/stop)?$")


class ControlError(Exception):
    """A control-plane request refused: (error type, message) -> HTTP error reply."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def parse_s3_uri(uri, where: str, want_key: bool) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; want_key: the URI must name an object, not a prefix."""
    match = S3_URI.fullmatch(uri) if isinstance(uri, str) else None
    if match is None:
        raise ControlError("ValidationException", f"{where} must be an s3://bucket/key URI (got {uri!r})")
    key = match.group(2) or ""
    if want_key and (not key or key.endswith("/")):
        raise ControlError("ValidationException", f"{where} must name an object, not a bucket or prefix (got {uri!r})")
    return match.group(1), key


class S3Error(Exception):
    """An S3 request failed; the message names the URI and what S3 said."""


class S3Client:
    """GET and PUT of whole objects against one S3 endpoint, path-style, with urllib.

    Requests are SigV4-signed with the AWS_* credentials in the environment (read once;
    "test" when unset): moto treats an unsigned GET as anonymous and refuses it with 403,
    and signing is what any S3 endpoint expects anyway."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint.rstrip("/")
        self.access_key = os.environ.get("AWS_ACCESS_KEY_ID") or "test"
        self.secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or "test"
        self.session_token = os.environ.get("AWS_SESSION_TOKEN")
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or BATCH_REGION

    def get(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes, or None when the bucket or key does not exist."""
        status, body = self._request("GET", bucket, key, b"")
        if status == 404:
            return None
        if status != 200:
            raise S3Error(f"GET s3://{bucket}/{key} answered {status}: {body[:200].decode('utf-8', 'replace')}")
        return body

    def put(self, bucket: str, key: str, data: bytes) -> None:
        status, body = self._request("PUT", bucket, key, data)
        if status != 200:
            raise S3Error(f"PUT s3://{bucket}/{key} answered {status}: {body[:200].decode('utf-8', 'replace')}")

    def _request(self, method: str, bucket: str, key: str, data: bytes) -> tuple[int, bytes]:
        path = "/" + urllib.parse.quote(f"{bucket}/{key}", safe="/-_.~")
        url = self.endpoint + path
        host = urllib.parse.urlsplit(url).netloc
        amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        payload_hash = hashlib.sha256(data).hexdigest()
        headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
        if self.session_token:
            headers["x-amz-security-token"] = self.session_token
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                               signed, payload_hash])
        scope = f"{amz_date[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key_bytes = ("AWS4" + self.secret_key).encode()
        for part in (amz_date[:8], self.region, "s3", "aws4_request"):
            key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
        send = {k: v for k, v in headers.items() if k != "host"}
        send["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                 f"SignedHeaders={signed}, Signature={signature}")
        if method == "PUT":
            # Without it urllib sends a form Content-Type and moto reads the body as a form.
            send["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(url, data=data if method == "PUT" else None, method=method,
                                         headers=send)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:
            raise S3Error(f"{method} s3://{bucket}/{key}: cannot reach S3 at {self.endpoint}: {exc}") from exc


def parse_batch_timing(doc, base: dict) -> dict:
    """base updated with the timing fields of doc; raise ControlError naming a bad field."""
    if not isinstance(doc, dict):
        raise ControlError("ValidationException", "(document): must be an object")
    timing = dict(base)
    for key, value in doc.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULT_BATCH_TIMING:
            raise ControlError("ValidationException",
                               f"{key}: unknown field (allowed: {', '.join(sorted(DEFAULT_BATCH_TIMING))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ControlError("ValidationException", f"{key}: must be a number >= 0")
        timing[key] = value
    return timing


@dataclasses.dataclass
class BatchJob:
    """One model invocation job. Times are on the server clock (monotonic seconds)."""

    job_id: str
    name: str
    model_id: str
    role_arn: str
    token: str | None
    request: dict            # the create body as sent (idempotency compares it)
    input_loc: tuple[str, str]
    output_loc: tuple[str, str]  # (bucket, key prefix ending in "/" or "")
    timing: dict
    timeout_hours: int
    submitted: float
    status: str = "Submitted"
    message: str | None = None
    changed: float = 0.0     # when the current status began
    ended: float | None = None
    stop_at: float | None = None
    records: list | None = None  # [(record id, modelInput)] once validated
    lines: list = dataclasses.field(default_factory=list)  # output lines so far, input order
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def arn(self) -> str:
        return JOB_ARN_PREFIX + self.job_id

    def output_key(self, name: str) -> str:
        return f"{self.output_loc[1]}{self.job_id}/{name}"


class BatchJobs:
    """The model invocation jobs of one server. Jobs move through their lifecycle lazily:
    whenever one is read (Get, List, Stop, the calls listing) it is advanced to the server
    clock's now, processing the records that are due by then, so a fake clock makes the
    whole lifecycle deterministic. One lock covers advancing, S3 I/O included."""

    def __init__(self, state: "DevModelState", s3_endpoint: str | None, timing: dict | None):
        self.state = state
        self.s3 = S3Client(s3_endpoint) if s3_endpoint else None
        self.timing = parse_batch_timing(timing or {}, DEFAULT_BATCH_TIMING)
        self.lock = threading.RLock()
        self.jobs: dict[str, BatchJob] = {}
        self.tokens: dict[str, str] = {}
        # Timestamps are the wall clock at start plus server-clock time since, so a test's
        # fake clock moves them too.
        self.clock_base = state.clock()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.wall_base = now.replace(microsecond=now.microsecond // 1000 * 1000)

    # ---- timing and reset -------------------------------------------------------------

    def set_timing(self, doc) -> dict:
        with self.lock:
            self.timing = parse_batch_timing(doc, self.timing)
            return dict(self.timing)

    def clear(self) -> None:
        with self.lock:
            self.jobs.clear()
            self.tokens.clear()

    def iso(self, t: float) -> str:
        # Whole milliseconds, so float error never shows in a timestamp.
        wall = self.wall_base + datetime.timedelta(milliseconds=round((t - self.clock_base) * 1000))
        return wall.strftime("%Y-%m-%dT%H:%M:%S.") + f"{wall.microsecond // 1000:03d}Z"

    # ---- operations -------------------------------------------------------------------

    def create(self, body) -> BatchJob:
        if not isinstance(body, dict):
            raise ControlError("ValidationException", "request body must be a JSON object")
        for field in ("jobName", "roleArn", "modelId", "inputDataConfig", "outputDataConfig"):
            if field not in body:
                raise ControlError("ValidationException", f"{field} is required")
        name, role, model_id = body["jobName"], body["roleArn"], body["modelId"]
        if not isinstance(name, str) or len(name) > 63 or not JOB_NAME.fullmatch(name):
            raise ControlError("ValidationException", f"jobName {name!r} must be 1-63 letters, digits, "
                               "'+', '-' and '.', starting with a letter or digit")
        if not isinstance(role, str) or not ROLE_ARN.fullmatch(role):
            raise ControlError("ValidationException", f"roleArn {role!r} must be an IAM role ARN")
        token = body.get("clientRequestToken")
        if token is not None and (not isinstance(token, str) or len(token) > 256
                                  or not REQUEST_TOKEN.fullmatch(token)):
            raise ControlError("ValidationException", f"clientRequestToken {token!r} must be 1-256 "
                               "letters, digits and '-'")
        if not isinstance(model_id, str) or bare_model_id(model_id) not in self.state.registry:
            raise ControlError("ValidationException", f"The model {model_id} is not in the model registry")
        min_records = self.state.levers(model_id).batch_min_records
        if min_records is None:
            raise ControlError("ValidationException", f"The model {model_id} does not support batch inference")
        invocation_type = body.get("modelInvocationType")
        if invocation_type not in (None, "Converse"):
            raise ControlError("ValidationException", "devmodel reads batch records as Converse requests: "
                               f"modelInvocationType must be Converse or left out (got {invocation_type!r})")
        in_config = body["inputDataConfig"].get("s3InputDataConfig") \
            if isinstance(body["inputDataConfig"], dict) else None
        if not isinstance(in_config, dict):
            raise ControlError("ValidationException", "inputDataConfig.s3InputDataConfig is required")
        if in_config.get("s3InputFormat", "JSONL") != "JSONL":
            raise ControlError("ValidationException", "inputDataConfig.s3InputDataConfig.s3InputFormat must be JSONL")
        input_loc = parse_s3_uri(in_config.get("s3Uri"), "inputDataConfig.s3InputDataConfig.s3Uri", True)
        out_config = body["outputDataConfig"].get("s3OutputDataConfig") \
            if isinstance(body["outputDataConfig"], dict) else None
        if not isinstance(out_config, dict):
            raise ControlError("ValidationException", "outputDataConfig.s3OutputDataConfig is required")
        out_bucket, out_prefix = parse_s3_uri(out_config.get("s3Uri"), "outputDataConfig.s3OutputDataConfig.s3Uri",
                                              False)
        if out_prefix and not out_prefix.endswith("/"):
            out_prefix += "/"  # Bedrock treats the output URI as a folder either way
        hours = body.get("timeoutDurationInHours", DEFAULT_TIMEOUT_HOURS)
        if isinstance(hours, bool) or not isinstance(hours, int) or not 24 <= hours <= 168:
            raise ControlError("ValidationException", "timeoutDurationInHours must be an integer from 24 to 168")
        if self.s3 is None:
            raise ControlError("ValidationException", "devmodel was started without an S3 endpoint "
                               "(--s3-endpoint / start_server(s3_endpoint=...)); batch jobs need one")

        with self.lock:
            if token is not None and token in self.tokens:
                job = self.jobs[self.tokens[token]]
                if job.request != body:
                    raise ControlError("ConflictException", f"clientRequestToken {token} was already used "
                                       f"for job {job.arn} with different parameters")
                return job
            now = self.state.clock()
            job = BatchJob(
                job_id=uuid.uuid4().hex[:12], name=name, model_id=model_id, role_arn=role, token=token,
                request=copy.deepcopy(body), input_loc=input_loc, output_loc=(out_bucket, out_prefix),
                timing=dict(self.timing), timeout_hours=hours, submitted=now, changed=now)
            self.jobs[job.job_id] = job
            if token is not None:
                self.tokens[token] = job.job_id
            return job

    def find(self, identifier: str) -> BatchJob:
        """The job an id or ARN names, advanced to now; ResourceNotFoundException otherwise."""
        job_id = identifier[len(JOB_ARN_PREFIX):] if identifier.startswith(JOB_ARN_PREFIX) else identifier
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise ControlError("ResourceNotFoundException", f"Model invocation job {identifier} not found")
            self.advance(job, self.state.clock())
            return job

    def stop(self, identifier: str) -> None:
        with self.lock:
            job = self.find(identifier)
            if job.status in FINISHED or job.status == "Stopping":
                raise ControlError("ValidationException",
                                   f"Job {job.arn} is {job.status}; only a job that has not finished can be stopped")
            now = self.state.clock()
            job.status, job.changed, job.stop_at = "Stopping", now, now

    def advance_all(self) -> list[BatchJob]:
        with self.lock:
            now = self.state.clock()
            for job in self.jobs.values():
                self.advance(job, now)
            return list(self.jobs.values())

    # ---- lifecycle --------------------------------------------------------------------

    def advance(self, job: BatchJob, now: float) -> None:
        """Move the job through every transition due by `now`, each at the time it fell due."""
        deadline = job.submitted + job.timeout_hours * 3600
        # The tolerance keeps float error (5000.05 + 0.1 > 5000.15) from holding back a
        # transition that is due.
        horizon = min(now, deadline) + CLOCK_TOLERANCE_S
        timing = job.timing
        while True:
            if job.status == "Submitted":
                due = job.submitted + timing["start_delay_ms"] / 1000
                if horizon < due:
                    break
                job.status, job.changed = "Validating", due
            elif job.status == "Validating":
                due = job.changed + timing["validate_ms"] / 1000
                if horizon < due:
                    break
                self.validate(job, due)
            elif job.status == "InProgress":
                per_ms = timing["run_ms_per_record"]
                total = len(job.records)
                ready = total if per_ms == 0 else min(total, int((horizon - job.changed) * 1000 / per_ms))
                while len(job.lines) < ready:
                    self.process(job)
                if len(job.lines) < total:
                    break
                self.finish(job, "PartiallyCompleted" if job.errors else "Completed",
                            job.changed + total * per_ms / 1000)
            elif job.status == "Stopping":
                due = job.stop_at + timing["stop_ms"] / 1000
                if horizon < due:
                    break
                self.finish(job, "Stopped", due)
            else:
                return
        if now >= deadline and job.status not in FINISHED:
            self.finish(job, "Expired", deadline,
                        f"The job did not finish within timeoutDurationInHours ({job.timeout_hours})")

    def validate(self, job: BatchJob, at: float) -> None:
        """Read and check the input file: the job goes InProgress or Failed (at `at`)."""
        bucket, key = job.input_loc
        uri = f"s3://{bucket}/{key}"
        try:
            data = self.s3.get(bucket, key)
        except S3Error as exc:
            self.fail(job, at, str(exc))
            return
        if data is None:
            self.fail(job, at, f"The input file {uri} was not found")
            return
        records = []
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                self.fail(job, at, f"Line {number} of {uri} is not valid JSON: {exc}")
                return
            if not isinstance(record, dict) or not isinstance(record.get("modelInput"), dict):
                self.fail(job, at, f"Line {number} of {uri} must be an object with a modelInput object")
                return
            record_id = record.get("recordId")
            if record_id is not None and not isinstance(record_id, str):
                self.fail(job, at, f"Line {number} of {uri}: recordId must be a string")
                return
            # Bedrock makes up an id for a record without one; devmodel uses its line number.
            records.append((record_id if record_id is not None else f"{number:011d}", record["modelInput"]))
        minimum = self.state.levers(job.model_id).batch_min_records
        if len(records) < minimum:
            self.fail(job, at, f"The input file {uri} has {len(records)} records; model {job.model_id} "
                               f"needs at least {minimum} records per batch job")
            return
        job.records = records
        job.status, job.changed = "InProgress", at

    def fail(self, job: BatchJob, at: float, message: str) -> None:
        job.status, job.message, job.changed, job.ended = "Failed", message, at, at

    def process(self, job: BatchJob) -> None:
        """Answer the next record with the rules engine and append its output line."""
        state = self.state
        record_id, model_input = job.records[len(job.lines)]
        batch = (job.job_id, record_id)
        line = {"recordId": record_id, "modelInput": model_input}
        try:
            request = parse_request(model_input)
        except BadRequest as exc:
            state.record_rejected_call(job.model_id, False, f"devmodel: malformed request: {exc}", None, batch)
            line["error"] = {"errorCode": 400, "errorMessage": f"devmodel: malformed request: {exc}"}
        else:
            try:
                check_levers(request, job.model_id, state.levers(job.model_id))
            except BadRequest as exc:
                state.record_rejected_call(job.model_id, False, str(exc), request, batch)
                line["error"] = {"errorCode": 400, "errorMessage": str(exc)}
            else:
                answer = state.answer(job.model_id, request, False, batch)
                if answer.error is not None:
                    line["error"] = {"errorCode": HTTP_ERRORS[answer.error[0]], "errorMessage": answer.error[1]}
                else:
                    state.update_call(answer.entry, status=200, stop_reason=answer.stop_reason, usage=answer.usage)
                    line["modelOutput"] = {
                        "output": {"message": {"role": "assistant", "content": [{"text": answer.text}]}},
                        "stopReason": answer.stop_reason,
                        "usage": answer.usage,
                        **answer.tier,
                    }
                    job.input_tokens += answer.usage["inputTokens"]
                    job.output_tokens += answer.usage["outputTokens"]
        if "error" in line:
            job.errors += 1
        job.lines.append(line)

    def manifest(self, job: BatchJob) -> dict:
        processed = len(job.lines)
        return {"totalRecordCount": len(job.records or []), "processedRecordCount": processed,
                "successRecordCount": processed - job.errors, "errorRecordCount": job.errors,
                "inputTokenCount": job.input_tokens, "outputTokenCount": job.output_tokens}

    def finish(self, job: BatchJob, status: str, at: float, message: str | None = None) -> None:
        """End the job; a job that got past validation writes its output and manifest."""
        if job.records is not None:
            bucket = job.output_loc[0]
            input_name = job.input_loc[1].rsplit("/", 1)[-1]
            body = "".join(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n"
                           for line in job.lines)
            try:
                self.s3.put(bucket, job.output_key(input_name + ".out"), body.encode("utf-8"))
                self.s3.put(bucket, job.output_key("manifest.json.out"),
                            json.dumps(self.manifest(job)).encode("utf-8"))
            except S3Error as exc:
                self.fail(job, at, f"Writing the output failed: {exc}")
                return
        job.status, job.changed, job.ended = status, at, at
        if message is not None:
            job.message = message

    # ---- rendering --------------------------------------------------------------------

    def describe(self, job: BatchJob) -> dict:
        """GetModelInvocationJob's reply (a list summary has the same fields)."""
        request = job.request
        out = {
            "jobArn": job.arn, "jobName": job.name, "modelId": job.model_id, "roleArn": job.role_arn,
            "status": job.status, "submitTime": self.iso(job.submitted),
            "lastModifiedTime": self.iso(job.changed),
            "inputDataConfig": request["inputDataConfig"], "outputDataConfig": request["outputDataConfig"],
            "timeoutDurationInHours": job.timeout_hours,
            "jobExpirationTime": self.iso(job.submitted + job.timeout_hours * 3600),
        }
        if job.token is not None:
            out["clientRequestToken"] = job.token
        if "modelInvocationType" in request:
            out["modelInvocationType"] = request["modelInvocationType"]
        if job.message is not None:
            out["message"] = job.message
        if job.ended is not None:
            out["endTime"] = self.iso(job.ended)
        if job.records is not None:
            manifest = self.manifest(job)
            out.update({k: manifest[k] for k in ("totalRecordCount", "processedRecordCount",
                                                 "successRecordCount", "errorRecordCount")})
        return out

    def list(self, query: dict) -> dict:
        """ListModelInvocationJobs: filters, newest first unless sortOrder=Ascending, and
        nextToken paging (the token is an offset)."""
        status = query.get("statusEquals")
        if status is not None and status not in JOB_STATUSES:
            raise ControlError("ValidationException", f"statusEquals must be one of {', '.join(JOB_STATUSES)}")
        order = query.get("sortOrder", "Descending")
        if order not in ("Ascending", "Descending"):
            raise ControlError("ValidationException", "sortOrder must be Ascending or Descending")
        if query.get("sortBy", "CreationTime") != "CreationTime":
            raise ControlError("ValidationException", "sortBy must be CreationTime")
        try:
            limit = int(query.get("maxResults", 1000))
            offset = int(query.get("nextToken", 0))
        except ValueError:
            raise ControlError("ValidationException", "maxResults and nextToken must be integers") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise ControlError("ValidationException", "maxResults must be 1-1000 and nextToken a token from a previous reply")
        bounds = {}
        for key in ("submitTimeAfter", "submitTimeBefore"):
            if key in query:
                try:
                    bounds[key] = datetime.datetime.fromisoformat(query[key].replace("Z", "+00:00"))
                except ValueError:
                    raise ControlError("ValidationException", f"{key} must be an ISO 8601 timestamp") from None
        with self.lock:
            jobs = self.advance_all()
            jobs.sort(key=lambda j: j.submitted, reverse=order == "Descending")
            summaries = []
            for job in jobs:
                submitted = self.wall_base + datetime.timedelta(seconds=job.submitted - self.clock_base)
                if status is not None and job.status != status:
                    continue
                if "nameContains" in query and query["nameContains"] not in job.name:
                    continue
                if "submitTimeAfter" in bounds and submitted <= bounds["submitTimeAfter"]:
                    continue
                if "submitTimeBefore" in bounds and submitted >= bounds["submitTimeBefore"]:
                    continue
                summaries.append(self.describe(job))
        page = summaries[offset:offset + limit]
        reply = {"invocationJobSummaries": page}
        if offset + limit < len(summaries):
            reply["nextToken"] = str(offset + limit)
        return reply


# --------------------------------------------------------------------------------------
# AWS event-stream framing
# --------------------------------------------------------------------------------------


def encode_event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """Encode one AWS event-stream message with string (type 7) headers.

    Layout: total length u32 | headers length u32 | prelude CRC32 | headers | payload |
    message CRC32 (over everything before it), all big-endian.
    """
    header_bytes = b""
    for name, value in headers.items():
        name_b, value_b = name.encode("utf-8"), value.encode("utf-8")
        header_bytes += struct.pack(">B", len(name_b)) + name_b
        header_bytes += struct.pack(">BH", 7, len(value_b)) + value_b
    total = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack(">II", total, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, payload: dict) -> bytes:
    return encode_event_frame(
        {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
        json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def exception_frame(exception_type: str, message: str) -> bytes:
    return encode_event_frame(
        {":exception-type": exception_type, ":content-type": "application/json",
         ":message-type": "exception"},
        json.dumps({"message": message}).encode("utf-8"))


# --------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------

MODEL_PATH = re.compile(r"^/model/([^/]+)/(converse|converse-stream)$")


class DevModelHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 so streamed replies can use chunked encoding and the SDK can keep
    # connections alive, as it would against the real endpoint.
    protocol_version = "HTTP/1.1"
    server_version = "devmodel/1"
    # Headers and body (and each stream frame) are separate writes; with Nagle on, a write
    # after the first waits for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: "DevModelServer"

    # ---- plumbing -------------------------------------------------------------------

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        if self.server.verbose:
            sys.stderr.write("devmodel: %s %s\n" % (self.address_string(), format % args))

    def send_json(self, status: int, payload, extra_headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_aws_error(self, error_type: str, message: str) -> None:
        self.send_json(HTTP_ERRORS[error_type], {"message": message},
                       {"x-amzn-ErrorType": error_type})

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # ---- routing ----------------------------------------------------------------------

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def route(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        model_match = MODEL_PATH.match(path)
        if model_match and method == "POST":
            # Decode the id only after splitting the path: ARNs encode '/' as %2F.
            model_id = urllib.parse.unquote(model_match.group(1))
            self.handle_model_call(model_id, stream=model_match.group(2) == "converse-stream")
            return
        body = read_body(self)
        if path.startswith("/_dev/"):
            self.handle_admin(method, path, parsed.query, body)
            return
        job_match = JOB_PATH.match(path)
        try:
            if path == "/model-invocation-job" and method == "POST":
                self.create_job(body)
                return
            if job_match and method == ("POST" if job_match.group(2) else "GET"):
                identifier = urllib.parse.unquote(job_match.group(1))
                if job_match.group(2):
                    self.server.state.batch.stop(identifier)
                    self.send_json(200, {})
                else:
                    batch = self.server.state.batch
                    with batch.lock:
                        reply = batch.describe(batch.find(identifier))
                    self.send_json(200, reply)
                return
            if path == "/model-invocation-jobs" and method == "GET":
                query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
                self.send_json(200, self.server.state.batch.list(query))
                return
        except ControlError as exc:
            self.send_json(CONTROL_ERRORS[exc.error_type], {"message": exc.message},
                           {"x-amzn-ErrorType": exc.error_type})
            return
        self.send_json(404, {"message": f"devmodel: no route for {method} {path}"},
                       {"x-amzn-ErrorType": "UnknownOperationException"})

    # ---- batch inference (control plane) -----------------------------------------------

    def create_job(self, body: bytes) -> None:
        try:
            doc = json.loads(body or b"null")
        except ValueError as exc:
            raise ControlError("ValidationException", f"request body is not valid JSON: {exc}") from None
        job = self.server.state.batch.create(doc)
        self.send_json(200, {"jobArn": job.arn})

    # ---- admin API ----------------------------------------------------------------------

    def handle_admin(self, method: str, path: str, query: str, body: bytes) -> None:
        state = self.server.state
        if path == "/_dev/health" and method == "GET":
            self.send_json(200, {"ok": True})
        elif path == "/_dev/calls" and method == "GET":
            state.batch.advance_all()  # so the listing shows every record due by now
            filters = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
            self.send_json(200, {"calls": state.snapshot_calls(filters)})
        elif path == "/_dev/reset" and method == "POST":
            state.reset()
            self.send_json(200, {"ok": True})
        elif path == "/_dev/rules" and method == "GET":
            self.send_json(200, state.rules_document())
        elif path == "/_dev/rules" and method in ("PUT", "POST"):
            try:
                doc = json.loads(body or b"null")
            except ValueError as exc:
                self.send_json(400, {"message": f"(document): invalid JSON: {exc}"})
                return
            try:
                if method == "PUT":
                    state.replace_rules(doc)
                    count = len(state.rules)
                else:
                    count = state.prepend_rules(doc)
            except RulesError as exc:
                self.send_json(400, {"message": str(exc)})
                return
            self.send_json(200, {"ok": True, "rules": count})
        elif path == "/_dev/batch" and method == "GET":
            batch = state.batch
            with batch.lock:
                jobs = [batch.describe(job) for job in batch.advance_all()]
            self.send_json(200, {"timing": dict(batch.timing),
                                 "s3_endpoint": batch.s3.endpoint if batch.s3 else None, "jobs": jobs})
        elif path == "/_dev/batch" and method == "PUT":
            try:
                timing = state.batch.set_timing(json.loads(body or b"null"))
            except ValueError as exc:
                self.send_json(400, {"message": f"(document): invalid JSON: {exc}"})
                return
            except ControlError as exc:
                self.send_json(400, {"message": exc.message})
                return
            self.send_json(200, {"ok": True, "timing": timing})
        else:
            self.send_json(404, {"message": f"devmodel: no admin route for {method} {path}"})

    # ---- model calls --------------------------------------------------------------------

    def handle_model_call(self, model_id: str, stream: bool) -> None:
        state = self.server.state
        raw = read_body(self)
        try:
            request = parse_request(json.loads(raw or b"null"))
        except (ValueError, BadRequest) as exc:
            message = f"devmodel: malformed request: {exc}"
            state.record_rejected_call(model_id, stream, message, None)
            self.send_aws_error("ValidationException", message)
            return
        levers = state.levers(model_id)
        try:
            check_levers(request, model_id, levers)
        except BadRequest as exc:
            state.record_rejected_call(model_id, stream, str(exc), request)
            self.send_aws_error("ValidationException", str(exc))
            return

        answer = state.answer(model_id, request, stream)
        if answer.error is not None:
            self.send_aws_error(*answer.error)
            return
        chosen, entry, call_number = answer.rule, answer.entry, answer.call_number
        text, stop_reason, usage, tier = answer.text, answer.stop_reason, answer.usage, answer.tier
        fail_count = chosen.fail_first[0]
        latency_ms = chosen.latency_ms
        if not stream:
            time.sleep(latency_ms / 1000)
            state.update_call(entry, status=200, stop_reason=stop_reason, usage=usage)
            self.send_json(200, {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": stop_reason,
                "usage": usage,
                "metrics": {"latencyMs": round(latency_ms)},
                **tier,
            })
            return

        fail_mid_stream = (chosen.stream_error_after is not None
                           and call_number == fail_count + 1)
        self.stream_reply(chosen, entry, text, stop_reason, usage, tier, latency_ms,
                          chosen.stream_error_after if fail_mid_stream else None)

    def stream_reply(self, rule: Rule, entry: dict, text: str, stop_reason: str, usage: dict,
                     tier: dict, latency_ms: float, error_after: int | None) -> None:
        state = self.server.state
        chunks = split_chunks(text, rule.chunk_chars)
        # Time to first byte is half the latency; the rest trickles out with the deltas,
        # so a live progress view sees the text arrive gradually.
        time.sleep(latency_ms / 2000)
        per_chunk_s = latency_ms / 2000 / len(chunks)

        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.amazon.eventstream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.end_headers()
        try:
            self.write_chunk(event_frame("messageStart", {"role": "assistant"}))
            for index, chunk in enumerate(chunks):
                if error_after is not None and index >= error_after:
                    break
                self.write_chunk(event_frame(
                    "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": chunk}}))
                time.sleep(per_chunk_s)
            if error_after is not None:
                error_type, message = rule.stream_error
                state.update_call(entry, status=200, error=error_type)
                self.write_chunk(exception_frame(error_type, message))
            else:
                self.write_chunk(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
                self.write_chunk(event_frame("messageStop", {"stopReason": stop_reason}))
                self.write_chunk(event_frame(
                    "metadata", {"usage": usage, "metrics": {"latencyMs": round(latency_ms)}, **tier}))
                state.update_call(entry, status=200, stop_reason=stop_reason, usage=usage)
            self.write_chunk(b"")  # zero-length chunk ends the chunked body
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up mid-stream (e.g. a timeout test); nothing left to send.
            state.update_call(entry, status=200, error="client disconnected")
            self.close_connection = True


class DevModelServer(StoppableServer):
    """The HTTP server carrying the shared state; shutdown() also closes its connections."""

    def __init__(self, address, state: DevModelState, verbose: bool = False):
        self.state = state
        self.verbose = verbose
        super().__init__(address, DevModelHandler)


def start_server(rules: dict, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
                 models_path=None, clock=None, s3_endpoint: str | None = None,
                 batch_timing: dict | None = None) -> tuple[DevModelServer, str]:
    """Start devmodel in a daemon thread; return (server, base URL). Stop with server.shutdown().

    models_path: the model registry (default shared/models.json); clock: monotonic seconds
    for the prompt cache's TTL and the batch jobs' lifecycle (default time.monotonic);
    s3_endpoint: where batch jobs read and write (none: batch jobs are refused);
    batch_timing: the /_dev/batch fields to start with."""
    state = DevModelState(rules, models_path, clock, s3_endpoint, batch_timing)
    server = DevModelServer((host, port), state, verbose=verbose)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="devmodel", daemon=True)
    thread.start()
    return server, f"http://{host}:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    default_rules = str(INFRA / "devmodel-rules.json")
    parser = argparse.ArgumentParser(description="Scripted Bedrock Runtime (Converse) and batch inference server for local runs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--rules", default=default_rules, help="rules JSON file")
    parser.add_argument("--models", default=str(DEFAULT_MODELS),
                        help="model registry JSON (which models offer caching, tiers, structured output)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL batch jobs read and write (e.g. moto's)")
    parser.add_argument("--batch-timing", default="{}",
                        help='JSON of the batch phase durations, as PUT /_dev/batch takes them')
    parser.add_argument("--port-file", help="write the bound port number to this file when ready")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)

    try:
        batch_timing = parse_batch_timing(json.loads(args.batch_timing), DEFAULT_BATCH_TIMING)
    except (ValueError, ControlError) as exc:
        print(f"devmodel: --batch-timing: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    try:
        with open(args.rules, encoding="utf-8") as fh:
            rules = json.load(fh)
        state = DevModelState(rules, args.models, s3_endpoint=args.s3_endpoint, batch_timing=batch_timing)
    except RegistryError as exc:
        print(f"devmodel: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"devmodel: cannot load rules from {args.rules}: {exc}", file=sys.stderr)
        return 2

    server = DevModelServer((args.host, args.port), state, verbose=not args.quiet)
    return serve_until_stopped(server, args.port_file,
                               f"devmodel listening on http://{args.host}:{server.server_address[1]}")

if __name__ == "__main__":
    sys.exit(main())
