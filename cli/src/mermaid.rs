//! A run's step graph as a Mermaid flowchart: one node per step, labelled with its id, kind,
//! status, latency and cost, shaped by kind; an edge per dependency (a router's labelled
//! with the route that leads there, dotted into a step that was skipped); one class per
//! status, coloured. Pure: the graph and the run in, the text out.

use crate::format::{latency, short, usd};
use crate::wire::{Graph, GraphStep, Run, Step};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// Statuses in the order their classes are declared, with their colours.
const CLASSES: [(&str, &str); 7] = [
    ("COMPLETED", "fill:#dcfce7,stroke:#16a34a,color:#14532d"),
    ("RUNNING", "fill:#dbeafe,stroke:#2563eb,color:#1e3a8a"),
    ("WAITING", "fill:#fef9c3,stroke:#ca8a04,color:#713f12"),
    ("FAILED", "fill:#fee2e2,stroke:#dc2626,color:#7f1d1d"),
    ("CANCELLED", "fill:#ffedd5,stroke:#ea580c,color:#7c2d12"),
    ("SKIPPED", "fill:#f3f4f6,stroke:#9ca3af,color:#6b7280,stroke-dasharray:4 3"),
    ("PENDING", "fill:#ffffff,stroke:#9ca3af,color:#374151"),
];
/// How much of a route's label an edge shows.
const ROUTE_LABEL_CHARS: usize = 40;

pub fn flowchart(graph: &Graph, run: &Run) -> String {
    let checkpoints: HashMap<&str, &Step> = run.steps.iter().map(|s| (s.id.as_str(), s)).collect();
    let status_of = |id: &str| checkpoints.get(id).map_or("PENDING", |s| s.status.as_str());
    let kinds: HashMap<&str, &GraphStep> = graph.steps.iter().map(|s| (s.id.as_str(), s)).collect();

    // A JSON string is a YAML double-quoted scalar: the title is safe whatever the name.
    let title = serde_json::Value::from(format!("{} · run {} · {}", graph.workflow, run.run_id, run.status));
    let mut out = format!("---\ntitle: {title}\n---\nflowchart TD\n");
    for step in &graph.steps {
        let (open, close) = shape(&step.kind);
        let label = label(step, checkpoints.get(step.id.as_str()).copied());
        let _ = writeln!(out, "    {}{open}\"{label}\"{close}", node(&step.id));
    }
    for step in &graph.steps {
        let arrow = if status_of(&step.id) == "SKIPPED" { "-.->" } else { "-->" };
        for dependency in &step.depends_on {
            let routed = kinds.get(dependency.as_str()).map(|router| route_label(router, &step.id)).unwrap_or_default();
            let label = if routed.is_empty() { String::new() } else { format!("|\"{}\"|", escape(&routed)) };
            let _ = writeln!(out, "    {} {arrow}{label} {}", node(dependency), node(&step.id));
        }
    }
    let mut by_status: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for step in &graph.steps {
        let status = status_of(&step.id);
        let class = CLASSES.iter().position(|(name, _)| *name == status).unwrap_or(CLASSES.len() - 1);
        by_status.entry(class).or_default().push(node(&step.id));
    }
    for (class, nodes) in by_status {
        let (name, colours) = CLASSES[class];
        let _ = writeln!(out, "    classDef {} {colours}", name.to_lowercase());
        let _ = writeln!(out, "    class {} {}", nodes.join(","), name.to_lowercase());
    }
    out
}

/// Node ids carry a prefix: a step may be called `end` or `o`, which Mermaid reads as syntax.
fn node(step: &str) -> String {
    format!("s_{step}")
}

/// A shape per kind: rounded for model calls, a rhombus for routers, a subroutine for
/// maps, a hexagon for steps that wait for people.
fn shape(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "llm" => ("(", ")"),
        "router" => ("{", "}"),
        "map" => ("[[", "]]"),
        "review" | "input" => ("{{", "}}"),
        _ => ("[", "]"),
    }
}

fn label(step: &GraphStep, checkpoint: Option<&Step>) -> String {
    let status = checkpoint.map_or("PENDING", |c| c.status.as_str());
    let mut lines = vec![format!("<b>{}</b>", escape(&step.id))];
    let mut kind = match &step.item {
        Some(item) => format!("{} of {item}", step.kind),
        None => step.kind.clone(),
    };
    if let Some(model) = &step.model {
        kind.push_str(&format!(" · {model}"));
    }
    lines.push(escape(&kind));
    let flags: Vec<&str> =
        [(step.stream, "streamed"), (step.join.as_deref() == Some("any"), "join any"), (!step.required, "optional"), (!step.enabled, "switched off")]
            .into_iter()
            .filter_map(|(on, flag)| on.then_some(flag))
            .collect();
    if !flags.is_empty() {
        lines.push(flags.join(", "));
    }
    lines.push(status.to_owned());
    if let Some(c) = checkpoint.filter(|c| c.latency_ms.is_some_and(|ms| ms > 0) || c.attempts > 0) {
        let mut figures = vec![latency(c.latency_ms.unwrap_or(0))];
        if c.attempts > 1 {
            figures.push(format!("{} attempts", c.attempts));
        }
        if c.cost_usd.as_deref().is_some_and(|cost| cost != "0") {
            figures.push(usd(c.cost_usd.as_deref()));
        }
        lines.push(figures.join(" · "));
    }
    lines.join("<br/>")
}

