//! What every API test builds the same way: the router's state over in-memory ports, and a
//! locally signed token. Each test file keeps the handles it looks at.
#![allow(dead_code, clippy::unwrap_used)] // each test file uses part of it; a panic is the failure report

use chainrun_api::AppState;
use chainrun_api::auth::{Authenticator, LOCAL_AUDIENCE, LOCAL_ISSUER};
use chainrun_core::memory::{
    MemoryAnalytics, MemoryDailySpend, MemoryDispatcher, MemoryIdempotency, MemoryProgress, MemoryQuota, MemoryStore, MemoryTemplates,
    MemoryWorkflows,
};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::spend::DailyCaps;
use serde_json::json;
use std::sync::Arc;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// The in-memory ports behind an [`AppState`], and the state itself.
pub struct Ports {
    pub store: Arc<MemoryStore>,
    pub progress: Arc<MemoryProgress>,
    pub dispatcher: Arc<MemoryDispatcher>,
    pub analytics: Arc<MemoryAnalytics>,
    pub daily: Arc<MemoryDailySpend>,
    pub workflows: Arc<MemoryWorkflows>,
    pub templates: Arc<MemoryTemplates>,
    pub quota: Arc<MemoryQuota>,
    pub state: AppState,
}

/// Fresh in-memory ports; `auth` says where identities come from, `caps` who has a daily cap.
pub fn ports(auth: Authenticator, caps: DailyCaps) -> Ports {
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let analytics = Arc::new(MemoryAnalytics::new());
    let daily = Arc::new(MemoryDailySpend::new());
    let workflows = Arc::new(MemoryWorkflows::new());
    let templates = Arc::new(MemoryTemplates::new());
    let quota = Arc::new(MemoryQuota::new());
    let state = AppState {
        // The deployment's defaults: tests of the limits set their own.
        limits: Arc::new(chainrun_core::quota::TenantLimits::default()),
        quota: quota.clone(),
        idempotency: Arc::new(MemoryIdempotency::new()),
        workflows: workflows.clone(),
        templates: templates.clone(),
        store: store.clone(),
        progress: progress.clone(),
        history: store.clone(),
        analytics: analytics.clone(),
        dispatcher: dispatcher.clone(),
        models: Arc::new(ModelRegistry::builtin()),
        auth,
        daily: daily.clone(),
        daily_caps: Arc::new(caps),
    };
    Ports { store, progress, dispatcher, analytics, daily, workflows, templates, quota, state }
}

/// Ports whose tokens are signed locally with [`SECRET`], nobody capped.
pub fn local_ports() -> Ports {
    ports(Authenticator::local(SECRET.as_bytes()), DailyCaps::parse(None, None).unwrap())
}

/// A token for `sub` in `groups`, signed with `secret`, expiring `exp_offset` seconds from now.
pub fn token_signed(secret: &str, sub: &str, groups: &[&str], exp_offset: i64) -> String {
    let claims =
        json!({ "sub": sub, "groups": groups, "iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "exp": chrono::Utc::now().timestamp() + exp_offset });
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}
