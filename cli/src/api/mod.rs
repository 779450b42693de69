//! The HTTP API as the CLI calls it: JSON in and out, a bearer token when there is one,
//! refusals turned into [`Problem`]s.
//!
//! Reads are retried a few times on what a moment's wait can mend (no answer, `429`,
//! `5xx`); writes are sent once, since only the caller knows whether acting twice is
//! harmless.

mod problem;

pub use problem::{Problem, warnings};

use crate::exit::CliError;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// How long one request may take, connection to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The most a run document may be (the API keeps answers under Lambda's 6 MB).
const MAX_ANSWER_BYTES: u64 = 16 * 1024 * 1024;
/// Tries of a read before its error is the command's.
const READ_TRIES: u32 = 5;

pub struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A query string's pairs; values are percent-encoded on the way out.
pub type Query<'a> = [(&'a str, String)];

impl Api {
    /// `token` `None`: an anonymous caller, who may use the `/public/` routes only.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(REQUEST_TIMEOUT)).build().into();
        Self { base: base.trim_end_matches('/').to_owned(), token, agent }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Fails with what to do when the caller has no token and `command` needs one.
    pub fn require_token(&self, command: &'static str) -> Result<(), CliError> {
        match self.token {
            Some(_) => Ok(()),
            None => Err(CliError::NoToken { command }),
        }
    }

    /// `path` for this caller: without a token, the same route under `/public`, where the
    /// API serves what anyone may read or run (a `PUBLIC` run's events, a `PUBLIC` workflow).
    pub fn scoped(&self, path: &str) -> String {
        match self.token {
            Some(_) => path.to_owned(),
            None => format!("/public{path}"),
        }
    }

    pub fn get(&self, path: &str, query: &Query) -> Result<Value, CliError> {
        let mut wait = Duration::from_millis(300);
        for _ in 1..READ_TRIES {
            match self.call("GET", path, query, None, &[]) {
                Err(e) if transient(&e) => {
                    let asked = match &e {
                        CliError::Api(p) => p.retry_after.map(Duration::from_secs),
                        _ => None,
                    };
                    std::thread::sleep(asked.unwrap_or(wait).min(Duration::from_secs(5)));
                    wait *= 2;
                }
                done => return done,
            }
        }
        self.call("GET", path, query, None, &[])
    }

    pub fn get_as<T: DeserializeOwned>(&self, path: &str, query: &Query) -> Result<T, CliError> {
        let value = self.get(path, query)?;
        serde_json::from_value(value).map_err(|e| CliError::Unexpected { what: format!("GET {path}"), message: e.to_string() })
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call("POST", path, &[], Some(body), &[])
    }

    /// A `PUT` with extra headers (`If-Match`).
    pub fn put(&self, path: &str, body: &Value, headers: &[(&str, String)]) -> Result<Value, CliError> {
        self.call("PUT", path, &[], Some(body), headers)
    }

    fn call(&self, method: &str, path: &str, query: &Query, body: Option<&Value>, headers: &[(&str, String)]) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: ureq::Error| CliError::Unreachable { url: url.clone(), message: e.to_string() };
        let answer = match (method, body) {
            ("GET", None) => {
                let request = query.iter().fold(self.agent.get(&url), |r, (name, value)| r.query(*name, value));
                self.dressed(request, headers).call()
            }
            (_, body) => {
                let bytes =
                    serde_json::to_vec(&body.unwrap_or(&Value::Null)).map_err(|e| CliError::Usage(format!("cannot encode the request: {e}")))?;
                let request = match method {
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                self.dressed(request, headers).content_type("application/json").send(&bytes[..])
            }
        };
        let mut response = answer.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(MAX_ANSWER_BYTES).read_to_string().map_err(unreachable)?;
        if !(200..300).contains(&status) {
            return Err(CliError::Api(Box::new(Problem::from_answer(status, &text))));
        }
        if text.trim().is_empty() {
            // `204 No Content`.
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| CliError::Unexpected { what: format!("{method} {path}"), message: format!("not JSON ({e})") })
    }

    /// The headers every request carries, and `extra`.
    fn dressed<B>(&self, request: ureq::RequestBuilder<B>, extra: &[(&str, String)]) -> ureq::RequestBuilder<B> {
        let mut request = request.header("Accept", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        extra.iter().fold(request, |r, (name, value)| r.header(*name, value))
    }
}

/// What a read tried again a moment later may get past. A `500` too: a read changes
/// nothing, and one that met a write half done (moto applies an update in steps) answers
/// the next time.
fn transient(e: &CliError) -> bool {
    match e {
        CliError::Unreachable { .. } => true,
        CliError::Api(p) => matches!(p.status, 429 | 500 | 502 | 503 | 504),
        _ => false,
    }
}
