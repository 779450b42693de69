"""The chaos suite's workflows and dev model rules.

Every prompt carries a marker, `[cr:TAG:STEP]` (a map item: `[cr:TAG:STEP:INDEX]`),
with TAG unique per run, so the dev model server's call log says exactly which run,
step and item each call was for, however many runs are in flight (tests/chaos/checks.py).
Each run gets its own dev model rule keyed on `[cr:TAG:` (POST /_dev/rules prepends it):
its latency, and for the throttle storm its seeded fail_rate.
"""

from __future__ import annotations

import secrets

MODEL = "amazon.nova-micro-v1:0"
# Nova Micro, shared/models.json: $0.000035 / $0.00014 per 1k tokens, in pico-dollars per token.
PRICE_IN_PICO = 35_000
PRICE_OUT_PICO = 140_000
MAX_TOKENS = 64


def new_tag() -> str:
    return "t" + secrets.token_hex(5)


def marker(tag: str, step: str, item: str | None = None) -> str:
    return f"[cr:{tag}:{step}]" if item is None else f"[cr:{tag}:{step}:{item}]"


def rule(tag: str, latency_ms: int, fail_rate: float | None = None, seed: int = 0) -> dict:
    r = {"name": f"chaos-{tag}", "match": {"prompt_contains": f"[cr:{tag}:"},
         "text": f"ok {tag}", "latency_ms": latency_ms}
    if fail_rate:
        r["fail_rate"] = {"rate": fail_rate, "seed": seed, "error": "ThrottlingException",
                          "message": "Too many requests (chaos storm)"}
    return r


def fan_workflow(tag: str, items: int, *, retry: dict | None = None, budget_usd: str = "0.05",
                 item_concurrency: int = 2) -> tuple[dict, dict]:
    """Parallel steps, a map over a list from the input (an llm sub-step), a join and a
    transform, under a budget:

        a ─┐
           ├─▶ fan (map over input.items, llm) ─▶ join (llm) ─▶ report (transform)
        b ─┘

    `fan` waits for both a and b (explicit depends_on), so a kill can be aimed at the
    parallel steps, the map's first wave, the middle of the map or the join.
    Returns (definition, input)."""
    m = lambda step, item=None: marker(tag, step, item)  # noqa: E731
    definition = {
        "name": f"chaos-fan-{tag}",
        "defaults": {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
                     "retry": retry or {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 1000}},
        "budget": {"max_cost_usd": budget_usd, "max_total_tokens": 200_000},
        "max_concurrency": 8,
        "steps": [
            {"id": "a", "type": "llm", "prompt": f"{m('a')} Name one colour for {{{{ input.topic }}}}."},
            {"id": "b", "type": "llm", "prompt": f"{m('b')} Name one fruit for {{{{ input.topic }}}}."},
            {"id": "fan", "type": "map", "over": "input.items", "depends_on": ["a", "b"],
             "max_concurrency": item_concurrency,
             "step": {"type": "llm", "prompt": f"{m('fan', '{{ index }}')} Suggest one fix for {{{{ item }}}}."}},
            {"id": "join", "type": "llm",
             "prompt": f"{m('join')} Combine {{{{ steps.a.text }}}}, {{{{ steps.b.text }}}} and "
                       f"{{{{ steps.fan.output | join('; ') }}}}."},
            {"id": "report", "type": "transform", "expression": "size(steps.fan.output)",
             "depends_on": ["join"]},
        ],
        "output": "{{ steps.join.text }} ({{ steps.report.output }} fixes)",
    }
    return definition, {"topic": f"chaos {tag}", "items": [f"issue {i} of {tag}" for i in range(items)]}


FAN_LLM_STEPS = ("a", "b", "join")
FAN_MAP_STEP = "fan"


def fan_keys(items: int) -> set[tuple[str, int | None]]:
    return {(s, None) for s in FAN_LLM_STEPS} | {(FAN_MAP_STEP, i) for i in range(items)}


