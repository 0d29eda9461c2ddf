//! Authentication before the upgrade, and origin checks.
//!
//! As in go-ws, an [`Authenticator`] looks at the HTTP upgrade request and either names the
//! user (an [`Identity`], attached to the client before `on_connect` runs) or refuses, in which
//! case the hub answers `401 Unauthorized`, calls `on_auth_failure`, and never upgrades.
//!
//! ```
//! use wshub::{ApiKeyAuth, HubConfig};
//!
//! let config = HubConfig::builder()
//!     .authenticator(ApiKeyAuth::new([("s3cret-key", "alice")]))
//!     .build()
//!     .unwrap();
//! # let _ = config;
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use http::{HeaderMap, Uri};
use serde_json::Value;

/// The parts of an upgrade request an authenticator may look at.
#[derive(Debug)]
pub struct AuthRequest<'a> {
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// The request's URI, with its query.
    pub uri: &'a Uri,
    /// The peer's address, when known.
    pub remote_addr: Option<SocketAddr>,
}

/// Who an authenticated client is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    /// The user's id; [`Hub::send_to_user`](crate::Hub::send_to_user) reaches every connection
    /// that has it.
    pub user_id: String,
    /// Anything else the authenticator knows (roles, tenant): readable in policies and snapshots.
    pub claims: Value,
}

impl Identity {
    /// An identity with no claims.
    pub fn new(user_id: impl Into<String>) -> Self {
        Identity {
            user_id: user_id.into(),
            claims: Value::Null,
        }
    }

    /// Sets the claims.
    pub fn with_claims(mut self, claims: Value) -> Self {
        self.claims = claims;
        self
    }
}

/// Why an authenticator refused a request. Shown to `on_auth_failure`, never to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthError {
    reason: String,
}

impl AuthError {
    /// A refusal with a reason for the logs.
    pub fn new(reason: impl Into<String>) -> Self {
        AuthError {
            reason: reason.into(),
        }
    }

    /// The reason given.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "authentication failed: {}", self.reason)
    }
}

impl std::error::Error for AuthError {}

/// Decides, from the upgrade request alone, who a client is or that it may not connect.
///
/// It runs on the connection's task before the upgrade, so it should be quick; work that needs
/// IO is better done beforehand (cache the keys) or by the application's own HTTP layer.
/// Any `Fn(&AuthRequest) -> Result<Identity, AuthError>` is an authenticator.
pub trait Authenticator: Send + Sync + 'static {
    /// Names the client, or refuses it (the hub answers 401).
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<Identity, AuthError>;
}

impl<F> Authenticator for F
where
    F: Fn(&AuthRequest<'_>) -> Result<Identity, AuthError> + Send + Sync + 'static,
{
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        self(request)
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (scheme in any case), if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of query parameter `name` in `uri`, percent-decoded, if present and non-empty.
pub fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key).as_deref() == Some(name))
            .then(|| percent_decode(value))
            .flatten()
            .filter(|v| !v.is_empty())
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Authenticates `Authorization: Bearer KEY` against a fixed set of API keys, each naming a
/// user, as go-ws's API-key authenticator does.
///
/// ```
/// use wshub::{ApiKeyAuth, AuthRequest, Authenticator};
///
/// let auth = ApiKeyAuth::new([("k1", "alice")]);
/// let mut headers = http::HeaderMap::new();
/// headers.insert("authorization", "bearer k1".parse().unwrap());
/// let uri = "/ws".parse().unwrap();
/// let who = auth.authenticate(&AuthRequest { headers: &headers, uri: &uri, remote_addr: None });
/// assert_eq!(who.unwrap().user_id, "alice");
/// ```
#[derive(Clone, Debug, Default)]
pub struct ApiKeyAuth {
    keys: HashMap<String, String>,
}

impl ApiKeyAuth {
    /// An authenticator for these `(key, user id)` pairs.
    pub fn new<K: Into<String>, U: Into<String>>(keys: impl IntoIterator<Item = (K, U)>) -> Self {
        ApiKeyAuth {
            keys: keys
                .into_iter()
                .map(|(k, u)| (k.into(), u.into()))
                .collect(),
        }
    }
}

impl Authenticator for ApiKeyAuth {
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        let key =
            bearer_token(request.headers).ok_or_else(|| AuthError::new("missing bearer token"))?;
        let user = self
            .keys
            .get(key)
            .ok_or_else(|| AuthError::new("unknown api key"))?;
        Ok(Identity::new(user.clone()))
    }
}

type Validate = dyn Fn(&str) -> Result<Identity, AuthError> + Send + Sync;

/// Validates the token of `Authorization: Bearer TOKEN` with the application's function (a JWT
/// check, a session lookup in memory).
pub struct BearerTokenAuth {
    validate: Box<Validate>,
}

