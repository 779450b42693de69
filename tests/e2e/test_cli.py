"""End-to-end: the `chainrun` CLI (cli/) against the local stack.

Each test runs the real binary as a user would, its output piped (not a terminal, so
plain lines), and checks the lines it prints, its exit status (0 completed, 1 failed, 2
usage or access, 3 waiting for input) and, with --json, the document it prints. Model
replies are scripted with rules keyed on a marker unique to the test.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from cli_binary import ANSI, Cli, build
from test_runs import MODEL, add_rules, marker, workflow


@pytest.fixture(scope="session")
def cli(stack):
    with tempfile.TemporaryDirectory(prefix="chainrun-cli-") as cwd:
        yield Cli(build(), stack.api_url, Path(cwd))


@pytest.fixture
def write(tmp_path):
    def write(name: str, document) -> str:
        path = tmp_path / name
        path.write_text(json.dumps(document))
        return str(path)

    return write


def plain(result) -> str:
    """The output, asserted free of escape codes: piped output is plain."""
    assert not ANSI.search(result.out + result.err), f"escape codes in piped output:\n{result!r}"
    return result.out


def run_id_in(text: str) -> str:
    found = re.search(r"^run (\w{26})", text, re.M)
    assert found, text
    return found.group(1)


def test_run_follows_a_run_live_line_by_line_and_ends_with_its_table_and_output(cli, stack, devmodel, write):
    m = marker("cli-live")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "alpha"},
               "usage": {"input_tokens": 30, "output_tokens": 5}, "latency_ms": 300},
              {"name": m + "-s", "match": {"prompt_contains": m + " S"}, "reply": {"text": "Dear reader,\nthe first line.\nThe last"},
               "stream_chunk_chars": 6, "latency_ms": 1200})
    wf = workflow("cli-live", [
        {"id": "a", "type": "llm", "prompt": m + " A {{ input.x }}"},
        {"id": "letter", "type": "llm", "stream": True, "prompt": m + " S {{ steps.a.text }}"},
    ], output="{{ steps.letter.text }}")
    result = cli("run", write("wf.json", {"workflow": wf, "input": {"x": 1}}), token=stack.token("cli-alice"))
    out = plain(result)
    assert result.code == 0, result
    lines = out.splitlines()
    assert lines[0].startswith("run ") and "cli-live" in lines[0]
    assert "▶ run started: cli-live (2 steps)" in lines
    assert re.search(r"^· a\s+RUNNING\s+amazon\.nova-micro-v1:0$", out, re.M), out
    assert re.search(r"^✓ a\s+COMPLETED\s+1 attempt\s+30→5 tokens\s+\$0\.0000\d+\s+\d+ ms$", out, re.M), out
    # The streamed reply arrives line by line, before its step's line.
    streamed = [line for line in lines if line.startswith("  letter │ ")]
    assert streamed == ["  letter │ Dear reader,", "  letter │ the first line.", "  letter │ The last"], out
    assert lines.index(streamed[-1]) < next(i for i, line in enumerate(lines) if line.startswith("✓ letter"))
    assert re.search(r"^■ run COMPLETED\s+\d+ tokens\s+\$0\.\d+$", out, re.M), out
    # The table: a row per step and the totals, then the output.
    assert re.search(r"│ a\s+┆ COMPLETED ┆\s+1 ┆\s+30 ┆\s+5 ┆", out), out
    assert re.search(r"│ total\s+┆ COMPLETED ┆\s+2 calls ┆", out), out
    assert out.rstrip().endswith("output:\nDear reader,\nthe first line.\nThe last"), out


def test_a_maps_items_are_counted_as_they_settle(cli, stack, devmodel, write):
    m = marker("cli-map")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "fixed"}, "latency_ms": 500})
    wf = workflow("cli-map", [{"id": "fixes", "type": "map", "over": "input.issues", "max_concurrency": 1,
                               "step": {"type": "llm", "prompt": m + " {{ item }}"}}])
    result = cli("run", write("wf.json", {"workflow": wf, "input": {"issues": ["a", "b", "c"]}}), token=stack.token("cli-alice"))
    out = plain(result)
    assert result.code == 0, result
    counts = re.findall(r"^  fixes │ items (\d)/3$", out, re.M)
    assert counts[:2] == ["0", "1"] and counts == sorted(counts), out
    assert re.search(r"^✓ fixes\s+COMPLETED\s+1 attempt .* items 3/3$", out, re.M), out


def test_a_failed_run_exits_1_with_the_failure_on_its_step_and_the_run(cli, stack, devmodel, write):
    m = marker("cli-fail")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "error": {"type": "ValidationException", "message": "model says no"}})
    wf = workflow("cli-fail", [
        {"id": "a", "type": "llm", "prompt": m},
        {"id": "b", "type": "llm", "prompt": "after {{ steps.a.text }}"},
    ])
    result = cli("run", write("wf.json", wf), token=stack.token("cli-alice"))
    out = plain(result)
    assert result.code == 1, result
    assert re.search(r"^✗ a\s+FAILED\s+1 attempt\s+\$0\s+\w+: model says no$", out, re.M), out
    assert re.search(r"^- b\s+SKIPPED\s+dependency a is failed$", out, re.M), out
    assert re.search(r"^■ run FAILED", out, re.M) and re.search(r"^error: \w+: step a failed: model says no", out, re.M), out


def test_a_run_waiting_for_input_exits_3_says_what_it_asks_and_resume_follow_finishes_it(cli, stack, devmodel, write):
    m = marker("cli-input")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m + " OPEN"}, "reply": {"text": "opened"}})
    token = stack.token("cli-alice")
    wf = workflow("cli-input", [
        {"id": "account", "type": "input", "ask": "Which account should " + m + " open?",
         "fields": {"type": "object", "properties": {"account_id": {"type": "string", "pattern": "^AC-[0-9]{6}$"},
                                                     "plan": {"enum": ["free", "pro"]}},
                    "required": ["account_id", "plan"]}},
        {"id": "open", "type": "llm", "prompt": m + " OPEN {{ steps.account.output.account_id }}"},
    ], output="{{ steps.open.text }}")
    result = cli("run", write("wf.json", wf), token=token)
    out = plain(result)
    assert result.code == 3, result
    run = run_id_in(out)
    assert re.search(rf"^\? account\s+WAITING\s+input  “Which account should {m} open\?”  missing account_id, plan"
                     r"  3 answers left  from user:cli-alice$", out, re.M), out
    assert f"run {run} waits for input (input)" in out
    assert f"answer:  chainrun resume {run} --step account --values" in out

    # An invalid answer: the problem names the field; the run still waits.
    refused = cli("resume", run, "--step", "account", "--values", '{"account_id": "AC-12", "plan": "pro"}', token=token)
    assert refused.code == 2, refused
    assert "error: Invalid answer (HTTP 422, invalid-answer)" in refused.err
    assert re.search(r"^  - field account_id: .*AC-12", refused.err, re.M) and "2 answers left" in refused.err, refused

    done = cli("resume", run, "--step", "account", "--values", '{"account_id": "AC-123456"}', "--follow", token=token)
    out = plain(done)
    assert done.code == 0, done
    assert re.search(r"answer to account is complete", out), out
    assert re.search(r"^✓ open\s+COMPLETED", out, re.M) and out.rstrip().endswith("output:\nopened"), out
    assert "✓ a " not in out and "▶ run started" not in out, "only what the answer set off is shown"


def test_a_review_waits_and_a_decision_with_follow_completes_the_run(cli, stack, devmodel, write):
    m = marker("cli-review")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "Dear customer"}})
    token = stack.token("cli-alice")
    wf = workflow("cli-review", [
        {"id": "draft", "type": "llm", "prompt": m},
        {"id": "check", "type": "review", "show": "{{ steps.draft.text }}"},
    ], output="{{ steps.check.text }}")
    waiting = cli("run", write("wf.json", wf), token=token)
    out = plain(waiting)
    assert waiting.code == 3, waiting
    run = run_id_in(out)
    assert re.search(r"^\? check\s+WAITING\s+review  “Dear customer”  from user:cli-alice$", out, re.M), out
    assert f"decide:  chainrun resume {run} --step check --decision approve|reject|edit" in out
    watched = cli("watch", run, token=token)
    assert watched.code == 3 and "waits for input (review)" in watched.out, watched

    decided = cli("resume", run, "--step", "check", "--decision", "edit", "--output", '"Dear valued customer"', "--follow", token=token)
    assert decided.code == 0, decided
    assert "edit by cli-alice recorded on check" in decided.out and decided.out.rstrip().endswith("output:\nDear valued customer"), decided


def test_usage_and_access_errors_exit_2_with_the_problem_document_rendered(cli, stack, write):
    token = stack.token("cli-alice")
    wf = {"name": "cli-invalid", "defaults": {"model": MODEL},
          "steps": [{"id": "a", "type": "llm", "prompt": "x {{ steps.nope.text }}"}]}
    refused = cli("run", write("wf.json", wf), token=token)
    assert refused.code == 2, refused
    assert refused.out == ""
    assert refused.err.startswith("error: Invalid workflow (HTTP 400, bad-request)\n"), refused
    assert "\n  - step a, field prompt: references unknown step \"nope\"" in refused.err, refused
    assert "{" not in refused.err, "rendered, not dumped"
    # --json: the problem document itself, for scripts.
    as_json = cli("--json", "run", write("wf.json", wf), token=token)
    assert as_json.code == 2 and as_json.json()["problems"] == [
        {"step": "a", "field": "prompt", "message": "references unknown step \"nope\""}], as_json

    missing = cli("show", "01JZZZZZZZZZZZZZZZZZZZZZZZ", token=token)
    assert missing.code == 2 and missing.err.startswith("error: Not found (HTTP 404, not-found)"), missing
    bad_token = cli("runs", token="not-a-jwt")
    assert bad_token.code == 2 and bad_token.err.startswith("error: Unauthorized (HTTP 401"), bad_token
    no_token = cli("runs")
    assert no_token.code == 2 and "`chainrun runs` needs a token" in no_token.err, no_token
    no_api = cli("runs", env={"PATH": os.environ.get("PATH", "")})
    assert no_api.code == 2 and "no API URL" in no_api.err, no_api
    bad_flag = cli("run", "--input", "{not json", write("wf.json", wf), token=token)
    assert bad_flag.code == 2 and "not JSON" in bad_flag.err, bad_flag
    unknown = cli("frobnicate", token=token)
    assert unknown.code == 2, unknown


def test_json_is_printed_for_every_command_and_parses(cli, stack, devmodel, write):
    m = marker("cli-json")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "fine"}})
    user = "cli-json-" + m[-8:]
    token = stack.token(user)
    wf = workflow("cli-json-" + m[-8:], [{"id": "only", "type": "llm", "prompt": m + " {{ input.n }}"}])
    path = write("wf.json", wf)

    ran = cli("--json", "run", path, "--input", '{"n": 1}', token=token)
    assert ran.code == 0, ran
    run = ran.json()
    assert run["status"] == "COMPLETED" and run["steps"][0]["id"] == "only" and run["input"] == {"n": 1}
    assert cli("--json", "watch", run["run_id"], token=token).json()["run_id"] == run["run_id"]
    assert cli("--json", "show", run["run_id"], token=token).json()["totals"] == run["totals"]
    runs = cli("--json", "runs", "--workflow", wf["name"], token=token).json()
    assert [r["run_id"] for r in runs["items"]] == [run["run_id"]] and "next" in runs
    assert cli("--json", "runs", "--limit", "1", token=token).json()["items"][0]["run_id"] == run["run_id"]
    estimate = cli("--json", "estimate", path, "--input", '{"n": 2}', token=token).json()
    assert estimate["steps"][0]["step_id"] == "only" and int(estimate["total"]["max"]["cost_pico_usd"]) > 0
    costs = cli("--json", "costs", "--days", "1", token=token).json()
    assert costs["days"] == 1 and costs["scope"] == f"USER#{user}", costs
    spend = cli("--json", "spend", token=token).json()
    assert spend["owner"] == user and "charged_pico_usd" in spend and "cap_usd" in spend, spend

    pushed = cli("--json", "workflows", "push", path, token=token).json()
    assert pushed["version"] == 1 and pushed["name"] == wf["name"]
    again = cli("--json", "workflows", "push", path, "--id", pushed["id"], token=token).json()
    assert again["id"] == pushed["id"] and again["version"] == 2
    listed = cli("--json", "workflows", "list", token=token).json()
    assert pushed["id"] in [w["id"] for w in listed["items"]]
    shown = cli("--json", "workflows", "show", pushed["id"], "--version", "1", token=token).json()
    assert shown["version"] == 1 and shown["workflow"] == wf
    stored_run = cli("--json", "run", "--workflow", pushed["id"], "--input", '{"n": 3}', token=token)
    assert stored_run.code == 0 and stored_run.json()["workflow_ref"] == {"workflow_id": pushed["id"], "version": 2}, stored_run
    templates = cli("--json", "templates", token=token).json()
    assert "feedback-analysis" in [t["id"] for t in templates["items"]]
    template = cli("--json", "templates", "feedback-analysis", token=token).json()
    assert template["workflow"]["name"] and template["example_input"]
    opened = cli("--json", "show", run["run_id"], "--open", token=token).json()
    assert opened == {"run_id": run["run_id"], "url": f"{stack.api_url}/runs/{run['run_id']}/view"}


def test_human_lists_are_tables_without_escape_codes(cli, stack, devmodel, write):
    m = marker("cli-lists")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "fine"}})
    token = stack.token("cli-lists-" + m[-8:])
    path = write("wf.json", workflow("cli-lists-" + m[-8:], [{"id": "only", "type": "llm", "prompt": m}]))
    run = run_id_in(plain(cli("run", path, token=token)))
    for args, expected in [(("runs",), run), (("show", run), "│ only"), (("estimate", path), "│ total"),
                           (("costs", "--days", "1"), "costs over 1 days"), (("spend",), "charged"),
                           (("templates",), "feedback-analysis"), (("workflows", "list"), "│ id")]:
        result = cli(*args, token=token)
        assert result.code == 0 and expected in plain(result), (args, result)


def test_cancel_ends_a_running_run_and_watch_exits_1(cli, stack, devmodel, write):
    m = marker("cli-cancel")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "slow"}, "latency_ms": 20000})
    token = stack.token("cli-alice")
    started = cli("run", write("wf.json", workflow("cli-cancel", [{"id": "slow", "type": "llm", "prompt": m}])), "--detach", token=token)
    assert started.code == 0 and re.fullmatch(r"\w{26}\n", started.out), started
    run = started.out.strip()
    cancelled = cli("cancel", run, "--reason", "changed my mind", token=token)
    assert cancelled.code == 0 and f"run {run}  cancel requested by cli-alice" in plain(cancelled), cancelled
    watched = cli("watch", run, token=token)
    out = plain(watched)
    assert watched.code == 1, watched
    assert re.search(r"^✗ slow\s+CANCELLED", out, re.M) and re.search(r"^■ run CANCELLED.*by cli-alice: changed my mind$", out, re.M), out
    again = cli("cancel", run, token=token)
    assert again.code == 2 and "(HTTP 409, conflict)" in again.err, again


def test_retry_and_override_start_revisions_that_follow_and_show_tell_apart(cli, stack, devmodel, write):
    m = marker("cli-revise")
    add_rules(devmodel,
              {"name": m + "-a", "match": {"prompt_contains": m + " A"}, "reply": {"text": "first"}},
              {"name": m + "-b", "match": {"prompt_contains": m + " B"}, "reply": {"text": "second"}})
    token = stack.token("cli-alice")
    wf = workflow("cli-revise", [
        {"id": "a", "type": "llm", "prompt": m + " A"},
        {"id": "b", "type": "llm", "prompt": m + " B {{ steps.a.text }}"},
    ], output="{{ steps.a.text }}/{{ steps.b.text }}")
    run = run_id_in(cli("run", write("wf.json", wf), token=token).out)

    retried = cli("retry", run, "b", "--comment", "once more", "--follow", token=token)
    out = plain(retried)
    assert retried.code == 0, retried
    assert re.search(r"retry of b starts revision 1; runs again: b", out), out
    assert re.search(r"^▶ revision 1 started: retry of b by cli-alice; runs again: b$", out, re.M), out
    assert re.search(r"^✓ b\s+COMPLETED", out, re.M) and not re.search(r"^✓ a ", out, re.M), out

    overridden = cli("override", run, "a", "--output", '"hand-made"', "--follow", token=token)
    assert overridden.code == 0, overridden
    assert "✎ a  output set by hand by cli-alice" in overridden.out and overridden.out.rstrip().endswith("output:\nhand-made/second")

    latest = cli("--json", "show", run, token=token).json()
    assert latest["revision"] == 2 and [r["kind"] for r in latest["revisions"]] == ["retry", "override"]
    first = cli("--json", "show", run, "--revision", "0", token=token).json()
    assert first["revision"] == 0 and first["output"] == "first/second"
    shown = plain(cli("show", run, token=token))
    assert "revision 2 of 2" in shown and "override of a by cli-alice" in shown, shown


def test_a_token_is_minted_from_the_stacks_env_file_for_the_user_named(cli, stack, tmp_path):
    env_file = tmp_path / "stack.env"
    env_file.write_text(f"API_URL={stack.api_url}\nCHAINRUN_LOCAL_JWT_SECRET='{stack.secret}'\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    spend = cli("--json", "--env-file", str(env_file), "--user", "cli-minted", "spend", env=env)
    assert spend.code == 0 and spend.json()["owner"] == "cli-minted", spend
    # `infra.stack run` names its stack's file in STACK_ENV_FILE.
    named = cli("--json", "spend", env=dict(env, STACK_ENV_FILE=str(env_file), CHAINRUN_USER="cli-named"))
    assert named.json()["owner"] == "cli-named", named
    # A token command wins over the file.
    command = cli("--json", "--env-file", str(env_file), "spend",
                  env=dict(env, CHAINRUN_TOKEN_COMMAND=f"printf '%s\\n' {stack.token('cli-commanded')}"))
    assert command.json()["owner"] == "cli-commanded", command


def test_show_open_prints_the_view_url_with_the_token_only_when_asked(cli, stack):
    token = stack.token("cli-alice")
    url = f"{stack.api_url}/runs/01JZZZZZZZZZZZZZZZZZZZZZZZ/view"
    assert cli("show", "01JZZZZZZZZZZZZZZZZZZZZZZZ", "--open", token=token).out == url + "\n"
    assert cli("show", "01JZZZZZZZZZZZZZZZZZZZZZZZ", "--open", "--with-token", token=token).out == f"{url}#token={token}\n"


def test_on_a_terminal_output_is_coloured_unless_no_progress(cli, stack, devmodel, write):
    m = marker("cli-tty")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "fine"}})
    token = stack.token("cli-alice")
    run = run_id_in(cli("run", write("wf.json", workflow("cli-tty", [{"id": "only", "type": "llm", "prompt": m}])), token=token).out)

    def on_a_terminal(*args: str) -> str:
        leader, follower = pty.openpty()
        try:
            done = subprocess.run([str(cli.binary), *args], cwd=cli.cwd, env=cli.env(token, TERM="xterm"),
                                  stdout=follower, stderr=follower, timeout=60)
            os.close(follower)
            chunks = []
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal's other end is closed: all was read
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(leader)
        assert done.returncode == 0
        return b"".join(chunks).decode()

    assert ANSI.search(on_a_terminal("show", run)), "a terminal gets colours"
    assert not ANSI.search(on_a_terminal("--no-progress", "show", run)), "--no-progress stays plain"


def test_show_mermaid_draws_the_runs_graph_with_statuses_timings_and_the_route_taken(cli, stack, devmodel, write):
    m = marker("cli-mermaid")
    add_rules(devmodel,
              {"name": m + "-c", "match": {"prompt_contains": m + " CLASSIFY"}, "reply": {"json": {"label": "happy"}}, "latency_ms": 200},
              {"name": m + "-r", "match": {"prompt_contains": m + " REPLY"}, "reply": {"text": "thanks"}})
    token = stack.token("cli-alice")
    wf = workflow("cli-mermaid", [
        {"id": "classify", "type": "llm", "prompt": m + " CLASSIFY", "output": {"format": "json"}},
        {"id": "route", "type": "router", "routes": [{"when": "steps.classify.output.label == 'angry'", "to": ["escalate"]}],
         "default": ["reply"]},
        {"id": "escalate", "type": "review", "depends_on": ["route"], "show": "angry"},
        {"id": "reply", "type": "llm", "depends_on": ["route"], "prompt": m + " REPLY"},
    ])
    run = run_id_in(cli("run", write("wf.json", wf), token=token).out)
    result = cli("show", run, "--mermaid", token=token)
    chart = plain(result)
    assert result.code == 0, result
    assert chart.startswith(f'---\ntitle: "cli-mermaid · run {run} · COMPLETED"\n---\nflowchart TD\n'), chart
    assert re.search(r'^    s_classify\("<b>classify</b><br/>llm · amazon\.nova-micro-v1:0<br/>COMPLETED<br/>\d+ ms · \$0\.\d+"\)$', chart, re.M), chart
    assert re.search(r'^    s_route\{"<b>route</b><br/>router<br/>COMPLETED<br/>\d+ ms"\}$', chart, re.M), chart
    assert '    s_escalate{{"<b>escalate</b><br/>review<br/>SKIPPED"}}\n' in chart
    assert "    s_classify --> s_route\n" in chart
    assert "    s_route -.->|\"steps.classify.output.label == 'angry'\"| s_escalate\n" in chart
    assert '    s_route -->|"default"| s_reply\n' in chart
    assert "    class s_classify,s_route,s_reply completed\n" in chart and "    class s_escalate skipped\n" in chart
    as_json = cli("--json", "show", run, "--mermaid", token=token).json()
    assert as_json == {"run_id": run, "revision": 0, "mermaid": chart}


def test_without_a_token_a_public_workflow_runs_and_is_followed_through_the_public_routes(cli, stack, api, devmodel, write):
    m = marker("cli-public")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "hello, anyone"}})
    path = write("wf.json", workflow("cli-public", [{"id": "greet", "type": "llm", "prompt": m}], output="{{ steps.greet.text }}"))
    owner = stack.token("cli-alice")
    pushed = cli("--json", "workflows", "push", path, "--visibility", "PUBLIC", token=owner)
    assert pushed.code == 0 and pushed.json()["visibility"] == "PUBLIC", pushed
    try:
        ran = cli("run", "--workflow", pushed.json()["id"])
        out = plain(ran)
        assert ran.code == 0 and re.search(r"^✓ greet\s+COMPLETED", out, re.M) and out.rstrip().endswith("output:\nhello, anyone"), ran
        run = run_id_in(out)
        assert cli("--json", "show", run).json()["status"] == "COMPLETED"
        assert "s_greet(" in cli("show", run, "--mermaid").out
        inline = cli("run", path)
        assert inline.code == 2 and "`chainrun run FILE` needs a token" in inline.err, inline
    finally:
        # A PUBLIC workflow is listed to everyone on this session's stack: other modules'
        # listings must not see it.
        status, _, _ = api("DELETE", f"/workflows/{pushed.json()['id']}", token=owner)
        assert status == 204, status


def test_a_legacy_model_is_warned_about_on_stderr_by_run_and_estimate(cli, write, stack, devmodel):
    m = marker("cli-legacy")
    add_rules(devmodel, {"name": m, "match": {"prompt_contains": m}, "reply": {"text": "ok"}})
    wf = {"name": "cli-legacy", "steps": [
        {"id": "old", "type": "llm", "model": "anthropic.claude-3-5-haiku-20241022-v1:0", "max_tokens": 20, "prompt": m}]}
    path = write("wf.json", {"workflow": wf, "input": {}})
    token = stack.token("cli-alice")
    ran = cli("run", path, token=token)
    assert ran.code == 0, ran
    assert "warning: step old, field model: anthropic.claude-3-5-haiku-20241022-v1:0 is a legacy model" in ran.err, ran
    estimated = cli("estimate", path, token=token)
    assert estimated.code == 0 and "warning: step old, field model:" in estimated.err, estimated
    # Under --json the warnings are in the document, not on stderr.
    detached = cli("--json", "run", "--detach", path, token=token)
    assert detached.code == 0 and "warning" not in detached.err, detached
    assert detached.json()["warnings"][0]["step"] == "old"
