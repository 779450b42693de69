//! The local stack's env file (`.local/stack.env`, written by `python -m infra.stack up`):
//! shell-sourceable `KEY=VALUE` lines, values shell-quoted where they need it, as
//! `infra/envfile.py` writes and reads them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where `make up` writes the stack's env file, relative to the repository.
pub const DEFAULT_ENV_FILE: &str = ".local/stack.env";

/// The file's variables; comments and blank lines skipped, quoting undone.
pub fn parse(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), unquote(value.trim())))
        .collect()
}

/// `'a b'` → `a b`, `'it'"'"'s'` → `it's`, as a shell reads it; a bare value as it is.
fn unquote(value: &str) -> String {
    if !value.starts_with(['\'', '"']) {
        return value.to_owned();
    }
    match shlex::split(value).as_deref() {
        Some([one]) => one.clone(),
        _ => value.to_owned(),
    }
}

/// `.local/stack.env` in `dir` or the nearest parent that has one.
pub fn find_from(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().map(|d| d.join(DEFAULT_ENV_FILE)).find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_as_a_shell_would() {
        let vars = parse("# stack\nAPI_URL=http://127.0.0.1:9000/lambda-url/chainrun-api\n\nRUST_LOG='info,chainrun=debug'\nQUOTE='it'\"'\"'s'\n");
        assert_eq!(vars["API_URL"], "http://127.0.0.1:9000/lambda-url/chainrun-api");
        assert_eq!(vars["RUST_LOG"], "info,chainrun=debug");
        assert_eq!(vars["QUOTE"], "it's");
        assert_eq!(vars.len(), 3);
    }

    #[test]
    fn finds_the_stack_file_in_a_parent_directory() {
        let root = std::env::temp_dir().join(format!("chainrun-cli-envfile-{}", std::process::id()));
        let nested = root.join("a/b");
        std::fs::create_dir_all(&nested).expect("temp dirs");
        std::fs::create_dir_all(root.join(".local")).expect("temp dirs");
        std::fs::write(root.join(DEFAULT_ENV_FILE), "API_URL=x\n").expect("env file");
        assert_eq!(find_from(&nested), Some(root.join(DEFAULT_ENV_FILE)));
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
