//! A run's calls checked against its caller's daily spend cap (see [`crate::spend`]).
//!
//! Each call holds its worst-case cost on the caller's counter for the UTC day before it
//! is made, and the hold is replaced by what it was charged after. The holds a dead runner
//! left are settled by whoever next takes its run on ([`resolve_holds`]), by what the
//! run's checkpoints say of each call: the decision is [`Reached::settlement`], pure and
//! apart from the writes.

use crate::budget;
use crate::ids::{RunId, StepId};
use crate::money::Usd;
use crate::ports::{DailySpend, StoreError};
use crate::run::{ItemRecord, StepRecord};
use crate::spend::{DailyCapExceeded, DayHold, Settlement};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};

/// One owner's daily spend cap, as a run checks its calls against it.
pub struct OwnerCap {
    pub spend: Arc<dyn DailySpend>,
    pub owner: String,
    pub cap: Usd,
    pub run: RunId,
    /// The lease holder: tells this runner's holds from those of runners before it.
    pub holder: String,
}

/// Which call a hold is for.
pub struct CallName<'a> {
    pub step: &'a StepId,
    pub item: Option<usize>,
    pub attempt: u32,
}

impl OwnerCap {
    /// Holds the call's worst-case cost on today's counter if it fits under the cap.
    pub async fn reserve(&self, call: CallName<'_>, attempted: budget::Amount) -> Result<Result<DayHold, DailyCapExceeded>, StoreError> {
        let hold = DayHold {
            run: self.run.clone(),
            step: call.step.clone(),
            item: call.item,
            attempt: call.attempt,
            holder: self.holder.clone(),
            owner: self.owner.clone(),
            day: Utc::now().date_naive(),
            amount: attempted.cost,
        };
        Ok(match self.spend.reserve(&hold, self.cap).await? {
            Ok(()) => Ok(hold),
            Err(counter) => {
                Err(DailyCapExceeded { owner: self.owner.clone(), day: hold.day, cap: self.cap, committed: counter.committed, attempted })
            }
        })
    }

    /// Replaces the hold by `settlement`.
    pub async fn settle(&self, hold: DayHold, settlement: Settlement) {
        if let Err(e) = self.spend.settle(&hold, settlement).await {
            // The hold stays recorded: the next runner to take the run on settles it (see
            // [`resolve_holds`]), and until then the cap errs towards refusing.
            warn!(error = %e, owner = %self.owner, step_id = %hold.step, item = hold.item, settlement = settlement.name(), "could not settle a daily spend hold");
        }
    }
}

/// How far a step (or map item) got, by its latest checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub settled: bool,
    /// The attempt of the last call the checkpoint was written for (a `RUNNING` one is
    /// written before each call).
    pub attempts: u32,
    /// Whether a `RUNNING` checkpoint holds a call in flight.
    pub in_flight: bool,
    /// A map whose batch job is out: its hold stays until the job's answers are read.
    pub batch_out: bool,
}

/// What a run's checkpoints say of each step and map item: what a dead runner's holds are
/// settled by.
#[derive(Debug, Default)]
pub struct Reached {
    seen: HashMap<(StepId, Option<usize>), Seen>,
}

impl Reached {
    pub fn step(&mut self, record: &StepRecord) {
        let batch_out =
            record.status == crate::run::StepStatus::Waiting && crate::run::BatchWait::of(record.detail.as_ref()).is_some_and(|wait| !wait.read);
        let seen = Seen { settled: record.status.is_settled(), attempts: record.attempts, in_flight: record.in_flight.is_some(), batch_out };
        self.seen.insert((record.step_id.clone(), None), seen);
    }

    pub fn item(&mut self, step: &StepId, record: &ItemRecord) {
        let seen = Seen { settled: record.status.is_settled(), attempts: record.attempts, in_flight: record.in_flight.is_some(), batch_out: false };
        self.seen.insert((step.clone(), Some(record.index)), seen);
    }

    /// The run ends without reading its batch jobs' answers: their holds are settled as any
    /// other call's in flight (lost).
    pub fn ending(&mut self) {
        self.seen.values_mut().for_each(|seen| seen.batch_out = false);
    }

    /// How a hold left by an earlier runner is settled. The checkpoint before each call is
    /// written after its hold, so a hold whose call the checkpoints show as reached (in
    /// flight at that attempt, past it, or settled) belongs to a call that may have been
    /// made and billed: it stays counted at its worst case ([`Settlement::Lost`]; the exact
    /// charge of a call whose settlement failed is not known per call either). A hold the
    /// checkpoints do not reach was taken by a runner that died before writing the
    /// checkpoint: its call was never made, and it is released.
    ///
    /// The checkpoints do not name their runner, and `attempt` restarts with each runner:
    /// a hold taken by a runner that died before its checkpoint, on a step whose earlier
    /// runner died with the same attempt in flight, is counted lost too. That errs towards
    /// refusing, as the cap does.
    ///
    /// `None`: the hold is a map's batch job still out, kept for the runner that reads the
    /// job's answers to settle at what they were charged.
    pub fn settlement(&self, hold: &DayHold) -> Option<Settlement> {
        if hold.item.is_none() && self.seen.get(&(hold.step.clone(), None)).is_some_and(|s| s.batch_out) {
            return None;
        }
        let step_settled = self.seen.get(&(hold.step.clone(), None)).is_some_and(|s| s.settled);
        let reached = match self.seen.get(&(hold.step.clone(), hold.item)) {
            Some(seen) => seen.settled || seen.attempts > hold.attempt || (seen.attempts == hold.attempt && seen.in_flight),
            // A map item with no checkpoint of its own: reached only if its map settled.
            None => hold.item.is_some() && step_settled,
        };
        Some(if reached { Settlement::Lost } else { Settlement::Charged(Usd::ZERO) })
    }
}

