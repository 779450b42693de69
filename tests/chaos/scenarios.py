"""The chaos scenarios. Each drives the real binaries on a local stack (a Harness) with no
person acting, then checks every run it started (tests/chaos/checks.py) and reports its
own counts (a ScenarioResult).

    kill         runs of the fan workflow (parallel steps, a map over the input's list with
                 an llm sub-step, a join, a budget); the runner process running each is
                 SIGKILLed once or twice at seeded points (a phase of the run plus a seeded
                 delay); every run must complete, each kill's recovery (kill -> the run's
                 next event) is measured.
    duplicates   one run delivered 100 more times at once, straight through the invoke
                 proxy's Invoke API (Event): every model call made once.
    storm        the dev model server throttles half the run's calls (seeded fail_rate):
                 runs finish, no step or item makes more attempts than its retry policy.
    dynamodb     DynamoDB writes (and some reads) fail: throttled, 500, applied with the
                 reply lost, held and dropped (the fault proxy): runs finish consistent.
    lost         the API's dispatch is lost (the proxy drops it): the sweeper starts the run.
    chain        100 sequential steps under an 8 s runner timeout: the run suspends and
                 continues across invocations, paying every call once.
    steer        runs paused and resumed, or cancelled, some with their runner killed first.
    review       runs with a review step: decided once, twice at once, racing a cancel,
                 while the runner is busy (and then killed), with the runner that picks
                 the decision up killed, followed by a budget pause the driver raises (and
                 then, once, kills the runner that continues), or by a short deadline
                 nobody waits on; each ends as its answers say, with exact spend.
    batch        runs of a 100-120-item map run as one batch inference job, then an llm
                 step; the runner SIGKILLed while the job is submitted, while the run is
                 parked and while the answers are read: one job per run, each record
                 paid once, exactly the batch price of the records charged.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import workflows as wf
from .checks import (CHECKPOINT_GRACE_S, BatchCheck, calls_of, check_batch_calls, check_calls, check_events,
                     checkpoint_times, fmt_key, key_of, lost_calls, online_in_flight_at_kills, overrun, review_ends,
                     spend_problem, ts)
from .driver import TERMINAL, Harness

# The local stack's recovery timings (infra/stack.py): lease 6 s, sweep every 5 s, queued
# grace 10 s. A crashed run is resumed within lease + sweep (+ a cold start).
LEASE_S = 6.0
SWEEP_S = 5.0
QUEUED_GRACE_S = 10.0
PER_CRASH_S = LEASE_S + SWEEP_S + 14.0  # slack: a loaded 2-core machine, a retry's delay

SCENARIOS = ("kill", "duplicates", "storm", "dynamodb", "lost", "steer", "review", "chain", "batch")
# Which stack each scenario needs (infra.stack.Stack keyword arguments / environment).
STACK_OF = {"kill": "main", "duplicates": "main", "storm": "main", "lost": "main", "steer": "main",
            "review": "main", "batch": "main", "dynamodb": "faults", "chain": "chain"}

# Kill phases of the fan workflow, in the order a run passes them. "mid-map" waits until
# an item's answer is older than CHECKPOINT_GRACE_S (so it should have been checkpointed,
# DESIGN.md: "map items one by one"); "time" is a seeded delay after the run (re)started.
PHASES = ("parallel", "between", "map-first-wave", "mid-map", "join", "time")
ORDER = {p: i for i, p in enumerate(PHASES)}
# Phases whose kills no missing capability turns into double payments today.
SAFE_PHASES = ("parallel", "between", "map-first-wave", "join")


@dataclasses.dataclass
class Trial:
    scenario: str
    label: str
    tag: str
    run_id: str
    definition: dict
    keys: set
    latency_s: float
    created: float
    bound_s: float
    expected: str = "COMPLETED"
    max_attempts: int = 3
    kills: list = dataclasses.field(default_factory=list)
    plan: list = dataclasses.field(default_factory=list)
    missed: list = dataclasses.field(default_factory=list)
    finished_in: float | None = None
    shared_tag: bool = False  # another run has the same prompts (a retried POST): skip call counts
    step_latency_s: dict = dataclasses.field(default_factory=dict)  # steps whose latency is not latency_s
    batch_steps: frozenset = frozenset()  # map steps run as batch inference jobs
    log_offset: int = 0  # the functions' log's size when the run started

    @property
    def budget(self) -> dict:
        return self.definition.get("budget") or {}


@dataclasses.dataclass
class Verdict:
    trial: Trial
    status: str | None
    completed: bool
    stuck: bool
    duplicated: int
    double_paid: int
    repeated: int
    overrun: str | None
    problems: list
    events: list
    event_counts: dict
    calls_per_key: dict
    executions_per_key: dict
    paid_calls: int
    failed_calls: int
    error: dict | None
    all_failed: set  # keys none of whose calls was answered
    paid_pico: int  # the answered calls' cost by the dev model server's usage
    charged_pico: int  # the run's totals
    batch: BatchCheck | None = None  # the batch maps' records and calls (Trial.batch_steps)


@dataclasses.dataclass
class ScenarioResult:
    name: str
    trials: int = 0
    completed: int = 0
    stuck: int = 0
    duplicated_events: int = 0
    double_paid_calls: int = 0
    repeated_calls: int = 0
    overruns: int = 0
    violations: int = 0  # the scenario's own invariants (attempt bounds, suspensions, …)
    recoveries: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, v: Verdict) -> None:
        self.trials += 1
        self.completed += int(v.completed)
        self.stuck += int(v.stuck)
        self.duplicated_events += v.duplicated
        self.double_paid_calls += v.double_paid
        self.repeated_calls += v.repeated
        self.overruns += int(v.overrun is not None)
        self.recoveries.extend(k.recovery_s for k in v.trial.kills if k.recovery_s is not None)
        for p in v.problems:
            self.problems.append(f"run {v.trial.run_id} ({v.trial.label}): {p}")

    def violate(self, run_id: str, what: str) -> None:
        self.violations += 1
        self.problems.append(f"run {run_id}: {what}")

    @property
    def ok(self) -> bool:
        return (self.completed == self.trials and not (self.stuck or self.duplicated_events or self.double_paid_calls
                                                       or self.overruns or self.violations))

    @property
    def max_recovery_s(self) -> float:
        return max(self.recoveries, default=0.0)

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.info.items())
        return (f"chaos[{self.name}]: trials={self.trials} completed={self.completed} stuck={self.stuck} "
                f"duplicated_events={self.duplicated_events} double_paid_calls={self.double_paid_calls} "
                f"repeated_calls={self.repeated_calls} overruns={self.overruns} violations={self.violations} "
                f"max_recovery_s={self.max_recovery_s:.1f} {extra} ({self.seconds:.0f}s)").rstrip()


def summary_line(results: list[ScenarioResult]) -> str:
    t = sum(r.trials for r in results)
    c = sum(r.completed for r in results)
    s = sum(r.stuck for r in results)
    d = sum(r.duplicated_events for r in results)
    p = sum(r.double_paid_calls for r in results)
    o = sum(r.overruns for r in results)
    rec = max((r.max_recovery_s for r in results), default=0.0)
    return (f"chaos: trials={t} completed={c} stuck={s} duplicated_events={d} double_paid_calls={p} "
            f"overruns={o} max_recovery_s={rec:.1f}")


def passed(results: list[ScenarioResult]) -> bool:
    return all(r.ok for r in results) and bool(results)


# ---------------------------------------------------------------------------------------
# evaluating one run


def evaluate(h: Harness, t: Trial) -> Verdict:
    view = h.run_view(t.run_id)
    status = view.get("status")
    if status in TERMINAL and view.get("finished_at"):
        t.finished_in = ts(view["finished_at"]) - t.created
    events = h.events(t.run_id)
    ev = check_events(events, status)
    problems = list(ev.problems)
    items = h.run_items(t.run_id)
    calls = calls_of(h.calls(t.tag), t.tag, t.latency_s, t.step_latency_s) if not t.shared_tag else []
    # Batch records are judged by check_batch_calls: answered when the job got to them,
    # not as a runner asked, they have no place in check_calls' timing of online calls.
    online = [c for c in calls if c.batch_job is None]
    cc = check_calls(online, checkpoint_times(items), t.kills, [x for x in ev.takeovers if x is not None],
                     map_steps={wf.FAN_MAP_STEP, *t.batch_steps})
    # What the model provider was paid for this run, against what the run was charged: the
    # difference is calls made again after a crash that no budget saw (until reservations
    # lost with a crashed runner are recorded).
    paid = sum(wf.paid_pico(c.usage) for c in online if c.status == 200)
    bc = None
    if t.batch_steps:
        bc = check_batch_calls(calls, set(t.batch_steps), wf.batch_paid_pico, wf.paid_pico)
        paid = bc.paid_pico
        problems += bc.problems
    charged = int((view.get("totals") or {}).get("cost_pico_usd", 0))
    problems += cc.problems
    over = overrun(view.get("totals") or {}, t.budget)
    if over:
        problems.append(f"over budget: {over}")
    stuck = t.finished_in is None or t.finished_in > t.bound_s
    if stuck:
        problems.append(f"not finished within its bound of {t.bound_s:.0f}s "
                        f"(finished in {'-' if t.finished_in is None else f'{t.finished_in:.1f}s'}; status {status})")
    completed = status == t.expected
    if not completed:
        problems.append(f"ended {status}, expected {t.expected}: {view.get('error')}")
    if status == "COMPLETED" and not t.shared_tag:
        called = {c.key for c in calls}
        never = sorted(fmt_key(k) for k in t.keys if k not in called)
        if never:
            problems.append(f"completed without a model call for {never}")
    double_paid = cc.double_paid + (bc.double_paid if bc else 0)
    return Verdict(t, status, completed, stuck, ev.duplicated, double_paid, cc.repeated, over, problems, events,
                   dict(ev.counts), cc.calls_per_key, cc.executions_per_key, cc.paid_calls, cc.failed_calls,
                   view.get("error"), cc.all_failed, paid, charged, bc)


def _finish(h: Harness, trials: list[Trial], res: ScenarioResult, log, *, quiesce: float = 60.0) -> list[Verdict]:
    """Waits for every trial's run to end (each within a hard cap past its bound), lets
    async deliveries settle, evaluates each run."""
    t0 = time.monotonic()
    for t in trials:
        # a hard cap past the bound; `stuck` itself is judged from the run's finished_at
        h.wait_terminal([t.run_id], max(1.0, t.created + t.bound_s + 60.0 - time.time()))
    if not h.c.wait_quiescent(quiesce):
        res.problems.append(f"async deliveries still in flight {quiesce:.0f}s after the runs ended: {h.proxy_stats()}")
    verdicts = [evaluate(h, t) for t in trials]
    for v in verdicts:
        res.add(v)
    log(f"chaos[{res.name}]: evaluated {len(verdicts)} runs in {time.monotonic() - t0:.1f}s")
    return verdicts


def _start(h: Harness, scenario: str, label: str, definition: dict, input_: dict, tag: str, keys: set,
           latency_s: float, bound_s: float, **kw) -> Trial:
    created = time.time()
    run_id = h.create_run(definition, input_)
    return Trial(scenario, label, tag, run_id, definition, keys, latency_s, created, bound_s, **kw)


# ---------------------------------------------------------------------------------------
# kill


def kill_plan(rng: random.Random, phases: tuple[str, ...], max_kills: int = 2) -> list[tuple[str, float]]:
    """One or two (phase, delay s) kills, the second at a later phase (or a time)."""
    first = rng.choice(phases)
    plan = [first]
    if max_kills > 1 and rng.random() < 0.5:
        later = [p for p in phases if p == "time" or ORDER[p] > ORDER[first]]
        if later:
            plan.append(rng.choice(later))
    return [(p, phase_delay(rng, p)) for p in plan]


def phase_delay(rng: random.Random, phase: str) -> float:
    return {"parallel": rng.uniform(0, 0.1), "between": rng.uniform(0, 0.03),
            "map-first-wave": rng.uniform(0, 0.08), "mid-map": rng.uniform(0, 0.08),
            "join": rng.uniform(0, 0.15), "time": rng.uniform(0.2, 3.0)}[phase]


def triggered(phase: str, calls: list[dict], tag: str, items: int, latency_s: float, now: float) -> bool:
    """Whether the run (its calls since it last started) is at `phase`."""
    by: dict[str, list[dict]] = {}
    for c in calls:
        k = key_of(c.get("prompt", ""), tag)
        if k:
            by.setdefault(k[0], []).append(c)
    ab = by.get("a", []) + by.get("b", [])
    fan = by.get(wf.FAN_MAP_STEP, [])
    join = by.get("join", [])
    if phase == "parallel":
        return any(c["status"] is None for c in ab)
    if phase == "between":
        return any(c["status"] == 200 for c in ab)
    if phase == "map-first-wave":
        return bool(fan) and all(c["status"] is None for c in fan)
    if phase == "mid-map":
        answered = [ts(c["at"]) + latency_s for c in fan if c["status"] == 200]
        pending = len({key_of(c["prompt"], tag) for c in fan}) < items or any(c["status"] is None for c in fan)
        return bool(answered) and pending and now - min(answered) >= CHECKPOINT_GRACE_S + 0.2
    if phase == "join":
        return any(c["status"] is None for c in join)
    return phase == "time"


def drive_kills(h: Harness, t: Trial, items: int, log) -> None:
    since = t.created - 0.5
    for phase, delay in t.plan:
        fired = None
        deadline = time.monotonic() + 60
        polls = 0
        while time.monotonic() < deadline:
            if polls % 10 == 0 and h.status(t.run_id) in TERMINAL:
                break
            polls += 1
            calls = [c for c in h.calls(t.tag) if ts(c["at"]) > since]
            if triggered(phase, calls, t.tag, items, t.latency_s, time.time()):
                fired = time.time()
                break
            time.sleep(0.04)
        if fired is None:
            t.missed.append(f"{phase}: the run ended first")
            return
        time.sleep(delay)
        kill = h.kill_run(t.run_id, phase)
        if kill is None:
            t.missed.append(f"{phase}: no runner process had the run")
            continue
        t.kills.append(kill)
        if not kill.hit:
            t.missed.append(f"{phase}: process {kill.pid} was no longer running the run")
            continue
        nxt = h.next_event_after(t.run_id, kill.at, timeout=PER_CRASH_S + 30)
        if nxt is None:
            log(f"chaos[kill]: run {t.run_id}: no event within {PER_CRASH_S + 30:.0f}s of the kill at {phase}")
            return
        kill.recovery_s = ts(nxt["at"]) - kill.at
        since = ts(nxt["at"])
        log(f"chaos[kill]: {t.label} run {t.run_id}: killed pid {kill.pid} at {phase}; "
            f"next event {nxt['type']} after {kill.recovery_s:.1f}s")


def scenario_kill(h: Harness, rng: random.Random, runs: int, log, *, phases=PHASES, max_kills: int = 2,
                  batch: int = 4, items: int = 10, latency_ms: int = 400, name: str = "kill") -> ScenarioResult:
    res = ScenarioResult(name)
    t0 = time.monotonic()
    all_trials: list[Trial] = []
    for start in range(0, runs, batch):
        trials: list[Trial] = []
        for i in range(start, min(runs, start + batch)):
            tag = wf.new_tag()
            definition, input_ = wf.fan_workflow(tag, items, budget_usd="0.01")
            h.add_rules([wf.rule(tag, latency_ms)])
            plan = kill_plan(rng, phases, max_kills)
            bound = 45.0 + PER_CRASH_S * len(plan)
            t = _start(h, name, f"{name}#{i}", definition, input_, tag, wf.fan_keys(items), latency_ms / 1000, bound,
                       plan=plan)
            trials.append(t)
        log(f"chaos[{name}]: runs {start}..{start + len(trials) - 1}: " +
            "; ".join(f"{t.run_id} kills at {[p for p, _ in t.plan]}" for t in trials))
        with ThreadPoolExecutor(len(trials)) as pool:
            for f in [pool.submit(drive_kills, h, t, items, log) for t in trials]:
                f.result()
        h.wait_terminal([t.run_id for t in trials], max(t.bound_s for t in trials) + 30)
        all_trials += trials
    verdicts = _finish(h, all_trials, res, log)
    kills = [k for t in all_trials for k in t.kills]
    res.info.update(kills=sum(k.hit for k in kills), kills_missed=sum(len(t.missed) for t in all_trials),
                    paid_not_charged_usd=_usd(sum(max(0, v.paid_pico - v.charged_pico) for v in verdicts)),
                    phases="/".join(f"{p}:{sum(k.phase == p and k.hit for k in kills)}" for p in PHASES
                                    if any(k.phase == p for k in kills)),
                    median_recovery_s=f"{_median(res.recoveries):.1f}")
    return _with_missed_kills(res, all_trials, t0)


def _with_missed_kills(res: ScenarioResult, trials: list[Trial], t0: float) -> ScenarioResult:
    """`res` with a problem for each kill that never found its moment, and its duration."""
    for t in trials:
        for m in t.missed:
            res.problems.append(f"run {t.run_id} ({t.label}): kill missed ({m})")
    res.seconds = time.monotonic() - t0
    return res


def _usd(pico: int) -> str:
    from decimal import Decimal

    return format((Decimal(pico) / Decimal(10) ** 12).normalize(), "f")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


# ---------------------------------------------------------------------------------------
# duplicates


def scenario_duplicates(h: Harness, rng: random.Random, runs: int, log, *, copies: int = 100,
                        items: int = 4, latency_ms: int = 300) -> ScenarioResult:
    res = ScenarioResult("duplicates")
    t0 = time.monotonic()
    trials = []
    before = h.proxy_stats()
    accepted = 0
    for i in range(runs):
        tag = wf.new_tag()
        definition, input_ = wf.fan_workflow(tag, items)
        h.add_rules([wf.rule(tag, latency_ms)])
        t = _start(h, "duplicates", f"duplicates#{i}", definition, input_, tag, wf.fan_keys(items),
                   latency_ms / 1000, 60.0)
        trials.append(t)
        # 100 more deliveries of the same run at once, straight to the runner's Invoke API.
        with ThreadPoolExecutor(copies) as pool:
            statuses = list(pool.map(lambda _: h.invoke_event("chainrun-runner", {"run_id": t.run_id}), range(copies)))
        accepted += sum(s == 202 for s in statuses)
        if any(s != 202 for s in statuses):
            res.violate(t.run_id, f"duplicate deliveries not all accepted: {sorted(set(statuses))}")
        h.wait_terminal([t.run_id], 90)
        h.c.wait_quiescent(60)  # one run's burst at a time
    verdicts = _finish(h, trials, res, log)
    after = h.proxy_stats()
    for v in verdicts:
        more = {fmt_key(k): n for k, n in v.calls_per_key.items() if n != 1}
        if more:
            res.violate(v.trial.run_id, f"model calls not made exactly once: {more}")
    log_text = _read(h.c.logs / "lambda-watch.log")
    held = sum(_count_lines(log_text, t.run_id, "held by another runner") for t in trials)
    finished = sum(_count_lines(log_text, t.run_id, "run already finished") for t in trials)
    res.info.update(deliveries=accepted + runs, already_running=held, already_finished=finished,
                    failed_deliveries=after["failed"] - before["failed"],
                    calls=sum(v.paid_calls for v in verdicts))
    if after["failed"] != before["failed"]:
        res.violate(",".join(t.run_id for t in trials), f"{after['failed'] - before['failed']} deliveries failed")
    res.seconds = time.monotonic() - t0
    return res


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _count_lines(text: str, run_id: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if run_id in line and needle in line)


# ---------------------------------------------------------------------------------------
# throttle storm


def scenario_storm(h: Harness, rng: random.Random, runs: int, log, *, items: int = 4, latency_ms: int = 100,
                   rate: float = 0.5, max_attempts: int = 8) -> ScenarioResult:
    res = ScenarioResult("storm")
    t0 = time.monotonic()
    retry = {"max_attempts": max_attempts, "initial_backoff_ms": 50, "max_backoff_ms": 400}
    trials = []
    for i in range(runs):
        tag = wf.new_tag()
        definition, input_ = wf.fan_workflow(tag, items, retry=retry)
        h.add_rules([wf.rule(tag, latency_ms, fail_rate=rate, seed=rng.randrange(1 << 30))])
        trials.append(_start(h, "storm", f"storm#{i}", definition, input_, tag, wf.fan_keys(items),
                             latency_ms / 1000, 90.0, max_attempts=max_attempts))
    h.wait_terminal([t.run_id for t in trials], 120)
    # A step or item whose every attempt was throttled fails, and fails the run: expected.
    for t in trials:
        calls = calls_of(h.calls(t.tag), t.tag, t.latency_s)
        by: dict = {}
        for c in calls:
            by.setdefault(c.key, []).append(c)
        if any(len(cs) >= max_attempts and all(c.status != 200 for c in cs) for cs in by.values()):
            t.expected = "FAILED"
    verdicts = _finish(h, trials, res, log)
    throttled = sum(v.failed_calls for v in verdicts)
    for v in verdicts:
        for k, n in v.calls_per_key.items():
            bound = max_attempts * v.executions_per_key.get(k, 1)
            if n > bound:
                res.violate(v.trial.run_id, f"{fmt_key(k)}: {n} calls, its retry policy allows {bound}")
        # Every failed attempt is announced by one STEP_RETRYING, but the last of a step or
        # item that ran out of attempts (which fails the run).
        retrying = v.event_counts.get("STEP_RETRYING", 0)
        exhausted = sum(1 for k, n in v.calls_per_key.items() if n >= max_attempts and k in v.all_failed)
        if retrying != v.failed_calls - exhausted:
            res.violate(v.trial.run_id, f"{retrying} STEP_RETRYING events for {v.failed_calls} throttled calls "
                                        f"({exhausted} steps or items out of attempts)")
    res.info.update(throttled_calls=throttled, paid_calls=sum(v.paid_calls for v in verdicts),
                    failed_as_expected=sum(v.trial.expected == "FAILED" and v.completed for v in verdicts),
                    max_attempts_seen=max((n for v in verdicts for n in v.calls_per_key.values()), default=0))
    res.seconds = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------
# DynamoDB faults

WRITE_OPS = ["PutItem", "UpdateItem", "TransactWriteItems", "DeleteItem"]
READ_OPS = ["GetItem", "Query"]


def fault_config(seed: int) -> dict:
    """About a third of the write attempts fail (the SDK tries each request 3 times, so
    now and then a write fails for good and the runner's own recovery has to step in)."""
    return {"seed": seed, "faults": [
        {"kind": "throttle", "rate": 0.15, "operations": WRITE_OPS},
        {"kind": "error500", "rate": 0.08, "operations": WRITE_OPS},
        {"kind": "lost_reply", "rate": 0.08, "operations": WRITE_OPS},
        {"kind": "timeout", "rate": 0.03, "delay_ms": 1500, "operations": WRITE_OPS},
        {"kind": "timeout", "rate": 0.03, "delay_ms": 1500, "forward": True, "operations": WRITE_OPS},
        {"kind": "throttle", "rate": 0.05, "operations": READ_OPS},
        {"kind": "latency", "rate": 0.2, "delay_ms": 30},
    ]}


def scenario_dynamodb(h: Harness, rng: random.Random, runs: int, log, *, items: int = 4,
                      latency_ms: int = 200) -> ScenarioResult:
    res = ScenarioResult("dynamodb")
    t0 = time.monotonic()
    h.c.set_faults(fault_config(rng.randrange(1 << 30)))
    trials = []
    try:
        for i in range(runs):
            tag = wf.new_tag()
            definition, input_ = wf.fan_workflow(tag, items)
            h.add_rules([wf.rule(tag, latency_ms)])
            trials.append(_start(h, "dynamodb", f"dynamodb#{i}", definition, input_, tag, wf.fan_keys(items),
                                 latency_ms / 1000, 90.0 + PER_CRASH_S))
        h.wait_terminal([t.run_id for t in trials], max(t.bound_s for t in trials) + 30)
        h.c.wait_quiescent(60)
    finally:
        faults = h.c.faults()
        h.c.set_faults({"faults": []})
    # A POST /runs the client tried again may have stored its run twice: check them all.
    for t in list(trials):
        ids = h.runs_of_workflow(t.definition["name"])
        if len(ids) > 1:
            t.shared_tag = True
            for extra in ids:
                if extra != t.run_id:
                    trials.append(dataclasses.replace(t, run_id=extra, label=t.label + "'", finished_in=None))
            res.problems.append(f"{t.label}: POST /runs stored {len(ids)} runs: {ids}")
    _finish(h, trials, res, log)
    res.info.update(requests=faults.get("requests"),
                    fired="/".join(f"{k}:{v}" for k, v in sorted((faults.get("fired") or {}).items())),
                    idempotent_replays=(faults.get("tokens") or {}).get("replayed"))
    res.seconds = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------
# lost dispatch


def scenario_lost(h: Harness, rng: random.Random, runs: int, log, *, items: int = 2,
                  latency_ms: int = 100) -> ScenarioResult:
    res = ScenarioResult("lost")
    t0 = time.monotonic()
    lost_before = h.drops()["lost"]
    h.add_drop({"function": "chainrun-runner", "match": {"cause": "start"}, "count": runs})
    trials = []
    for i in range(runs):
        tag = wf.new_tag()
        definition, input_ = wf.fan_workflow(tag, items)
        h.add_rules([wf.rule(tag, latency_ms)])
        trials.append(_start(h, "lost", f"lost#{i}", definition, input_, tag, wf.fan_keys(items), latency_ms / 1000,
                             QUEUED_GRACE_S + SWEEP_S + 25.0))
    h.wait_terminal([t.run_id for t in trials], max(t.bound_s for t in trials) + 30)
    lost = h.drops()["lost"] - lost_before
    verdicts = _finish(h, trials, res, log)
    starts = []
    log_text = _read(h.c.logs / "lambda-watch.log")
    for v in verdicts:
        first = v.events[0] if v.events else None
        if first:
            starts.append(ts(first["at"]) - v.trial.created)
        if not _count_lines(log_text, v.trial.run_id, "Sweep"):
            res.violate(v.trial.run_id, "no delivery with cause Sweep in the runner's log")
    if lost != runs:
        res.violate(",".join(t.run_id for t in trials), f"{lost} dispatches lost, {runs} meant to be")
    res.info.update(dispatches_lost=lost, max_start_s=f"{max(starts, default=0):.1f}",
                    min_start_s=f"{min(starts, default=0):.1f}")
    res.seconds = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------
# continuation chain


def scenario_chain(h: Harness, rng: random.Random, runs: int, log, *, steps: int = 100,
                   latency_ms: int = 100) -> ScenarioResult:
    res = ScenarioResult("chain")
    t0 = time.monotonic()
    before = h.proxy_stats()
    trials = []
    for i in range(runs):
        tag = wf.new_tag()
        definition, input_, keys = wf.chain_workflow(tag, steps)
        h.add_rules([wf.rule(tag, latency_ms)])
        trials.append(_start(h, "chain", f"chain#{i}", definition, input_, tag, keys, latency_ms / 1000,
                             steps * 1.5 + 60))
    h.wait_terminal([t.run_id for t in trials], max(t.bound_s for t in trials) + 30)
    verdicts = _finish(h, trials, res, log)
    after = h.proxy_stats()
    suspended = resumed = taken = 0
    for v in verdicts:
        s, r = v.event_counts.get("RUN_SUSPENDED", 0), v.event_counts.get("RUN_RESUMED", 0)
        causes = [e["data"].get("cause") for e in v.events if e["type"] == "RUN_RESUMED"]
        # An invocation that overran its timeout (a step started just before the margin and
        # took longer) is killed like a crash and taken over: allowed, and counted.
        takeovers = sum(1 for e in v.events if e["type"] == "RUN_RESUMED" and e["data"].get("takeover"))
        suspended += s
        resumed += r
        taken += takeovers
        if s < 1:
            res.violate(v.trial.run_id, "never suspended: the runner timeout did not bite (the chain is too short?)")
        if r != s + takeovers:
            res.violate(v.trial.run_id, f"{s} RUN_SUSPENDED and {takeovers} takeovers but {r} RUN_RESUMED: {causes}")
        more = {fmt_key(k): n for k, n in v.calls_per_key.items() if n != 1}
        if more:
            res.problems.append(f"run {v.trial.run_id}: calls made more than once (see repeated/double paid): {more}")
        if any(c not in ("continue", "sweep") for c in causes):
            res.violate(v.trial.run_id, f"resumed other than by its continuation or a takeover: {causes}")
    res.info.update(steps=steps, suspended=suspended, resumed=resumed, takeovers=taken,
                    timeouts=after["timeouts"] - before["timeouts"],
                    invocations=sum(1 + v.event_counts.get("RUN_RESUMED", 0) for v in verdicts))
    res.seconds = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------
# steer: runs paused (and resumed) or cancelled mid-way, some with their runner killed


def steer_run(h: Harness, t: Trial, rng: random.Random, cancel: bool, kill: bool, log) -> None:
    """Drives one run: after a seeded delay maybe SIGKILLs its runner, then pauses it,
    waits until it waits, and resumes it a little later — or cancels it."""
    time.sleep(rng.uniform(0.3, 2.0))
    if kill:
        k = h.kill_run(t.run_id, "time")
        if k is not None:
            t.kills.append(k)
    action = "cancel" if cancel else "pause"
    status, _, body = h.api("POST", f"/runs/{t.run_id}/{action}", body={"reason": "chaos"})
    if status not in (202, 409):
        t.missed.append(f"{action} answered {status}: {body}")
        return
    if cancel or status == 409:  # 409: it had ended already
        return
    deadline = time.monotonic() + t.bound_s
    while time.monotonic() < deadline and h.status(t.run_id) not in ("AWAITING_INPUT", *TERMINAL):
        time.sleep(0.2)
    if h.status(t.run_id) != "AWAITING_INPUT":
        return  # it finished before the pause took hold
    time.sleep(rng.uniform(0.5, 2.0))
    status, _, body = h.api("POST", f"/runs/{t.run_id}/resume")
    if status != 202:
        t.missed.append(f"resume answered {status}: {body}")
    else:
        log(f"chaos[steer]: {t.run_id} paused and resumed")


def scenario_steer(h: Harness, rng: random.Random, runs: int, log, *, items: int = 6, latency_ms: int = 400,
                   name: str = "steer") -> ScenarioResult:
    """Every fourth run is cancelled, the others paused and resumed; every other run also
    loses its runner to a SIGKILL first. Each must end as asked, with the usual checks:
    no call paid twice for a checkpointed step, a gap-free log, within its budget."""
    res = ScenarioResult(name)
    t0 = time.monotonic()
    trials: list[Trial] = []
    plans = []
    for i in range(runs):
        tag = wf.new_tag()
        definition, input_ = wf.fan_workflow(tag, items, budget_usd="0.01")
        h.add_rules([wf.rule(tag, latency_ms)])
        cancel, kill = i % 4 == 3, i % 2 == 1
        t = _start(h, name, f"{name}#{i}", definition, input_, tag, wf.fan_keys(items), latency_ms / 1000,
                   60.0 + PER_CRASH_S * kill, expected="CANCELLED" if cancel else "COMPLETED")
        trials.append(t)
        plans.append((cancel, kill))
    log(f"chaos[{name}]: " + "; ".join(f"{t.run_id} {'cancel' if c else 'pause+resume'}{' +kill' if k else ''}"
                                      for t, (c, k) in zip(trials, plans)))
    seeds = [rng.random() for _ in trials]
    with ThreadPoolExecutor(len(trials)) as pool:
        for f in [pool.submit(steer_run, h, t, random.Random(seed), c, k, log) for t, seed, (c, k) in zip(trials, seeds, plans)]:
            f.result()
    _finish(h, trials, res, log)
    for t in trials:
        for m in t.missed:
            res.problems.append(f"run {t.run_id} ({t.label}): {m}")
    res.info.update(cancelled=sum(c for c, _ in plans), paused=sum(not c for c, _ in plans),
                    kills=sum(k.hit for t in trials for k in t.kills))
    res.seconds = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------
# review: runs waiting for a person, decided in every awkward way


# Modes in the order a scenario of n runs uses them (then again from the start). The short
# suite's runs stop before "deadline": a review's deadline is at least a minute.
REVIEW_MODES = ("approve", "reject", "edit", "twice", "cancel-race", "early-kill", "kill-after", "budget",
                "budget-kill", "deadline")
REVIEW_KILLS = ("early-kill", "kill-after", "budget-kill")
REVIEW_BUDGET = ("budget", "budget-kill")
# The budget mode's numbers: draft's and then side's worst cases (under 10 µUSD each) fit
# 40 µUSD; send's, whose prompt carries 1,000 bytes of padding, does not (about 50 µUSD),
# so the run waits for its budget after the review until the driver raises it
# (tests/chaos/test_checks.py checks the arithmetic).
REVIEW_TIGHT_USD = "0.00004"
REVIEW_RAISED_USD = "0.001"
REVIEW_PAD = 1000


def review_mode(i: int) -> str:
    return REVIEW_MODES[i % len(REVIEW_MODES)]


def wait_until(probe, timeout: float, poll: float = 0.1):
    """probe() until it returns something truthy (returned), or None after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(poll)
    return None


def step_status(h: Harness, run_id: str, step: str) -> str | None:
    for it in h.run_items(run_id):
        if it.get("sk") == f"STEP#{step}":
            return it.get("status")
    return None


def review_run(h: Harness, t: Trial, rng: random.Random, mode: str, note: dict, log) -> None:
    """Drives one run of the review workflow as `mode` says; records every answer in `note`."""
    run, step = t.run_id, wf.REVIEW_STEP
    path = f"/runs/{run}/resume"

    def decide(verdict: str, output: str | None = None):
        body = {"step": step, "decision": verdict}
        if output is not None:
            body["output"] = output
        status, _, answer = h.api("POST", path, body=body)
        note["decisions"].append((verdict, status))
        if status not in (202, 409):
            t.missed.append(f"{verdict} answered {status}: {answer}")
        return status, answer

    def parked(kind: str = "review") -> bool:
        def probe():
            view = h.run_view(run)
            if view["status"] in TERMINAL:
                return "ended"
            return "yes" if view["status"] == "AWAITING_INPUT" and (view.get("waiting") or {}).get("kind") == kind else None
        got = wait_until(probe, t.bound_s, poll=0.2)
        if got != "yes":
            t.missed.append(f"never waited for {kind} ({got or 'timeout'})")
        return got == "yes"

    def together(*calls):
        barrier = threading.Barrier(len(calls))

        def go(fn):
            barrier.wait()
            return fn()
        with ThreadPoolExecutor(len(calls)) as pool:
            return [f.result() for f in [pool.submit(go, fn) for fn in calls]]

    def cancel():
        status, _, answer = h.api("POST", f"/runs/{run}/cancel", body={"reason": "chaos"})
        note["cancel"] = status
        return status, answer

    def killed(k) -> None:
        """Records a kill and how long the run took to show life again (its next event)."""
        if k is None:
            note["kills_missed"] += 1  # the run was between two invocations: no fault of the run
            return
        t.kills.append(k)
        nxt = h.next_event_after(run, k.at, timeout=PER_CRASH_S + 30) if k.hit else None
        if nxt is not None:
            k.recovery_s = ts(nxt["at"]) - k.at
            log(f"chaos[review]: {t.label} run {run}: killed pid {k.pid}; next event {nxt['type']} "
                f"after {k.recovery_s:.1f}s")

    if mode == "deadline":
        return  # nobody decides, nobody polls the API: the deadline's wake-up ends it
    if mode == "early-kill":
        # Decided while the runner still runs side (the run is not parked yet), then killed.
        if not wait_until(lambda: step_status(h, run, step) == "WAITING", t.bound_s):
            t.missed.append("the review never waited")
            return
        decide("approve")
        time.sleep(rng.uniform(0.05, 0.4))
        killed(h.kill_run(run, "early"))
        return
    if not parked():
        return
    time.sleep(rng.uniform(0.1, 0.8))
    if mode in ("approve", "reject", *REVIEW_BUDGET):
        decide("reject" if mode == "reject" else "approve")
    elif mode == "edit":
        decide("edit", note["edited"])
    elif mode == "twice":
        second = rng.choice(["approve", "reject"])
        together(lambda: decide("approve"), lambda: decide(second))
        winners = [v for v, s in note["decisions"] if s == 202]
        if winners:  # the winner repeated (a retry, a double click) is answered as the first
            status, _ = decide(winners[0])
            if status != 202:
                t.missed.append(f"the accepted {winners[0]} sent again answered {status}")
    elif mode == "cancel-race":
        together(lambda: decide("approve"), cancel)
    elif mode == "kill-after":
        decide("approve")
        killed(h.kill_run(run, "after-decision", find_s=3.0))
    if mode in REVIEW_BUDGET:
        if not parked("budget"):
            return
        time.sleep(rng.uniform(0.1, 0.5))
        status, _, answer = h.api("POST", path, body={"budget": {"max_cost_usd": REVIEW_RAISED_USD}})
        note["raise"] = status
        if status != 202:
            t.missed.append(f"the budget raise answered {status}: {answer}")
        elif mode == "budget-kill":
            # The runner that continues after the raise dies (before or during send).
            time.sleep(rng.uniform(0.0, 0.5))
            killed(h.kill_run(run, "after-raise", find_s=3.0))


def scenario_review(h: Harness, rng: random.Random, runs: int, log, *, latency_ms: int = 300,
                    side_ms: int = 1500, name: str = "review") -> ScenarioResult:
    """Runs of the review workflow, each in one REVIEW_MODES mode, all at once. Each must end
    as the answers to its requests say (review_ends), with the usual checks and exact spend
    (spend_problem); a rejected run fails REVIEW_REJECTED without sending, an edited one
    sends the edit, a budget-paused one records its raise."""
    res = ScenarioResult(name)
    t0 = time.monotonic()
    trials: list[Trial] = []
    notes: dict[str, dict] = {}
    for i in range(runs):
        mode = review_mode(i)
        tag = wf.new_tag()
        kw = {}
        if mode == "deadline":
            kw = {"timeout": "1m", "on_timeout": rng.choice(["approve", "reject"])}
        elif mode in REVIEW_BUDGET:
            kw = {"budget_usd": REVIEW_TIGHT_USD, "pause_on_budget": True, "send_pad": REVIEW_PAD}
        definition, input_ = wf.review_workflow(tag, **kw)
        h.add_rules([{"name": f"chaos-{tag}-side", "match": {"prompt_contains": wf.marker(tag, "side")},
                      "text": f"side {tag}", "latency_ms": side_ms}, wf.rule(tag, latency_ms)])
        bound = 45.0 + PER_CRASH_S * (mode in REVIEW_KILLS) + 60.0 * (mode == "deadline")
        t = _start(h, name, f"{name}#{i}:{mode}", definition, input_, tag, wf.review_keys(), latency_ms / 1000, bound,
                   step_latency_s={"side": side_ms / 1000})
        trials.append(t)
        notes[t.run_id] = {"mode": mode, "decisions": [], "cancel": None, "raise": None, "kills_missed": 0,
                           "on_timeout": kw.get("on_timeout"), "edited": f"edited {tag}"}
    log(f"chaos[{name}]: " + "; ".join(f"{t.run_id} {notes[t.run_id]['mode']}" for t in trials))
    seeds = [rng.random() for _ in trials]
    with ThreadPoolExecutor(len(trials)) as pool:
        for f in [pool.submit(review_run, h, t, random.Random(seed), notes[t.run_id]["mode"], notes[t.run_id], log)
                  for t, seed in zip(trials, seeds)]:
            f.result()
    h.wait_terminal([t.run_id for t in trials], max(t.bound_s for t in trials) + 30)
    for t in trials:
        note = notes[t.run_id]
        ends, problems = review_ends(note["decisions"], note["cancel"], note["on_timeout"])
        for p in problems:
            res.violate(t.run_id, f"({note['mode']}) {p}")
        status = h.status(t.run_id)
        t.expected = status if status in ends else "|".join(sorted(ends)) or "-"
        if note["raise"] == 202:
            # Judged against the budget it was raised to (the overrun check reads it here).
            t.definition = dict(t.definition, budget=dict(t.definition["budget"], max_cost_usd=REVIEW_RAISED_USD))
    verdicts = _finish(h, trials, res, log)
    for v in verdicts:
        t, note = v.trial, notes[v.trial.run_id]
        view = h.run_view(t.run_id)
        crashed = any(k.hit for k in t.kills)
        why = spend_problem(v.paid_pico, view.get("totals") or {}, exact=not crashed and v.status != "CANCELLED")
        if why:
            res.violate(t.run_id, f"({note['mode']}) {why}")
        sends = v.calls_per_key.get(("send", None), 0)
        check = next((s for s in view.get("steps") or [] if s["id"] == wf.REVIEW_STEP), {})
        if v.status == "FAILED":
            if (v.error or {}).get("code") != "REVIEW_REJECTED" or check.get("status") != "FAILED":
                res.violate(t.run_id, f"({note['mode']}) failed other than by its rejection: {v.error}")
            if sends:
                res.violate(t.run_id, f"({note['mode']}) rejected, yet send was called {sends} times")
        if v.status == "COMPLETED" and check.get("status") != "COMPLETED":
            res.violate(t.run_id, f"({note['mode']}) completed with its review {check.get('status')}")
        if v.status == "CANCELLED" and not any(s == 202 for _, s in note["decisions"]) and sends:
            res.violate(t.run_id, f"({note['mode']}) cancelled before any decision, yet send was called")
        if note["mode"] == "edit" and v.status == "COMPLETED":
            prompts = [c.get("prompt", "") for c in h.calls(t.tag) if key_of(c.get("prompt", ""), t.tag) == ("send", None)]
            if not prompts or not all(note["edited"] in p for p in prompts):
                res.violate(t.run_id, f"(edit) send did not get the reviewer's edit: {prompts}")
        if note["mode"] in REVIEW_BUDGET:
            raises = view.get("budget_raises") or []
            if note["raise"] != 202 or len(raises) != 1 or raises[0].get("by") != h.user:
                res.violate(t.run_id, f"(budget) raise answered {note['raise']}, recorded {raises}")
            if not any(e["type"] == "AWAITING_INPUT" and (e.get("data") or {}).get("kind") == "budget" for e in v.events):
                res.violate(t.run_id, "(budget) never waited for its budget")
    for t in trials:
        # Whatever the driver could not do as planned, the run did not do as it should.
        for m in t.missed:
            res.violate(t.run_id, f"({t.label}) {m}")
    modes = [notes[t.run_id]["mode"] for t in trials]
    res.info.update(modes="/".join(f"{m}:{modes.count(m)}" for m in REVIEW_MODES if m in modes),
                    ends="/".join(f"{s}:{n}" for s, n in sorted(Counter(v.status for v in verdicts).items())),
                    kills=sum(k.hit for t in trials for k in t.kills),
                    kills_missed=sum(notes[t.run_id]["kills_missed"] + sum(not k.hit for k in t.kills) for t in trials))
    res.seconds = time.monotonic() - t0
    return res


# ---------------------------------------------------------------------------------------
# batch: a large map run as one batch inference job, its runners killed around the job

# Kill phases of the batch workflow, in the order a run passes them: "submit" while the
# first runner renders, reserves, checkpoints the map WAITING and submits the job — a
# seeded moment after the map's STEP_STARTED ("submit@start") or right after the job was
# created ("submit@job", its id not yet checkpointed), the two alternating by run, both
# seen in the functions' log (the whole window is a hundred milliseconds or so); "parked"
# the runner a poll deadline handed the parked run to, while the job still runs;
# "reading" a seeded moment after the first of the job's answers was checkpointed as its
# item.
BATCH_PHASES = ("submit", "parked", "reading")
BATCH_ORDER = {p: i for i, p in enumerate(BATCH_PHASES)}
# The job validates 1.5 s, then answers a record every 5 ms (0.6 s for 120): with the
# local stack's 1 s poll interval (doubling), the first poll finds it Validating and the
# second, 3 s after the submission, finds it Completed.
BATCH_TIMING = {"start_delay_ms": 0, "validate_ms": 1500, "run_ms_per_record": 5}
BATCH_ITEMS = (100, 120)  # Nova Micro takes 100 records a job at least
# Runs at once: reading a job's answers writes one checkpoint per item, slow on moto when
# several runs read at once, and the local stack runs at most 4 runners (a run waiting for
# a free one looks like a slow recovery).
BATCH_WAVE = 3
JOB_ENDED = ("Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired")
# Where a kill actually landed, judged from what the run and the dev model server hold
# right after it (nothing moves until a runner takes the run over, seconds later).
BATCH_WINDOWS = ("before-checkpoint", "checkpointed-unsubmitted", "submitted-unrecorded", "job-running",
                 "job-ended", "mid-read", "after-read")


def batch_plan(rng: random.Random, i: int, phases: tuple[str, ...] = BATCH_PHASES,
               max_kills: int = 2) -> list[tuple[str, float]]:
    """Run i's kills as (phase, delay s): the first at phases[i % len] (so every phase is
    covered in turn), maybe a second at a later phase. A submit kill's phase names its
    trigger: "submit@start" or "submit@job", alternating."""
    first = phases[i % len(phases)]
    plan = [first]
    later = [p for p in phases if BATCH_ORDER[p] > BATCH_ORDER[first]]
    if max_kills > 1 and later and rng.random() < 0.5:
        plan.append(rng.choice(later))
    trigger = ("start", "job")[(i // len(phases)) % 2]
    plan = [f"{p}@{trigger}" if p == "submit" else p for p in plan]
    return [(p, batch_delay(rng, p)) for p in plan]


def batch_delay(rng: random.Random, phase: str) -> float:
    return {"submit@start": rng.uniform(0.0, 0.12), "submit@job": rng.uniform(0.0, 0.02),
            "parked": rng.uniform(0.0, 0.03), "reading": rng.uniform(0.0, 0.4)}[phase]


def batch_wait_of(row: dict | None) -> dict | None:
    """The map checkpoint's batch job (`detail.batch_job`), if it has one."""
    import json

    detail = (row or {}).get("detail")
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return None
    return detail.get("batch_job") if isinstance(detail, dict) else None


