//! A router step: the first route whose condition holds chooses its steps, else the
//! default. Its output names the chosen steps (`{"route": n, "selected": [...]}`), which
//! is what the schedule reads to switch the others off.

use super::step::Work;
use crate::codes::ErrorCode;
use crate::graph::RouterSpec;
use crate::ids::StepId;
use crate::wire::{RouteDetail, StepDetail};
use serde_json::{Value, json};

pub fn route(spec: &RouterSpec, context: &Value) -> Work {
    for (n, route) in spec.routes.iter().enumerate() {
        match route.when.evaluate_bool(context) {
            Ok(true) => {
                let selected: Vec<&str> = route.to.iter().map(StepId::as_str).collect();
                let mut work = Work::done(format!("route {n}"), json!({ "route": n, "selected": selected }));
                work.detail = Some(StepDetail::Route(RouteDetail { route: n, when: route.when.source().to_owned() }));
                return work;
            }
            Ok(false) => {}
            Err(e) => return Work::failed(ErrorCode::ConditionError, format!("routes[{n}].when: {e}")),
        }
    }
    let selected: Vec<&str> = spec.default.iter().map(StepId::as_str).collect();
    Work::done("default".into(), json!({ "route": "default", "selected": selected }))
}
