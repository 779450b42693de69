//! A moto server (local DynamoDB) for tests and benchmarks: started on a port it picks
//! itself, stopped on drop, with chainrun's tables created from `infra/tables.json`.
//! Included by the store contract tests and the store benchmark.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType, ScalarAttributeType,
};
use chainrun_core::config::Tables;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TABLES: &str = include_str!("../../../infra/tables.json");

/// A moto server on a loopback port it picked itself, stopped on drop (panics included).
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn moto_binary() -> PathBuf {
    std::env::var_os("CHAINRUN_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server"))
}

/// Starts moto with `-p 0` and reads its port from the banner, so no other process can be
/// handed the same port between our choosing it and moto binding it.
pub fn start_moto() -> Result<Moto, String> {
    let binary = moto_binary();
    if !binary.exists() {
        return Err(format!("{} not found: run `make venv` (or set CHAINRUN_MOTO_SERVER)", binary.display()));
    }
    let mut child = Command::new(&binary)
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", binary.display()))?;
    let Some(stderr) = child.stderr.take() else { return Err("moto's stderr is not piped".into()) };
    let mut moto = Moto { child, url: String::new() };
    let mut lines = BufReader::new(stderr).lines();
    let port = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| line.split("Running on http://127.0.0.1:").nth(1).and_then(|rest| rest.trim().trim_end_matches('/').parse::<u16>().ok()));
    // Keep draining: moto logs every request, and a full pipe would block it.
    std::thread::spawn(move || lines.for_each(drop));
    let port = port.ok_or_else(|| format!("{} exited without announcing its port", binary.display()))?;
    moto.url = format!("http://127.0.0.1:{port}");
    Ok(moto)
}

/// Creates the tables exactly as `infra/tables.json` defines them.
pub async fn create_tables(client: &aws_sdk_dynamodb::Client) -> Result<Tables, BoxError> {
    let defs: Value = serde_json::from_str(TABLES)?;
    let mut names = BTreeMap::new();
    let text = |v: &Value| v.as_str().map(str::to_owned).ok_or("infra/tables.json: expected a string");
    for t in defs["tables"].as_array().ok_or("infra/tables.json: no tables")? {
        let name = text(&t["local_name"])?;
        let key = |hash: &str, range: &str| -> Result<Vec<KeySchemaElement>, BoxError> {
            Ok(vec![
                KeySchemaElement::builder().attribute_name(hash).key_type(KeyType::Hash).build()?,
                KeySchemaElement::builder().attribute_name(range).key_type(KeyType::Range).build()?,
            ])
        };
        let mut req = client.create_table().table_name(&name).billing_mode(BillingMode::PayPerRequest);
        for (attr, ty) in t["attributes"].as_object().into_iter().flatten() {
            let ty = if ty == "N" { ScalarAttributeType::N } else { ScalarAttributeType::S };
            req = req.attribute_definitions(AttributeDefinition::builder().attribute_name(attr).attribute_type(ty).build()?);
        }
        req = req.set_key_schema(Some(key(&text(&t["key"]["hash"])?, &text(&t["key"]["range"])?)?));
        for g in t["gsis"].as_array().into_iter().flatten() {
            req = req.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(text(&g["name"])?)
                    .set_key_schema(Some(key(&text(&g["hash"])?, &text(&g["range"])?)?))
                    .projection(Projection::builder().projection_type(ProjectionType::from(g["projection"].as_str().unwrap_or("ALL"))).build())
                    .build()?,
            );
        }
        req.send().await?;
        names.insert(text(&t["env"])?, name);
    }
    let table = |env: &str| names.get(env).cloned().ok_or_else(|| format!("infra/tables.json has no {env}"));
    Ok(Tables {
        runs: table("CHAINRUN_RUNS_TABLE")?,
        events: table("CHAINRUN_EVENTS_TABLE")?,
        progress: table("CHAINRUN_PROGRESS_TABLE")?,
        workflows: table("CHAINRUN_WORKFLOWS_TABLE")?,
        rollups: table("CHAINRUN_ROLLUPS_TABLE")?,
    })
}

/// A DynamoDB client for `moto`'s endpoint, with test credentials.
#[allow(dead_code)] // each file that includes this module uses part of it
pub fn dynamodb_client(moto: &Moto) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(&moto.url)
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A fresh moto server with chainrun's tables and a client for it, when the moto half of
/// a contract runs (`CHAINRUN_MOTO=1`, as `make test` sets); `None`, said on stderr, when
/// it does not. `test` names the test that skipped.
#[allow(dead_code)] // each file that includes this module uses part of it
pub async fn moto_with_tables(test: &str) -> Option<(Moto, aws_sdk_dynamodb::Client, Tables)> {
    if !std::env::var("CHAINRUN_MOTO").is_ok_and(|v| v == "1") {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped {test}: the DynamoDB half runs against moto only with CHAINRUN_MOTO=1");
        return None;
    }
    let moto = start_moto().unwrap_or_else(|e| panic!("CHAINRUN_MOTO=1, but moto could not start: {e}"));
    let client = dynamodb_client(&moto);
    let tables = create_tables(&client).await.unwrap_or_else(|e| panic!("moto tables: {e}"));
    Some((moto, client, tables))
}
