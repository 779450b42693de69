"""The chaos suite's checks: pure functions over what one run left behind — its events,
its stored step checkpoints, the dev model server's call log and the kills the driver
made — so they are unit-tested without a stack (tests/chaos/test_checks.py).

Counting model calls exactly needs to know which step (and map item) each call was for:
every prompt of a chaos workflow carries a marker `[cr:TAG:STEP]` or `[cr:TAG:STEP:INDEX]`
(TAG unique per run), see tests/chaos/workflows.py.

What is counted, per run:

duplicated_events
    seq not exactly 1..n (each gap or repeat counts), and events that repeat where they
    must not: a second RUN_STARTED or run-ending event, a run-ending event that is not
    last, a second settling event (STEP_COMPLETED/FAILED/SKIPPED/CANCELLED) for a step, a
    step event after its step settled, and a STEP_STARTED (step, attempt) or
    STEP_RETRYING (step, attempt, item) seen again without a RUN_RESUMED in between (a
    resumed runner restarts a step that was in flight, with its attempt count from 1).
    The run's status must be what its last event says (else one more).

double_paid_calls
    answered model calls for a step or map item whose result was already held:
    (a) made after the step's checkpoint (or the item's, once items have their own) was
        written — `finished_at` of its STEP# (ITEM#) item;
    (b) a repeat of a call whose answer had arrived more than CHECKPOINT_GRACE_S before
        the runner was killed: the design checkpoints every step and every map item as
        its answer arrives, so that answer should have survived the crash;
    (c) a repeat with no crash or takeover of the run in between at all (two runners at
        once, or a runner re-running what it already had).
repeated_calls
    repeats the durability contract allows: the earlier call was in flight (or answered
    less than CHECKPOINT_GRACE_S before) when the runner was killed, or a takeover came
    between the two. A kill justifies at most one repeat per step or item.
overrun
    the run's charged cost (totals, plus any `reserved_lost`-like totals field once the
    runner records reservations lost with a crashed runner) above its budget, or its
    tokens above `max_total_tokens`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections import Counter, defaultdict

# A checkpoint lands within milliseconds of its answer (one DynamoDB transaction); a
# kill this long after an answer means the answer should have been checkpointed.
CHECKPOINT_GRACE_S = 0.5

MARKER = re.compile(r"\[cr:(?P<tag>[a-z0-9]+):(?P<step>[A-Za-z][A-Za-z0-9_]*)(?::(?P<item>\d+))?\]")
RUN_END = {"RUN_COMPLETED": "COMPLETED", "RUN_FAILED": "FAILED", "RUN_CANCELLED": "CANCELLED"}
STEP_SETTLED = {"STEP_COMPLETED", "STEP_FAILED", "STEP_SKIPPED", "STEP_CANCELLED"}


def ts(value) -> float | None:
    """Epoch seconds of an RFC 3339 time (any number of fraction digits), or None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$", str(value).strip())
    if not m:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    base, frac, zone = m.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    t = dt.datetime.fromisoformat(base + zone).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def key_of(prompt: str, tag: str) -> tuple[str, int | None] | None:
    """(step, item index or None) of a prompt of the run tagged `tag`."""
    for m in MARKER.finditer(prompt or ""):
        if m.group("tag") == tag:
            return m.group("step"), (int(m.group("item")) if m.group("item") is not None else None)
    return None


@dataclasses.dataclass
class Kill:
    """One SIGKILL of a runner process the driver made for a run."""
    run_id: str
    at: float  # epoch s
    phase: str
    pid: int
    request_id: str | None
    hit: bool = False  # the process died during that run's invocation
    recovery_s: float | None = None  # kill -> the run's next event


@dataclasses.dataclass
class Call:
    key: tuple[str, int | None]
    at: float
    status: int | None
    error: str | None
    usage: dict | None
    latency_s: float
    batch_job: str | None = None  # the batch inference job that answered it (a record), or None: online


def calls_of(log: list[dict], tag: str, latency_s: float, step_latency_s: dict | None = None) -> list[Call]:
    """The run's calls from the model server's log, each with the latency its rule
    scripted: `step_latency_s` for the steps it names, else `latency_s` (when a call was
    answered decides whether a kill came before or after its answer)."""
    out = []
    for c in log:
        key = key_of(c.get("prompt", ""), tag)
        if key is None:
            continue
        latency = (step_latency_s or {}).get(key[0], latency_s)
        out.append(Call(key, ts(c["at"]), c.get("status"), c.get("error"), c.get("usage"), latency,
                        c.get("batch_job")))
    out.sort(key=lambda c: c.at)
    return out


