"""Tests for devmodel's batch inference: the Bedrock control plane's model invocation jobs
(CreateModelInvocationJob, GetModelInvocationJob, StopModelInvocationJob,
ListModelInvocationJobs), reading the input JSONL from S3 and writing the output there.

The server is driven through boto3's `bedrock` client and S3 is a moto server, so the
request and reply shapes are the ones a real AWS SDK sends and parses. Each test owns a
fake clock: a job moves through its lifecycle only when the test advances it.
"""

import datetime
import json
import re
import subprocess
import sys
import uuid

import boto3
import botocore.config
import botocore.exceptions
import pytest

from infra import devmodel
from infra.net import http

NOVA_MICRO = "amazon.nova-micro-v1:0"        # batch: min_records 100
PROFILE = "us.amazon.nova-micro-v1:0"         # the same model through a profile id
NO_BATCH = "deepseek.v3-v1:0"                 # in the registry, no batch entry
UNKNOWN = "example.not-in-the-registry-v1:0"
ROLE = "arn:aws:iam::123456789012:role/chainrun-batch"
BUCKET = "chainrun-batch-test"
MIN_RECORDS = 100
TIMING = {"start_delay_ms": 50, "validate_ms": 100, "run_ms_per_record": 10, "stop_ms": 40}

RULES = {
    "default": {"text": "OK"},
    "rules": [
        {"name": "scripted", "match": {"prompt_contains": "MARK-scripted"},
         "text": "scripted reply", "usage": {"input_tokens": 50, "output_tokens": 9}},
        {"name": "cached", "match": {"prompt_contains": "MARK-cached"},
         "text": "cached reply", "usage": {"cache_read_tokens": 7}},
        {"name": "refused", "match": {"prompt_contains": "MARK-refused"},
         "error": {"type": "ValidationException", "message": "scripted refusal"}},
        {"name": "throttled", "match": {"prompt_contains": "MARK-throttled"},
         "fail_first": {"count": 2, "message": "slow down"}},
        {"name": "broken", "match": {"prompt_contains": "MARK-broken"},
         "error": {"type": "InternalServerException", "message": "scripted crash"}},
        {"name": "system", "match": {"model": NOVA_MICRO, "system_contains": "terse analyst"},
         "text": "terse"},
    ],
}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now

    def advance(self, ms):
        self.now += ms / 1000


# --------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    s3_client(url).create_bucket(Bucket=BUCKET)
    yield url
    # moto's state is per process: leave none behind for the next module's server.
    http("POST", url + "/moto-api/reset")
    srv.stop()


def s3_client(url):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture
def s3(moto_url):
    return s3_client(moto_url)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server_url(clock, moto_url):
    server, url = devmodel.start_server(json.loads(json.dumps(RULES)), clock=clock,
                                        s3_endpoint=moto_url, batch_timing=TIMING)
    try:
        yield url
    finally:
        server.shutdown()


def bedrock_client(url):
    return boto3.client("bedrock", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=botocore.config.Config(retries={"total_max_attempts": 1}))


@pytest.fixture
def bedrock(server_url):
    return bedrock_client(server_url)


def record(record_id, prompt, system=None, **extra):
    body = {"messages": [{"role": "user", "content": [{"text": prompt}]}], **extra}
    if system is not None:
        body["system"] = [{"text": system}]
    return {"recordId": record_id, "modelInput": body}


def plain_records(n, start=0):
    return [record(f"r{i:04d}", f"item {i}") for i in range(start, start + n)]


def upload(s3, records=None, raw=None):
    """Put an input file (records as JSONL, or raw bytes) under a fresh key; its s3:// URI."""
    key = f"in/{uuid.uuid4().hex}/items.jsonl"
    data = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records).encode()
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def create(bedrock, input_uri, model=NOVA_MICRO, **extra):
    kwargs = {
        "jobName": "job-" + uuid.uuid4().hex[:8], "roleArn": ROLE, "modelId": model,
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": input_uri, "s3InputFormat": "JSONL"}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": f"s3://{BUCKET}/out/"}},
    }
    kwargs.update(extra)
    return bedrock.create_model_invocation_job(**kwargs)["jobArn"]


def job_id(arn):
    return arn.rsplit("/", 1)[1]