impl BearerTokenAuth {
    /// An authenticator that passes the bearer token to `validate`.
    pub fn new(
        validate: impl Fn(&str) -> Result<Identity, AuthError> + Send + Sync + 'static,
    ) -> Self {
        BearerTokenAuth {
            validate: Box::new(validate),
        }
    }
}

impl Authenticator for BearerTokenAuth {
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        let token =
            bearer_token(request.headers).ok_or_else(|| AuthError::new("missing bearer token"))?;
        (self.validate)(token)
    }
}

impl fmt::Debug for BearerTokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerTokenAuth")
    }
}

/// Validates a `?token=` query parameter with the application's function: for browsers, whose
/// WebSocket API cannot set headers. Tokens in URLs end up in proxy logs; prefer short-lived ones.
pub struct QueryTokenAuth {
    param: String,
    validate: Box<Validate>,
}

impl QueryTokenAuth {
    /// An authenticator that passes the `token` query parameter to `validate`.
    pub fn new(
        validate: impl Fn(&str) -> Result<Identity, AuthError> + Send + Sync + 'static,
    ) -> Self {
        QueryTokenAuth {
            param: "token".to_owned(),
            validate: Box::new(validate),
        }
    }

    /// Reads the token from parameter `name` instead of `token`.
    pub fn with_param(mut self, name: impl Into<String>) -> Self {
        self.param = name.into();
        self
    }
}

impl Authenticator for QueryTokenAuth {
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<Identity, AuthError> {
        let token = query_param(request.uri, &self.param)
            .ok_or_else(|| AuthError::new(format!("missing ?{}= parameter", self.param)))?;
        (self.validate)(&token)
    }
}

impl fmt::Debug for QueryTokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryTokenAuth")
            .field("param", &self.param)
            .finish()
    }
}

/// An origin as scheme, lower-case host and port (the scheme's default when not given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]`; `None` for anything else (including `null`).
    pub(crate) fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.trim().split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return None;
        }
        let default_port = match scheme.as_str() {
            "http" | "ws" => 80,
            "https" | "wss" => 443,
            _ => return None,
        };
        // An IPv6 host is bracketed: [::1]:8080.
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                (&authority[..i], authority[i + 1..].parse().ok()?)
            }
            _ => (authority, default_port),
        };
        if host.is_empty() {
            return None;
        }
        Some(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// Whether a request with `Origin` header `origin` may connect, given the allow-list. An empty
/// list allows every origin; a request without `Origin` (not a browser) is always allowed.
pub(crate) fn origin_allowed(allowed: &[Origin], origin: Option<&[u8]>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin else {
        return true;
    };
    std::str::from_utf8(origin)
        .ok()
        .and_then(Origin::parse)
        .is_some_and(|origin| allowed.contains(&origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        headers
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("BEARER abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn api_keys_name_their_users() {
        let auth = ApiKeyAuth::new([("k1", "alice"), ("k2", "bob")]);
        let uri: Uri = "/ws".parse().unwrap();
        let check = |h: &HeaderMap| {
            auth.authenticate(&AuthRequest {
                headers: h,
                uri: &uri,
                remote_addr: None,
            })
        };
        assert_eq!(check(&headers("Bearer k2")).unwrap().user_id, "bob");
        assert!(check(&headers("Bearer nope")).is_err());
        assert!(check(&HeaderMap::new()).is_err());
    }

    #[test]
    fn query_tokens_are_percent_decoded() {
        let uri: Uri = "/ws?a=1&token=x%2By+z&b".parse().unwrap();
        assert_eq!(query_param(&uri, "token").as_deref(), Some("x+y z"));
        assert_eq!(query_param(&uri, "b"), None);
        assert_eq!(query_param(&"/ws".parse().unwrap(), "token"), None);
        assert_eq!(
            query_param(&"/ws?token=%zz".parse().unwrap(), "token"),
            None
        );
    }

    #[test]
    fn origins_match_on_scheme_host_and_port() {
        let allowed = vec![
            Origin::parse("https://App.example.com").unwrap(),
            Origin::parse("http://localhost:3000").unwrap(),
            Origin::parse("http://[::1]:8080").unwrap(),
        ];
        let ok = |o: &str| origin_allowed(&allowed, Some(o.as_bytes()));
        assert!(ok("https://app.EXAMPLE.com"));
        assert!(ok("https://app.example.com:443"));
        assert!(ok("http://localhost:3000"));
        assert!(ok("http://[::1]:8080"));
        assert!(!ok("http://app.example.com"));
        assert!(!ok("https://app.example.com:8443"));
        assert!(!ok("http://localhost:3001"));
        assert!(!ok("https://evil.example.com"));
        assert!(!ok("null"));
        assert!(origin_allowed(&allowed, None), "no Origin: not a browser");
        assert!(origin_allowed(&[], Some(b"https://anything")));
    }
}
