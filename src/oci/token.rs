//! Registry authentication as docker does it: learn a host's challenge (`WWW-Authenticate` on
//! `GET /v2/`), then send Basic credentials or fetch a Bearer token for the request's scopes
//! from the token endpoint, cached per host and scope until shortly before it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use serde::Deserialize;
use url::Url;

use super::credentials::{Credential, CredentialStore, Secret};
use super::endpoint::Endpoints;

/// Errors of authenticating against a registry. Messages never name the token realm: they can
/// reach a client of the proxy, which must not learn where the registry's credentials are sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached to learn its challenge.
    #[error("cannot reach registry {host}")]
    Ping {
        /// The registry host.
        host: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The token endpoint could not be reached or answered garbage.
    #[error("the token request failed")]
    TokenRequest {
        /// The token endpoint.
        realm: String,
        /// The transport or decoding error.
        #[source]
        source: reqwest::Error,
    },
    /// The token endpoint refused the credentials.
    #[error("the token endpoint refused the credentials with status {status}")]
    TokenRefused {
        /// The token endpoint.
        realm: String,
        /// Its HTTP status.
        status: u16,
    },
    /// The token endpoint's answer is larger than a token response can be.
    #[error("the token response is larger than {MAX_TOKEN_RESPONSE} bytes")]
    TokenTooLarge {
        /// The token endpoint.
        realm: String,
    },
    /// The token endpoint's answer is not a token response.
    #[error("the token response is not valid json")]
    TokenInvalid {
        /// The token endpoint.
        realm: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The challenge names a realm that is not an http(s) URL.
    #[error("the challenge names a token realm that is not an http(s) URL")]
    BadRealm {
        /// The realm as given.
        realm: String,
    },
    /// Credentials would go over plain HTTP to a host that is not loopback or declared insecure.
    #[error("refusing to send credentials to a plain-HTTP token realm")]
    PlainHttpRealm {
        /// The token endpoint.
        realm: String,
    },
}

/// Largest token response read (real ones are a few KiB; a JWT with a certificate chain ~10).
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// How a registry asks to be authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// No authentication needed.
    None,
    /// HTTP Basic.
    Basic,
    /// Token authentication.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter.
        service: Option<String>,
        /// The scope(s) the registry asked for, space-separated, if any.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header; quoted values may hold commas and spaces (distribution
/// puts several scopes, space-separated, into one `scope="..."`).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    let params = parse_params(rest);
    let get = |k: &str| params.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            Some(Challenge::Bearer { realm: get("realm")?, service: get("service"), scope: get("scope") })
        }
        _ => None,
    }
}

fn parse_params(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let Some(eq) = s.find('=') else { return out };
        let key = s[..eq].trim().to_string();
        s = &s[eq + 1..];
        let value;
        if let Some(quoted) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &quoted[end.min(quoted.len())..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        out.push((key, value));
    }
}

/// The scope string for a repository: `repository:<name>:<actions>`.
pub fn repository_scope(repository: &str, push: bool) -> String {
    format!("repository:{repository}:{}", if push { "pull,push" } else { "pull" })
}

#[derive(Clone)]
struct Token {
    value: Secret,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

type TokenKey = (String, String, u64);

/// Per-host challenges and a token cache in front of a credential store.
pub struct Authenticator {
    http: reqwest::Client,
    creds: Arc<CredentialStore>,
    endpoints: Endpoints,
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<TokenKey, Token>>,
}

impl Authenticator {
    /// An authenticator that uses `http` for pings and token requests.
    pub fn new(http: reqwest::Client, creds: Arc<CredentialStore>, endpoints: Endpoints) -> Self {
        Self { http, creds, endpoints, challenges: Mutex::default(), tokens: Mutex::default() }
    }

    /// The `Authorization` header for a request to registry `host` (as in a reference) needing
    /// `scopes`, or `None` for an anonymous request.
    pub async fn authorization(&self, host: &str, scopes: &[String]) -> Result<Option<HeaderValue>, Error> {
        let (cred, generation) = self.creds.lookup(host);
        if let Some(Credential::RegistryToken(t)) = &cred {
            return Ok(Some(bearer(t)));
        }
        let challenge = match self.known_challenge(host) {
            Some(c) => c,
            None => self.ping(host).await?,
        };
        match challenge {
            Challenge::None => Ok(None),
            Challenge::Basic => Ok(match &cred {
                Some(Credential::Basic { username, password }) => {
                    let raw = STANDARD.encode(format!("{username}:{}", password.expose()));
                    Some(sensitive(&format!("Basic {raw}")))
                }
                _ => None,
            }),
            Challenge::Bearer { realm, service, .. } => {
                let key = (host.to_string(), scopes.join(" "), generation);
                if let Some(t) = self.cached(&key) {
                    return Ok(Some(bearer(&t.value)));
                }
                let token = self.fetch(&realm, service.as_deref(), scopes, cred.as_ref()).await?;
                let header = bearer(&token.value);
                self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(key, token);
                Ok(Some(header))
            }
        }
    }

