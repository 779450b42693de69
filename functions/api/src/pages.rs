//! The two pages a browser opens: `GET /runs/{id}/view` (a run as its graph, a timeline of
//! every attempt, tokens and costs, streamed text and what waits for a person, followed
//! live) and `GET /analytics/view` (cost per workflow per day, the most expensive steps).
//!
//! Each page is one self-contained HTML document compiled into the binary: inline SVG,
//! style and script, nothing fetched from elsewhere, no build step. The document is the
//! same for every run and every caller and holds no data: its script reads the API from
//! the browser, with the caller's token. So the routes need no token (a browser that
//! follows a link cannot send one), and the token never reaches a server log: the script
//! takes it from the URL fragment (`#token=…`, which browsers do not send), keeps it in
//! `sessionStorage` and removes it from the address bar, or asks for it; without one it
//! reads the `/public` routes, which serve `PUBLIC` runs to anyone.
//!
//! Why the run page answers every well-formed run id, even one nobody has: whether a run
//! exists is for the API to say to a caller it has identified, and the page's route
//! identifies nobody. A malformed id is refused (`404`), which reveals nothing either.
//!
//! The pages share a stylesheet and a script (token handling, API calls, SVG helpers),
//! spliced in once, at first use; the `Content-Security-Policy` allows exactly those
//! inline blocks by their SHA-256, and nothing else (`connect-src 'self'` for the API).

use crate::error::ApiError;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chainrun_core::ids::RunId;
use http::{HeaderValue, header};
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

const STYLE: &str = include_str!("../assets/page.css");
const COMMON: &str = include_str!("../assets/page.js");
const MESSAGES: &str = include_str!("../assets/messages.html");
const RUN_PAGE: &str = include_str!("../assets/run.html");
const COST_PAGE: &str = include_str!("../assets/costs.html");

/// Where a page's HTML takes the shared stylesheet and script.
const STYLE_SLOT: &str = "/*chainrun:style*/";
const COMMON_SLOT: &str = "/*chainrun:common*/";
/// …and the notice, token form and problem box the shared script fills (`page.js`).
const MESSAGES_SLOT: &str = "<!--chainrun:messages-->";

/// A page as served: its HTML, and the policy allowing exactly its inline blocks.
struct Page {
    html: String,
    policy: HeaderValue,
}

static RUN: LazyLock<Page> = LazyLock::new(|| Page::assemble(RUN_PAGE));
static COSTS: LazyLock<Page> = LazyLock::new(|| Page::assemble(COST_PAGE));

impl Page {
    fn assemble(template: &str) -> Self {
        let html = template.replacen(STYLE_SLOT, STYLE, 1).replacen(COMMON_SLOT, COMMON, 1).replacen(MESSAGES_SLOT, MESSAGES, 1);
        let hashes = |tag: &str| {
            inline_blocks(&html, tag).map(|block| format!("'sha256-{}'", STANDARD.encode(Sha256::digest(block)))).collect::<Vec<_>>().join(" ")
        };
        let policy = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hashes("script"),
            hashes("style")
        );
        // Base64 and the fixed words are visible ASCII: always a valid header value.
        let policy = HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
        Self { html, policy }
    }

    fn response(&self) -> Response {
        (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
                (header::CONTENT_SECURITY_POLICY, self.policy.clone()),
                (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
                (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
                // The document changes only with a deployment; revalidating costs nothing.
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            self.html.clone(),
        )
            .into_response()
    }
}

/// The contents of every `<tag>…</tag>` in `html`, as a CSP hash covers them.
fn inline_blocks<'a>(html: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let end = rest[start..].find(&close)? + start;
        let block = &rest[start..end];
        rest = &rest[end + close.len()..];
        Some(block)
    })
}

/// `GET /runs/{id}/view`.
pub(crate) async fn run_view(Path(id): Path<String>) -> Result<Response, ApiError> {
    RunId::parse(&id).map_err(|_| ApiError::NotFound(format!("{:?} is not a run id", id.chars().take(40).collect::<String>())))?;
    Ok(RUN.response())
}

/// `GET /analytics/view`.
pub(crate) async fn cost_view() -> Response {
    COSTS.response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_inline_block_is_found_and_hashed_into_the_policy() {
        let page = Page::assemble("<style>a{}</style><p>x</p><script>one()</script><script>two()</script>");
        let blocks: Vec<_> = inline_blocks(&page.html, "script").collect();
        assert_eq!(blocks, ["one()", "two()"]);
        let policy = page.policy.to_str().unwrap_or_default();
        // sha256("one()"), as `echo -n 'one()' | openssl dgst -sha256 -binary | base64` gives it.
        let one = STANDARD.encode(Sha256::digest("one()"));
        assert!(policy.contains(&format!("script-src 'sha256-{one}' 'sha256-")), "{policy}");
        assert!(policy.contains("style-src 'sha256-"), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
    }

    #[test]
    fn the_shared_style_script_and_messages_are_spliced_into_both_pages() {
        for page in [&*RUN, &*COSTS] {
            assert!(!page.html.contains(STYLE_SLOT) && !page.html.contains(COMMON_SLOT) && !page.html.contains(MESSAGES_SLOT));
            assert!(page.html.contains(COMMON.trim()) && page.html.contains(STYLE.trim()) && page.html.contains(MESSAGES.trim()));
        }
    }
}
