//! A model step's `RUNNING` checkpoint: how its spend survives a crash.
//!
//! Before every model call, the step's `RUNNING` checkpoint holds the worst case reserved
//! for that call (`in_flight`) beside what the step has been charged so far. For the first
//! call it goes with the step's `STEP_STARTED` event, in one write; each retry writes it
//! once more. A runner that takes the run over reads these checkpoints: their exact
//! charges and their calls in flight (at the worst case, as [`crate::run::Lost`]) count
//! against the budget, and the step's next checkpoints carry them on (see
//! [`crate::run::Carried`]), so a budget holds across any number of crashes.

use super::EngineError;
use super::journal::Journal;
use super::step::Work;
use crate::budget::Amount;
use crate::ids::{ModelId, StepId};
use crate::run::{Carried, InFlight, ItemRecord, StepRecord, StepStatus};
use crate::wire::events::{EventBody, StepStarted};
use chrono::{DateTime, Utc};

pub struct Running {
    step_id: StepId,
    model: Option<ModelId>,
    started_at: DateTime<Utc>,
    carried: Carried,
    announced: bool,
}

impl Running {
    pub fn new(step_id: StepId, model: Option<ModelId>, started_at: DateTime<Utc>, carried: Option<Carried>) -> Self {
        Self { step_id, model, started_at, carried: carried.unwrap_or_default(), announced: false }
    }

    /// What runners that died while this step ran spent on it.
    pub fn carried(&self) -> &Carried {
        &self.carried
    }

    pub fn announced(&self) -> bool {
        self.announced
    }

    /// The checkpoint: `work`'s charges so far plus what is carried, and the call in flight.
    fn checkpoint(&self, work: Option<&Work>, in_flight: Option<Amount>) -> StepRecord {
        let mut record = StepRecord::settled(self.step_id.clone(), StepStatus::Running, None, self.started_at);
        record.finished_at = None;
        record.started_at = Some(self.started_at);
        record.model = self.model.clone();
        record.attempts = work.map_or(1, |w| w.attempts.max(1));
        record.usage = self.carried.usage;
        record.cost = self.carried.cost;
        record.calls = self.carried.calls;
        record.lost = self.carried.lost;
        if let Some(work) = work {
            record.usage = record.usage.plus(&work.usage);
            record.cost = record.cost.saturating_add(work.cost);
            record.calls += work.calls;
        }
        record.in_flight = in_flight.map(|a| InFlight { tokens: a.tokens, cost: a.cost });
        record
    }

    /// A map's checkpoint while its batch job is out (`WAITING`, the job's reservation in
    /// flight) or once its answers were read (`RUNNING`): see [`super::batch`].
    pub fn batch_checkpoint(&self, wait: &crate::run::BatchWait, in_flight: Option<Amount>) -> StepRecord {
        let mut record = self.checkpoint(None, in_flight);
        record.status = if wait.read { StepStatus::Running } else { StepStatus::Waiting };
        record.detail = Some(wait.to_detail());
        record
    }

    /// Sends `STEP_STARTED`, once. A model step's `RUNNING` checkpoint goes with it (no
    /// extra write), holding `in_flight` when a call is about to be made.
    pub async fn announce(&mut self, journal: &Journal, in_flight: Option<Amount>) -> Result<(), EngineError> {
        if self.announced {
            return Ok(());
        }
        self.announced = true;
        let body = EventBody::StepStarted(StepStarted { model: self.model.clone() });
        let checkpoint = self.model.is_some().then(|| self.checkpoint(None, in_flight));
        let id = self.step_id.clone();
        journal.emit_with(body, Some(&self.step_id), Some(1), checkpoint.as_ref(), move |s| s.current_step = Some(id)).await?;
        Ok(())
    }

    /// Before a call other than the step's first: the checkpoint with what `work` was
    /// charged so far and this call's worst case.
    pub async fn hold(&self, journal: &Journal, work: &Work, in_flight: Amount) -> Result<(), EngineError> {
        journal.checkpoint(&self.checkpoint(Some(work), Some(in_flight))).await?;
        Ok(())
    }
}

/// Where a model call's reservation is written before the call is made.
pub enum Hold<'a> {
    /// The step's `RUNNING` checkpoint (the first call's goes with `STEP_STARTED`).
    Step(&'a mut Running),
    /// A map item's checkpoint, `carried` being what dead runners spent on the item.
    Item { step: &'a StepId, index: usize, carried: Carried },
}

impl Hold<'_> {
    pub async fn before_call(&mut self, journal: &Journal, work: &Work, worst: Amount) -> Result<(), EngineError> {
        match self {
            Hold::Step(running) if !running.announced() => running.announce(journal, Some(worst)).await,
            Hold::Step(running) => running.hold(journal, work, worst).await,
            Hold::Item { step, index, carried } => {
                let mut record = item_record(*index, work, carried);
                record.status = StepStatus::Running;
                record.in_flight = Some(InFlight { tokens: worst.tokens, cost: worst.cost });
                journal.save_item(step, &record).await?;
                Ok(())
            }
        }
    }
}

/// A map item's checkpoint: `work` so far (its result once it is done) plus what dead
/// runners spent on it.
pub fn item_record(index: usize, work: &Work, carried: &Carried) -> ItemRecord {
    let (status, output, text, error) = match &work.output {
        Ok((text, value)) => (StepStatus::Completed, Some(value.clone()), Some(text.clone()), None),
        Err(e) => (StepStatus::Failed, None, None, Some(e.clone())),
    };
    ItemRecord {
        index,
        status,
        attempts: work.attempts,
        output,
        text,
        usage: work.usage.plus(&carried.usage),
        cost: work.cost.saturating_add(carried.cost),
        calls: work.calls + carried.calls,
        error,
        lost: carried.lost,
        in_flight: None,
    }
}
