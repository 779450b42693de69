"""The chaos suite's checks on made-up runs (no stack): what each count counts."""

from __future__ import annotations

import random

import pytest

from .checks import (CHECKPOINT_GRACE_S, Call, Kill, calls_of, check_batch_calls, check_calls, check_events, checkpoint_times, key_of,
                     lost_calls, online_in_flight_at_kills, overrun, reserved_lost_pico, review_ends, spend_problem, ts,
                     usd_to_pico)
from .scenarios import (BATCH_PHASES, PHASES, REVIEW_MODES, REVIEW_PAD, REVIEW_RAISED_USD, REVIEW_TIGHT_USD, SAFE_PHASES, ScenarioResult, batch_plan, kill_plan, review_mode, summary_line,
                        triggered)
from .suite import short_plan
from .workflows import (BATCH_PRICE_IN_PICO, BATCH_PRICE_OUT_PICO, PRICE_IN_PICO, PRICE_OUT_PICO, REVIEW_STEP,
                        batch_keys, batch_paid_pico, batch_workflow, chain_workflow, fan_keys, fan_workflow, marker, review_keys, review_workflow,
                        paid_pico, worst_case_pico)

T0 = 1_800_000_000.0


def ev(seq, kind, step=None, attempt=None, at=None, **data):
    e = {"seq": seq, "type": kind, "at": at or f"2027-01-15T08:00:{seq:02d}.000000000Z", "data": data}
    if step:
        e["step_id"] = step
    if attempt is not None:
        e["attempt"] = attempt
    return e


def clean_log():
    return [ev(1, "RUN_STARTED"), ev(2, "STEP_STARTED", "a", 1), ev(3, "STEP_RETRYING", "a", 2, item=None),
            ev(4, "STEP_COMPLETED", "a", 2), ev(5, "RUN_COMPLETED")]


def test_rfc3339_times_keep_nanoseconds_and_zones():
    assert ts("2027-01-15T08:00:00.123456789Z") == pytest.approx(ts("2027-01-15T08:00:00Z") + 0.123456789)
    assert ts("2027-01-15T09:00:00.5+01:00") == pytest.approx(ts("2027-01-15T08:00:00.5Z"))


def test_a_clean_event_log_counts_nothing():
    out = check_events(clean_log(), "COMPLETED")
    assert out.duplicated == 0, out.problems


def test_a_seq_gap_a_second_settling_event_and_events_after_the_end_are_counted():
    log = clean_log()
    log[2]["seq"] = 7
    assert check_events(log, "COMPLETED").duplicated == 1
    log = clean_log()[:4] + [ev(5, "STEP_COMPLETED", "a", 2), ev(6, "RUN_COMPLETED"), ev(7, "RUN_FAILED")]
    out = check_events(log, "COMPLETED")
    assert out.duplicated == 3, out.problems  # a second STEP_COMPLETED, RUN_FAILED after the end, status


def test_a_step_restarted_by_a_resumed_runner_is_no_duplicate_but_one_restarted_without_a_resume_is():
    resumed = [ev(1, "RUN_STARTED"), ev(2, "STEP_STARTED", "a", 1),
               ev(3, "RUN_RESUMED", cause="sweep", takeover={"from": "x"}), ev(4, "STEP_STARTED", "a", 1),
               ev(5, "STEP_COMPLETED", "a", 1), ev(6, "RUN_COMPLETED")]
    out = check_events(resumed, "COMPLETED")
    assert out.duplicated == 0 and len(out.takeovers) == 1
    again = [e for e in resumed if e["type"] != "RUN_RESUMED"]
    for i, e in enumerate(again, start=1):
        e["seq"] = i
    assert check_events(again, "COMPLETED").duplicated == 1


def test_a_status_the_last_event_does_not_say_is_counted():
    assert check_events(clean_log(), "FAILED").duplicated == 1
    assert check_events(clean_log()[:-1], "RUNNING").duplicated == 0
    assert check_events(clean_log()[:-1], "COMPLETED").duplicated == 1


def call(key, at, status=200, latency=0.3):
    return Call(key, T0 + at, status, None, {"inputTokens": 10, "outputTokens": 5}, latency)


def kill(at, hit=True):
    return Kill("R", T0 + at, "test", 1, "req", hit=hit)


def test_each_call_once_is_clean():
    out = check_calls([call(("a", None), 0), call(("fan", 0), 1), call(("fan", 1), 1)],
                      {("a", None): T0 + 0.5, ("fan", None): T0 + 2}, [], [])
    assert (out.double_paid, out.repeated, out.paid_calls) == (0, 0, 3)


