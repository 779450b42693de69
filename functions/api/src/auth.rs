//! Who is calling. Identity always comes from a verified token:
//! - in AWS, the HTTP API's JWT authorizer has verified it and passes the claims in the
//!   request context (never a header a client could set);
//! - locally, the function verifies an HS256 token signed with the stack's dev key
//!   (`make token USER=… GROUPS=…` mints one).

use chainrun_core::config::{ConfigError, Source};
use chainrun_core::ids::{Principal, UserId};
use http::HeaderMap;
use http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub const LOCAL_ISSUER: &str = "chainrun-local";
pub const LOCAL_AUDIENCE: &str = "chainrun";
/// Members of this group see every run.
pub const ADMIN_GROUP: &str = "admin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub groups: Vec<String>,
}

/// Marks a request that came in under `/public/`: its caller is anonymous whatever it
/// sends, because in AWS those routes have no authorizer to vouch for a token.
#[derive(Debug, Clone, Copy)]
pub struct Anonymous;

impl Identity {
    /// A caller without a token (the `/public/` routes).
    pub fn anonymous() -> Self {
        Self { user: UserId::anonymous(), groups: Vec::new() }
    }

    pub fn is_anonymous(&self) -> bool {
        self.user.is_anonymous()
    }

    pub fn is_admin(&self) -> bool {
        !self.is_anonymous() && self.groups.iter().any(|g| g == ADMIN_GROUP)
    }

    /// This caller as the access rules see it.
    pub fn viewer(&self) -> chainrun_core::access::Viewer<'_> {
        chainrun_core::access::Viewer { user: &self.user, groups: &self.groups, admin: self.is_admin() }
    }

    /// Every principal this caller acts as, for visibility checks: anyone is `PUBLIC`; a
    /// signed-in caller is also themself, `AUTHED` and their groups; admins are `ADMIN`.
    pub fn principals(&self) -> Vec<Principal> {
        if self.is_anonymous() {
            return vec![Principal::Public];
        }
        let mut p = vec![Principal::User(self.user.to_string()), Principal::Authed, Principal::Public];
        p.extend(self.groups.iter().cloned().map(Principal::Group));
        if self.is_admin() {
            p.push(Principal::Admin);
        }
        p
    }

    /// The feeds `GET /progress` reads by default: the caller's own, their groups' and (for
    /// admins) the admin feed; the `AUTHED` and `PUBLIC` feeds only when asked for, since
    /// every run anyone makes visible to all would drown the caller's own.
    pub fn own_feeds(&self) -> Vec<Principal> {
        self.principals().into_iter().filter(|p| !matches!(p, Principal::Authed | Principal::Public) || self.is_anonymous()).collect()
    }
}

#[derive(Clone)]
pub enum Authenticator {
    /// Claims from API Gateway's JWT authorizer (`requestContext.authorizer.jwt.claims`).
    ApiGatewayJwt,
    /// A bearer token verified here with a shared dev key.
    LocalJwt { key: DecodingKey },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::ApiGatewayJwt => "ApiGatewayJwt",
            Authenticator::LocalJwt { .. } => "LocalJwt",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct LocalClaims {
    sub: String,
    #[serde(default)]
    groups: Vec<String>,
}

impl Authenticator {
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        match env.get("CHAINRUN_AUTH").as_deref().unwrap_or("apigateway-jwt") {
            "apigateway-jwt" => Ok(Authenticator::ApiGatewayJwt),
            "local-jwt" => {
                let secret = env.required("CHAINRUN_LOCAL_JWT_SECRET")?;
                if secret.len() < 32 {
                    return Err(ConfigError::Invalid { name: "CHAINRUN_LOCAL_JWT_SECRET", reason: "must be at least 32 characters".into() });
                }
                Ok(Self::local(secret.as_bytes()))
            }
            other => Err(ConfigError::Invalid { name: "CHAINRUN_AUTH", reason: format!("{other:?}: expected \"apigateway-jwt\" or \"local-jwt\"") }),
        }
    }

    pub fn local(secret: &[u8]) -> Self {
        Authenticator::LocalJwt { key: DecodingKey::from_secret(secret) }
    }

    pub fn identify(&self, parts: &Parts) -> Result<Identity, AuthError> {
        match self {
            Authenticator::LocalJwt { key } => verify_local(key, &parts.headers),
            Authenticator::ApiGatewayJwt => from_authorizer(parts),
        }
    }
}

fn verify_local(key: &DecodingKey, headers: &HeaderMap) -> Result<Identity, AuthError> {
    let header = headers.get(http::header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| AuthError::Invalid("expected `Authorization: Bearer <token>`".into()))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[LOCAL_ISSUER]);
    validation.set_audience(&[LOCAL_AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    let data = jsonwebtoken::decode::<LocalClaims>(token.trim(), key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
    identity(data.claims.sub, data.claims.groups)
}

fn identity(user: String, groups: Vec<String>) -> Result<Identity, AuthError> {
    if user.trim().is_empty() {
        return Err(AuthError::Invalid("the token has an empty subject".into()));
    }
    if user.starts_with('~') {
        return Err(AuthError::Invalid("subjects starting with `~` are reserved".into()));
    }
    let user = UserId::parse(&user).map_err(|e| AuthError::Invalid(format!("the token's subject is not a user id: {e}")))?;
    Ok(Identity { user, groups })
}

fn from_authorizer(parts: &Parts) -> Result<Identity, AuthError> {
    use lambda_http::request::RequestContext;
    let Some(RequestContext::ApiGatewayV2(ctx)) = parts.extensions.get::<RequestContext>() else {
        return Err(AuthError::Missing);
    };
    let jwt = ctx.authorizer.as_ref().and_then(|a| a.jwt.as_ref()).ok_or(AuthError::Missing)?;
    let sub = jwt.claims.get("sub").cloned().ok_or_else(|| AuthError::Invalid("the token has no subject".into()))?;
    let groups = jwt.claims.get("cognito:groups").or_else(|| jwt.claims.get("groups")).map(|g| parse_group_claim(g)).unwrap_or_default();
    identity(sub, groups)
}

/// API Gateway flattens array claims into strings: `[a b]` (Cognito), or a JSON array.
fn parse_group_claim(raw: &str) -> Vec<String> {
    if let Ok(list) = serde_json::from_str::<Vec<String>>(raw) {
        return list;
    }
    raw.trim_matches(|c| c == '[' || c == ']').split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flattened_group_claims() {
        assert_eq!(parse_group_claim("[eng ops]"), ["eng", "ops"]);
        assert_eq!(parse_group_claim("[\"eng\",\"ops\"]"), ["eng", "ops"]);
        assert_eq!(parse_group_claim("eng,ops"), ["eng", "ops"]);
    }
}
