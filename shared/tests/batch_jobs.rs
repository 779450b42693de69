//! The Bedrock batch adapter ([`BedrockBatch`]) against the dev model server's batch
//! control plane (`infra/devmodel.py`), which reads the job's input from and writes its
//! answers to a moto S3 server, as Bedrock does with the outputs bucket.
//!
//! Opt-in like the other moto contracts: run with `CHAINRUN_MOTO=1` (as `make test` does).
//! Each test starts its own moto and devmodel on ports they pick, and stops both at the end.
//! Devmodel's batch timing is set per test (`PUT /_dev/batch`), so each job's lifecycle is
//! decided by the server clock and nothing here sleeps.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use aws_config::{BehaviorVersion, Region, SdkConfig};
use chainrun_core::aws::{BedrockBatch, bedrock_control_client, s3_client};
use chainrun_core::ids::{RunId, StepId};
use chainrun_core::ports::{BatchJobs, BatchRecord, BatchState, BatchSubmission, CachePoints, ModelErrorKind, ModelRequest};
use chainrun_core::pricing::ServiceTier;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

#[allow(dead_code)] // only `start_moto` is used here
#[path = "support/moto.rs"]
mod moto;
use moto::{Moto, start_moto};

const MODEL: &str = "amazon.nova-micro-v1:0";
const BUCKET: &str = "outputs";
const ROLE: &str = "arn:aws:iam::123456789012:role/chainrun-batch";

/// `infra/devmodel.py` on a loopback port it picked, stopped on drop.
struct DevModel {
    child: Child,
    url: String,
}

impl Drop for DevModel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevModel {
    fn start(s3_endpoint: &str) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = root.join(".venv/bin/python");
        let mut child = Command::new(&python)
            .args(["-m", "infra.devmodel", "--host", "127.0.0.1", "--port", "0", "--quiet", "--s3-endpoint", s3_endpoint])
            .current_dir(&root)
            // What devmodel signs its S3 requests with; moto takes any.
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_SESSION_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start devmodel with {}: {e} (run `make venv`)", python.display()));
        let stdout = child.stdout.take().unwrap();
        let mut dev = DevModel { child, url: String::new() };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        dev.url = line.trim().strip_prefix("devmodel listening on ").unwrap_or_else(|| panic!("devmodel said {line:?}")).to_owned();
        dev
    }

    /// One admin call; the reply's status and JSON body.
    fn admin(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let host = self.url.strip_prefix("http://").unwrap();
        let body = body.to_string();
        let mut stream = TcpStream::connect(host).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let json = reply.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
        (status, json)
    }

    fn set_timing(&self, timing: Value) {
        let (status, reply) = self.admin("PUT", "/_dev/batch", &timing);
        assert_eq!(status, 200, "{reply}");
    }

    fn add_rules(&self, rules: Value) {
        let (status, reply) = self.admin("POST", "/_dev/rules", &json!({ "rules": rules }));
        assert_eq!(status, 200, "{reply}");
    }

    fn jobs(&self) -> Vec<Value> {
        self.admin("GET", "/_dev/batch", &Value::Null).1["jobs"].as_array().cloned().unwrap_or_default()
    }
}

/// moto (S3, with the outputs bucket), devmodel reading and writing it, and the adapter
/// wired as the runner wires it.
struct Stack {
    batch: BedrockBatch,
    s3: aws_sdk_s3::Client,
    dev: DevModel,
    _moto: Moto,
}

fn sdk_config(endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(aws_sdk_s3::config::Credentials::new(
            "test", "test", None, None, "test",
        )))
        .endpoint_url(endpoint)
        .build()
}