def test_a_call_after_its_checkpoint_is_double_paid():
    out = check_calls([call(("a", None), 0), call(("a", None), 5)], {("a", None): T0 + 0.5}, [kill(4)], [])
    assert out.double_paid == 1


def test_a_call_in_flight_when_the_runner_died_may_be_repeated_once():
    out = check_calls([call(("a", None), 0), call(("a", None), 10)], {("a", None): T0 + 10.5}, [kill(0.1)], [T0 + 9])
    assert (out.double_paid, out.repeated) == (0, 1)
    # answered just before the kill, not yet checkpointed: allowed too
    out = check_calls([call(("a", None), 0), call(("a", None), 10)], {("a", None): T0 + 10.5},
                      [kill(0.3 + CHECKPOINT_GRACE_S / 2)], [])
    assert (out.double_paid, out.repeated) == (0, 1)


def test_a_map_item_answered_long_before_the_kill_and_paid_again_is_double_paid():
    calls = [call(("fan", 0), 0), call(("fan", 1), 2), call(("fan", 0), 10), call(("fan", 1), 10)]
    out = check_calls(calls, {("fan", None): T0 + 11}, [kill(2.1)], [T0 + 9], map_steps={"fan"})
    assert (out.double_paid, out.repeated) == (1, 1)
    assert "not checkpointed" in out.problems[0]


def test_a_repeat_without_any_crash_or_takeover_is_double_paid_and_one_after_a_takeover_is_not():
    calls = [call(("a", None), 0), call(("a", None), 3)]
    assert check_calls(calls, {}, [], []).double_paid == 1
    out = check_calls(calls, {}, [], [T0 + 2])
    assert (out.double_paid, out.repeated) == (0, 1)


def test_failed_calls_are_not_paid_and_a_kill_that_missed_justifies_nothing():
    calls = [call(("a", None), 0, status=429), call(("a", None), 0.5), call(("a", None), 3)]
    out = check_calls(calls, {}, [kill(0.6, hit=False)], [])
    assert (out.failed_calls, out.paid_calls, out.double_paid) == (1, 2, 1)


def test_item_checkpoints_take_over_from_the_maps_once_they_exist():
    items = [{"sk": "STEP#fan", "status": "COMPLETED", "finished_at": "2027-01-15T08:00:10Z"},
             {"sk": "ITEM#fan#3", "status": "COMPLETED", "finished_at": "2027-01-15T08:00:02Z"},
             {"sk": "STEP#b", "status": "RUNNING", "finished_at": None}, {"sk": "META", "status": "RUNNING"}]
    cps = checkpoint_times(items)
    assert set(cps) == {("fan", None), ("fan", 3)}
    t3 = cps[("fan", 3)]
    calls = [Call(("fan", 3), t3 - 1, 200, None, None, 0.3), Call(("fan", 3), t3 + 1, 200, None, None, 0.3)]
    assert check_calls(calls, cps, [], []).double_paid == 1


def test_charges_over_the_budget_count_reserved_lost_included():
    budget = {"max_cost_usd": "0.00001", "max_total_tokens": 1000}
    assert overrun({"cost_pico_usd": 10_000_000, "total_tokens": 1000}, budget) is None
    assert overrun({"cost_pico_usd": 10_000_001, "total_tokens": 10}, budget)
    assert overrun({"cost_pico_usd": 1, "total_tokens": 1001}, budget)
    lost = {"cost_pico_usd": 9_000_000, "total_tokens": 10, "reserved_lost_cost_pico_usd": 2_000_000}
    assert reserved_lost_pico(lost) == 2_000_000 and overrun(lost, budget)
    assert reserved_lost_pico({"reserved_lost": {"cost_pico_usd": 5, "cost_usd": "0.000000000005"}}) == 5


def test_every_prompt_names_its_run_step_and_item():
    definition, input_ = fan_workflow("tabc", 3)
    prompts = [s.get("prompt") or s.get("step", {}).get("prompt") for s in definition["steps"]]
    assert key_of(prompts[0], "tabc") == ("a", None)
    assert key_of(prompts[2].replace("{{ index }}", "2"), "tabc") == ("fan", 2)
    assert key_of(marker("tother", "a"), "tabc") is None
    assert fan_keys(3) == {("a", None), ("b", None), ("join", None), ("fan", 0), ("fan", 1), ("fan", 2)}
    assert len(input_["items"]) == 3
    chain, _, keys = chain_workflow("tabc", 100)
    assert len(chain["steps"]) == 100 and len(keys) == 90
    assert all(s.get("depends_on") == [chain["steps"][i - 1]["id"]] for i, s in enumerate(chain["steps"]) if i)


