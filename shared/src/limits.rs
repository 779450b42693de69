//! What a step's result may be, and what a model is told when its reply is refused.
//!
//! Pure rules shared by the engine, which enforces them, and the estimator, which counts
//! on them: an estimate is only a true upper bound because the engine refuses what these
//! rules exclude. Keeping them here lets `estimate` reason about replies without knowing
//! the engine exists.

/// A map fans out over at most this many items (each is a model call or more). Every item
/// is checkpointed on its own, and a map that does not fit one invocation continues in the
/// next, so the bound is about what one run should do, not about what fits.
pub const MAX_MAP_ITEMS: usize = 10_000;

/// A step's output (and the run's) is refused past this size. What does not fit one
/// DynamoDB item (400 KB) is stored in S3, so the bound is what one API response may carry:
/// Lambda answers at most 6 MB, and `GET /runs/{id}/steps/{step}/output` returns one output.
pub const MAX_OUTPUT_BYTES: usize = 4 * 1024 * 1024;

/// A document (an output or text) larger than this is not inlined in `GET /runs/{id}`;
/// the view links to it instead (see [`VIEW_DOCUMENT_BYTES`]).
pub const INLINE_DOCUMENT_BYTES: usize = 256 * 1024;

/// `GET /runs/{id}` inlines documents, in order, while they add up to at most this; the
/// rest are linked. With the input (at most 256 KiB) and the steps' fields the answer
/// stays under Lambda's 6 MB.
pub const VIEW_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// `RUN_COMPLETED` carries the run's output when it has at most this many bytes, and a
/// link to it otherwise: events are polled, often, and each is one DynamoDB item.
pub const EVENT_OUTPUT_BYTES: usize = 64 * 1024;

/// A reply longer than this many bytes per `max_tokens` token is refused. English runs
/// about 4 bytes a token and code about 3; a reply averaging 32 over its whole length is a
/// degenerate run (a model repeating a long separator), not an answer. The limit is what
/// lets an estimate bound a prompt that pastes an upstream reply by the upstream step's
/// `max_tokens` rather than by the checkpoint limit.
pub const MAX_REPLY_BYTES_PER_TOKEN: usize = 32;

/// The most bytes a reply of a step with this `max_tokens` may have, when outputs are
/// limited to `max_output_bytes`.
pub fn reply_limit(max_tokens: u32, max_output_bytes: usize) -> usize {
    (max_tokens as usize).saturating_mul(MAX_REPLY_BYTES_PER_TOKEN).min(max_output_bytes)
}

/// What is appended (after a blank line) to the prompt of the next attempt when a reply
/// could not be used as the step's JSON output. It quotes `problem`, so an estimate of the
/// retried prompt counts [`JSON_HINT_BYTES`] plus the problem's own bytes.
pub fn corrective_hint(problem: &str) -> String {
    format!("Your previous reply could not be used: {problem}. Reply again with only the corrected JSON.")
}

/// The bytes [`corrective_hint`] adds to a prompt for a reply that is not JSON at all,
/// with its blank line: what an estimate allows for it.
pub const JSON_HINT_BYTES: u64 = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_limited_by_its_tokens_and_by_the_checkpoint() {
        assert_eq!(reply_limit(10, MAX_OUTPUT_BYTES), 320);
        assert_eq!(reply_limit(1 << 20, 160 * 1024), 160 * 1024);
        assert_eq!(reply_limit(u32::MAX, MAX_OUTPUT_BYTES), MAX_OUTPUT_BYTES);
        assert_eq!(reply_limit(0, MAX_OUTPUT_BYTES), 0);
    }

    #[test]
    fn the_hint_for_a_reply_that_is_not_json_fits_its_allowance() {
        // The exact sentence the engine appends after `output::parse` refuses non-JSON.
        let problem = crate::output::extract_json("not json").unwrap_err().0;
        let hint = format!("\n\n{}", corrective_hint(&problem));
        assert!(hint.len() as u64 <= JSON_HINT_BYTES, "{} bytes: {hint}", hint.len());
    }
}