def chain_workflow(tag: str, steps: int = 100, transform_every: int = 10) -> tuple[dict, dict, set]:
    """`steps` sequential steps, each reading the one before; every `transform_every`-th
    a transform, the rest llm calls. Returns (definition, input, llm step keys)."""
    out = []
    keys = set()
    for i in range(1, steps + 1):
        sid = f"s{i:03d}"
        prev = f"s{i - 1:03d}" if i > 1 else None
        if i % transform_every == 0:
            step = {"id": sid, "type": "transform", "template": f"{sid} after {{{{ steps.{prev}.output }}}}"}
        else:
            tail = f" after {{{{ steps.{prev}.output }}}}" if prev else ""
            step = {"id": sid, "type": "llm", "prompt": f"{marker(tag, sid)} step {i}{tail}"}
            keys.add((sid, None))
        if prev:
            step["depends_on"] = [prev]
        out.append(step)
    definition = {
        "name": f"chaos-chain-{tag}",
        "defaults": {"model": MODEL, "temperature": 0, "max_tokens": 16,
                     "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 1000}},
        "max_concurrency": 4,
        "steps": out,
        "output": f"{{{{ steps.s{steps:03d}.text }}}}",
    }
    return definition, {"n": steps}, keys


def worst_case_pico(prompt: str, max_tokens: int = MAX_TOKENS) -> int:
    """What the runner reserves for one Nova Micro call with this prompt (no system prompt):
    (64 + 32 + its UTF-8 bytes) input tokens and max_tokens of output (shared/src/budget.rs)."""
    return (64 + 32 + len(prompt.encode())) * PRICE_IN_PICO + max_tokens * PRICE_OUT_PICO


def paid_pico(usage: dict | None) -> int:
    """What a call with this (Converse) usage costs on Nova Micro."""
    if not usage:
        return 0
    return int(usage.get("inputTokens", 0)) * PRICE_IN_PICO + int(usage.get("outputTokens", 0)) * PRICE_OUT_PICO


REVIEW_STEP = "check"
# The llm steps of the review workflow that every completed run calls.
REVIEW_LLM_STEPS = ("draft", "side", "send")


def review_workflow(tag: str, *, timeout: str | None = None, on_timeout: str | None = None,
                    budget_usd: str = "0.01", pause_on_budget: bool = False, send_pad: int = 0) -> tuple[dict, dict]:
    """A draft a person reviews before it is sent, beside a slower step that does not wait:

        draft (llm) ─▶ check (review of draft.text) ─┐
              └──────▶ side (llm) ───────────────────┴─▶ send (llm: check.text, side.text)

    The run waits once check waits and side has settled; a decision that arrives while
    side still runs is picked up by the runner that holds the run. `timeout`/`on_timeout`
    give the review a deadline (nobody need decide). `pause_on_budget` sets
    `budget.on_exceeded: pause`; `send_pad` bytes of the input go into send's prompt, so
    its worst case can be made not to fit what is left. Returns (definition, input)."""
    m = lambda step: marker(tag, step)  # noqa: E731
    check = {"id": REVIEW_STEP, "type": "review", "show": "{{ steps.draft.text }}"}
    if timeout:
        check["timeout"] = timeout
    if on_timeout:
        check["on_timeout"] = on_timeout
    budget = {"max_cost_usd": budget_usd}
    if pause_on_budget:
        budget["on_exceeded"] = "pause"
    definition = {
        "name": f"chaos-review-{tag}",
        "defaults": {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
                     "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 1000}},
        "budget": budget,
        "steps": [
            {"id": "draft", "type": "llm", "prompt": f"{m('draft')} Draft a reply about {{{{ input.topic }}}}."},
            {"id": "side", "type": "llm", "depends_on": ["draft"], "prompt": f"{m('side')} Tag {{{{ steps.draft.text }}}}."},
            check,
            {"id": "send", "type": "llm", "depends_on": [REVIEW_STEP, "side"],
             "prompt": f"{m('send')} Send {{{{ steps.check.text }}}} tagged {{{{ steps.side.text }}}}{{{{ input.pad }}}}."},
        ],
        "output": "{{ steps.send.text }}",
    }
    return definition, {"topic": f"chaos {tag}", "pad": "." * send_pad}


def review_keys() -> set[tuple[str, int | None]]:
    return {(s, None) for s in REVIEW_LLM_STEPS}


# Batch inference prices: Nova Micro's registry entry has `batch.pct: 50`.
BATCH_PRICE_IN_PICO = PRICE_IN_PICO // 2
BATCH_PRICE_OUT_PICO = PRICE_OUT_PICO // 2
BATCH_MAP_STEP = "labels"
BATCH_AFTER_STEP = "sum_up"


def batch_workflow(tag: str, items: int, *, budget_usd: str = "0.05") -> tuple[dict, dict]:
    """A map of `items` llm items run as one batch inference job (`mode: batch`; Nova
    Micro takes at least 100 records a job), then an ordinary llm step that reads every
    answer, so the run goes on after the job:

        labels (map over input.items, batch) ─▶ sum_up (llm)

    Returns (definition, input)."""
    m = lambda step, item=None: marker(tag, step, item)  # noqa: E731
    definition = {
        "name": f"chaos-batch-{tag}",
        "defaults": {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
                     "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 1000}},
        "budget": {"max_cost_usd": budget_usd, "max_total_tokens": 200_000},
        "steps": [
            {"id": BATCH_MAP_STEP, "type": "map", "over": "input.items", "mode": "batch",
             "step": {"type": "llm", "prompt": f"{m(BATCH_MAP_STEP, '{{ index }}')} Label {{{{ item }}}}."}},
            {"id": BATCH_AFTER_STEP, "type": "llm", "depends_on": [BATCH_MAP_STEP],
             "prompt": f"{m(BATCH_AFTER_STEP)} Count the labels: {{{{ steps.{BATCH_MAP_STEP}.output | join('; ') }}}}."},
        ],
        "output": f"{{{{ steps.{BATCH_AFTER_STEP}.text }}}}",
    }
    return definition, {"items": [f"ticket {i} of {tag}" for i in range(items)]}


def batch_keys(items: int) -> set[tuple[str, int | None]]:
    return {(BATCH_AFTER_STEP, None)} | {(BATCH_MAP_STEP, i) for i in range(items)}


def batch_paid_pico(usage: dict | None) -> int:
    """What a batch record with this usage costs on Nova Micro (half the on-demand price)."""
    if not usage:
        return 0
    return (int(usage.get("inputTokens", 0)) * BATCH_PRICE_IN_PICO
            + int(usage.get("outputTokens", 0)) * BATCH_PRICE_OUT_PICO)
