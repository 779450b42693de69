//! Stored workflows: a definition kept under an id, in numbered, immutable versions.
//!
//! A stored workflow is a head ([`StoredWorkflow`]: owner, name, latest version, times)
//! and one [`WorkflowVersion`] per write. A version is never changed once written, so a
//! run can name the version it ran (a [`Pinned`] on its record) and that name means the
//! same definition forever; the run keeps its own snapshot of it anyway, so deleting the
//! workflow changes no run.
//!
//! Writing a new version is optimistic: the writer says which version it read, and the
//! write is refused if another landed since (a lost update), rather than silently
//! overwriting it.
//!
//! Access: the head holds the workflow's visibility and shares ([`crate::access::Access`]):
//! they describe the workflow, not one version, and the runs of a workflow inherit them.

use crate::ids::{UserId, WorkflowId, WorkflowName};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The highest version number a workflow may reach. Version sort keys are zero-padded to
/// six digits (`V#000001`) so they read back in order.
pub const MAX_VERSION: u32 = 999_999;

/// A stored workflow's head: what is true of the workflow as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWorkflow {
    pub id: WorkflowId,
    /// Who created it: holds every role on it and its runs.
    pub owner: UserId,
    /// Who else may see, run, edit or control it.
    pub access: crate::access::Access,
    /// The latest version's name.
    pub name: WorkflowName,
    /// The latest version's number (1 for a new workflow).
    pub version: u32,
    pub created_at: DateTime<Utc>,
    /// When its latest version was written.
    pub updated_at: DateTime<Utc>,
}

impl StoredWorkflow {
    /// A new workflow owned by `owner`, at version 1, written at `at`.
    pub fn new(owner: UserId, name: WorkflowName, at: DateTime<Utc>) -> Self {
        Self { id: WorkflowId::new(), owner, access: crate::access::Access::private(), name, version: 1, created_at: at, updated_at: at }
    }
}

impl StoredWorkflow {
    /// Every principal whose list of workflows shows this one: its owner, the admin group,
    /// and whoever its access lets see it (the `AUTHED` and `PUBLIC` feeds stand for
    /// everyone signed in and everyone).
    pub fn grantees(&self) -> Vec<crate::ids::Principal> {
        let mut grantees = vec![crate::ids::Principal::User(self.owner.to_string())];
        for p in self.access.feeds() {
            if !grantees.contains(&p) {
                grantees.push(p);
            }
        }
        grantees
    }
}

/// One immutable version of a stored workflow's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowVersion {
    pub version: u32,
    /// The definition exactly as validated when it was written.
    pub definition: Value,
    pub written_by: UserId,
    pub written_at: DateTime<Utc>,
}

/// What a run started from a stored workflow remembers of it: which workflow, and the
/// version it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Pinned {
    pub workflow_id: WorkflowId,
    pub version: u32,
}

/// The sort key of a version's item: zero-padded so versions sort by number.
pub fn version_key(version: u32) -> String {
    format!("V#{version:06}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_sort_like_their_numbers() {
        let keys: Vec<String> = [1, 2, 10, 99, 100_000, MAX_VERSION].into_iter().map(version_key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(version_key(7), "V#000007");
    }
}