def batch_window(h: Harness, run_id: str) -> str:
    """Which window of the batch path the run's (dead) runner was in."""
    wait = batch_wait_of(h.step_row(run_id, wf.BATCH_MAP_STEP))
    jobs = h.batch_jobs_of(run_id)
    if wait is None:
        return "before-checkpoint"
    if wait.get("read"):
        return "after-read"
    if not wait.get("job"):
        return "submitted-unrecorded" if jobs else "checkpointed-unsubmitted"
    if h.item_count(run_id, wf.BATCH_MAP_STEP):
        return "mid-read"
    return "job-ended" if jobs and jobs[-1]["status"] in JOB_ENDED else "job-running"


def _batch_trigger(h: Harness, t: Trial, phase: str) -> bool:
    """Waits until the run is where `phase` kills it; False if it ended (or never got there)."""
    run = t.run_id
    ended = lambda: h.status(run) in TERMINAL  # noqa: E731
    if phase.startswith("submit@"):
        needles = ('"event":"StepStarted"', f'"step_id":"{wf.BATCH_MAP_STEP}"') if phase == "submit@start" \
            else ('"message":"batch job submitted"',)
        return h.wait_log(run, needles, t.log_offset, 30, stop=ended)
    if phase == "parked":
        parked = wait_until(lambda: (lambda s: s if s in ("AWAITING_INPUT", *TERMINAL) else None)(h.status(run)),
                            t.bound_s, poll=0.05)
        if parked != "AWAITING_INPUT":
            return False
        return bool(wait_until(lambda: h.process_of(run) or ("ended" if ended() else None), t.bound_s, poll=0.01)) \
            and h.process_of(run) is not None
    # reading: once the job ended, the runner that reads it checkpoints its first answer
    if not wait_until(lambda: any(j["status"] in JOB_ENDED for j in h.batch_jobs_of(run)) or ended(), t.bound_s,
                      poll=0.2):
        return False
    return bool(wait_until(lambda: h.item_count(run, wf.BATCH_MAP_STEP) > 0 or ended(), t.bound_s, poll=0.02)) \
        and not ended()