/// Which of `router`'s routes lead to `target` (`default` for its default).
fn route_label(router: &GraphStep, target: &str) -> String {
    let mut labels: Vec<String> =
        router.routes.iter().filter(|r| r.to.iter().any(|t| t == target)).map(|r| short(&r.when, ROUTE_LABEL_CHARS)).collect();
    if router.default.iter().any(|t| t == target) {
        labels.push("default".to_owned());
    }
    labels.join(" / ")
}

/// Text inside a quoted label, with Mermaid's entity codes for what would end or break it.
fn escape(text: &str) -> String {
    text.replace('#', "#35;").replace('"', "#quot;").replace('<', "#lt;").replace('>', "#gt;").replace('|', "#124;").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Route, Totals};

    fn graph_step(id: &str, kind: &str, depends_on: &[&str]) -> GraphStep {
        GraphStep {
            id: id.to_owned(),
            kind: kind.to_owned(),
            depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
            join: Some("all".to_owned()),
            required: true,
            enabled: true,
            model: None,
            stream: false,
            item: None,
            routes: Vec::new(),
            default: Vec::new(),
        }
    }

    fn step(id: &str, status: &str, latency_ms: u64, cost: &str) -> Step {
        Step {
            id: id.to_owned(),
            status: status.to_owned(),
            attempts: u32::from(status != "SKIPPED"),
            latency_ms: Some(latency_ms),
            cost_usd: Some(cost.to_owned()),
            ..Step::default()
        }
    }

    fn run(steps: Vec<Step>) -> Run {
        serde_json::from_value::<Run>(serde_json::json!({
            "run_id": "01RUN", "workflow": "triage", "status": "COMPLETED", "totals": {}, "steps": []
        }))
        .map(|r| Run { steps, totals: Totals::default(), ..r })
        .expect("a run")
    }

    #[test]
    fn a_routed_run_shows_each_step_with_its_status_timing_and_cost_and_the_route_taken() {
        let mut route = graph_step("route", "router", &["classify"]);
        route.routes = vec![Route { when: "steps.classify.output == 'negative'".to_owned(), to: vec!["escalate".to_owned()] }];
        route.default = vec!["reply".to_owned()];
        let graph = Graph {
            workflow: "triage".to_owned(),
            steps: vec![
                graph_step("classify", "llm", &[]),
                route,
                graph_step("escalate", "review", &["route"]),
                graph_step("reply", "llm", &["route"]),
            ],
        };
        let run = run(vec![
            step("classify", "COMPLETED", 905, "0.0000136"),
            step("route", "COMPLETED", 2, "0"),
            step("escalate", "SKIPPED", 0, "0"),
            step("reply", "COMPLETED", 1210, "0.0000166"),
        ]);
        let expected = "---
title: \"triage · run 01RUN · COMPLETED\"
---
flowchart TD
    s_classify(\"<b>classify</b><br/>llm<br/>COMPLETED<br/>905 ms · $0.0000136\")
    s_route{\"<b>route</b><br/>router<br/>COMPLETED<br/>2 ms\"}
    s_escalate{{\"<b>escalate</b><br/>review<br/>SKIPPED\"}}
    s_reply(\"<b>reply</b><br/>llm<br/>COMPLETED<br/>1.2 s · $0.0000166\")
    s_classify --> s_route
    s_route -.->|\"steps.classify.output == 'negative'\"| s_escalate
    s_route -->|\"default\"| s_reply
    classDef completed fill:#dcfce7,stroke:#16a34a,color:#14532d
    class s_classify,s_route,s_reply completed
    classDef skipped fill:#f3f4f6,stroke:#9ca3af,color:#6b7280,stroke-dasharray:4 3
    class s_escalate skipped
";
        assert_eq!(flowchart(&graph, &run), expected);
    }

    #[test]
    fn a_step_without_a_checkpoint_is_pending_and_one_switched_off_says_so() {
        let mut off = graph_step("extra", "transform", &["a"]);
        off.enabled = false;
        off.required = false;
        let graph = Graph { workflow: "w".to_owned(), steps: vec![graph_step("a", "map", &[]), off] };
        let chart = flowchart(&graph, &run(vec![step("a", "RUNNING", 0, "0")]));
        assert!(chart.contains("    s_a[[\"<b>a</b><br/>map<br/>RUNNING<br/>0 ms\"]]\n"), "{chart}");
        assert!(chart.contains("    s_extra[\"<b>extra</b><br/>transform<br/>optional, switched off<br/>PENDING\"]\n"), "{chart}");
        assert!(chart.contains("    class s_extra pending\n"), "{chart}");
    }

    #[test]
    fn labels_cannot_break_out_of_their_quotes() {
        assert_eq!(escape("a \"b\" <i>|#"), "a #quot;b#quot; #lt;i#gt;#124;#35;");
    }

    #[test]
    fn a_step_named_like_mermaid_syntax_is_still_a_node() {
        let graph = Graph { workflow: "w".to_owned(), steps: vec![graph_step("end", "llm", &[]), graph_step("o", "llm", &["end"])] };
        assert!(flowchart(&graph, &run(vec![])).contains("    s_end --> s_o\n"));
    }
}