def read_output(s3, arn, input_uri, prefix="out/"):
    """(output lines, manifest) the job wrote."""
    base = f"{prefix}{job_id(arn)}/"
    name = input_uri.rsplit("/", 1)[1]
    body = s3.get_object(Bucket=BUCKET, Key=base + name + ".out")["Body"].read().decode()
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=base + "manifest.json.out")["Body"].read())
    return [json.loads(line) for line in body.splitlines()], manifest


def run_to_end(bedrock, clock, arn, step_ms=1000, limit=100):
    for _ in range(limit):
        job = bedrock.get_model_invocation_job(jobIdentifier=arn)
        if job["status"] in devmodel.FINISHED:
            return job
        clock.advance(step_ms)
    raise AssertionError(f"job {arn} still {job['status']}")


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def calls(url, **filters):
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    return http("GET", f"{url}/_dev/calls?{query}")[2]["calls"]


# --------------------------------------------------------------------------------------
# lifecycle and output
# --------------------------------------------------------------------------------------


def test_job_moves_through_its_lifecycle_on_the_server_clock(bedrock, s3, clock):
    uri = upload(s3, plain_records(MIN_RECORDS))
    arn = create(bedrock, uri)
    assert re.fullmatch(r"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/[a-z0-9]{12}", arn)

    def status():
        return bedrock.get_model_invocation_job(jobIdentifier=arn)

    assert status()["status"] == "Submitted"
    clock.advance(50)   # start_delay_ms
    assert status()["status"] == "Validating"
    clock.advance(99)
    assert status()["status"] == "Validating"
    clock.advance(1)    # validate_ms done: the input is read and accepted
    job = status()
    assert (job["status"], job["totalRecordCount"], job["processedRecordCount"]) == ("InProgress", 100, 0)
    clock.advance(10 * 40)  # run_ms_per_record x 40
    assert (status()["status"], status()["processedRecordCount"]) == ("InProgress", 40)
    clock.advance(10 * 60)
    job = status()
    assert job["status"] == "Completed"
    assert (job["successRecordCount"], job["errorRecordCount"]) == (100, 0)
    assert "message" not in job
    # Timestamps are ISO 8601 on the server clock: submit + 50 + 100 + 100 x 10 ms.
    assert job["endTime"] - job["submitTime"] == datetime.timedelta(milliseconds=1150)
    assert job["lastModifiedTime"] == job["endTime"]
    assert job["jobExpirationTime"] - job["submitTime"] == datetime.timedelta(hours=24)
    assert job["modelId"] == NOVA_MICRO and job["roleArn"] == ROLE
    assert job["inputDataConfig"]["s3InputDataConfig"]["s3Uri"] == uri