def drive_batch_kills(h: Harness, t: Trial, windows: list, log) -> None:
    """Kills the run's runner at each phase of its plan (a parked kill that finds the poll
    over is tried again at the next poll, three times at most); records each kill's window."""
    for phase, delay in t.plan:
        kill = None
        for _ in range(3 if phase == "parked" else 1):
            if not _batch_trigger(h, t, phase):
                t.missed.append(f"{phase}: the run ended (or moved on) first")
                return
            time.sleep(delay)
            k = h.kill_run(t.run_id, phase, find_s=0.2)
            if k is not None:
                t.kills.append(k)
                if k.hit:
                    kill = k
                    break
        if kill is None:
            t.missed.append(f"{phase}: no runner process had the run when the kill came")
            continue
        window = batch_window(h, t.run_id)
        windows.append((phase, window))
        nxt = h.next_event_after(t.run_id, kill.at, timeout=PER_CRASH_S + 30)
        if nxt is None:
            log(f"chaos[batch]: run {t.run_id}: no event within {PER_CRASH_S + 30:.0f}s of the kill at {phase}")
            return
        kill.recovery_s = ts(nxt["at"]) - kill.at
        log(f"chaos[batch]: {t.label} run {t.run_id}: killed pid {kill.pid} at {phase} ({window}); "
            f"next event {nxt['type']} after {kill.recovery_s:.1f}s")


