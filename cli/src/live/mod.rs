//! Following a run live: its events read with the cursor (`GET /runs/{id}/events?after=`),
//! each shown as it arrives, until the run ends or waits for a person. A run whose maps
//! wait for their batch jobs waits for no one: it is followed on.
//!
//! Polling backs off from 300 ms to 2 s while nothing happens and drops back as soon as an
//! event arrives; a full page is followed at once by the next.

mod screen;
mod state;

pub use state::{Asked, batch_share};

use state::Standing;

use crate::api::Api;
use crate::exit::CliError;
use crate::term::Ui;
use crate::wire::{BatchJob, EventsPage, is_terminal};
use screen::Screen;
use state::Follow;
use std::time::Duration;

const PAGE: usize = 100;
const FIRST_WAIT: Duration = Duration::from_millis(300);
const LONGEST_WAIT: Duration = Duration::from_secs(2);
/// …and while the run waits for a batch job, which takes minutes to hours: the run's next
/// event comes at its next poll at the earliest.
const LONGEST_WAIT_PARKED: Duration = Duration::from_secs(5);
/// Empty reads of a run whose record says it ended before the CLI stops waiting for the
/// event that says so.
const ENDED_QUIET_READS: u32 = 3;

pub struct Follower<'a> {
    api: &'a Api,
    run_id: String,
    state: Follow,
    screen: Screen,
    after: u64,
}

impl<'a> Follower<'a> {
    /// `step_ids`: the run's steps (to line up their columns).
    pub fn new(api: &'a Api, ui: Ui, run_id: &str, step_ids: &[String]) -> Self {
        Self { api, run_id: run_id.to_owned(), state: Follow::new(step_ids.iter().map(String::as_str)), screen: Screen::new(ui), after: 0 }
    }

    /// Reads the events so far without showing them: what follows is only what happens
    /// next (after a resume, a retry or an override).
    pub fn skip_to_now(&mut self) -> Result<(), CliError> {
        loop {
            let page = self.page()?;
            for event in &page.events {
                self.state.apply(event);
            }
            self.after = self.after.max(page.last_seq);
            if page.events.len() < PAGE {
                self.state.forget_standing();
                return Ok(());
            }
        }
    }

    /// Shows every event from the cursor on until the run ends or waits for a person.
    pub fn follow(&mut self) -> Result<(), CliError> {
        let from = self.after;
        let mut wait = FIRST_WAIT;
        let mut quiet_ended = 0;
        loop {
            let page = self.page()?;
            let got = page.events.len();
            for event in &page.events {
                for note in self.state.apply(event) {
                    self.screen.show(note);
                }
            }
            self.after = self.after.max(page.last_seq);
            let drained = got < PAGE;
            if stops(self.state.standing(), &page.status, drained) {
                break;
            }
            // The record says the run ended, but its last event was not read (a reader
            // that joined late, an event log that lags): give it a few reads, then stop.
            if is_terminal(&page.status) && got == 0 && self.after > from {
                quiet_ended += 1;
                if quiet_ended >= ENDED_QUIET_READS {
                    break;
                }
            }
            if drained {
                std::thread::sleep(wait);
                wait = next_wait(wait, got > 0, self.state.standing());
            }
        }
        self.screen.clear();
        Ok(())
    }

    /// The maps' batch jobs, as their last `BATCH_JOB` events said them.
    pub fn batches(&self) -> Vec<(String, BatchJob)> {
        self.state.batches().map(|(step, job)| (step.clone(), job.clone())).collect()
    }

    /// The steps that wait for a person now, with what they ask.
    pub fn asked(&self) -> Vec<Asked> {
        self.state.asked().cloned().collect()
    }

    pub fn line(&mut self, line: String) {
        self.screen.line(line);
    }

    fn page(&self) -> Result<EventsPage, CliError> {
        let path = self.api.scoped(&format!("/runs/{}/events", self.run_id));
        self.api.get_as(&path, &[("after", self.after.to_string()), ("limit", PAGE.to_string())])
    }
}

/// Whether following stops: the run ended, or waits for a person and every event up to
/// the wait is shown. A run parked on its batch jobs (`Standing::Parked`) is followed on.
fn stops(standing: Standing, status: &str, drained: bool) -> bool {
    match standing {
        Standing::Ended => is_terminal(status),
        Standing::Waiting => drained && status == "AWAITING_INPUT",
        Standing::Going | Standing::Parked => false,
    }
}

/// How long to wait before the next read: short after news, longer the longer it is quiet.
fn next_wait(wait: Duration, news: bool, standing: Standing) -> Duration {
    let longest = if standing == Standing::Parked { LONGEST_WAIT_PARKED } else { LONGEST_WAIT };
    if news { FIRST_WAIT } else { (wait * 3 / 2).min(longest) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_stops_when_the_run_ends_or_waits_for_a_person_but_not_for_a_batch_job() {
        assert!(stops(Standing::Ended, "COMPLETED", true));
        assert!(!stops(Standing::Ended, "RUNNING", true), "a new revision may have started");
        assert!(stops(Standing::Waiting, "AWAITING_INPUT", true));
        assert!(!stops(Standing::Waiting, "AWAITING_INPUT", false), "events up to the wait are shown first");
        assert!(!stops(Standing::Parked, "AWAITING_INPUT", true), "a runner takes it back by itself");
        assert!(!stops(Standing::Going, "RUNNING", true));
    }

    #[test]
    fn a_quiet_run_is_read_less_often_and_a_parked_one_less_still() {
        let mut wait = FIRST_WAIT;
        for _ in 0..20 {
            wait = next_wait(wait, false, Standing::Going);
        }
        assert_eq!(wait, LONGEST_WAIT);
        for _ in 0..20 {
            wait = next_wait(wait, false, Standing::Parked);
        }
        assert_eq!(wait, LONGEST_WAIT_PARKED);
        assert_eq!(next_wait(wait, true, Standing::Parked), FIRST_WAIT, "news: read again soon");
    }
}
