"""End-to-end: a map of 10,000 items whose results are far larger than one DynamoDB item.

The results go to S3 (moto) and are referenced from the checkpoint; a downstream model
step reads them through its template, the API links to them and serves them whole.
"""

from __future__ import annotations

from test_runs import add_rules, calls_with, follow, marker, start, workflow

ITEMS = 10_000
PAD = "p" * 60


def test_a_ten_thousand_item_map_keeps_its_megabyte_of_results_whole_in_s3(api, stack, devmodel):
    m = marker("large")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "counted"}})
    token = stack.token("alice")
    wf = workflow("e2e-large", [
        {"id": "each", "type": "map", "over": "input.items", "max_concurrency": 64,
         "step": {"type": "transform", "template": "{{ item }}:{{ input.pad }}"}},
        {"id": "count", "type": "llm", "prompt": m + " {{ steps.each.output | length }} {{ steps.each.output | last }}"},
    ], output="{{ steps.each.output | join(',') }}")
    run_id = start(api, token, wf, {"items": list(range(ITEMS)), "pad": PAD})["run_id"]
    events = follow(api, token, run_id, timeout=240, limit=100)
    assert events[-1]["type"] == "RUN_COMPLETED", events[-1]

    expected = [f"{i}:{PAD}" for i in range(ITEMS)]
    # The downstream step's template read every item.
    (call,) = calls_with(devmodel, m)
    assert f"{m} {ITEMS} {ITEMS - 1}:{PAD}" in call["prompt"]

    # Linked, not inlined: the run's output and the map's output are each over 600 KB.
    end = events[-1]["data"]
    assert end["output"] is None and end["output_ref"]["href"] == f"/runs/{run_id}/output"
    status, _, run = api("GET", f"/runs/{run_id}", token=token)
    assert status == 200, run
    each = next(s for s in run["steps"] if s["id"] == "each")
    assert each["output"] is None and each["output_ref"]["href"] == f"/runs/{run_id}/steps/each/output"
    assert each["output_ref"]["bytes"] > 600_000
    assert run["output"] is None and run["output_ref"]["bytes"] > 600_000

    status, _, output = api("GET", each["output_ref"]["href"], token=token)
    assert status == 200 and output == expected
    status, _, whole = api("GET", run["output_ref"]["href"], token=token)
    assert status == 200, whole if isinstance(whole, dict) else str(whole)[:500]
    assert whole == ",".join(expected)

    # In S3, under the run, content-addressed — and nowhere whole in the runs table.
    objects = stack.s3().list_objects_v2(Bucket=stack.env["CHAINRUN_OUTPUTS_BUCKET"], Prefix=f"runs/{run_id}/")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    assert len(keys) >= 2 and all(len(k.rsplit("/", 1)[1]) == 64 for k in keys), keys