def check_batch_run(h: Harness, v: Verdict, res: ScenarioResult) -> None:
    """The batch scenario's own invariants for one run (beyond evaluate's): one job, whose
    events name it throughout; exact spend at the batch and on-demand prices; nothing
    counted as reserved and lost but online calls a kill caught in flight."""
    t, bc = v.trial, v.batch
    run = t.run_id
    jobs = h.batch_jobs_of(run)
    if len(jobs) != 1:
        res.violate(run, f"{len(jobs)} batch jobs for the run: "
                         f"{[(j['jobArn'].rsplit('/', 1)[-1], j['clientRequestToken'], j['status']) for j in jobs]}")
    ids = {j["jobArn"].rsplit("/", 1)[-1] for j in jobs}
    if bc and not bc.jobs <= ids:
        res.violate(run, f"records answered by jobs {sorted(bc.jobs - ids)} not submitted for the run")
    told = [e["data"] for e in v.events if e["type"] == "BATCH_JOB"]
    arns = {d.get("job") for d in told if d.get("job")}
    if len(arns) != 1 or not {a.rsplit("/", 1)[-1] for a in arns} <= ids:
        res.violate(run, f"BATCH_JOB events name jobs {sorted(arns)}; the run's jobs are {sorted(ids)}")
    last = told[-1] if told else {}
    if v.status == "COMPLETED" and (last.get("status") not in JOB_ENDED or last.get("answered") is None):
        res.violate(run, f"completed, but its last BATCH_JOB is {last or None}")
    totals = h.run_view(run).get("totals") or {}
    if bc and v.charged_pico != bc.expected_pico:
        res.violate(run, f"charged {v.charged_pico} pico-USD; its {bc.batch_answered} batch records at the batch "
                         f"price and its online calls at the on-demand price come to {bc.expected_pico} "
                         f"(the provider was paid {bc.paid_pico})")
    calls = calls_of(h.calls(t.tag), t.tag, t.latency_s)
    lost, allowed = lost_calls(totals), online_in_flight_at_kills(calls, t.kills)
    if lost > allowed:
        res.violate(run, f"totals count {lost} calls reserved and lost ({totals.get('reserved_lost')}); kills caught "
                         f"{allowed} online calls in flight")