async fn stack(test: &str) -> Option<Stack> {
    if !std::env::var("CHAINRUN_MOTO").is_ok_and(|v| v == "1") {
        let _ = writeln!(std::io::stderr(), "skipped {test}: the batch contract runs against moto and devmodel only with CHAINRUN_MOTO=1");
        return None;
    }
    let moto = start_moto().unwrap_or_else(|e| panic!("CHAINRUN_MOTO=1, but moto could not start: {e}"));
    let s3 = s3_client(&sdk_config(&moto.url));
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    let dev = DevModel::start(&moto.url);
    let batch = BedrockBatch::new(bedrock_control_client(&sdk_config(&dev.url)), s3.clone(), BUCKET.into(), ROLE.into());
    Some(Stack { batch, s3, dev, _moto: moto })
}

fn request(prompt: String) -> ModelRequest {
    ModelRequest {
        model: MODEL.parse().unwrap(),
        system: Some("Answer briefly.".into()),
        prompt,
        temperature: Some(0.0),
        max_tokens: 200,
        stop_sequences: vec![],
        cache_points: CachePoints::default(),
        service_tier: ServiceTier::Default,
        metadata: BTreeMap::new(),
        output_schema: None,
    }
}

/// `n` records whose prompts name their item (`[item 7]`) and grow with the index, so each
/// answer's text and estimated input tokens tell which record it answered.
fn submission(token: &str, n: usize) -> BatchSubmission {
    BatchSubmission {
        token: token.into(),
        run: RunId::new(),
        step: StepId::parse("per_item").unwrap(),
        model: MODEL.parse().unwrap(),
        records: (0..n).map(|index| BatchRecord { index, request: request(format!("[item {index}] {}", "x".repeat(index))) }).collect(),
        timeout_hours: 1,
    }
}

/// Every phase at once: a job has ended by the time it is first read.
fn instant() -> Value {
    json!({ "start_delay_ms": 0, "validate_ms": 0, "run_ms_per_record": 0, "stop_ms": 0 })
}

#[tokio::test]
async fn a_job_answers_every_record_by_index_and_a_resubmission_finds_it() {
    let Some(s) = stack("a_job_answers_every_record_by_index_and_a_resubmission_finds_it").await else { return };
    s.dev.set_timing(instant());
    s.dev.add_rules(json!(
        (0..120).map(|i| json!({ "match": { "prompt_contains": format!("[item {i}]") }, "text": format!("answer {i}") })).collect::<Vec<_>>()
    ));
    // Submitted in reverse: answers are matched by record id, not by position.
    let mut job = submission("run1-per-item-r1", 120);
    job.records.reverse();

    let arn = s.batch.submit(&job).await.unwrap();
    assert!(arn.starts_with("arn:aws:bedrock:") && arn.contains(":model-invocation-job/"), "{arn}");
    assert_eq!(s.batch.submit(&job).await.unwrap(), arn, "the same token finds the same job");
    assert_eq!(s.dev.jobs().len(), 1, "and creates no other");
    let created = &s.dev.jobs()[0];
    assert_eq!(created["modelInvocationType"], "Converse");
    assert_eq!(created["timeoutDurationInHours"], 24, "clamped up to Bedrock's minimum");
    assert_eq!(created["roleArn"], ROLE);

    assert_eq!(s.batch.state(&arn).await.unwrap(), BatchState::Ended { status: "Completed".into(), message: None });
    let results = s.batch.results(&arn).await.unwrap();
    assert_eq!(results.keys().copied().collect::<Vec<_>>(), (0..120).collect::<Vec<_>>());
    for (index, answer) in &results {
        let reply = answer.as_ref().unwrap();
        assert_eq!(reply.text, format!("answer {index}"));
        assert_eq!(reply.stop_reason, "end_turn");
        // devmodel's estimate: a token per 4 characters of system + prompt, and of reply.
        let prompt = format!("Answer briefly.[item {index}] {}", "x".repeat(*index));
        assert_eq!(reply.usage.input_tokens, prompt.len().div_ceil(4) as u64, "item {index}");
        assert_eq!(reply.usage.output_tokens, reply.text.len().div_ceil(4) as u64, "item {index}");
        assert_eq!(reply.service_tier, None);
    }

    // The input lies under the run, step and token, one line per record in the order given.
    let key = format!("batches/{}/per_item/run1-per-item-r1/input.jsonl", job.run);
    let stored = s.s3.get_object().bucket(BUCKET).key(&key).send().await.unwrap().body.collect().await.unwrap().into_bytes();
    let first: Value = serde_json::from_slice(stored.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["recordId"], "R0000000119");
}