def test_output_has_one_line_per_record_in_input_order_and_a_manifest(bedrock, s3, clock):
    records = plain_records(MIN_RECORDS)
    records[3] = record("r0003", "MARK-scripted please")
    records[7] = record("r0007", "anything", system="You are a terse analyst.")
    uri = upload(s3, records)
    arn = create(bedrock, uri)
    assert run_to_end(bedrock, clock, arn)["status"] == "Completed"

    lines, manifest = read_output(s3, arn, uri)
    assert [line["recordId"] for line in lines] == [r["recordId"] for r in records]
    assert [line["modelInput"] for line in lines] == [r["modelInput"] for r in records]
    scripted, terse, plain = lines[3]["modelOutput"], lines[7]["modelOutput"], lines[0]["modelOutput"]
    assert scripted == {
        "output": {"message": {"role": "assistant", "content": [{"text": "scripted reply"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 50, "outputTokens": 9, "totalTokens": 59},
    }
    assert terse["output"]["message"]["content"] == [{"text": "terse"}]
    # Unscripted usage is the estimate: ceil(len("item 0") / 4) in, ceil(len("OK") / 4) out.
    assert plain["usage"] == {"inputTokens": 2, "outputTokens": 1, "totalTokens": 3}
    assert manifest == {
        "totalRecordCount": 100, "processedRecordCount": 100, "successRecordCount": 100,
        "errorRecordCount": 0,
        "inputTokenCount": sum(line["modelOutput"]["usage"]["inputTokens"] for line in lines),
        "outputTokenCount": sum(line["modelOutput"]["usage"]["outputTokens"] for line in lines),
    }


def test_cache_fields_appear_only_when_scripted_and_max_tokens_applies(bedrock, s3, clock):
    records = plain_records(MIN_RECORDS)
    records[0] = record("cached", "MARK-cached")
    records[1] = record("cut", "MARK-scripted", inferenceConfig={"maxTokens": 3})
    uri = upload(s3, records)
    arn = create(bedrock, uri)
    run_to_end(bedrock, clock, arn)
    lines, _ = read_output(s3, arn, uri)
    assert lines[0]["modelOutput"]["usage"] == {
        "inputTokens": 0, "outputTokens": 3, "totalTokens": 10, "cacheReadInputTokens": 7}
    assert lines[1]["modelOutput"]["stopReason"] == "max_tokens"
    assert lines[1]["modelOutput"]["usage"]["outputTokens"] == 3
    assert "cacheReadInputTokens" not in lines[2]["modelOutput"]["usage"]


def test_output_uri_without_trailing_slash_is_a_folder(bedrock, s3, clock):
    uri = upload(s3, plain_records(MIN_RECORDS))
    arn = create(bedrock, uri, outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{BUCKET}/nested/out"}})
    assert run_to_end(bedrock, clock, arn)["status"] == "Completed"
    lines, manifest = read_output(s3, arn, uri, prefix="nested/out/")
    assert len(lines) == 100 and manifest["successRecordCount"] == 100


def test_records_the_rules_fail_become_error_lines_and_the_job_partially_completes(bedrock, s3, clock):
    records = plain_records(MIN_RECORDS)
    records[1] = record("refused", "MARK-refused")
    records[2] = record("throttled-1", "MARK-throttled")
    records[3] = record("throttled-2", "MARK-throttled")
    records[4] = record("throttled-3", "MARK-throttled")
    records[5] = record("broken", "MARK-broken")
    records[6] = {"recordId": "malformed", "modelInput": {"messages": []}}
    uri = upload(s3, records)
    arn = create(bedrock, uri)
    job = run_to_end(bedrock, clock, arn)
    assert job["status"] == "PartiallyCompleted"
    assert (job["successRecordCount"], job["errorRecordCount"]) == (95, 5)

    lines, manifest = read_output(s3, arn, uri)
    assert lines[1]["error"] == {"errorCode": 400, "errorMessage": "scripted refusal"}
    assert lines[2]["error"] == {"errorCode": 429, "errorMessage": "slow down"}
    assert lines[3]["error"]["errorCode"] == 429
    # fail_first counts batch records like calls: the third one gets through.
    assert lines[4]["modelOutput"]["output"]["message"]["content"] == [{"text": "OK"}]
    assert lines[5]["error"] == {"errorCode": 500, "errorMessage": "scripted crash"}
    assert lines[6]["error"]["errorCode"] == 400
    assert "messages must be a non-empty list" in lines[6]["error"]["errorMessage"]
    for line in (lines[1], lines[2], lines[6]):
        assert "modelOutput" not in line and line["modelInput"] == records[lines.index(line)]["modelInput"]
    assert (manifest["successRecordCount"], manifest["errorRecordCount"], manifest["processedRecordCount"]) \
        == (95, 5, 100)


def test_levers_a_model_lacks_fail_the_record_not_the_job(bedrock, s3, clock):
    records = plain_records(MIN_RECORDS)
    records[0] = record("flex", "hello", serviceTier={"type": "flex"})
    uri = upload(s3, records)
    arn = create(bedrock, uri)
    assert run_to_end(bedrock, clock, arn)["status"] == "PartiallyCompleted"
    lines, _ = read_output(s3, arn, uri)
    assert lines[0]["error"] == {"errorCode": 400,
                                 "errorMessage": f"The model {NOVA_MICRO} does not support the flex service tier"}


def test_each_record_is_logged_as_a_call_with_its_job_and_record_id(bedrock, s3, clock, server_url):
    client = boto3.client("bedrock-runtime", endpoint_url=server_url, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    client.converse(modelId=NOVA_MICRO, messages=[{"role": "user", "content": [{"text": "ordinary"}]}])
    records = plain_records(MIN_RECORDS)
    records[0] = record("first", "MARK-scripted")
    records[1] = {"recordId": "bad", "modelInput": {"messages": "nope"}}
    uri = upload(s3, records)
    arn = create(bedrock, uri, model=PROFILE)
    clock.advance(150 + 10 * 5)  # validated, then five records due

    # The listing advances the job itself: five records are logged without a Get.
    logged = calls(server_url)
    ordinary, batch = logged[0], logged[1:]
    assert (ordinary["batch_job"], ordinary["record_id"]) == (None, None)
    assert [c["record_id"] for c in batch] == ["first", "bad", "r0002", "r0003", "r0004"]
    assert {c["batch_job"] for c in batch} == {job_id(arn)}
    assert all(c["model"] == PROFILE and c["stream"] is False for c in batch)
    assert (batch[0]["rule"], batch[0]["status"], batch[0]["usage"]["inputTokens"]) == ("scripted", 200, 50)
    assert (batch[1]["status"], batch[1]["error"], batch[1]["rule"]) == (400, "ValidationException", None)
    assert batch[2]["prompt"] == "item 2"

    run_to_end(bedrock, clock, arn)
    assert len(calls(server_url, rule="scripted")) == 1
    assert len([c for c in calls(server_url) if c["batch_job"] == job_id(arn)]) == 100


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def test_too_few_records_fail_the_job_at_validation_naming_the_minimum(bedrock, s3, clock):
    uri = upload(s3, plain_records(MIN_RECORDS - 1))
    arn = create(bedrock, uri)
    clock.advance(150)
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Failed"
    assert "99 records" in job["message"] and "at least 100 records" in job["message"]
    assert job["endTime"] - job["submitTime"] == datetime.timedelta(milliseconds=150)
    assert "totalRecordCount" not in job
    with pytest.raises(botocore.exceptions.ClientError):
        read_output(s3, arn, uri)


def test_missing_input_file_fails_the_job_at_validation(bedrock, clock):
    uri = f"s3://{BUCKET}/in/{uuid.uuid4().hex}/absent.jsonl"
    arn = create(bedrock, uri)
    clock.advance(149)
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["status"] == "Validating"
    clock.advance(1)
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert (job["status"], job["message"]) == ("Failed", f"The input file {uri} was not found")


def test_bad_jsonl_line_fails_the_job_naming_the_line(bedrock, s3, clock):
    good = "".join(json.dumps(r) + "\n" for r in plain_records(MIN_RECORDS))
    lines = good.splitlines()
    uri = upload(s3, raw=("\n".join(lines[:2] + ['{"recordId": "x", "modelInput": '] + lines[2:]) + "\n").encode())
    arn = create(bedrock, uri)
    clock.advance(150)
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Failed"
    assert job["message"].startswith(f"Line 3 of {uri} is not valid JSON")

    uri = upload(s3, raw=(good + '{"recordId": "no-input"}\n').encode())
    arn = create(bedrock, uri)
    clock.advance(150)
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["message"] == \
        f"Line 101 of {uri} must be an object with a modelInput object"


@pytest.mark.parametrize("model, message", [
    (NO_BATCH, f"The model {NO_BATCH} does not support batch inference"),
    (UNKNOWN, f"The model {UNKNOWN} is not in the model registry"),
])
def test_model_without_batch_is_refused_at_create(bedrock, s3, model, message):
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        create(bedrock, f"s3://{BUCKET}/in/x.jsonl", model=model)
    assert error_code(exc) == "ValidationException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert exc.value.response["Error"]["Message"] == message
    assert bedrock.list_model_invocation_jobs()["invocationJobSummaries"] == []


@pytest.mark.parametrize("override, fragment", [
    ({"roleArn": "not-a-role"}, "roleArn 'not-a-role' must be an IAM role ARN"),
    ({"jobName": "bad name!"}, "jobName 'bad name!'"),
    ({"inputDataConfig": {"s3InputDataConfig": {"s3Uri": f"s3://{BUCKET}/folder/"}}}, "must name an object"),
    ({"inputDataConfig": {"s3InputDataConfig": {"s3Uri": "http://x/y"}}}, "must be an s3://bucket/key URI"),
    ({"outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://A/out/"}}}, "must be an s3://bucket/key URI"),
    ({"timeoutDurationInHours": 200}, "timeoutDurationInHours must be an integer from 24 to 168"),
    ({"modelInvocationType": "InvokeModel"}, "modelInvocationType must be Converse"),
])
def test_malformed_create_requests_are_refused_naming_the_field(bedrock, override, fragment):
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        create(bedrock, f"s3://{BUCKET}/in/x.jsonl", **override)
    assert error_code(exc) == "ValidationException"
    assert fragment in exc.value.response["Error"]["Message"]


def test_without_an_s3_endpoint_jobs_are_refused(clock):
    server, url = devmodel.start_server(json.loads(json.dumps(RULES)), clock=clock)
    try:
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            create(bedrock_client(url), f"s3://{BUCKET}/in/x.jsonl")
        assert error_code(exc) == "ValidationException"
        assert "--s3-endpoint" in exc.value.response["Error"]["Message"]
    finally:
        server.shutdown()


def test_raw_garbage_bodies_are_400s(server_url):
    status, headers, body = http("POST", server_url + "/model-invocation-job", raw=b"{not json")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    assert "not valid JSON" in body["message"]
    status, _, body = http("POST", server_url + "/model-invocation-job", body=["a list"])
    assert status == 400 and body["message"] == "request body must be a JSON object"
    status, _, body = http("POST", server_url + "/model-invocation-job",
                           body={"jobName": "j", "roleArn": ROLE, "modelId": NOVA_MICRO,
                                 "inputDataConfig": "x", "outputDataConfig": {}})
    assert status == 400 and body["message"] == "inputDataConfig.s3InputDataConfig is required"


# --------------------------------------------------------------------------------------
# identity, idempotency, listing, stopping
# --------------------------------------------------------------------------------------


def test_unknown_job_is_404_for_get_and_stop(bedrock):
    for call in (bedrock.get_model_invocation_job, bedrock.stop_model_invocation_job):
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            call(jobIdentifier=devmodel.JOB_ARN_PREFIX + "abcdef123456")
        assert error_code(exc) == "ResourceNotFoundException"
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_job_is_found_by_arn_or_bare_id(bedrock, s3):
    arn = create(bedrock, upload(s3, plain_records(MIN_RECORDS)))
    assert bedrock.get_model_invocation_job(jobIdentifier=job_id(arn))["jobArn"] == arn
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["jobArn"] == arn


def test_same_client_request_token_is_the_same_job(bedrock, s3):
    uri = upload(s3, plain_records(MIN_RECORDS))
    first = create(bedrock, uri, jobName="idem", clientRequestToken="token-1")
    again = create(bedrock, uri, jobName="idem", clientRequestToken="token-1")
    other = create(bedrock, uri, jobName="idem", clientRequestToken="token-2")
    assert first == again != other
    assert bedrock.get_model_invocation_job(jobIdentifier=first)["clientRequestToken"] == "token-1"
    assert len(bedrock.list_model_invocation_jobs()["invocationJobSummaries"]) == 2
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        create(bedrock, uri, jobName="changed", clientRequestToken="token-1")
    assert error_code(exc) == "ConflictException"
    assert first in exc.value.response["Error"]["Message"]


def test_list_filters_by_status_and_name_newest_first(bedrock, s3, clock):
    done = create(bedrock, upload(s3, plain_records(MIN_RECORDS)), jobName="alpha-done")
    run_to_end(bedrock, clock, done)
    clock.advance(1)
    running = create(bedrock, upload(s3, plain_records(MIN_RECORDS)), jobName="beta-running")
    listed = bedrock.list_model_invocation_jobs()["invocationJobSummaries"]
    assert [j["jobArn"] for j in listed] == [running, done]
    assert [j["status"] for j in listed] == ["Submitted", "Completed"]
    assert [j["jobArn"] for j in bedrock.list_model_invocation_jobs(statusEquals="Completed")
            ["invocationJobSummaries"]] == [done]
    assert [j["jobArn"] for j in bedrock.list_model_invocation_jobs(nameContains="beta")
            ["invocationJobSummaries"]] == [running]
    ascending = bedrock.list_model_invocation_jobs(sortOrder="Ascending", maxResults=1)
    assert [j["jobArn"] for j in ascending["invocationJobSummaries"]] == [done]
    page2 = bedrock.list_model_invocation_jobs(sortOrder="Ascending", maxResults=1,
                                               nextToken=ascending["nextToken"])
    assert [j["jobArn"] for j in page2["invocationJobSummaries"]] == [running] and "nextToken" not in page2
    status, headers, body = http("GET", bedrock.meta.endpoint_url + "/model-invocation-jobs?statusEquals=Done")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    assert body["message"].startswith("statusEquals must be one of Submitted, Validating")


def test_stop_mid_run_writes_only_the_processed_records(bedrock, s3, clock):
    uri = upload(s3, plain_records(MIN_RECORDS))
    arn = create(bedrock, uri)
    clock.advance(150 + 10 * 30)  # 30 records due
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert (job["status"], job["processedRecordCount"]) == ("Stopping", 30)
    clock.advance(1000)  # well past stop_ms: no more records are processed
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert (job["status"], job["processedRecordCount"]) == ("Stopped", 30)
    assert job["endTime"] - job["submitTime"] == datetime.timedelta(milliseconds=150 + 300 + 40)

    lines, manifest = read_output(s3, arn, uri)
    assert [line["recordId"] for line in lines] == [f"r{i:04d}" for i in range(30)]
    assert (manifest["totalRecordCount"], manifest["processedRecordCount"], manifest["successRecordCount"]) \
        == (100, 30, 30)

    with pytest.raises(botocore.exceptions.ClientError) as exc:
        bedrock.stop_model_invocation_job(jobIdentifier=arn)
    assert error_code(exc) == "ValidationException"
    assert "is Stopped" in exc.value.response["Error"]["Message"]


def test_stop_before_validation_writes_nothing(bedrock, s3, clock):
    uri = upload(s3, plain_records(MIN_RECORDS))
    arn = create(bedrock, uri)
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    clock.advance(40)
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Stopped" and "totalRecordCount" not in job
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"out/{job_id(arn)}/").get("KeyCount") == 0


def test_job_expires_after_its_timeout(bedrock, s3, clock, server_url):
    http("PUT", server_url + "/_dev/batch", body={"run_ms_per_record": 3_600_000})  # an hour each
    uri = upload(s3, plain_records(MIN_RECORDS))
    arn = create(bedrock, uri, timeoutDurationInHours=24)
    clock.advance(25 * 3_600_000)
    job = bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Expired" and "timeoutDurationInHours (24)" in job["message"]
    assert job["endTime"] - job["submitTime"] == datetime.timedelta(hours=24)
    # Records due before the deadline were processed and written: 24 h less the 150 ms
    # of starting and validating leaves 23 whole records.
    assert job["processedRecordCount"] == 23
    lines, _ = read_output(s3, arn, uri)
    assert len(lines) == 23


# --------------------------------------------------------------------------------------
# admin and command line
# --------------------------------------------------------------------------------------


def test_admin_batch_timing_applies_to_new_jobs(bedrock, s3, clock, server_url):
    before = create(bedrock, upload(s3, plain_records(MIN_RECORDS)))
    status, _, body = http("PUT", server_url + "/_dev/batch",
                           body={"start_delay_ms": 0, "validate_ms": 0, "run_ms_per_record": 0})
    assert status == 200 and body["timing"] == {"start_delay_ms": 0, "validate_ms": 0,
                                                "run_ms_per_record": 0, "stop_ms": 40}
    after = create(bedrock, upload(s3, plain_records(MIN_RECORDS)))
    assert bedrock.get_model_invocation_job(jobIdentifier=after)["status"] == "Completed"
    assert bedrock.get_model_invocation_job(jobIdentifier=before)["status"] == "Submitted"

    status, _, body = http("GET", server_url + "/_dev/batch")
    assert status == 200 and body["timing"]["run_ms_per_record"] == 0
    assert {j["jobArn"]: j["status"] for j in body["jobs"]} == {before: "Submitted", after: "Completed"}


@pytest.mark.parametrize("doc, message", [
    ({"validate": 5}, "validate: unknown field"),
    ({"validate_ms": -1}, "validate_ms: must be a number >= 0"),
    ({"run_ms_per_record": True}, "run_ms_per_record: must be a number >= 0"),
    ([1], "(document): must be an object"),
])
def test_admin_batch_timing_rejects_bad_documents(server_url, doc, message):
    status, _, body = http("PUT", server_url + "/_dev/batch", body=doc)
    assert status == 400 and body["message"].startswith(message)
    assert http("GET", server_url + "/_dev/batch")[2]["timing"] == TIMING


def test_reset_forgets_jobs(bedrock, s3, server_url):
    arn = create(bedrock, upload(s3, plain_records(MIN_RECORDS)))
    http("POST", server_url + "/_dev/reset")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        bedrock.get_model_invocation_job(jobIdentifier=arn)
    assert error_code(exc) == "ResourceNotFoundException"


def test_cli_rejects_bad_batch_timing():
    result = subprocess.run([sys.executable, "-m", "infra.devmodel", "--batch-timing", '{"validate_ms": "soon"}'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--batch-timing: validate_ms: must be a number >= 0" in result.stderr