def scenario_batch(h: Harness, rng: random.Random, runs: int, log, *, phases: tuple[str, ...] = BATCH_PHASES,
                   max_kills: int = 2, latency_ms: int = 300, name: str = "batch") -> ScenarioResult:
    """Runs of the batch workflow (a 100-120-item map run as one batch job, then an llm
    step reading its answers), in waves of BATCH_WAVE, each runner SIGKILLed once or twice
    at seeded moments of the job (batch_plan). Every run must complete with one job, each
    item paid once, and exactly the batch price of its records plus the on-demand price
    of its online calls charged (check_batch_run)."""
    res = ScenarioResult(name)
    t0 = time.monotonic()
    before = h.set_batch_timing(BATCH_TIMING)
    all_trials: list[Trial] = []
    windows: dict[str, list] = {}
    try:
        for start in range(0, runs, BATCH_WAVE):
            trials: list[Trial] = []
            wave = range(start, min(runs, start + BATCH_WAVE))
            # Each run's driver starts as soon as its run does: a submission is over in a
            # few hundred milliseconds.
            with ThreadPoolExecutor(len(wave)) as pool:
                driving = []
                for i in wave:
                    tag = wf.new_tag()
                    items = rng.randint(*BATCH_ITEMS)
                    definition, input_ = wf.batch_workflow(tag, items)
                    h.add_rules([wf.rule(tag, latency_ms)])
                    plan = batch_plan(rng, i, phases, max_kills)
                    t = _start(h, name, f"{name}#{i}", definition, input_, tag, wf.batch_keys(items),
                               latency_ms / 1000, 45.0 + PER_CRASH_S * len(plan), plan=plan,
                               batch_steps=frozenset({wf.BATCH_MAP_STEP}), log_offset=h.log_offset())
                    trials.append(t)
                    windows[t.run_id] = []
                    log(f"chaos[{name}]: {t.label} run {t.run_id} ({items} items): kills at {[p for p, _ in plan]}")
                    driving.append(pool.submit(drive_batch_kills, h, t, windows[t.run_id], log))
                for f in driving:
                    f.result()
            h.wait_terminal([t.run_id for t in trials], max(t.bound_s for t in trials) + 30)
            all_trials += trials
    finally:
        h.set_batch_timing(before)
    verdicts = _finish(h, all_trials, res, log)
    for v in verdicts:
        check_batch_run(h, v, res)
    landed = Counter(w for ws in windows.values() for _, w in ws)
    kills = [k for t in all_trials for k in t.kills]
    res.info.update(kills=sum(k.hit for k in kills), kills_missed=sum(len(t.missed) for t in all_trials),
                    windows="/".join(f"{w}:{landed[w]}" for w in BATCH_WINDOWS if landed[w]),
                    jobs=sum(len(h.batch_jobs_of(t.run_id)) for t in all_trials),
                    batch_records=sum(v.batch.batch_answered for v in verdicts if v.batch),
                    online_items=sum(v.batch.online_answered for v in verdicts if v.batch),
                    reserved_lost_calls=sum(lost_calls(h.run_view(t.run_id).get("totals") or {}) for t in all_trials),
                    median_recovery_s=f"{_median(res.recoveries):.1f}")
    return _with_missed_kills(res, all_trials, t0)


RUNNERS = {"kill": scenario_kill, "duplicates": scenario_duplicates, "storm": scenario_storm,
           "dynamodb": scenario_dynamodb, "lost": scenario_lost, "steer": scenario_steer, "review": scenario_review,
           "chain": scenario_chain, "batch": scenario_batch}
