//! The spans the functions open around their work. The JSON log format puts the fields of
//! every span a line is printed in at the top level of that line, so a field set here is on
//! every line inside: `run_id` on all a runner prints for an invocation, on all the API
//! prints for a request to `/runs/{id}/…`, on all the recovery functions print per run.
//! The engine adds its own inside them: `run` (`workflow`, `revision`), `step` (`step_id`,
//! `attempt`) and `item` (a map's `item`, its `attempt`).

use crate::ids::{RunId, StepId};
use crate::run::Cause;
use tracing::{Span, field, info_span};

/// One runner invocation, handed `run` for `cause`.
pub fn invocation(run: &RunId, cause: Cause) -> Span {
    info_span!("invocation", run_id = %run, ?cause)
}

/// Work a recovery function does on one run.
pub fn run(run: &RunId) -> Span {
    info_span!("run", run_id = %run)
}

/// One API request; `run_id` and `step_id` when its path names them.
pub fn request(method: &str, path: &str) -> Span {
    let span = info_span!("request", method, path, run_id = field::Empty, step_id = field::Empty);
    let (run, step) = path_ids(path);
    if let Some(run) = run {
        span.record("run_id", run.as_str());
    }
    if let Some(step) = step {
        span.record("step_id", step.as_str());
    }
    span
}

/// The run (and step) a request path names: `/runs/{id}…` and `/runs/{id}/steps/{step}…`,
/// under `/public` too. Ids that do not parse name nothing.
pub fn path_ids(path: &str) -> (Option<RunId>, Option<StepId>) {
    let path = path.strip_prefix("/public").unwrap_or(path);
    let mut parts = path.trim_start_matches('/').split('/');
    let run = match (parts.next(), parts.next()) {
        (Some("runs"), Some(id)) => RunId::parse(id).ok(),
        _ => None,
    };
    let step = match (run.is_some(), parts.next(), parts.next()) {
        (true, Some("steps"), Some(id)) => StepId::parse(id).ok(),
        _ => None,
    };
    (run, step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_path_names_its_run_and_step() {
        let run = RunId::new();
        assert_eq!(path_ids(&format!("/runs/{run}")), (Some(run.clone()), None));
        assert_eq!(path_ids(&format!("/runs/{run}/events")), (Some(run.clone()), None));
        assert_eq!(path_ids(&format!("/public/runs/{run}/graph")), (Some(run.clone()), None));
        assert_eq!(path_ids(&format!("/runs/{run}/steps/extract/retry")), (Some(run.clone()), Some(StepId::parse("extract").unwrap())));
    }

    #[test]
    fn paths_without_a_valid_run_id_name_nothing() {
        for path in ["/", "/runs", "/runs/not-a-ulid", "/workflows/01J00000000000000000000000", "/runs//steps/a", "/publicruns/x"] {
            assert_eq!(path_ids(path), (None, None), "{path}");
        }
        assert_eq!(path_ids(&format!("/runs/{}/steps/9bad/retry", RunId::new())).1, None);
    }
}
