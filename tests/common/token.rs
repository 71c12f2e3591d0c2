//! A token server for registry token auth, written for the tests: RS256 JWTs with an `x5c`
//! header, a self-signed certificate made with `openssl`, Basic credentials or an OAuth2 refresh
//! token for full access, anonymous callers get `pull` only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};

pub const SERVICE: &str = "test-registry";
pub const ISSUER: &str = "test-issuer";

struct Inner {
    key: RsaKeyPair,
    cert_der_b64: String,
    basic: String,
    refresh_token: String,
    lifetime: u64,
    requests: AtomicUsize,
    issued: std::sync::Mutex<Vec<String>>,
}

/// The running token server.
pub struct TokenServer {
    addr: std::net::SocketAddr,
    inner: Arc<Inner>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).expect("PEM base64")
}

impl TokenServer {
    /// Starts a token server for `user:password` whose tokens live `lifetime` seconds.
    pub async fn start(user: &str, password: &str, lifetime: u64) -> Self {
        super::require("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        super::run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"])
                .args([
                    "-subj",
                    "/CN=test-token-issuer",
                    "-keyout",
                    key.to_str().unwrap(),
                    "-out",
                    cert.to_str().unwrap(),
                ]),
        );
        let key_der = pem_body(&std::fs::read_to_string(&key).unwrap());
        let cert_der = pem_body(&std::fs::read_to_string(&cert).unwrap());
        let inner = Arc::new(Inner {
            key: RsaKeyPair::from_pkcs8(&key_der).expect("PKCS#8 RSA key from openssl"),
            cert_der_b64: STANDARD.encode(cert_der),
            basic: format!("{user}:{password}"),
            refresh_token: format!("refresh-{password}"),
            lifetime,
            requests: AtomicUsize::new(0),
            issued: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/token", axum::routing::get(get_token).post(post_token))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenServer { addr, inner, dir, task }
    }

    /// The realm URL for the registry config.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The certificate file for the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// How many token requests were answered so far.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Every token issued so far (to prove none reaches a log).
    pub fn issued(&self) -> Vec<String> {
        self.inner.issued.lock().unwrap().clone()
    }

    /// The refresh token accepted as an `identitytoken`.
    pub fn refresh_token(&self) -> String {
        self.inner.refresh_token.clone()
    }

    /// The key directory (for tests that need to clean up explicitly).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn scopes_of(query: &str, key: &str) -> Vec<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == key)
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect()
}

async fn get_token(State(s): State<Arc<Inner>>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let q = q.unwrap_or_default();
    let scopes = scopes_of(&q, "scope");
    let sub = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(a) if a.starts_with("Basic ") => {
            let decoded = STANDARD.decode(&a[6..]).ok().and_then(|d| String::from_utf8(d).ok());
            if decoded.as_deref() != Some(s.basic.as_str()) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            Some(s.basic.split(':').next().unwrap().to_string())
        }
        _ => None,
    };
    issue(&s, sub, scopes)
}

async fn post_token(State(s): State<Arc<Inner>>, body: String) -> Response {
    let field = |k: &str| {
        url::form_urlencoded::parse(body.as_bytes()).find(|(key, _)| key == k).map(|(_, v)| v.into_owned())
    };
    if field("grant_type").as_deref() != Some("refresh_token")
        || field("refresh_token") != Some(s.refresh_token.clone())
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let scopes = scopes_of(&body, "scope");
    issue(&s, Some("oauth-user".into()), scopes)
}

fn issue(s: &Inner, sub: Option<String>, scopes: Vec<String>) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let mut access = Vec::new();
    for scope in scopes {
        let mut parts = scope.splitn(2, ':');
        let (typ, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let Some((name, actions)) = rest.rsplit_once(':') else { continue };
        let mut actions: Vec<&str> = actions.split(',').collect();
        if sub.is_none() {
            actions.retain(|a| *a == "pull");
        }
        access.push(serde_json::json!({"type": typ, "name": name, "actions": actions}));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let n = s.requests.load(Ordering::SeqCst);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [s.cert_der_b64]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": sub.unwrap_or_default(), "aud": SERVICE, "exp": now + s.lifetime,
        "nbf": now - 10, "iat": now, "jti": format!("jti-{now}-{n}"), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; s.key.public().modulus_len()];
    s.key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut sig).unwrap();
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
    s.issued.lock().unwrap().push(token.clone());
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": s.lifetime});
    ([("content-type", "application/json")], body.to_string()).into_response()
}