def checkpoint_times(items: list[dict]) -> dict[tuple[str, int | None], float]:
    """When each step's (and, once they exist, each map item's) result was checkpointed,
    from the runs table's items of one run (plain JSON: attribute -> value)."""
    out: dict[tuple[str, int | None], float] = {}
    for it in items:
        sk = str(it.get("sk", ""))
        status = it.get("status")
        finished = ts(it.get("finished_at")) if it.get("finished_at") else None
        if finished is None or status in ("RUNNING", "PENDING"):
            continue
        if sk.startswith("STEP#"):
            out[(sk[5:], None)] = finished
        elif sk.startswith("ITEM#"):
            # ITEM#<step>#<index> (DESIGN.md's data model)
            parts = sk.split("#")
            if len(parts) >= 3 and parts[-1].isdigit():
                out[("#".join(parts[1:-1]), int(parts[-1]))] = finished
    return out


@dataclasses.dataclass
class CallCheck:
    double_paid: int = 0
    repeated: int = 0
    paid_calls: int = 0
    failed_calls: int = 0
    problems: list = dataclasses.field(default_factory=list)
    calls_per_key: dict = dataclasses.field(default_factory=dict)
    executions_per_key: dict = dataclasses.field(default_factory=dict)
    all_failed: set = dataclasses.field(default_factory=set)  # keys with calls, none answered


