//! `chainrun`, the command line of chainrun: start a workflow run and follow it live, then
//! inspect, steer and account for runs — all through the HTTP API, the same against the
//! local stack (`make up`) and a deployed one.
//!
//! | module | what |
//! |---|---|
//! | `args` | the command line (clap) |
//! | `connect` | the API URL and the token: flags, environment, the local stack's env file |
//! | `api` | HTTP calls and the API's problem documents |
//! | `wire` | the answers the CLI reads field by field |
//! | `live` | following a run's events: the pure fold (`state`), drawing it (`screen`) |
//! | `report`, `mermaid` | a run as a table, and as a Mermaid flowchart |
//! | `commands` | one file per group of commands |

mod api;
pub mod args;
mod commands;
mod connect;
mod exit;
mod format;
mod live;
mod mermaid;
mod report;
mod source;
mod term;
mod wire;

pub use exit::Exit;

use exit::CliError;

/// Runs one command; problems are explained on stderr and become the exit status.
pub fn execute(cli: args::Cli) -> Exit {
    let ui = term::Ui::new(cli.global.json, cli.global.no_progress);
    match commands::dispatch(cli, ui) {
        Ok(exit) => exit,
        Err(error) => {
            report_error(&error, ui);
            Exit::Usage
        }
    }
}

fn report_error(error: &CliError, ui: term::Ui) {
    match error {
        CliError::Api(problem) => {
            // Scripts asked for JSON: they get the problem document itself on stdout.
            if ui.json {
                ui.print_json(&serde_json::to_value(problem).unwrap_or_default());
            }
            eprintln!("{}", problem.render());
        }
        other => eprintln!("{} {other}", term::alarm("error:")),
    }
}
