//! chainrun's recovery functions: nothing depends on a lucky redelivery.
//!
//! - [`Sweeper`] runs on a schedule (every minute in AWS) and hands every *due* run to the
//!   runner again: a run whose runner stopped renewing its lease (a crash, a timeout), and
//!   a run still queued (or released) after the queued grace (a lost dispatch). It reads
//!   them from the store's index of unfinished runs, never by scanning all runs. The runner
//!   decides the rest: it takes the run over, or fails it past the takeover bound.
//! - [`DeadLetters`] consumes the runner's on-failure destination: an event Lambda gave up
//!   on (retries or event age exhausted). A retryable failure is handed to the runner again
//!   (a bounded number of times); anything else ends the run `RUN_FAILED` with
//!   `DELIVERY_FAILED` and the reason.

mod dead_letter;
mod sweeper;

pub use dead_letter::{DeadLetters, DestinationRecord};
pub use sweeper::{SweepError, Sweeper, Swept};
