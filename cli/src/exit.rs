//! How a command ends: its exit status, and the one error type of the CLI.
//!
//! Scripts branch on the status, so it says what happened to the *run*: 0 completed, 1
//! failed or cancelled, 3 waits for a person. Everything that kept the command from acting
//! at all — a bad flag, no token, a refusal from the API, an API that cannot be reached —
//! is 2, and is explained on stderr.

use crate::api::Problem;
use std::process::ExitCode;

/// The statuses the CLI exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The run completed, or a command that follows no run did what it was asked.
    Success,
    /// The run failed or was cancelled.
    RunFailed,
    /// Bad usage, or the API refused or could not be reached.
    Usage,
    /// The run waits for input (a review, an input step, a pause or its budget).
    Waiting,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::RunFailed => 1,
            Exit::Usage => 2,
            Exit::Waiting => 3,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// Why a command could not act. Every variant exits with [`Exit::Usage`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag, file or value the command cannot use.
    #[error("{0}")]
    Usage(String),
    #[error("no API URL: pass --api-url or set API_URL, or start a local stack (`make up`) so that .local/stack.env exists")]
    NoApiUrl,
    #[error(
        "`{command}` needs a token: pass --token or set CHAINRUN_TOKEN (for a local stack: `make token USER=you`), \
         set CHAINRUN_TOKEN_COMMAND to a command that prints one, or start a local stack (`make up`) so the CLI can mint one"
    )]
    NoToken { command: &'static str },
    #[error("the token command `{command}` failed: {message}")]
    TokenCommand { command: String, message: String },
    /// The API answered with a problem document (or something it had to be made from).
    /// Boxed: it is large, and every `Result` of the CLI carries this type.
    #[error("{}", .0.title)]
    Api(Box<Problem>),
    /// No answer at all: refused, reset, timed out, a bad URL.
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    /// A 2xx answer that is not what the route promises.
    #[error("{what}: unexpected answer: {message}")]
    Unexpected { what: String, message: String },
}