def check_calls(calls: list[Call], checkpoints: dict, kills: list[Kill], takeovers: list[float],
                map_steps: set[str] = frozenset()) -> CallCheck:
    """Sorts every answered call into first, repeated (allowed) or double paid.

    checkpoints: when each key's result was stored (a map item falls back to its map's
    checkpoint while items have none of their own). kills: the run's confirmed kills.
    takeovers: times of the run's takeovers (RUN_RESUMED with a takeover)."""
    out = CallCheck()
    by_key: dict[tuple, list[Call]] = defaultdict(list)
    for c in calls:
        by_key[c.key].append(c)
    kill_times = sorted(k.at for k in kills if k.hit)
    for key, cs in sorted(by_key.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        out.calls_per_key[key] = len(cs)
        stored = checkpoints.get(key)
        if stored is None and key[1] is not None:
            stored = checkpoints.get((key[0], None))
        answered = [c for c in cs if c.status == 200]
        if not answered:
            out.all_failed.add(key)
        out.failed_calls += len(cs) - len(answered)
        out.paid_calls += len(answered)
        out.executions_per_key[key] = 1
        used_kills: set[float] = set()
        for c in cs:
            if stored is not None and c.at > stored:
                out.double_paid += 1
                out.problems.append(f"{fmt_key(key)}: call at {iso(c.at)} after its checkpoint at {iso(stored)}")
        for prev, nxt in zip(answered, answered[1:]):
            if stored is not None and nxt.at > stored:
                continue  # counted above
            answer_at = prev.at + prev.latency_s
            in_window = [t for t in kill_times if prev.at <= t <= answer_at + CHECKPOINT_GRACE_S and t < nxt.at
                         and t not in used_kills]
            late = [t for t in kill_times if answer_at + CHECKPOINT_GRACE_S < t < nxt.at]
            taken_over = [t for t in takeovers if prev.at < t < nxt.at]
            if in_window:
                used_kills.add(in_window[0])
                out.repeated += 1
                out.executions_per_key[key] += 1
            elif late:
                out.double_paid += 1
                out.executions_per_key[key] += 1
                what = "map item" if key[1] is not None or key[0] in map_steps else "step"
                out.problems.append(
                    f"{fmt_key(key)}: answered at {iso(answer_at)}, the runner killed {late[0] - answer_at:.2f}s later "
                    f"at {iso(late[0])}, and paid again at {iso(nxt.at)}: the {what}'s answer was not checkpointed")
            elif taken_over and not kill_times:
                out.repeated += 1
                out.executions_per_key[key] += 1
            else:
                out.double_paid += 1
                out.executions_per_key[key] += 1
                out.problems.append(f"{fmt_key(key)}: answered at {iso(answer_at)} and paid again at {iso(nxt.at)} "
                                    f"with no crash or takeover of the run in between")
    return out


@dataclasses.dataclass
class BatchCheck:
    """What the batch records and online calls of a run's batch maps add up to."""
    double_paid: int = 0
    problems: list = dataclasses.field(default_factory=list)
    jobs: set = dataclasses.field(default_factory=set)  # jobs that answered a record of the run
    batch_answered: int = 0  # records answered (every job)
    online_answered: int = 0  # online calls answered for items of a batch map
    expected_pico: int = 0  # what the run should be charged for all its calls
    paid_pico: int = 0  # what the model provider was paid for them


def check_batch_calls(calls: list[Call], batch_steps: set[str], batch_price, online_price) -> BatchCheck:
    """Each item of a batch map is paid once: its record answered in at most one batch job,
    and not also online unless no job answered it (a reply that fails the step's checks is
    run again online, but this suite's batch steps have none). The run is charged exactly
    the batch price (`batch_price(usage)`) of every answered record plus the on-demand
    price (`online_price(usage)`) of every step's or item's last answered online call:
    earlier online answers of the same key were lost with a killed runner (its totals
    count them as reserved and lost)."""
    out = BatchCheck()
    records: dict[tuple, list[Call]] = defaultdict(list)
    online: dict[tuple, list[Call]] = defaultdict(list)
    for c in calls:
        if c.status != 200:
            continue
        if c.batch_job is not None:
            records[c.key].append(c)
            out.jobs.add(c.batch_job)
            out.expected_pico += batch_price(c.usage)
            out.paid_pico += batch_price(c.usage)
        else:
            online[c.key].append(c)
            out.paid_pico += online_price(c.usage)
    for key, cs in online.items():
        out.expected_pico += online_price(cs[-1].usage)
        if key[0] in batch_steps:
            out.online_answered += len(cs)
    for key, rs in sorted(records.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        out.batch_answered += len(rs)
        if len(rs) > 1:
            out.double_paid += len(rs) - 1
            out.problems.append(f"{fmt_key(key)}: its record answered {len(rs)} times, in jobs "
                                f"{sorted({r.batch_job for r in rs})}")
        again = online.get(key, [])
        if again:
            out.double_paid += len(again)
            out.problems.append(f"{fmt_key(key)}: answered in batch job {rs[0].batch_job} at {iso(rs[0].at)} "
                                f"and online {len(again)} times (first at {iso(again[0].at)})")
    return out


def online_in_flight_at_kills(calls: list[Call], kills: list[Kill]) -> int:
    """How many confirmed kills caught an online model call of the run in flight: the most
    calls its totals may count as reserved and lost (a batch job is held again by the
    runner that takes the run over, never lost)."""
    online = [c for c in calls if c.batch_job is None]
    return sum(1 for k in kills if k.hit and any(c.at <= k.at <= c.at + c.latency_s + CHECKPOINT_GRACE_S
                                                 for c in online))


def lost_calls(totals: dict) -> int:
    """The model calls a run's totals count as reserved and lost (0 when none)."""
    lost = (totals or {}).get("reserved_lost")
    return int(lost.get("calls", 0)) if isinstance(lost, dict) else 0


def fmt_key(key) -> str:
    return key[0] if key[1] is None else f"{key[0]}[{key[1]}]"


def iso(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


@dataclasses.dataclass
class EventCheck:
    duplicated: int = 0
    problems: list = dataclasses.field(default_factory=list)
    counts: Counter = dataclasses.field(default_factory=Counter)
    takeovers: list = dataclasses.field(default_factory=list)  # times of RUN_RESUMED with a takeover
    resumed_causes: Counter = dataclasses.field(default_factory=Counter)
    last_type: str | None = None


def check_events(events: list[dict], status: str | None) -> EventCheck:
    """Gap-free seq, no event repeated where it must not be, status = last event's."""
    out = EventCheck()
    seqs = [e.get("seq") for e in events]
    for want, e in enumerate(events, start=1):
        if e.get("seq") != want:
            out.duplicated += 1
            out.problems.append(f"seq {e.get('seq')} where {want} was due (seqs {seqs[:3]}…{seqs[-3:]})")
            break
    dup_seq = [s for s, n in Counter(seqs).items() if n > 1]
    if dup_seq:
        out.duplicated += len(dup_seq)
        out.problems.append(f"seq repeated: {dup_seq[:10]}")
    settled: dict[str, int] = {}
    started: dict[tuple, int] = {}
    retrying: dict[tuple, int] = {}
    resumes: list[int] = []
    run_started = 0
    ended_at: int | None = None
    for e in events:
        kind, step, seq = e.get("type"), e.get("step_id"), e.get("seq")
        out.counts[kind] += 1
        data = e.get("data") or {}
        if ended_at is not None:
            out.duplicated += 1
            out.problems.append(f"seq {seq} {kind} after the run ended at seq {ended_at}")
        if kind == "RUN_STARTED":
            run_started += 1
            if run_started > 1 or seq != 1:
                out.duplicated += 1
                out.problems.append(f"seq {seq} RUN_STARTED again (or not first)")
        elif kind == "RUN_RESUMED":
            resumes.append(seq)
            out.resumed_causes[data.get("cause")] += 1
            if data.get("takeover"):
                out.takeovers.append(ts(e.get("at")))
        elif kind in RUN_END:
            if ended_at is None:
                ended_at = seq
        if step is None:
            continue
        if step in settled and kind != "STREAMING":
            out.duplicated += 1
            out.problems.append(f"seq {seq} {kind} {step} after the step settled at seq {settled[step]}")
            continue
        if kind in STEP_SETTLED:
            settled[step] = seq
        elif kind == "STEP_STARTED":
            k = (step, e.get("attempt"))
            if k in started and not any(started[k] < r < seq for r in resumes):
                out.duplicated += 1
                out.problems.append(f"seq {seq} STEP_STARTED {step} attempt {k[1]} again (first at seq {started[k]}) "
                                    f"without a resume in between")
            started[k] = seq
        elif kind == "STEP_RETRYING":
            k = (step, e.get("attempt"), data.get("item"))
            if k in retrying and not any(retrying[k] < r < seq for r in resumes):
                out.duplicated += 1
                out.problems.append(f"seq {seq} STEP_RETRYING {step} attempt {k[1]} item {k[2]} again "
                                    f"(first at seq {retrying[k]}) without a resume in between")
            retrying[k] = seq
    out.last_type = events[-1].get("type") if events else None
    if status is not None:
        want = RUN_END.get(out.last_type or "", "RUNNING")
        if status in RUN_END.values() or want != "RUNNING":
            if want != status:
                out.duplicated += 1
                out.problems.append(f"status {status} but the last event is {out.last_type}")
    return out


def reserved_lost_pico(totals: dict) -> int:
    """What the run's totals say it lost to crashed runners' reservations, once the runner
    records that (a totals field named like reserved_lost…; pico-dollars)."""
    lost = 0
    for k, v in (totals or {}).items():
        if "reserved_lost" in k or ("lost" in k and "reserv" in k):
            if isinstance(v, dict):
                v = v.get("cost_pico_usd", 0)
            if k.endswith("pico_usd") or isinstance(v, int):
                try:
                    lost = max(lost, int(v))
                except (TypeError, ValueError):
                    pass
    return lost


def overrun(totals: dict, budget: dict) -> str | None:
    """Why the run's charges exceed its budget, or None."""
    if not totals or not budget:
        return None
    charged = int(totals.get("cost_pico_usd", 0)) + reserved_lost_pico(totals)
    if "max_cost_usd" in budget:
        limit = usd_to_pico(budget["max_cost_usd"])
        if charged > limit:
            return f"charged {charged} pico-USD (reserved lost included) > budget {limit}"
    if "max_total_tokens" in budget:
        tokens = int(totals.get("total_tokens", 0))
        if tokens > int(budget["max_total_tokens"]):
            return f"{tokens} tokens > budget {budget['max_total_tokens']}"
    return None


def usd_to_pico(value) -> int:
    from decimal import Decimal

    return int(Decimal(str(value)) * Decimal(10) ** 12)


# What a review decision makes of its run.
VERDICT_END = {"approve": "COMPLETED", "edit": "COMPLETED", "reject": "FAILED"}


def review_ends(decisions: list[tuple[str, int]], cancel: int | None = None,
                on_timeout: str | None = None) -> tuple[set[str], list[str]]:
    """The end states a run with one review step may reach, from the answers its requests
    got: `decisions` as (verdict, HTTP status) in the order sent, `cancel` the status of a
    cancel sent alongside (None: none was), `on_timeout` what the review's deadline decides
    if nobody does. Also returns what is wrong with the answers themselves: a status other
    than 202/409, two different verdicts both accepted, nothing that could end the run."""
    problems = [f"{verdict} answered {status}" for verdict, status in decisions if status not in (202, 409)]
    if cancel is not None and cancel not in (202, 409):
        problems.append(f"cancel answered {cancel}")
    accepted = [verdict for verdict, status in decisions if status == 202]
    if len(set(accepted)) > 1:
        problems.append(f"different decisions all accepted: {accepted}")
    ends: set[str] = set()
    if accepted:
        ends.add(VERDICT_END[accepted[0]])
    elif on_timeout and cancel != 202:
        ends.add(VERDICT_END[on_timeout])
    if cancel == 202:
        ends.add("CANCELLED")
    if not ends:
        problems.append("no decision or cancel was accepted: nothing could end the run")
    return ends, problems


def spend_problem(paid_pico: int, totals: dict, exact: bool) -> str | None:
    """Whether what the model server was paid for a run's calls (`paid_pico`) and what
    the run was charged (its totals) disagree. A run no runner died in and nobody
    cancelled mid-call is charged exactly what was paid; otherwise what was paid for calls
    whose runner was gone is within what the run counts as reserved and lost."""
    charged = int((totals or {}).get("cost_pico_usd", 0))
    lost = reserved_lost_pico(totals)
    if charged > paid_pico:
        return f"charged {charged} pico-USD, more than the {paid_pico} the model server was paid"
    if exact and charged != paid_pico:
        return f"charged {charged} pico-USD, the model server was paid {paid_pico}"
    if paid_pico > charged + lost:
        return f"paid {paid_pico} pico-USD, charged {charged} and {lost} reserved and lost: {paid_pico - charged - lost} unaccounted"
    return None