#[tokio::test]
async fn record_errors_come_back_classified_and_the_job_completes_partially() {
    let Some(s) = stack("record_errors_come_back_classified_and_the_job_completes_partially").await else { return };
    s.dev.set_timing(instant());
    s.dev.add_rules(json!([
        { "match": { "prompt_contains": "[item 7]" }, "error": { "type": "ThrottlingException", "message": "slow down" } },
        { "match": { "prompt_contains": "[item 8]" }, "error": { "type": "ValidationException", "message": "bad input" } },
        { "match": { "prompt_contains": "[item 9]" }, "error": { "type": "InternalServerException", "message": "oops" } },
    ]));
    let arn = s.batch.submit(&submission("run2-per-item-r1", 100)).await.unwrap();

    assert!(matches!(s.batch.state(&arn).await.unwrap(), BatchState::Ended { status, .. } if status == "PartiallyCompleted"));
    let results = s.batch.results(&arn).await.unwrap();
    assert_eq!(results.len(), 100);
    let err = |i: usize| results[&i].as_ref().unwrap_err().clone();
    assert_eq!((err(7).kind, err(7).code.as_str(), err(7).message.contains("slow down")), (ModelErrorKind::Throttled, "BatchRecord429", true));
    assert_eq!((err(8).kind, err(8).code.as_str(), err(8).retryable()), (ModelErrorKind::Invalid, "BatchRecord400", false));
    assert_eq!((err(9).kind, err(9).retryable()), (ModelErrorKind::ServerError, true));
    assert_eq!(results.values().filter(|r| r.is_ok()).count(), 97);
}

#[tokio::test]
async fn a_job_below_the_models_minimum_fails_and_answers_nothing() {
    let Some(s) = stack("a_job_below_the_models_minimum_fails_and_answers_nothing").await else { return };
    s.dev.set_timing(instant());
    let arn = s.batch.submit(&submission("run3-per-item-r1", 5)).await.unwrap();

    let BatchState::Ended { status, message } = s.batch.state(&arn).await.unwrap() else { panic!("the job should have ended") };
    assert_eq!(status, "Failed");
    let message = message.unwrap_or_default();
    assert!(message.contains("at least 100 records"), "{message}");
    assert!(s.batch.results(&arn).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_running_job_stops_and_stopping_it_again_is_no_error() {
    let Some(s) = stack("a_running_job_stops_and_stopping_it_again_is_no_error").await else { return };
    // Validated at once, then a minute per record: the job is in progress whenever read here.
    s.dev.set_timing(json!({ "start_delay_ms": 0, "validate_ms": 0, "run_ms_per_record": 60_000, "stop_ms": 0 }));
    let arn = s.batch.submit(&submission("run4-per-item-r1", 100)).await.unwrap();
    assert_eq!(s.batch.state(&arn).await.unwrap(), BatchState::Running { status: "InProgress".into() });

    s.batch.stop(&arn).await.unwrap();
    assert!(matches!(s.batch.state(&arn).await.unwrap(), BatchState::Ended { status, .. } if status == "Stopped"));
    s.batch.stop(&arn).await.unwrap();
    assert!(s.batch.results(&arn).await.unwrap().is_empty(), "no record was answered before the stop");

    let unknown = s.batch.state("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/nosuchjob000").await.unwrap_err();
    assert!(!unknown.retryable(), "{unknown:?}");
}
