//! `GET /runs/{id}/graph`: the run's steps and their edges, from the definition the run was
//! started with (its snapshot, not the stored workflow's head, which may have moved on).

use crate::auth::Identity;
use crate::error::ApiError;
use crate::{AppState, Part, visible_run};
use axum::Json;
use axum::extract::{Path, State};
use chainrun_core::graph::validate_json;
use chainrun_core::wire::graph::GraphView;

pub(crate) async fn get_graph(State(state): State<AppState>, identity: Identity, Path(id): Path<String>) -> Result<Json<GraphView>, ApiError> {
    let run = visible_run(&state, &identity, &id, Part::Head).await?;
    // The snapshot validated when the run started; it stops validating only when the
    // registry dropped a model it names since — the run can still be read, not drawn.
    let graph = validate_json(&run.definition, &state.models).map_err(|invalid| {
        ApiError::Conflict(format!(
            "run {id}'s definition no longer validates, so it cannot be drawn: {}",
            invalid.problems.first().map(|p| p.to_string()).unwrap_or_default()
        ))
    })?;
    Ok(Json(GraphView::of(&run.id, &graph)))
}
