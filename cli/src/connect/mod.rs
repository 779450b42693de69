//! Where the API is and who the caller is, resolved once per command.
//!
//! The API URL: `--api-url`, else `API_URL`, else the local stack's env file. The token,
//! first found wins: `--token` / `CHAINRUN_TOKEN`; the output of `--token-command` /
//! `CHAINRUN_TOKEN_COMMAND`; a token minted for `--user` with the stack's
//! `CHAINRUN_LOCAL_JWT_SECRET` when the API is that stack's. Without one the caller is
//! anonymous, and commands that need a token say how to get one.

mod envfile;
mod local_token;

use crate::args::Global;
use crate::exit::CliError;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

pub struct Connection {
    pub api_url: String,
    pub token: Option<String>,
}

pub fn resolve(global: &Global) -> Result<Connection, CliError> {
    let stack = stack_env(global)?;
    let api_url = match (&global.api_url, stack.get("API_URL")) {
        (Some(url), _) if !url.trim().is_empty() => url.trim().to_owned(),
        (_, Some(url)) if !url.is_empty() => url.clone(),
        _ => return Err(CliError::NoApiUrl),
    };
    let token = match (&global.token, &global.token_command) {
        (Some(token), _) if !token.trim().is_empty() => Some(token.trim().to_owned()),
        (_, Some(command)) if !command.trim().is_empty() => Some(run_token_command(command)?),
        // A stack's secret signs tokens for that stack only: an API_URL pointing elsewhere
        // (a deployed stack) gets no local token, which it would refuse anyway.
        _ => match (stack.get("CHAINRUN_LOCAL_JWT_SECRET"), stack.get("API_URL")) {
            (Some(secret), Some(url)) if same_url(url, &api_url) => Some(
                local_token::mint(secret, &user(global), &global.groups).map_err(|e| CliError::Usage(format!("cannot sign a local token: {e}")))?,
            ),
            _ => None,
        },
    };
    Ok(Connection { api_url, token })
}

/// The env file's variables: the one named, or the stack's if one can be found; none
/// when there is no stack.
fn stack_env(global: &Global) -> Result<HashMap<String, String>, CliError> {
    let read = |path: &PathBuf| std::fs::read_to_string(path).map(|text| envfile::parse(&text));
    if let Some(path) = &global.env_file {
        return read(path).map_err(|e| CliError::Usage(format!("cannot read the env file {}: {e}", path.display())));
    }
    // `python -m infra.stack run` names its stack's file for the command it runs.
    let found = std::env::var_os("STACK_ENV_FILE")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| std::env::current_dir().ok().and_then(|dir| envfile::find_from(&dir)));
    Ok(found.and_then(|path| read(&path).ok()).unwrap_or_default())
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// `--user`, else the login name, else `dev` (as `make token`'s default).
fn user(global: &Global) -> String {
    global.user.clone().filter(|u| !u.is_empty()).or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty())).unwrap_or_else(|| "dev".to_owned())
}

/// Runs the command through the shell; its trimmed stdout is the token.
fn run_token_command(command: &str) -> Result<String, CliError> {
    let failed = |message: String| CliError::TokenCommand { command: command.to_owned(), message };
    let output = Command::new("sh").arg("-c").arg(command).output().map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failed(format!("{}: {}", output.status, stderr.trim())));
    }
    let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match token.is_empty() {
        true => Err(failed("it printed nothing".to_owned())),
        false => Ok(token),
    }
}
