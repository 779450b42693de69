//! Following a run live: its events read with the cursor (`GET /runs/{id}/events?after=`),
//! each shown as it arrives, until the run ends or waits for a person.
//!
//! Polling backs off from 300 ms to 2 s while nothing happens and drops back as soon as an
//! event arrives; a full page is followed at once by the next.

mod screen;
mod state;

pub use state::Asked;

use state::Standing;

use crate::api::Api;
use crate::exit::CliError;
use crate::term::Ui;
use crate::wire::{EventsPage, is_terminal};
use screen::Screen;
use state::Follow;
use std::time::Duration;

const PAGE: usize = 100;
const FIRST_WAIT: Duration = Duration::from_millis(300);
const LONGEST_WAIT: Duration = Duration::from_secs(2);
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
            match self.state.standing() {
                Standing::Ended if is_terminal(&page.status) => break,
                Standing::Waiting if drained && page.status == "AWAITING_INPUT" => break,
                _ => {}
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
                wait = if got > 0 { FIRST_WAIT } else { (wait * 3 / 2).min(LONGEST_WAIT) };
            }
        }
        self.screen.clear();
        Ok(())
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