    /// Records a `401` from `host`: forgets tokens for the host and learns its challenge again.
    /// Returns the scopes the registry asked for, to be added on the retry.
    pub fn unauthorized(&self, host: &str, www_authenticate: Option<&HeaderValue>) -> Vec<String> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).retain(|(h, _, _), _| h != host);
        let challenge = www_authenticate.and_then(|v| v.to_str().ok()).and_then(parse_challenge);
        let mut challenges = self.challenges.lock().unwrap_or_else(|e| e.into_inner());
        match challenge {
            Some(c) => {
                let scopes = match &c {
                    Challenge::Bearer { scope: Some(s), .. } => s.split(' ').map(str::to_string).collect(),
                    _ => Vec::new(),
                };
                challenges.insert(host.to_string(), c);
                scopes
            }
            None => {
                challenges.remove(host);
                Vec::new()
            }
        }
    }

    fn known_challenge(&self, host: &str) -> Option<Challenge> {
        self.challenges.lock().unwrap_or_else(|e| e.into_inner()).get(host).cloned()
    }

    fn cached(&self, key: &TokenKey) -> Option<Token> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.get(key).filter(|t| Instant::now() < t.refresh_at).cloned()
    }

    async fn ping(&self, host: &str) -> Result<Challenge, Error> {
        let url = self.endpoints.base_url(host).join("v2/").expect("static path");
        let resp =
            self.http.get(url).send().await.map_err(|source| Error::Ping { host: host.into(), source })?;
        let challenge = if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            resp.headers()
                .get(http::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge)
                .unwrap_or(Challenge::None)
        } else {
            Challenge::None
        };
        tracing::debug!(host, ?challenge, "learned registry challenge");
        self.challenges.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), challenge.clone());
        Ok(challenge)
    }

    async fn fetch(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        cred: Option<&Credential>,
    ) -> Result<Token, Error> {
        let mut url = Url::parse(realm).map_err(|_| Error::BadRealm { realm: realm.into() })?;
        let realm_host = match (url.scheme(), url.host_str()) {
            ("http" | "https", Some(h)) => match url.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_string(),
            },
            _ => return Err(Error::BadRealm { realm: realm.into() }),
        };
        if cred.is_some() && url.scheme() == "http" && !self.endpoints.is_plain_http(&realm_host) {
            return Err(Error::PlainHttpRealm { realm: realm.into() });
        }
        tracing::debug!(realm, "fetching a registry token");
        let started = Instant::now();
        let request = match cred {
            Some(Credential::IdentityToken(refresh)) => {
                // docker's OAuth2 flow: exchange the refresh token with a form POST.
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token").append_pair("client_id", "bob");
                form.append_pair("refresh_token", refresh.expose());
                if let Some(s) = service {
                    form.append_pair("service", s);
                }
                if !scopes.is_empty() {
                    form.append_pair("scope", &scopes.join(" "));
                }
                self.http
                    .post(url)
                    .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.finish())
            }
            other => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scopes {
                        q.append_pair("scope", s);
                    }
                }
                let req = self.http.get(url);
                match other {
                    Some(Credential::Basic { username, password }) => {
                        req.basic_auth(username, Some(password.expose()))
                    }
                    _ => req,
                }
            }
        };
        let realm_s = realm.to_string();
        let resp = request
            .send()
            .await
            .map_err(|e| Error::TokenRequest { realm: realm_s.clone(), source: e.without_url() })?;
        if !resp.status().is_success() {
            return Err(Error::TokenRefused { realm: realm_s, status: resp.status().as_u16() });
        }
        let bytes = super::transport::read_capped(resp, MAX_TOKEN_RESPONSE)
            .await
            .map_err(|e| Error::TokenRequest { realm: realm_s.clone(), source: e.without_url() })?
            .ok_or_else(|| Error::TokenTooLarge { realm: realm_s.clone() })?;
        let body: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|source| Error::TokenInvalid { realm: realm_s.clone(), source })?;
        let value = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or(Error::TokenRefused { realm: realm_s, status: 200 })?;
        // The spec's default lifetime is 60 s; refresh a little early so no request races expiry.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        tracing::debug!(scopes = ?scopes, lifetime_s = lifetime.as_secs(), "fetched registry token");
        Ok(Token { value: Secret::new(value), refresh_at: started + lifetime - margin })
    }
}

fn sensitive(value: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

fn bearer(token: &Secret) -> HeaderValue {
    sensitive(&format!("Bearer {}", token.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_with_multiple_scopes() {
        let c = parse_challenge(
            r#"Bearer realm="http://127.0.0.1:5003/token",service="test-registry",scope="repository:a:pull,push repository:b:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://127.0.0.1:5003/token".into(),
                service: Some("test-registry".into()),
                scope: Some("repository:a:pull,push repository:b:pull".into()),
            }
        );
    }

    #[test]
    fn parses_basic_and_rejects_unknown() {
        assert_eq!(parse_challenge(r#"Basic realm="basic-realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None, "bearer without realm");
        let c = parse_challenge(r#"bearer realm=https://auth.test/token, service="a\"b""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.test/token".into(),
                service: Some("a\"b".into()),
                scope: None
            }
        );
    }

    #[test]
    fn scopes_name_actions() {
        assert_eq!(repository_scope("base/x", false), "repository:base/x:pull");
        assert_eq!(repository_scope("base/x", true), "repository:base/x:pull,push");
    }
}
