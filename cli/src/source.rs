//! What the user hands the CLI as JSON: a workflow file, and values given inline or as
//! `@FILE` (`@-`: stdin).
//!
//! A workflow file is either a bare definition (it has `steps`) or a request body as
//! `POST /runs` takes it (`{"workflow": …, "input": …, "options": …}`, like
//! `infra/samples/feedback-analysis.json`), so the samples and the curl examples run as
//! they are.

use crate::args::SourceArgs;
use crate::exit::CliError;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// A definition with its input and options, read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub workflow: Value,
    pub input: Value,
    pub options: Map<String, Value>,
}

impl Request {
    /// `input`: `--input`, which wins over the file's own.
    pub fn read(path: &Path, input: Option<&str>) -> Result<Self, CliError> {
        let document = read_json(path)?;
        Self::from_document(document, input.map(json_arg).transpose()?).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
    }

    fn from_document(document: Value, input: Option<Value>) -> Result<Self, String> {
        let Value::Object(mut fields) = document else { return Err("expected a JSON object".to_owned()) };
        let (workflow, own_input, options) = match fields.remove("workflow") {
            Some(workflow) if !fields.contains_key("steps") => {
                let options = match fields.remove("options") {
                    Some(Value::Object(options)) => options,
                    None | Some(Value::Null) => Map::new(),
                    Some(_) => return Err("`options` must be an object".to_owned()),
                };
                (workflow, fields.remove("input"), options)
            }
            // A definition: its `workflow` key (if any) is its own business.
            workflow => {
                if let Some(w) = workflow {
                    fields.insert("workflow".to_owned(), w);
                }
                (Value::Object(fields), None, Map::new())
            }
        };
        let input = input.or(own_input).unwrap_or_else(|| Value::Object(Map::new()));
        if !input.is_object() {
            return Err("the input must be a JSON object".to_owned());
        }
        Ok(Self { workflow, input, options })
    }
}

/// What `run` and `estimate` were given: a stored workflow (with the body its route takes:
/// `input`, and `version` when asked) or a file's request.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Stored { id: String, body: Value },
    File(Request),
}

impl Source {
    pub fn of(args: &SourceArgs) -> Result<Self, CliError> {
        match (&args.workflow, &args.file) {
            (Some(id), _) => {
                let input = args.input.as_deref().map(|i| json_object_arg(i, "--input")).transpose()?.unwrap_or_else(|| Value::Object(Map::new()));
                let mut body = Map::from_iter([("input".to_owned(), input)]);
                if let Some(version) = args.version {
                    body.insert("version".to_owned(), Value::from(version));
                }
                Ok(Self::Stored { id: id.clone(), body: Value::Object(body) })
            }
            (None, Some(file)) => Ok(Self::File(Request::read(file, args.input.as_deref())?)),
            (None, None) => Err(CliError::Usage("give a workflow FILE or --workflow ID".to_owned())),
        }
    }
}

/// A JSON value given on the command line: inline, or `@FILE`, or `@-` for stdin.
pub fn json_arg(arg: &str) -> Result<Value, CliError> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
            serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("stdin is not JSON: {e}")))
        }
        Some(path) => read_json(Path::new(path)),
        None => serde_json::from_str(arg).map_err(|e| CliError::Usage(format!("not JSON: {e} (in {})", crate::format::short(arg, 60)))),
    }
}

/// A JSON object given on the command line (`--values`, `--input`).
pub fn json_object_arg(arg: &str, what: &str) -> Result<Value, CliError> {
    match json_arg(arg)? {
        value @ Value::Object(_) => Ok(value),
        _ => Err(CliError::Usage(format!("{what} must be a JSON object"))),
    }
}

pub fn read_json(path: &Path) -> Result<Value, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("{} is not JSON: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_body_gives_its_workflow_input_and_options() {
        let body = json!({"workflow": {"name": "w", "steps": []}, "input": {"x": 1}, "options": {"auto_approve": true}});
        let request = Request::from_document(body, None).expect("valid");
        assert_eq!(request.workflow, json!({"name": "w", "steps": []}));
        assert_eq!(request.input, json!({"x": 1}));
        assert_eq!(request.options["auto_approve"], json!(true));
    }

    #[test]
    fn a_bare_definition_runs_on_the_input_given_or_an_empty_one() {
        let definition = json!({"name": "w", "steps": [{"id": "a", "type": "llm", "prompt": "hi"}]});
        let request = Request::from_document(definition.clone(), None).expect("valid");
        assert_eq!((request.workflow, request.input), (definition.clone(), json!({})));
        let given = Request::from_document(definition, Some(json!({"y": 2}))).expect("valid");
        assert_eq!(given.input, json!({"y": 2}));
    }

    #[test]
    fn input_on_the_command_line_wins_over_the_files() {
        let body = json!({"workflow": {"name": "w"}, "input": {"x": 1}});
        assert_eq!(Request::from_document(body, Some(json!({"x": 2}))).expect("valid").input, json!({"x": 2}));
    }

    #[test]
    fn an_input_that_is_not_an_object_is_refused() {
        let err = Request::from_document(json!({"workflow": {}, "input": [1]}), None).expect_err("refused");
        assert!(err.contains("JSON object"), "{err}");
    }
}