/// Settles every hold `run` still has, by `reached`. Called before this invocation makes
/// any call of its own, so every hold found belongs to a runner before it (dead, or a
/// zombie whose late settlement will then find its hold gone). A store error stops here,
/// retryable or not as the store says, like any other at the start of a run.
pub async fn resolve_holds(spend: &dyn DailySpend, run: &RunId, reached: &Reached) -> Result<usize, StoreError> {
    let holds = spend.holds(run).await?;
    for hold in &holds {
        let Some(settlement) = reached.settlement(hold) else { continue };
        spend.settle(hold, settlement).await?;
        info!(
            run_id = %run,
            step_id = %hold.step,
            item = hold.item,
            attempt = hold.attempt,
            holder = %hold.holder,
            owner = %hold.owner,
            day = %hold.day,
            amount_pico = hold.amount.pico(),
            outcome = settlement.name(),
            "settled a daily spend hold a dead runner left"
        );
    }
    Ok(holds.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{InFlight, StepStatus};
    use chrono::NaiveDate;

    fn hold(item: Option<usize>, attempt: u32) -> DayHold {
        DayHold {
            run: RunId::new(),
            step: StepId::parse("s").unwrap(),
            item,
            attempt,
            holder: "inv-1/x".into(),
            owner: "alice".into(),
            day: NaiveDate::from_ymd_opt(2026, 1, 2).unwrap(),
            amount: Usd::from_pico(100),
        }
    }

    fn running(attempts: u32, in_flight: bool) -> StepRecord {
        let mut record = StepRecord::settled(StepId::parse("s").unwrap(), StepStatus::Running, None, Utc::now());
        record.attempts = attempts;
        record.in_flight = in_flight.then_some(InFlight { tokens: 1, cost: Usd::from_pico(100) });
        record
    }

    const RELEASED: Settlement = Settlement::Charged(Usd::ZERO);

    #[test]
    fn a_call_the_checkpoint_shows_in_flight_is_lost() {
        let mut reached = Reached::default();
        reached.step(&running(2, true));
        assert_eq!(reached.settlement(&hold(None, 2)), Some(Settlement::Lost));
        assert_eq!(reached.settlement(&hold(None, 1)), Some(Settlement::Lost), "an earlier attempt returned: its settlement was lost");
    }

    #[test]
    fn a_call_the_checkpoint_does_not_reach_was_never_made_and_is_released() {
        let mut reached = Reached::default();
        assert_eq!(reached.settlement(&hold(None, 1)), Some(RELEASED), "no checkpoint at all");
        reached.step(&running(1, true));
        assert_eq!(reached.settlement(&hold(None, 2)), Some(RELEASED), "died between the hold and its checkpoint");
    }

    #[test]
    fn map_items_are_judged_by_their_own_checkpoint_or_their_maps() {
        let step = StepId::parse("s").unwrap();
        let mut reached = Reached::default();
        reached.step(&running(1, false));
        let item = |index, status, attempts, in_flight: bool| ItemRecord {
            index,
            status,
            attempts,
            output: None,
            text: None,
            usage: Default::default(),
            cost: Usd::ZERO,
            calls: 0,
            error: None,
            lost: Default::default(),
            in_flight: in_flight.then_some(InFlight { tokens: 1, cost: Usd::from_pico(100) }),
        };
        reached.item(&step, &item(0, StepStatus::Running, 1, true));
        reached.item(&step, &item(1, StepStatus::Completed, 1, false));
        assert_eq!(reached.settlement(&hold(Some(0), 1)), Some(Settlement::Lost));
        assert_eq!(reached.settlement(&hold(Some(1), 1)), Some(Settlement::Lost));
        assert_eq!(reached.settlement(&hold(Some(2), 1)), Some(RELEASED), "no checkpoint for the item, and its map runs");
        let mut settled = StepRecord::settled(step.clone(), StepStatus::Completed, None, Utc::now());
        settled.attempts = 1;
        reached.step(&settled);
        assert_eq!(reached.settlement(&hold(Some(2), 1)), Some(Settlement::Lost), "its map settled");
    }

    #[test]
    fn a_batch_job_out_keeps_its_hold_until_its_answers_are_read_or_the_run_ends() {
        let mut waiting = StepRecord::settled(StepId::parse("s").unwrap(), StepStatus::Waiting, None, Utc::now());
        waiting.attempts = 1;
        waiting.in_flight = Some(InFlight { tokens: 1, cost: Usd::from_pico(100) });
        let wait = crate::run::BatchWait {
            token: "t".into(),
            job: Some("j".into()),
            items: vec![0, 1],
            status: "InProgress".into(),
            message: None,
            polls: 1,
            read: false,
            answered: 0,
            online: 0,
        };
        waiting.detail = Some(wait.to_detail());
        let mut reached = Reached::default();
        reached.step(&waiting);
        assert_eq!(reached.settlement(&hold(None, 1)), None, "the runner that reads the job settles it");
        reached.ending();
        assert_eq!(reached.settlement(&hold(None, 1)), Some(Settlement::Lost), "a run ending without the answers writes it off");
        waiting.detail = Some(crate::run::BatchWait { read: true, ..wait }.to_detail());
        let mut reached = Reached::default();
        reached.step(&waiting);
        assert_eq!(reached.settlement(&hold(None, 1)), Some(Settlement::Lost), "a read job's hold was settled: one left is lost");
    }
}
