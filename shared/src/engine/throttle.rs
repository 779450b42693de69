//! Fair limits per tenant as the runner meets them (see [`crate::quota`]): each model call's
//! tokens reserved in its tenant's allowance for the model's current minute, waiting for
//! the next minute when it does not fit; and a run's concurrency slot given back when it
//! ends.
//!
//! **Waiting.** A call that does not fit sleeps until the minute ends, plus a random jitter
//! of up to [`JITTER_MS`] so the tenant's waiters do not all write at the same instant, and
//! tries again. It never fails for lack of room (only a call larger than a whole minute's
//! allowance does: it could never fit). If the invocation cannot wait that long (the wake
//! would pass its deadline margin), the call is handed over: it is not made, its step (or
//! map item) keeps what it was charged in an unsettled checkpoint, the run suspends, and the
//! next invocation tries it again from its first attempt — the way a run outlives one
//! invocation when time runs out.
//!
//! **Fairness.** Each tenant has its own counter per model, so one tenant's flood fills
//! only its own minute and never delays another tenant's calls. Within a tenant, waiters
//! are not queued: each tries again when the minute turns, in jitter order, and the first
//! to write is admitted. A large call can therefore wait longer than small ones that keep
//! filling the minute first (every minute gives it another chance, none a promise); a
//! tenant that needs its calls in order keeps `max_tokens` small next to its allowance.

use super::EngineError;
use super::step::StepContext;
use crate::ids::{ModelId, Principal, RunId, StepId};
use crate::ports::TenantQuota;
use crate::quota::{NeverFits, TenantLimits, TokenHold, gate};
use crate::run::RunRecord;
use crate::telemetry::Seen;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// The most a waiter waits past the minute's end before it tries again.
pub const JITTER_MS: u64 = 1_000;

/// The counters behind a deployment's tenant limits, and the limits.
#[derive(Clone)]
pub struct Tenancy {
    pub quota: Arc<dyn TenantQuota>,
    pub limits: Arc<TenantLimits>,
}

impl Tenancy {
    /// Gives back the concurrency slot `run` held, once it has ended. A failure is logged,
    /// not returned: the run's end is already recorded, and the API reclaims the slot of an
    /// ended run the next time it finds its tenant's slots full.
    pub async fn release_slot(&self, run: &RunRecord) {
        if self.limits.concurrent_runs.is_none() {
            return;
        }
        let tenant = run.caller.tenant();
        match gate::vacate_slot(self.quota.as_ref(), &self.limits, &tenant, &run.id).await {
            Ok(true) => info!(run_id = %run.id, tenant = %tenant.key(), status = ?run.status, "concurrency slot given back"),
            Ok(false) => {}
            Err(e) => warn!(run_id = %run.id, tenant = %tenant.key(), error = %e, "could not give back the concurrency slot; the API reclaims it"),
        }
    }
}

/// A run's token throttle: its tenant and the clock windows are read from.
pub struct TokenThrottle {
    pub tenancy: Tenancy,
    pub tenant: Principal,
    pub run: RunId,
    pub clock: Arc<dyn crate::durability::Clock>,
}

/// What throttling decided for one call.
pub enum Throttled {
    /// Reserved (`None`: no allowance applies to the model).
    Admitted(Option<TokenHold>),
    /// The next window comes after this invocation's deadline margin: hand the call over.
    HandOver,
    /// Larger than a whole minute's allowance.
    Never(NeverFits),
}

impl StepContext {
    /// Reserves `tokens` for a call to `model` in its tenant's allowance, waiting for later
    /// minutes while this invocation has time (see the module docs).
    pub(super) async fn throttle(&self, step: &StepId, model: &ModelId, tokens: u64) -> Result<Throttled, EngineError> {
        let Some(throttle) = &self.throttle else { return Ok(Throttled::Admitted(None)) };
        let Some(allowance) = throttle.tenancy.limits.tokens_for(model.as_str()) else { return Ok(Throttled::Admitted(None)) };
        if tokens > allowance {
            return Ok(Throttled::Never(NeverFits { tenant: throttle.tenant.key(), model: model.to_string(), tokens, allowance }));
        }
        let mut waited = Duration::ZERO;
        loop {
            let now = throttle.clock.now();
            let window = match gate::reserve_tokens(throttle.tenancy.quota.as_ref(), &throttle.tenant, model, tokens, allowance, now).await? {
                Ok(hold) => {
                    if !waited.is_zero() {
                        let waited_ms = waited.as_millis() as u64;
                        info!(tenant = %throttle.tenant.key(), model = %model, tokens, waited_ms, "tokens reserved after waiting");
                        self.journal.observe(Seen::ThrottleWaited { step, model, waited_ms });
                    }
                    return Ok(Throttled::Admitted(Some(hold)));
                }
                Err(window) => window,
            };
            let jitter = rand::rng().random_range(0..=JITTER_MS);
            let wait = (window.end() - now).to_std().unwrap_or_default() + Duration::from_millis(jitter);
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(Instant::now()).saturating_sub(self.config.deadline_margin);
                if wait > left {
                    info!(tenant = %throttle.tenant.key(), model = %model, tokens, wait_ms = wait.as_millis() as u64, "token allowance used up and no time to wait: handing the call over");
                    return Ok(Throttled::HandOver);
                }
            }
            info!(tenant = %throttle.tenant.key(), model = %model, tokens, allowance, wait_ms = wait.as_millis() as u64, "token allowance for this minute used up: waiting for the next");
            tokio::time::sleep(wait).await;
            waited += wait;
        }
    }

    /// Gives back what a call did not use of its token reservation.
    pub(super) async fn settle_tokens(&self, hold: Option<TokenHold>, used: u64) {
        let (Some(throttle), Some(hold)) = (&self.throttle, hold) else { return };
        if let Err(e) = gate::settle_tokens(throttle.tenancy.quota.as_ref(), &hold, used, throttle.clock.now()).await {
            // The unused part stays counted until the minute ends: the allowance errs towards refusing.
            warn!(run_id = %throttle.run, error = %e, reserved = hold.reserved, used, "could not give back unused tokens");
        }
    }
}
