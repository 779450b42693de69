//! What the stored-workflow routes answer: a workflow as lists show it, and one version of
//! it whole.

use crate::ids::{UserId, WorkflowId, WorkflowName};
use crate::stored::{StoredWorkflow, WorkflowVersion};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

/// A stored workflow in `GET /workflows`: its head, no definition.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WorkflowSummaryView<'a> {
    pub id: &'a WorkflowId,
    pub name: &'a WorkflowName,
    /// The latest version.
    pub version: u32,
    pub owner: &'a UserId,
    /// Who else may see, run, edit or control it: `visibility` and `shares`.
    #[serde(flatten)]
    pub access: &'a crate::access::Access,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub links: WorkflowLinks,
}

/// Where to read, run and estimate a stored workflow.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WorkflowLinks {
    #[serde(rename = "self")]
    pub this: String,
    pub runs: String,
    pub estimate: String,
}

impl WorkflowLinks {
    pub fn of(id: &WorkflowId) -> Self {
        Self { this: format!("/workflows/{id}"), runs: format!("/workflows/{id}/runs"), estimate: format!("/workflows/{id}/estimate") }
    }
}

impl<'a> From<&'a StoredWorkflow> for WorkflowSummaryView<'a> {
    fn from(head: &'a StoredWorkflow) -> Self {
        Self {
            id: &head.id,
            name: &head.name,
            version: head.version,
            owner: &head.owner,
            access: &head.access,
            created_at: head.created_at,
            updated_at: head.updated_at,
            links: WorkflowLinks::of(&head.id),
        }
    }
}

/// One version of a stored workflow, whole (`GET /workflows/{id}`, and what a write answers).
#[derive(Debug, Serialize, JsonSchema)]
pub struct WorkflowView<'a> {
    pub id: &'a WorkflowId,
    /// The name of the version shown.
    pub name: Option<&'a str>,
    /// The version shown.
    pub version: u32,
    pub latest_version: u32,
    pub owner: &'a UserId,
    #[serde(flatten)]
    pub access: &'a crate::access::Access,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Who wrote the version shown, and when.
    pub written_by: &'a UserId,
    pub written_at: DateTime<Utc>,
    #[schemars(with = "crate::workflow::WorkflowDef")]
    pub workflow: &'a Value,
    pub links: WorkflowLinks,
}

impl<'a> WorkflowView<'a> {
    pub fn new(head: &'a StoredWorkflow, version: &'a WorkflowVersion) -> Self {
        Self {
            id: &head.id,
            name: version.definition.get("name").and_then(Value::as_str),
            version: version.version,
            latest_version: head.version,
            owner: &head.owner,
            access: &head.access,
            created_at: head.created_at,
            updated_at: head.updated_at,
            written_by: &version.written_by,
            written_at: version.written_at,
            workflow: &version.definition,
            links: WorkflowLinks::of(&head.id),
        }
    }
}
