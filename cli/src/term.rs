//! How output looks: machine JSON, plain lines, or a live terminal with spinners and
//! colours. Decided once per command. Plain lines are what a pipe, a file, CI or
//! `--no-progress` get: no escape codes at all.

use comfy_table::{CellAlignment, Table, presets};
use console::{Style, Term};

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    /// `--json`: only the API's JSON goes to stdout.
    pub json: bool,
    /// Spinners, bars and colours on stdout.
    pub live: bool,
}

impl Ui {
    pub fn new(json: bool, no_progress: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let live = !json && !no_progress && Term::stdout().is_term();
        console::set_colors_enabled(live && !no_color);
        console::set_colors_enabled_stderr(!no_progress && !no_color && Term::stderr().is_term());
        Self { json, live }
    }

    /// Prints a JSON document (pretty) on stdout.
    pub fn print_json(&self, value: &serde_json::Value) {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    }
}

/// A status word, coloured by what it means (when colours are on).
pub fn status(word: &str) -> String {
    let style = match word {
        "COMPLETED" => Style::new().green(),
        "FAILED" => Style::new().red().bold(),
        "CANCELLED" => Style::new().red(),
        "RUNNING" | "QUEUED" => Style::new().cyan(),
        "WAITING" | "AWAITING_INPUT" | "RETRYING" => Style::new().yellow(),
        "SKIPPED" | "PENDING" => Style::new().dim(),
        _ => Style::new(),
    };
    style.apply_to(word).to_string()
}

/// A status word padded to `width` before colouring, so columns line up either way.
pub fn status_padded(word: &str, width: usize) -> String {
    let pad = width.saturating_sub(word.chars().count());
    format!("{}{}", status(word), " ".repeat(pad))
}

pub fn dim(text: &str) -> String {
    Style::new().dim().apply_to(text).to_string()
}

pub fn bold(text: &str) -> String {
    Style::new().bold().apply_to(text).to_string()
}

pub fn alarm(text: &str) -> String {
    Style::new().red().bold().apply_to(text).to_string()
}

/// A table with the CLI's look; `right`: the columns of numbers, aligned right. Its cells
/// stay uncoloured: the table measures escape codes as text and would misalign.
pub fn table(header: &[&str], right: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED).set_header(header.to_vec());
    for &column in right {
        if let Some(c) = table.column_mut(column) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}