def test_kill_plans_are_seeded_and_a_second_kill_comes_later():
    a = [kill_plan(random.Random(5), PHASES) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    for seed in range(200):
        plan = kill_plan(random.Random(seed), SAFE_PHASES)
        assert 1 <= len(plan) <= 2 and all(p in SAFE_PHASES for p, _ in plan)
        if len(plan) == 2:
            assert PHASES.index(plan[1][0]) > PHASES.index(plan[0][0])


def test_phases_are_recognised_from_the_call_log():
    tag = "tabc"

    def c(step, status, at=T0, item=None):
        return {"prompt": marker(tag, step, item) + " x", "status": status,
                "at": _iso(at)}

    assert triggered("parallel", [c("a", None), c("b", 200)], tag, 4, 0.3, T0)
    assert not triggered("parallel", [c("a", 200), c("b", 200)], tag, 4, 0.3, T0)
    assert triggered("map-first-wave", [c("fan", None, item="0")], tag, 4, 0.3, T0)
    fan = [c("fan", 200, T0, "0"), c("fan", None, T0 + 0.4, "1")]
    assert not triggered("mid-map", fan, tag, 4, 0.3, T0 + 0.5)
    assert triggered("mid-map", fan, tag, 4, 0.3, T0 + 0.3 + CHECKPOINT_GRACE_S + 0.3)


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def test_the_summary_line_adds_up_the_scenarios():
    a = ScenarioResult("kill", trials=2, completed=2, recoveries=[3.25, 9.5])
    b = ScenarioResult("storm", trials=3, completed=2, double_paid_calls=1)
    assert summary_line([a, b]) == ("chaos: trials=5 completed=4 stuck=0 duplicated_events=0 double_paid_calls=1 "
                                    "overruns=0 max_recovery_s=9.5")
    assert a.ok and not b.ok


def test_a_decision_accepted_decides_the_end_and_a_refused_one_decides_nothing():
    assert review_ends([("approve", 202)]) == ({"COMPLETED"}, [])
    assert review_ends([("edit", 202)]) == ({"COMPLETED"}, [])
    assert review_ends([("reject", 202)]) == ({"FAILED"}, [])
    # Two at once: the one accepted wins, the other is told it was decided already.
    assert review_ends([("approve", 409), ("reject", 202)]) == ({"FAILED"}, [])
    # The same decision twice (a double click) is answered as the first, both 202.
    assert review_ends([("approve", 202), ("approve", 202)]) == ({"COMPLETED"}, [])


def test_two_different_decisions_both_accepted_or_none_at_all_is_a_problem():
    _, problems = review_ends([("approve", 202), ("reject", 202)])
    assert problems == ["different decisions all accepted: ['approve', 'reject']"]
    ends, problems = review_ends([("approve", 409)])
    assert ends == set() and "nothing could end the run" in problems[0]
    _, problems = review_ends([("approve", 500)])
    assert "approve answered 500" in problems


def test_a_cancel_racing_a_decision_allows_either_end_only_if_both_were_accepted():
    assert review_ends([("approve", 202)], cancel=202) == ({"COMPLETED", "CANCELLED"}, [])
    assert review_ends([("approve", 409)], cancel=202) == ({"CANCELLED"}, [])
    assert review_ends([("reject", 202)], cancel=409) == ({"FAILED"}, [])
    assert review_ends([("approve", 409)], cancel=409)[0] == set()


def test_a_deadline_decides_only_when_nobody_did():
    assert review_ends([], on_timeout="approve") == ({"COMPLETED"}, [])
    assert review_ends([], on_timeout="reject") == ({"FAILED"}, [])
    assert review_ends([("reject", 202)], on_timeout="approve") == ({"FAILED"}, [])
    assert review_ends([], cancel=202, on_timeout="approve") == ({"CANCELLED"}, [])


def test_spend_is_exact_without_crashes_and_otherwise_accounted_for_by_what_was_lost():
    assert spend_problem(1_000, {"cost_pico_usd": 1_000}, exact=True) is None
    assert spend_problem(1_001, {"cost_pico_usd": 1_000}, exact=True) == \
        "charged 1000 pico-USD, the model server was paid 1001"
    assert spend_problem(1_001, {"cost_pico_usd": 1_000}, exact=False).endswith("1 unaccounted")
    assert "more than" in spend_problem(999, {"cost_pico_usd": 1_000}, exact=False)
    lost = {"cost_pico_usd": 1_000, "reserved_lost": {"calls": 1, "tokens": 9, "cost_pico_usd": 500}}
    assert spend_problem(1_400, lost, exact=False) is None
    assert "100 unaccounted" in spend_problem(1_600, lost, exact=False)
    assert spend_problem(1_400, lost, exact=True) is not None


def test_the_review_workflow_marks_every_call_and_waits_for_one_review():
    definition, input_ = review_workflow("tabc", timeout="1m", on_timeout="approve")
    steps = {s["id"]: s for s in definition["steps"]}
    assert steps[REVIEW_STEP]["type"] == "review" and steps[REVIEW_STEP]["timeout"] == "1m"
    assert steps[REVIEW_STEP]["on_timeout"] == "approve"
    assert {key_of(s["prompt"], "tabc") for s in steps.values() if s["type"] == "llm"} == review_keys()
    assert set(steps["send"]["depends_on"]) == {REVIEW_STEP, "side"} and input_["pad"] == ""
    assert "on_exceeded" not in definition["budget"]
    paused, input_ = review_workflow("tabc", budget_usd="0.00004", pause_on_budget=True, send_pad=1000)
    assert paused["budget"] == {"max_cost_usd": "0.00004", "on_exceeded": "pause"} and len(input_["pad"]) == 1000


def test_every_review_mode_but_the_deadline_is_in_the_short_suite_and_the_full_one_has_all():
    short = {review_mode(i) for i in range(short_plan().runs["review"])}
    assert short == set(REVIEW_MODES) - {"deadline"}
    assert {review_mode(i) for i in range(len(REVIEW_MODES))} == set(REVIEW_MODES)


def test_the_budget_modes_send_does_not_fit_after_draft_and_side_and_fits_the_raise():
    tag = "t0123456789"
    definition, input_ = review_workflow(tag, budget_usd=REVIEW_TIGHT_USD, pause_on_budget=True, send_pad=REVIEW_PAD)
    prompts = {s["id"]: s["prompt"] for s in definition["steps"] if s["type"] == "llm"}
    reply = f"ok {tag}"  # wf.rule's text; side's own rule answers "side TAG"
    draft = prompts["draft"].replace("{{ input.topic }}", input_["topic"])
    side = prompts["side"].replace("{{ steps.draft.text }}", reply)
    send = (prompts["send"].replace("{{ steps.check.text }}", reply).replace("{{ steps.side.text }}", f"side {tag}")
            .replace("{{ input.pad }}", input_["pad"]))
    tight, raised = usd_to_pico(REVIEW_TIGHT_USD), usd_to_pico(REVIEW_RAISED_USD)
    # draft, then side (after draft's charge, at most its worst case) fit; send never does.
    assert worst_case_pico(draft) + worst_case_pico(side) <= tight < worst_case_pico(send)
    assert worst_case_pico(draft) + worst_case_pico(side) + worst_case_pico(send) <= raised
    # Validation refuses a step whose empty prompt alone is over the budget: send's is not.
    assert worst_case_pico("") < tight


def test_a_slow_steps_call_still_in_flight_at_a_kill_may_be_repeated_by_its_own_latency():
    tag = "tabc"
    log = [{"prompt": marker(tag, "side") + " x", "at": _iso(T0), "status": 200, "usage": None},
           {"prompt": marker(tag, "side") + " x", "at": _iso(T0 + 9), "status": 200, "usage": None},
           {"prompt": marker("tother", "side"), "at": _iso(T0), "status": 200, "usage": None}]
    # Killed 1 s into a call scripted to take 1.5 s: in flight, so its repeat is allowed...
    slow = calls_of(log, tag, 0.3, {"side": 1.5})
    assert [c.latency_s for c in slow] == [1.5, 1.5]
    assert (check_calls(slow, {}, [kill(1.0)], []).double_paid, check_calls(slow, {}, [kill(1.0)], []).repeated) == (0, 1)
    # ...which the run's default latency would call an answer lost 0.7 s after it arrived.
    assert check_calls(calls_of(log, tag, 0.3), {}, [kill(1.0)], []).double_paid == 1


# -- batch maps -------------------------------------------------------------------------


def rec(item, at, job="job1", usage=None, status=200):
    """A batch record's answer (the dev model server's call for it)."""
    return Call(("labels", item), T0 + at, status, None, usage or {"inputTokens": 10, "outputTokens": 2}, 0.3, job)


def online_call(key, at, usage=None, status=200):
    return Call(key, T0 + at, status, None, usage or {"inputTokens": 10, "outputTokens": 2}, 0.3)


def test_each_record_answered_once_in_one_job_is_charged_the_batch_price_plus_the_online_steps():
    calls = [rec(0, 1), rec(1, 1), online_call(("sum_up", None), 5)]
    out = check_batch_calls(calls, {"labels"}, batch_paid_pico, paid_pico)
    assert out.double_paid == 0 and out.problems == []
    assert out.jobs == {"job1"} and out.batch_answered == 2 and out.online_answered == 0
    assert BATCH_PRICE_IN_PICO * 2 == PRICE_IN_PICO and BATCH_PRICE_OUT_PICO * 2 == PRICE_OUT_PICO
    assert out.expected_pico == 2 * (10 * 17_500 + 2 * 70_000) + (10 * 35_000 + 2 * 140_000) == out.paid_pico


def test_a_record_answered_by_two_jobs_or_also_online_is_double_paid():
    twice = check_batch_calls([rec(0, 1), rec(0, 9, job="job2"), rec(1, 1)], {"labels"}, batch_paid_pico, paid_pico)
    assert twice.double_paid == 1 and twice.jobs == {"job1", "job2"}, twice.problems
    both = check_batch_calls([rec(0, 1), online_call(("labels", 0), 4), online_call(("labels", 1), 4)], {"labels"},
                             batch_paid_pico, paid_pico)
    assert both.double_paid == 1 and both.online_answered == 2, both.problems  # item 1 had no record: fine


def test_an_online_call_repeated_after_a_kill_is_paid_but_only_its_last_answer_charged():
    calls = [rec(0, 1), online_call(("sum_up", None), 5, {"inputTokens": 100, "outputTokens": 1}),
             online_call(("sum_up", None), 20), online_call(("sum_up", None), 21, status=None)]
    out = check_batch_calls(calls, {"labels"}, batch_paid_pico, paid_pico)
    assert out.double_paid == 0
    assert out.expected_pico == (10 * 17_500 + 2 * 70_000) + (10 * 35_000 + 2 * 140_000)
    assert out.paid_pico == out.expected_pico + 100 * 35_000 + 140_000


def test_only_kills_that_caught_an_online_call_in_flight_may_leave_calls_reserved_and_lost():
    calls = [rec(0, 1), online_call(("sum_up", None), 5)]
    during = Kill("r", T0 + 5.1, "reading", 1, "q", hit=True)
    at_read = Kill("r", T0 + 2.0, "reading", 1, "q", hit=True)
    missed = Kill("r", T0 + 5.1, "reading", 1, "q", hit=False)
    assert online_in_flight_at_kills(calls, [during, at_read, missed]) == 1
    assert lost_calls({"cost_pico_usd": 5}) == 0
    assert lost_calls({"reserved_lost": {"calls": 2, "tokens": 9, "cost_pico_usd": 7}}) == 2


def test_batch_plans_cover_every_phase_and_submit_trigger_in_turn_and_a_second_kill_comes_later():
    rng = random.Random(3)
    plans = [batch_plan(rng, i) for i in range(12)]
    assert [p[0][0].split("@")[0] for p in plans[:3]] == list(BATCH_PHASES)
    assert plans[0][0][0] == "submit@start" and plans[3][0][0] == "submit@job", "both submit triggers in turn"
    for p in plans:
        assert len(p) <= 2 and all(0 <= d <= 0.4 for _, d in p)
        if len(p) == 2:
            assert BATCH_PHASES.index(p[1][0]) > BATCH_PHASES.index(p[0][0].split("@")[0])
    assert all(len(batch_plan(rng, i, max_kills=1)) == 1 for i in range(6))


def test_the_batch_workflow_marks_each_item_and_fits_the_batch_minimum():
    definition, input_ = batch_workflow("tabc", 100)
    labels, after = definition["steps"]
    assert labels["mode"] == "batch" and labels["step"]["prompt"].startswith("[cr:tabc:labels:{{ index }}]")
    assert after["depends_on"] == ["labels"] and "steps.labels.output" in after["prompt"]
    assert len(input_["items"]) == 100 and len(batch_keys(100)) == 101
    assert "batch" in short_plan().runs and short_plan().options["batch"]["max_kills"] == 1
