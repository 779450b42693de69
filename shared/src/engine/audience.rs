//! Who a run's progress goes to, brought up to date when an invocation takes the run.
//!
//! A run of a stored workflow is seen by whoever the workflow's access lets see it now,
//! not when the run started (see [`crate::access::effective`]): a workflow shared later
//! shows its running runs to the new audience, and one made narrower stops showing them.
//! Each invocation reads the workflow's head when it takes the run, and again every
//! [`REFRESH`] while it runs; if the owners differ from the run's, it records the new ones
//! (fenced by the lease, like every write of the run) and removes the run's rows from the
//! feeds that lost it. The events after that go to the new owners.

use super::EngineError;
use super::journal::Journal;
use crate::access::{effective, run_owners};
use crate::graph::ValidatedGraph;
use crate::ids::Principal;
use crate::ports::{StoreError, WorkflowStore};
use crate::run::RunRecord;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often a running invocation reads its workflow's access again: a minute is one
/// `GetItem` per run per minute, and a change reaches the feeds within it.
pub const REFRESH: Duration = Duration::from_secs(60);

/// Who should see `run` now that its workflow's access is `head`'s; `None` for a run not
/// of a stored workflow, or of one deleted (its runs stay as they were).
async fn owners_now(workflows: &dyn WorkflowStore, run: &RunRecord, people: &[Principal]) -> Result<Option<Vec<Principal>>, StoreError> {
    let Some(pinned) = &run.pinned else { return Ok(None) };
    let Some(head) = workflows.head(&pinned.workflow_id).await? else { return Ok(None) };
    let access = if run.inherits_access { head.access.clone() } else { effective(run.access.as_ref(), Some(&head.access)) };
    Ok(Some(run_owners(&run.caller, run.workflow_owner.as_ref(), people, &access)))
}

/// Everyone `graph`'s person steps ask, for a run `run` started.
fn people(graph: &ValidatedGraph, run: &RunRecord) -> Vec<Principal> {
    graph.people(&run.caller).into_iter().flat_map(|(_, people)| people).collect()
}

/// Stops the refresh when the invocation's run loop ends.
pub(super) struct Refresh(tokio::task::JoinHandle<()>);

impl Drop for Refresh {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the workflow's access every [`REFRESH`] while the run runs, and re-targets the
/// journal's next events when its owners change. A failed read or write is logged and
/// tried again at the next tick: the run goes on either way, and a lost lease surfaces in
/// the run loop's own next write.
pub(super) fn refresh(workflows: Arc<dyn WorkflowStore>, journal: Arc<Journal>, run: &RunRecord, graph: &ValidatedGraph) -> Option<Refresh> {
    run.pinned.as_ref()?;
    let people = people(graph, run);
    let run = RunRecord { definition: serde_json::Value::Null, input: serde_json::Value::Null, output: None, ..run.clone() };
    Some(Refresh(tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let owners = match owners_now(workflows.as_ref(), &run, &people).await {
                Ok(Some(owners)) => owners,
                Ok(None) => continue,
                Err(e) => {
                    warn!(run_id = %run.id, error = %e, "could not read the workflow's access; trying again later");
                    continue;
                }
            };
            match journal.retarget(owners).await {
                Ok(gone) if gone.is_empty() => {}
                Ok(gone) => info!(run_id = %run.id, removed = gone.len(), "the run's audience follows its workflow's changed access"),
                Err(e) => warn!(run_id = %run.id, error = %e, "could not re-target the run's progress; trying again later"),
            }
        }
    })))
}

/// Brings the run's owners up to date with its workflow's access before the invocation's
/// first event (through the journal, as every later change goes).
pub(super) async fn bring_up_to_date(
    workflows: &dyn WorkflowStore,
    journal: &Journal,
    run: &mut RunRecord,
    graph: &ValidatedGraph,
) -> Result<(), EngineError> {
    let Some(owners) = owners_now(workflows, run, &people(graph, run)).await? else { return Ok(()) };
    let gone = journal.retarget(owners.clone()).await?;
    if owners != run.owners {
        info!(run_id = %run.id, owners = owners.len(), removed = gone.len(), "the run's audience follows its workflow's access");
        run.owners = owners;
    }
    Ok(())
}
