//! Tokens for a local stack, signed with its `CHAINRUN_LOCAL_JWT_SECRET` exactly as
//! `infra/local_token.py` signs them (HS256; `iss` chainrun-local, `aud` chainrun), so the
//! CLI needs no Python to talk to `make up`'s stack.

use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

pub const ISSUER: &str = "chainrun-local";
pub const AUDIENCE: &str = "chainrun";
/// As long as `make token`'s tokens live.
const TTL_SECS: u64 = 12 * 3600;

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    groups: &'a [String],
    iss: &'static str,
    aud: &'static str,
    iat: u64,
    exp: u64,
}

/// A bearer token for `user` in `groups`, valid for 12 hours.
pub fn mint(secret: &str, user: &str, groups: &[String]) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let claims = Claims { sub: user, groups, iss: ISSUER, aud: AUDIENCE, iat: now, exp: now + TTL_SECS };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};

    #[test]
    fn a_minted_token_verifies_as_the_api_verifies_local_tokens() {
        let token = mint("s3cret", "alice", &["eng".to_owned()]).expect("mint");
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        let claims = decode::<serde_json::Value>(&token, &DecodingKey::from_secret(b"s3cret"), &validation).expect("valid").claims;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["groups"], serde_json::json!(["eng"]));
        assert!(decode::<serde_json::Value>(&token, &DecodingKey::from_secret(b"other"), &validation).is_err());
    }
}
