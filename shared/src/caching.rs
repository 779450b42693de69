//! Where a model request marks its head for Bedrock's prompt cache.
//!
//! A Converse `cachePoint` block marks everything before it as a prefix Bedrock may cache:
//! the first call that sends a prefix writes it (billed at the cache-write price, 1.25×
//! input on Claude), later calls within the TTL read it (0.1× input). A checkpoint whose
//! prefix is shorter than the model's minimum is ignored by Bedrock, at no cost; the n-th
//! checkpoint of a request needs n × the minimum, counted from the start of the request.
//!
//! Two heads are worth marking, and only when other calls will send them too (the step's
//! `shared_prefix`): the system prompt, and the static head of the prompt template — the
//! text before its first tag, which every item of a map renders identically.

use crate::ports::CachePoints;
use crate::pricing::CacheRules;

/// Bytes per token assumed when deciding whether a head reaches the minimum: typical of
/// English text. Too high a guess only places a checkpoint Bedrock ignores, at no cost.
pub const PLACEMENT_BYTES_PER_TOKEN: usize = 4;

/// The literal text a template renders first, whatever its context: everything before its
/// first `{{`, `{%` or `{#`.
pub fn static_head(source: &str) -> &str {
    let end = ["{{", "{%", "{#"].iter().filter_map(|tag| source.find(tag)).min().unwrap_or(source.len());
    &source[..end]
}

/// The cache points for one request: after the system prompt when it reaches the
/// minimum, and after the prompt's static head when system and head together reach the
/// minimum for the next checkpoint. `head` is the prompt template's [`static_head`]; it is
/// used only if the rendered prompt really starts with it (a tag such as `{%-` trims the
/// whitespace before it, so the head is also tried without trailing whitespace).
pub fn plan(rules: CacheRules, system: Option<&str>, prompt: &str, head: &str) -> CachePoints {
    let tokens = |bytes: usize| bytes / PLACEMENT_BYTES_PER_TOKEN;
    let min = rules.min_tokens as usize;
    let max_points = usize::from(rules.max_points);
    let system_bytes = system.map_or(0, str::len);
    let mut points = CachePoints::default();
    if system_bytes > 0 && max_points >= 1 && tokens(system_bytes) >= min {
        points.after_system = true;
    }
    let head = [head, head.trim_end()].into_iter().find(|h| !h.is_empty() && prompt.starts_with(h));
    if let Some(head) = head {
        let n = points.count() + 1;
        if n <= max_points && tokens(system_bytes + head.len()) >= n * min {
            points.prompt_head = Some(head.len());
        }
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    const HAIKU: CacheRules = CacheRules { min_tokens: 4096, max_points: 4 };

    #[test]
    fn the_static_head_ends_at_the_first_tag_of_any_kind() {
        assert_eq!(static_head("Rules: be terse.\nTicket: {{ item }}"), "Rules: be terse.\nTicket: ");
        assert_eq!(static_head("A {# note #} b {{ x }}"), "A ");
        assert_eq!(static_head("{% if x %}y{% endif %}"), "");
        assert_eq!(static_head("no tags at all"), "no tags at all");
    }

    #[test]
    fn a_long_system_prompt_gets_a_checkpoint_and_a_short_one_does_not() {
        let long = "x".repeat(4096 * 4);
        let short = "x".repeat(4096 * 4 - 1);
        assert_eq!(plan(HAIKU, Some(&long), "hi", ""), CachePoints { after_system: true, prompt_head: None });
        assert_eq!(plan(HAIKU, Some(&short), "hi", ""), CachePoints::default());
        assert_eq!(plan(HAIKU, None, "hi", ""), CachePoints::default());
    }

    #[test]
    fn the_prompt_head_needs_the_next_multiple_of_the_minimum_counted_from_the_start() {
        let system = "s".repeat(4096 * 4);
        // With the system's checkpoint, the head's prefix must reach 2 × 4,096 tokens.
        let head = "h".repeat(4096 * 4);
        let prompt = format!("{head}item 7");
        assert_eq!(plan(HAIKU, Some(&system), &prompt, &head), CachePoints { after_system: true, prompt_head: Some(head.len()) });
        let shorter = &head[..head.len() - 4];
        let prompt = format!("{shorter}item 7");
        assert_eq!(plan(HAIKU, Some(&system), &prompt, shorter).prompt_head, None);
        // Without a system prompt, the head alone is the first checkpoint.
        let prompt = format!("{head}item 7");
        assert_eq!(plan(HAIKU, None, &prompt, &head), CachePoints { after_system: false, prompt_head: Some(head.len()) });
    }

    #[test]
    fn a_head_the_rendering_does_not_start_with_is_not_marked_and_trimmed_whitespace_is_allowed_for() {
        let head = format!("{}\n  ", "h".repeat(20_000));
        let trimmed = head.trim_end();
        let rendered = format!("{trimmed}item");
        assert_eq!(plan(HAIKU, None, &rendered, &head).prompt_head, Some(trimmed.len()));
        assert_eq!(plan(HAIKU, None, "something else entirely", &head).prompt_head, None);
    }

    #[test]
    fn no_more_checkpoints_than_the_model_allows() {
        let one = CacheRules { min_tokens: 10, max_points: 1 };
        let system = "s".repeat(400);
        let head = "h".repeat(400);
        let prompt = format!("{head}x");
        assert_eq!(plan(one, Some(&system), &prompt, &head), CachePoints { after_system: true, prompt_head: None });
    }
}
