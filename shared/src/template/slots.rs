//! Templates made only of text and `{{ name.name… }}` slots — most prompts — read and
//! rendered without minijinja.
//!
//! Rendering through minijinja costs a fresh interpreter state per call (and, for a
//! template that keeps only its source, a compilation): measured, that was about half of
//! the engine's per-step overhead. A slot template needs none of it: each slot is a path
//! looked up in the context. The fast path takes a template only when it can print
//! exactly what minijinja would — every slot resolves to a string, an integer or a
//! boolean — and otherwise answers `None`, so minijinja renders it (and makes any error,
//! such as strict mode's for an undefined value). A property test holds the two to the
//! same output.

use serde_json::Value;
use std::fmt::Write;

/// One `{{ … }}` in a slot template: the text before it and what is between the braces.
struct Scanned<'a> {
    text: &'a str,
    inner: &'a str,
}

/// Splits `source` into its slots and the text after the last one; `None` if it is not
/// made only of text and slots whose insides are dotted identifiers (blocks, comments,
/// filters, operators, literals).
fn scan(source: &str) -> Option<(Vec<Scanned<'_>>, &str)> {
    if source.contains("{%") || source.contains("{#") {
        return None;
    }
    let mut slots = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let inner = &after[..end];
        // One `-` on either side is whitespace control; a second one would be a minus.
        let path = inner.strip_prefix('-').unwrap_or(inner);
        let path = path.strip_suffix('-').unwrap_or(path).trim();
        let is_ident = |s: &str| {
            let mut chars = s.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let root = path.split('.').next().unwrap_or_default();
        // Constants, `self` (which every template defines) and the keywords of expressions:
        // not variables, so not slots.
        let keyword =
            matches!(root, "true" | "false" | "none" | "True" | "False" | "None" | "self" | "and" | "or" | "not" | "in" | "is" | "if" | "else");
        if keyword || !path.split('.').all(is_ident) {
            return None;
        }
        slots.push(Scanned { text: &rest[..start], inner });
        rest = &after[end + 2..];
    }
    Some((slots, rest))
}

fn path_of(inner: &str) -> &str {
    let path = inner.strip_prefix('-').unwrap_or(inner);
    path.strip_suffix('-').unwrap_or(path).trim()
}

/// A value a slot's path resolved to.
pub enum Slot<'a> {
    Text(&'a str),
    Json(&'a Value),
    Number(u64),
}

/// A context a slot's path can be looked up in directly. `None` (the default) sends the
/// rendering through minijinja.
pub trait Resolve {
    fn resolve(&self, _path: &[&str]) -> Option<Slot<'_>> {
        None
    }
}

impl Resolve for Value {
    fn resolve(&self, path: &[&str]) -> Option<Slot<'_>> {
        walk(self, path).map(Slot::Json)
    }
}

/// The value at `path` through nested objects (a slot's `a.b` is a key lookup).
pub fn walk<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.as_object()?.get(*key))
}

/// A piece of a slot template, as byte offsets into its source (no copies: a graph of
/// 10,000 prompts keeps only these).
enum Piece {
    Text(u32, u32),
    Path(u32, u32),
}

/// A slot template split once into text and paths.
pub(super) struct Slots {
    pieces: Box<[Piece]>,
    /// Bytes of text, to size the output once.
    text_len: usize,
}

/// What a slot template reads (each slot's path, exactly what minijinja's
/// `undeclared_variables(true)` finds in it) and, when it uses no whitespace control
/// (`{{-`, left to minijinja), its pieces for rendering without minijinja; one scan for
/// both. `None` for any other template. Only called on a template that compiled, so every
/// `{{` has its `}}`.
pub(super) fn analyse(source: &str) -> Option<(Vec<&str>, Option<Slots>)> {
    // minijinja drops one trailing newline of the source (`keep_trailing_newline` off).
    let trimmed = source.strip_suffix('\n').unwrap_or(source);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    let (slots, tail) = scan(trimmed)?;
    let paths: Vec<&str> = slots.iter().map(|s| path_of(s.inner)).collect();
    let plain = slots.iter().all(|s| !s.inner.starts_with('-') && !s.inner.ends_with('-'));
    let offset = |part: &str| (part.as_ptr() as usize - source.as_ptr() as usize) as u32;
    let span = |part: &str| (offset(part), offset(part) + part.len() as u32);
    let pieces = plain.then(|| {
        let mut pieces = Vec::with_capacity(slots.len() * 2 + 1);
        for slot in &slots {
            if !slot.text.is_empty() {
                let (a, b) = span(slot.text);
                pieces.push(Piece::Text(a, b));
            }
            let (a, b) = span(path_of(slot.inner));
            pieces.push(Piece::Path(a, b));
        }
        if !tail.is_empty() {
            let (a, b) = span(tail);
            pieces.push(Piece::Text(a, b));
        }
        let text_len = slots.iter().map(|s| s.text.len()).sum::<usize>() + tail.len();
        Slots { pieces: pieces.into(), text_len }
    });
    Some((paths, pieces))
}

/// What a slot template reads (see [`analyse`]).
#[cfg(test)]
pub(super) fn slot_paths(source: &str) -> Option<Vec<&str>> {
    analyse(source).map(|(paths, _)| paths)
}

impl Slots {
    /// `None` unless `source` is a slot template without whitespace control.
    #[cfg(test)]
    pub(super) fn parse(source: &str) -> Option<Slots> {
        analyse(source).and_then(|(_, slots)| slots)
    }

    /// The rendering of `source` (the template these pieces were made from), or `None` when
    /// a slot does not resolve to a string, an integer or a boolean, or the text would
    /// exceed `limit` bytes: minijinja renders it then.
    pub(super) fn render(&self, source: &str, context: &impl Resolve, limit: usize) -> Option<String> {
        let mut out = String::with_capacity(self.text_len + 16);
        let mut path: Vec<&str> = Vec::new();
        for piece in &self.pieces {
            match *piece {
                Piece::Text(a, b) => out.push_str(source.get(a as usize..b as usize)?),
                Piece::Path(a, b) => {
                    path.clear();
                    path.extend(source.get(a as usize..b as usize)?.split('.'));
                    match context.resolve(&path)? {
                        Slot::Text(text) => out.push_str(text),
                        Slot::Number(n) => write!(out, "{n}").ok()?,
                        Slot::Json(Value::String(text)) => out.push_str(text),
                        // minijinja prints booleans as Python does.
                        Slot::Json(Value::Bool(b)) => out.push_str(if *b { "True" } else { "False" }),
                        Slot::Json(Value::Number(n)) if n.is_i64() || n.is_u64() => write!(out, "{n}").ok()?,
                        // Floats, null, lists and maps print as minijinja formats them.
                        Slot::Json(_) => return None,
                    }
                }
            }
            if out.len() > limit {
                return None;
            }
        }
        Some(out)
    }
}
