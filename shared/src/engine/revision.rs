//! The start of a revision (see [`crate::revision`]), announced by the first runner that
//! runs it: `REVISION_STARTED`, and `STEP_OVERRIDDEN` when a step's output was set by hand
//! (the API wrote that step's checkpoint when it started the revision).

use super::EngineError;
use super::journal::Journal;
use crate::limits::EVENT_OUTPUT_BYTES;
use crate::output::json_len;
use crate::revision::RevisionKind;
use crate::run::{RunRecord, StepRecord};
use crate::wire::events::{EventBody, RevisionStarted, StepOverridden};
use crate::wire::{DocumentRef, TotalsView};
use tracing::info;

/// Announces the revision `run` runs. `records` are its checkpoints by step index.
pub(super) async fn announce(journal: &Journal, run: &RunRecord, records: &[Option<StepRecord>]) -> Result<(), EngineError> {
    let Some(revision) = run.revisions.last() else { return Ok(()) };
    let body = RevisionStarted {
        revision: revision.revision,
        kind: revision.kind,
        step: revision.step.clone(),
        by: revision.by.clone(),
        comment: revision.comment.clone(),
        rerun: revision.rerun.clone(),
        previous_status: revision.previous.status,
        previous_totals: TotalsView::from(&revision.previous.totals),
    };
    journal.emit(EventBody::RevisionStarted(body), None, None).await?;
    info!(revision = revision.revision, kind = ?revision.kind, step_id = %revision.step, rerun = revision.rerun.len(), "revision started");
    if revision.kind != RevisionKind::Override {
        return Ok(());
    }
    let set = records.iter().flatten().find(|r| r.step_id == revision.step && r.revision == revision.revision);
    let (output, output_ref) = match set.and_then(|r| r.output.as_ref()) {
        Some(output) if json_len(output) > EVENT_OUTPUT_BYTES => (None, Some(DocumentRef::step(&run.id, &revision.step, "output", json_len(output)))),
        output => (output.cloned(), None),
    };
    let replaces_revision = replaced(run, &revision.step);
    let body = StepOverridden { by: revision.by.clone(), comment: revision.comment.clone(), output, output_ref, replaces_revision };
    journal.emit(EventBody::StepOverridden(body), Some(&revision.step), None).await?;
    Ok(())
}

/// The revision whose record of `step` the last revision's override replaces.
fn replaced(run: &RunRecord, step: &crate::ids::StepId) -> u32 {
    run.revision_of(step, run.revision.saturating_sub(1))
}
