"""devmodel: a scripted stand-in for Amazon Bedrock Runtime (Converse / ConverseStream).

chainrun's runner talks to Bedrock through aws-sdk-bedrockruntime. Pointing the SDK at
this server (``AWS_ENDPOINT_URL_BEDROCK_RUNTIME=http://127.0.0.1:PORT``) lets the
whole engine run hermetically: every model call gets a reply, token usage, latency and
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
* ``usage`` defaults: input = ceil(len(system + prompt) / 4), output =
  ceil(len(reply) / 4), each at least 1. Cache fields appear in the response only when
  the rule sets them (even to 0). ``totalTokens`` = input + output.
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

Admin API
---------
* ``GET  /_dev/health`` -> ``{"ok": true}``
* ``GET  /_dev/calls``  -> ``{"calls": [{seq, model, rule, prompt, system, stream, status,
  error, at, ...}]}`` in arrival order (optional query filters: ``rule``, ``model``,
  ``prompt_contains``). ``rule`` is null when the default answered.
* ``POST /_dev/reset``  -> clears the call log and all per-rule counters.
* ``GET  /_dev/rules``  -> the current rules document.
* ``PUT  /_dev/rules``  -> replaces the whole rules document (and resets counters).
* ``POST /_dev/rules``  with ``{"rules": [...]}`` -> prepends those rules, so parallel
  tests can add rules keyed on unique prompt markers without clobbering each other.
  Invalid documents are answered 400 with a message naming the bad field.

Usage
-----
``python -m infra.devmodel --host 127.0.0.1 --port 0 --rules infra/devmodel-rules.json
[--port-file PATH] [--quiet]`` prints ``devmodel listening on http://HOST:PORT`` once
ready. In-process: ``server, url = start_server(rules_dict)``; ``server.shutdown()``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import random
import re
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from http.server import BaseHTTPRequestHandler

from . import INFRA
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


class RulesError(ValueError):
    """A rules document is invalid; the message starts with the offending field path."""


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


class DevModelState:
    """Rules, per-rule counters and the call log, shared by all handler threads."""

    def __init__(self, rules_doc: dict):
        self.lock = threading.Lock()
        self.default, self.rules = parse_rules_document(rules_doc)
        self.calls: list[dict] = []
        self.seq = 0

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
            self.seq = 0
            for rule in [self.default, *self.rules]:
                rule.restart()

    def rules_document(self) -> dict:
        with self.lock:
            return {"default": copy.deepcopy(self.default.source),
                    "rules": [copy.deepcopy(r.source) for r in self.rules]}

    def record_call(self, model: str, prompt: str, system: str, stream: bool,
                    inference: dict) -> tuple[Rule | None, int, bool, dict]:
        """Log an incoming model call, pick its rule, bump that rule's counter and draw
        its fail_rate.

        Returns (rule or None for the default, the rule's 1-based call number, whether
        fail_rate fails it, log entry). Matching, counting and drawing happen under one
        lock so concurrent retries of the same rule see distinct call numbers and draws.
        """
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
                "max_tokens": inference.get("maxTokens"),
                "status": None,  # filled in once the outcome is known
                "error": None,
                "stop_reason": None,
                "usage": None,
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            }
            self.calls.append(entry)
            return rule, chosen.calls, rate_failure, entry

    def record_rejected_call(self, model: str, stream: bool, message: str) -> None:
        """Log a call whose body could not even be parsed (it still counts as received)."""
        with self.lock:
            self.seq += 1
            self.calls.append({
                "seq": self.seq, "model": model, "rule": None, "prompt": "", "system": "",
                "stream": stream, "max_tokens": None, "status": 400,
                "error": "ValidationException", "error_message": message,
                "stop_reason": None, "usage": None,
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            })

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


def extract_request_text(body: dict) -> tuple[str, str, dict]:
    """Return (prompt text, system text, inferenceConfig) from a Converse request body."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    texts = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        for block in message.get("content") or []:
            # Non-text blocks (images, tool use, cache points) carry no prompt text.
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                texts.append(block["text"])
    system_texts = [b["text"] for b in body.get("system") or []
                    if isinstance(b, dict) and isinstance(b.get("text"), str)]
    inference = body.get("inferenceConfig") or {}
    if not isinstance(inference, dict):
        raise BadRequest("inferenceConfig must be an object")
    max_tokens = inference.get("maxTokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise BadRequest("inferenceConfig.maxTokens must be an integer >= 1")
    return "\n".join(texts), "\n".join(system_texts), inference


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def shape_reply(rule: Rule, prompt: str, system: str, inference: dict) -> tuple[str, str, dict]:
    """Apply stop sequences and maxTokens to the scripted reply.

    Returns (reply text, stopReason, usage in Bedrock's camelCase shape).
    """
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

    input_tokens = usage.get("input_tokens", estimate_tokens(system + prompt))
    wire_usage = {"inputTokens": input_tokens, "outputTokens": output_tokens,
                  "totalTokens": input_tokens + output_tokens}
    if "cache_read_tokens" in usage:
        wire_usage["cacheReadInputTokens"] = usage["cache_read_tokens"]
    if "cache_write_tokens" in usage:
        wire_usage["cacheWriteInputTokens"] = usage["cache_write_tokens"]
    return text, stop_reason, wire_usage


def split_chunks(text: str, size: int) -> list[str]:
    # An empty reply still gets one (empty) delta so clients see a content block.
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


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
        self.send_json(404, {"message": f"devmodel: no route for {method} {path}"},
                       {"x-amzn-ErrorType": "UnknownOperationException"})

    # ---- admin API ----------------------------------------------------------------------

    def handle_admin(self, method: str, path: str, query: str, body: bytes) -> None:
        state = self.server.state
        if path == "/_dev/health" and method == "GET":
            self.send_json(200, {"ok": True})
        elif path == "/_dev/calls" and method == "GET":
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
        else:
            self.send_json(404, {"message": f"devmodel: no admin route for {method} {path}"})

    # ---- model calls --------------------------------------------------------------------

    def handle_model_call(self, model_id: str, stream: bool) -> None:
        state = self.server.state
        raw = read_body(self)
        try:
            body = json.loads(raw or b"null")
            prompt, system, inference = extract_request_text(body)
        except (ValueError, BadRequest) as exc:
            message = f"devmodel: malformed request: {exc}"
            state.record_rejected_call(model_id, stream, message)
            self.send_aws_error("ValidationException", message)
            return

        rule, call_number, rate_failure, entry = state.record_call(model_id, prompt, system, stream, inference)
        chosen = rule or state.default

        scripted_error = chosen.error
        fail_count, fail_type, fail_message = chosen.fail_first
        if scripted_error is None and call_number <= fail_count:
            scripted_error = (fail_type, fail_message)
        if scripted_error is None and rate_failure:
            scripted_error = chosen.fail_rate[1:3]
        if scripted_error is not None:
            error_type, message = scripted_error
            state.update_call(entry, status=HTTP_ERRORS[error_type], error=error_type)
            self.send_aws_error(error_type, message)
            return

        text, stop_reason, usage = shape_reply(chosen, prompt, system, inference)
        latency_ms = chosen.latency_ms
        if not stream:
            time.sleep(latency_ms / 1000)
            state.update_call(entry, status=200, stop_reason=stop_reason, usage=usage)
            self.send_json(200, {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": stop_reason,
                "usage": usage,
                "metrics": {"latencyMs": round(latency_ms)},
            })
            return

        fail_mid_stream = (chosen.stream_error_after is not None
                           and call_number == fail_count + 1)
        self.stream_reply(chosen, entry, text, stop_reason, usage, latency_ms,
                          chosen.stream_error_after if fail_mid_stream else None)

    def stream_reply(self, rule: Rule, entry: dict, text: str, stop_reason: str, usage: dict,
                     latency_ms: float, error_after: int | None) -> None:
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
                    "metadata", {"usage": usage, "metrics": {"latencyMs": round(latency_ms)}}))
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


def start_server(rules: dict, host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False) -> tuple[DevModelServer, str]:
    """Start devmodel in a daemon thread; return (server, base URL). Stop with server.shutdown()."""
    server = DevModelServer((host, port), DevModelState(rules), verbose=verbose)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="devmodel", daemon=True)
    thread.start()
    return server, f"http://{host}:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    default_rules = str(INFRA / "devmodel-rules.json")
    parser = argparse.ArgumentParser(description="Scripted Bedrock Runtime Converse server for local runs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--rules", default=default_rules, help="rules JSON file")
    parser.add_argument("--port-file", help="write the bound port number to this file when ready")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)

    try:
        with open(args.rules, encoding="utf-8") as fh:
            rules = json.load(fh)
        state = DevModelState(rules)
    except (OSError, ValueError) as exc:
        print(f"devmodel: cannot load rules from {args.rules}: {exc}", file=sys.stderr)
        return 2

    server = DevModelServer((args.host, args.port), state, verbose=not args.quiet)
    return serve_until_stopped(server, args.port_file,
                               f"devmodel listening on http://{args.host}:{server.server_address[1]}")

if __name__ == "__main__":
    sys.exit(main())
