//! `GET /runs/{id}/graph`: a run's steps as a graph (what each is, what it waits for), for
//! clients that draw it — the run view page and `chainrun show --mermaid`. Statuses and
//! timings are not here: they change while the graph does not, and `GET /runs/{id}` and the
//! events carry them.

use crate::graph::{ItemStep, StepKind, ValidatedGraph};
use crate::ids::{ModelId, RunId, StepId};
use crate::workflow::Join;
use schemars::JsonSchema;
use serde::Serialize;

#[derive(Debug, Serialize, JsonSchema)]
pub struct GraphView {
    pub run_id: RunId,
    pub workflow: String,
    /// In a topological order: every step comes after the steps it depends on.
    pub steps: Vec<GraphStep>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GraphStep {
    pub id: StepId,
    pub kind: GraphStepKind,
    /// The steps it waits for: its `depends_on` and every step its templates or
    /// expressions read. The graph's edges.
    pub depends_on: Vec<StepId>,
    pub join: Join,
    pub required: bool,
    /// False when the definition switched it off: it never runs.
    pub enabled: bool,
    /// The model an `llm` step, or each item of a map of `llm` items, calls.
    pub model: Option<ModelId>,
    /// Whether its text is streamed (`STREAMING` events) as it is produced.
    pub stream: bool,
    /// A map: what each item is (`llm` or `transform`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<GraphStepKind>,
    /// A router: its routes in order, each with its condition and the steps it chooses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<GraphRoute>,
    /// A router: the steps chosen when no route's condition holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<StepId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GraphStepKind {
    Llm,
    Transform,
    Router,
    Map,
    Review,
    Input,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct GraphRoute {
    /// The route's CEL condition, as written.
    pub when: String,
    pub to: Vec<StepId>,
}

impl GraphView {
    pub fn of(run_id: &RunId, graph: &ValidatedGraph) -> Self {
        let steps = graph.steps();
        let view = steps
            .iter()
            .map(|step| {
                let (kind, model, stream, item) = match &step.kind {
                    StepKind::Llm(llm) => (GraphStepKind::Llm, Some(llm.model.clone()), llm.stream, None),
                    StepKind::Transform(_) => (GraphStepKind::Transform, None, false, None),
                    StepKind::Router(_) => (GraphStepKind::Router, None, false, None),
                    StepKind::Map(map) => match &map.step {
                        ItemStep::Llm(llm) => (GraphStepKind::Map, Some(llm.model.clone()), llm.stream, Some(GraphStepKind::Llm)),
                        ItemStep::Transform(_) => (GraphStepKind::Map, None, false, Some(GraphStepKind::Transform)),
                    },
                    StepKind::Review(_) => (GraphStepKind::Review, None, false, None),
                    StepKind::Input(_) => (GraphStepKind::Input, None, false, None),
                };
                let (routes, default) = match &step.kind {
                    StepKind::Router(router) => (
                        router.routes.iter().map(|r| GraphRoute { when: r.when.source().to_owned(), to: r.to.clone() }).collect(),
                        router.default.clone(),
                    ),
                    _ => (Vec::new(), Vec::new()),
                };
                GraphStep {
                    id: step.id.clone(),
                    kind,
                    depends_on: step.deps.iter().map(|&d| steps[d].id.clone()).collect(),
                    join: step.join,
                    required: step.required,
                    enabled: step.enabled,
                    model,
                    stream,
                    item,
                    routes,
                    default,
                }
            })
            .collect();
        Self { run_id: run_id.clone(), workflow: graph.name().to_string(), steps: view }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::ModelRegistry;
    use serde_json::json;

    #[test]
    fn edges_follow_dependencies_and_routers_list_their_routes() {
        let def = json!({
            "name": "triage",
            "steps": [
                {"id": "classify", "type": "transform", "expression": "input.text.size() > 3 ? 'long' : 'short'"},
                {"id": "route", "type": "router", "depends_on": ["classify"],
                 "routes": [{"when": "steps.classify.output == 'long'", "to": ["summarise"]}], "default": ["echo"]},
                {"id": "summarise", "type": "llm", "model": "amazon.nova-micro-v1:0", "stream": true,
                 "prompt": "Summarise {{ input.text }}", "depends_on": ["route"]},
                {"id": "echo", "type": "transform", "template": "{{ input.text }}", "depends_on": ["route"]}
            ]
        });
        let graph = crate::graph::validate_json(&def, &ModelRegistry::builtin()).expect("valid");
        let run = RunId::new();
        let view = serde_json::to_value(GraphView::of(&run, &graph)).expect("serializes");

        assert_eq!(view["workflow"], "triage");
        let steps = view["steps"].as_array().expect("steps");
        let by_id = |id: &str| steps.iter().find(|s| s["id"] == id).expect(id).clone();
        assert_eq!(by_id("route")["kind"], "router");
        assert_eq!(by_id("route")["depends_on"], json!(["classify"]));
        assert_eq!(by_id("route")["routes"], json!([{"when": "steps.classify.output == 'long'", "to": ["summarise"]}]));
        assert_eq!(by_id("route")["default"], json!(["echo"]));
        assert_eq!(by_id("summarise")["model"], "amazon.nova-micro-v1:0");
        assert_eq!(by_id("summarise")["stream"], true);
        assert_eq!(by_id("echo")["depends_on"], json!(["route"]));
        assert!(by_id("echo").get("routes").is_none(), "only routers list routes");
        let order: Vec<_> = steps.iter().map(|s| s["id"].as_str().expect("id")).collect();
        let position = |id: &str| order.iter().position(|s| *s == id).expect(id);
        assert!(position("classify") < position("route") && position("route") < position("summarise"));
    }
}
