//! Registry credentials from a docker config (`{"auths": {...}}`), matched to hosts the way
//! docker does, and a store that re-reads its file when it changes (Secret rotation).
//!
//! Credential types never print their secrets: `Debug` shows `<redacted>`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::bounded;

/// Errors of reading and parsing a docker config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file (or inline value) cannot be read, or is larger than a docker config may be.
    #[error(transparent)]
    Read(#[from] crate::bounded::Error),
    /// The JSON is not a docker config.
    #[error("invalid docker config JSON")]
    Json(#[source] serde_json::Error),
    /// An `auth` field is not base64 of `user:password`.
    #[error("invalid `auth` value for {key:?}: expected base64 of user:password")]
    AuthValue {
        /// The `auths` key whose entry is invalid.
        key: String,
    },
}

/// A string that must never reach a log: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a docker config holds for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (from `auth` or `username`/`password`).
    Basic {
        /// The user name (not secret, but logged only at debug level).
        username: String,
        /// The password.
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken`), exchanged at the token endpoint.
    IdentityToken(Secret),
    /// A bearer token sent as it is (`registrytoken`).
    RegistryToken(Secret),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { username, .. } => {
                f.debug_struct("Basic").field("username", username).field("password", &"<redacted>").finish()
            }
            Self::IdentityToken(_) => f.debug_tuple("IdentityToken").field(&"<redacted>").finish(),
            Self::RegistryToken(_) => f.debug_tuple("RegistryToken").field(&"<redacted>").finish(),
        }
    }
}

#[derive(Deserialize, Default)]
struct RawEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// A parsed docker config: normalised registry key → credential.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DockerConfig {
    auths: BTreeMap<String, Credential>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerConfig").field("registries", &self.auths.keys().collect::<Vec<_>>()).finish()
    }
}

impl DockerConfig {
    /// Parses `{"auths": {...}}` (a `.dockerconfigjson`) or the legacy flat `.dockercfg` map.
    pub fn parse(json: &str) -> Result<Self, Error> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(Error::Json)?;
        let map = match value.get("auths") {
            Some(auths) => auths.clone(),
            None => value,
        };
        let raw: BTreeMap<String, RawEntry> = serde_json::from_value(map).map_err(Error::Json)?;
        let mut auths = BTreeMap::new();
        for (key, entry) in raw {
            if let Some(cred) = credential_of(&key, entry)? {
                auths.insert(normalize_key(&key), cred);
            }
        }
        Ok(Self { auths })
    }

    /// The credential for a registry host as written in a reference (`host[:port]`), matched as
    /// docker does: exact `host:port`, then for the default port the bare host, and Docker Hub's
    /// aliases (`docker.io`, `index.docker.io`, `registry-1.docker.io`) as one registry.
    pub fn lookup(&self, host: &str) -> Option<&Credential> {
        let host = normalize_key(host);
        if let Some(c) = self.auths.get(&host) {
            return Some(c);
        }
        // `example.com:443` and `example.com` name the same TLS registry.
        let alt = match host.strip_suffix(":443") {
            Some(bare) => bare.to_string(),
            None if !host.contains(':') || host.ends_with(']') => format!("{host}:443"),
            None => return None,
        };
        self.auths.get(&alt)
    }

    /// Whether the config names no registry at all.
    pub fn is_empty(&self) -> bool {
        self.auths.is_empty()
    }
}

fn credential_of(key: &str, e: RawEntry) -> Result<Option<Credential>, Error> {
    let nonempty = |s: Option<String>| s.filter(|v| !v.is_empty());
    if let Some(token) = nonempty(e.registrytoken) {
        return Ok(Some(Credential::RegistryToken(Secret(token))));
    }
    if let Some(token) = nonempty(e.identitytoken) {
        return Ok(Some(Credential::IdentityToken(Secret(token))));
    }
    if let Some(auth) = nonempty(e.auth) {
        let bad = || Error::AuthValue { key: key.to_string() };
        let decoded = STANDARD.decode(auth.trim()).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = decoded.trim().split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credential::Basic {
            username: user.to_string(),
            password: Secret(pass.to_string()),
        }));
    }
    match (nonempty(e.username), e.password) {
        (Some(username), Some(password)) => {
            Ok(Some(Credential::Basic { username, password: Secret(password) }))
        }
        _ => Ok(None),
    }
}

/// Normalises an `auths` key or a host the way docker does: no scheme, no path, lower case, and
/// Docker Hub's names folded into `docker.io`.
pub fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let k = k.split('/').next().unwrap_or(k).trim().to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        _ => k,
    }
}

/// Where the credentials come from.
#[derive(Debug)]
enum Source {
    None,
    Inline,
    File(PathBuf),
}

/// File identity used to notice a rotation: Kubernetes swaps a Secret volume's symlink, which
/// changes the inode and modification time of the path's target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp { modified: m.modified().ok(), len: m.len(), ino: m.ino() })
}

#[derive(Debug)]
struct Loaded {
    config: DockerConfig,
    stamp: Option<Stamp>,
    generation: u64,
}

/// Docker's default config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, if
/// it exists.
pub fn default_docker_config() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    Some(dir.join("config.json")).filter(|p| p.is_file())
}

/// Credentials for registry hosts, re-read from their file whenever the file changes.
#[derive(Debug)]
pub struct CredentialStore {
    source: Source,
    loaded: Mutex<Loaded>,
}

impl CredentialStore {
    /// No credentials: every registry is accessed anonymously.
    pub fn anonymous() -> Self {
        Self::with(Source::None, DockerConfig::default(), None)
    }

    /// Credentials given inline (`BOB_AUTH`), fixed for the life of the process.
    pub fn inline(json: &str) -> Result<Self, Error> {
        bounded::check("BOB_AUTH", json, bounded::DOCKER_CONFIG)?;
        Ok(Self::with(Source::Inline, DockerConfig::parse(json)?, None))
    }

    /// Credentials from a file (`BOB_AUTH_FILE`); it must be readable and valid now.
    pub fn file(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let stamp = stamp(&path);
        let config = read_config(&path)?;
        Ok(Self::with(Source::File(path), config, stamp))
    }

    fn with(source: Source, config: DockerConfig, stamp: Option<Stamp>) -> Self {
        Self { source, loaded: Mutex::new(Loaded { config, stamp, generation: 0 }) }
    }

    /// The credential for `host` and the generation of the config it came from; the generation
    /// changes when a rotated file is loaded, so caches keyed on it forget old tokens.
    pub fn lookup(&self, host: &str) -> (Option<Credential>, u64) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Source::File(path) = &self.source {
            reload_if_changed(path, &mut loaded);
        }
        (loaded.config.lookup(host).cloned(), loaded.generation)
    }

    /// A short description of where credentials come from, without any secret.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::None => "none (anonymous)".into(),
            Source::Inline => "inline BOB_AUTH".into(),
            Source::File(p) => format!("file {}", p.display()),
        }
    }
}

/// Reads a docker config file's text, at most `bounded::DOCKER_CONFIG`.
pub fn read_text(path: &Path) -> Result<String, Error> {
    Ok(bounded::read_to_string(path, bounded::DOCKER_CONFIG)?)
}

fn read_config(path: &Path) -> Result<DockerConfig, Error> {
    DockerConfig::parse(&read_text(path)?)
}

fn reload_if_changed(path: &Path, loaded: &mut Loaded) {
    // A stat per lookup costs about a microsecond; polling on a timer would make rotation lag.
    let now = stamp(path);
    if now == loaded.stamp {
        return;
    }
    match read_config(path) {
        Ok(config) => {
            if config != loaded.config {
                loaded.generation += 1;
                tracing::info!(file = %path.display(), registries = ?config, "registry credentials reloaded");
            }
            loaded.config = config;
            loaded.stamp = now;
        }
        // Half-written files happen during a rotation: keep the old credentials, try again later.
        Err(err) => {
            tracing::warn!(file = %path.display(), error = %crate::oci::error::chain(&err), "keeping previous registry credentials")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_PASS: &str = "dXNlcjpwYXNz"; // base64("user:pass")

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic { username: u.into(), password: Secret::new(p) }
    }

    #[test]
    fn docker_keys_match_like_docker() {
        let c = DockerConfig::parse(&format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{USER_PASS}"}},
                "registry.example.com":{{"auth":"{USER_PASS}"}},
                "other.example.com:5000":{{"username":"u2","password":"p2"}}}}}}"#
        ))
        .unwrap();
        assert_eq!(c.lookup("docker.io"), Some(&basic("user", "pass")));
        assert_eq!(c.lookup("registry-1.docker.io"), Some(&basic("user", "pass")));
        assert_eq!(c.lookup("registry.example.com"), Some(&basic("user", "pass")));
        assert_eq!(c.lookup("registry.example.com:443"), Some(&basic("user", "pass")));
        assert_eq!(c.lookup("REGISTRY.example.com"), Some(&basic("user", "pass")));
        assert_eq!(c.lookup("other.example.com:5000"), Some(&basic("u2", "p2")));
        assert_eq!(c.lookup("other.example.com"), None);
        assert_eq!(c.lookup("wrong.registry.com"), None);
    }

    #[test]
    fn auth_field_wins_and_tokens_are_kept() {
        let c = DockerConfig::parse(&format!(
            r#"{{"auths":{{"a.test":{{"auth":"{USER_PASS}","username":"x","password":"y"}},
                "b.test":{{"identitytoken":"refresh"}},"c.test":{{"registrytoken":"bearer"}},
                "d.test":{{"auth":"dXNlcjI6cGFzczIK"}}}}}}"#
        ))
        .unwrap();
        assert_eq!(c.lookup("a.test"), Some(&basic("user", "pass")));
        assert_eq!(c.lookup("b.test"), Some(&Credential::IdentityToken(Secret::new("refresh"))));
        assert_eq!(c.lookup("c.test"), Some(&Credential::RegistryToken(Secret::new("bearer"))));
        // a trailing newline inside the encoded value is trimmed
        assert_eq!(c.lookup("d.test"), Some(&basic("user2", "pass2")));
    }

    #[test]
    fn flat_legacy_format_and_errors() {
        let c =
            DockerConfig::parse(&format!(r#"{{"registry.example.com":{{"auth":"{USER_PASS}"}}}}"#)).unwrap();
        assert_eq!(c.lookup("registry.example.com"), Some(&basic("user", "pass")));
        assert!(matches!(DockerConfig::parse("{not json"), Err(Error::Json(_))));
        assert!(matches!(
            DockerConfig::parse(r#"{"auths":{"x":{"auth":"!!"}}}"#),
            Err(Error::AuthValue { .. })
        ));
        assert!(DockerConfig::parse(r#"{"auths":{}}"#).unwrap().is_empty());
    }

    #[test]
    fn secrets_never_print() {
        let c = basic("alice", "hunter2");
        let shown = format!("{c:?} {:?} {}", Secret::new("hunter2"), Secret::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice") && shown.contains("<redacted>"));
        let t = format!("{:?}", Credential::RegistryToken(Secret::new("tok-123")));
        assert!(!t.contains("tok-123"));
    }

    #[test]
    fn file_store_reloads_on_change_and_keeps_old_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, format!(r#"{{"auths":{{"r.test":{{"auth":"{USER_PASS}"}}}}}}"#)).unwrap();
        let store = CredentialStore::file(&path).unwrap();
        assert_eq!(store.lookup("r.test"), (Some(basic("user", "pass")), 0));
        // rotate by rename, as a Secret volume update does
        let tmp = dir.path().join("new.json");
        std::fs::write(&tmp, r#"{"auths":{"r.test":{"username":"u2","password":"p2longer"}}}"#).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(store.lookup("r.test"), (Some(basic("u2", "p2longer")), 1));
        std::fs::write(&path, "{half").unwrap();
        assert_eq!(store.lookup("r.test").0, Some(basic("u2", "p2longer")));
        assert!(matches!(CredentialStore::file(dir.path().join("missing")), Err(Error::Read(_))));
    }
}
