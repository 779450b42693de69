//! How numbers read on screen. Money arrives from the API as an exact decimal string
//! (`cost_usd`) and is shown as it came, with a dollar sign: the CLI never does money
//! arithmetic, so it can never round it.

/// `"0.0000136"` → `$0.0000136`; absent → `-`.
pub fn usd(cost: Option<&str>) -> String {
    match cost {
        Some(c) if !c.is_empty() => format!("${c}"),
        _ => "-".to_owned(),
    }
}

/// `905` → `905 ms`, `12340` → `12.3 s`, `125000` → `2m05s`.
pub fn latency(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{}.{} s", ms / 1000, ms % 1000 / 100),
        _ => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
    }
}

/// `1` → `1 attempt`, `3` → `3 attempts`.
pub fn count(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The first line of `text`, at most `max` characters, marked when cut.
pub fn short(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    let cut: String = line.chars().take(max).collect();
    match cut.len() < line.len() || line.len() < text.trim_end().len() {
        true => format!("{cut}…"),
        false => cut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_shown_exactly_as_the_api_gave_it() {
        assert_eq!(usd(Some("0.000006685")), "$0.000006685");
        assert_eq!(usd(Some("0")), "$0");
        assert_eq!(usd(None), "-");
    }

    #[test]
    fn latencies_read_in_the_unit_that_suits_them() {
        assert_eq!(latency(905), "905 ms");
        assert_eq!(latency(12_340), "12.3 s");
        assert_eq!(latency(125_000), "2m05s");
    }

    #[test]
    fn short_text_is_one_line_marked_when_cut() {
        assert_eq!(short("abc", 10), "abc");
        assert_eq!(short("abcdef", 3), "abc…");
        assert_eq!(short("one\ntwo", 10), "one…");
    }
}
