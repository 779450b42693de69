//! Draws [`Note`]s. On a terminal: a spinner per running step (its message what the step
//! does now: retrying, the tail of its streamed text), a bar of items for a map, under the
//! lines printed so far. Else plain lines, one per note, with no escape codes; streamed
//! text and a map's progress as lines prefixed by its step.

use super::state::Note;
use crate::term::dim;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::time::Duration;

pub enum Screen {
    Plain,
    Live(Box<Spinners>),
    /// `--json`: nothing but the final document is printed.
    Silent,
}

pub struct Spinners {
    multi: MultiProgress,
    running: HashMap<String, ProgressBar>,
    style: ProgressStyle,
    /// A map's: a bar of its items.
    bar: ProgressStyle,
}

impl Screen {
    pub fn new(ui: crate::term::Ui) -> Self {
        match (ui.json, ui.live) {
            (true, _) => Screen::Silent,
            (false, true) => Screen::Live(Box::new(Spinners {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
                running: HashMap::new(),
                // The template is fixed and valid; the default style is only a fallback.
                style: ProgressStyle::with_template("{spinner:.cyan} {prefix} {elapsed:>4} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                bar: ProgressStyle::with_template("{spinner:.cyan} {prefix} {elapsed:>4} [{bar:24.cyan/blue}] {pos}/{len} items {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            })),
            (false, false) => Screen::Plain,
        }
    }

    pub fn show(&mut self, note: Note) {
        match self {
            Screen::Silent => {}
            Screen::Plain => match note {
                Note::Started { line, .. } | Note::Settled { line, .. } | Note::Run { line } => println!("{line}"),
                Note::Streamed { step, lines } => lines.iter().for_each(|l| println!("  {step} │ {l}")),
                Note::Items { step, done, failed, total } => println!("  {step} │ {}", items(done, failed, total)),
                // A plain screen cannot redraw: transient states are not worth a line.
                Note::Activity { .. } => {}
            },
            Screen::Live(s) => s.show(note),
        }
    }

    /// A line about the run, outside any step.
    pub fn line(&mut self, line: String) {
        self.show(Note::Run { line });
    }

    /// Removes every spinner still turning (the run ended or waits).
    pub fn clear(&mut self) {
        if let Screen::Live(s) = self {
            s.running.drain().for_each(|(_, bar)| bar.finish_and_clear());
        }
    }
}

impl Spinners {
    fn show(&mut self, note: Note) {
        match note {
            Note::Started { step, line } => {
                // The spinner stands where a plain line has its dot.
                let prefix = line.trim_start_matches("· ").to_owned();
                let bar = self.multi.add(ProgressBar::new_spinner().with_style(self.style.clone()).with_prefix(prefix));
                bar.enable_steady_tick(Duration::from_millis(100));
                if let Some(old) = self.running.insert(step, bar) {
                    old.finish_and_clear();
                }
            }
            Note::Activity { step, message } => {
                if let Some(bar) = self.running.get(&step) {
                    bar.set_message(dim(&message));
                }
            }
            Note::Streamed { step, lines } => lines.iter().for_each(|l| self.println(&format!("  {} {l}", dim(&format!("{step} │"))))),
            Note::Items { step, done, failed, total } => {
                if let Some(bar) = self.running.get(&step) {
                    if bar.length() != Some(total) {
                        bar.set_style(self.bar.clone());
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                    bar.set_message(if failed > 0 { format!("({failed} failed)") } else { String::new() });
                }
            }
            Note::Settled { step, line } => {
                if let Some(bar) = self.running.remove(&step) {
                    bar.finish_and_clear();
                }
                self.println(&line);
            }
            Note::Run { line } => self.println(&line),
        }
    }

    fn println(&self, line: &str) {
        // Printed above the spinners; should the terminal go away, there is no one to tell.
        let _ = self.multi.println(line);
    }
}

/// `items 4/10 (1 failed)`.
fn items(done: u64, failed: u64, total: u64) -> String {
    match failed {
        0 => format!("items {done}/{total}"),
        _ => format!("items {done}/{total} ({failed} failed)"),
    }
}
