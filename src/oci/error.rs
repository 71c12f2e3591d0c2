//! The distribution spec's error format (`{"errors":[{"code","message","detail"}]}`), used by
//! the proxy for every answer it makes itself and read from registries' answers, and a one-line
//! rendering of error chains.

use std::error::Error as StdError;

use serde::{Deserialize, Serialize};

/// Error codes of the distribution spec (plus `UNAVAILABLE`/`UNKNOWN`, which distribution uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The blob is unknown to the registry.
    BlobUnknown,
    /// The upload is unknown (or was not issued by this proxy).
    BlobUploadUnknown,
    /// The upload failed.
    BlobUploadInvalid,
    /// The digest did not match.
    DigestInvalid,
    /// The manifest is invalid.
    ManifestInvalid,
    /// The manifest is unknown.
    ManifestUnknown,
    /// The repository name or path is not valid.
    NameInvalid,
    /// The repository is not known (here: not an alias or allowed mirror reference).
    NameUnknown,
    /// Authentication is required or failed.
    Unauthorized,
    /// Access to the resource is denied.
    Denied,
    /// The operation is not supported.
    Unsupported,
    /// Too many requests.
    Toomanyrequests,
    /// The upstream service is unavailable.
    Unavailable,
    /// Anything else.
    Unknown,
}

/// One entry of the error envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// The spec's code.
    pub code: ErrorCode,
    /// A human-readable message.
    pub message: String,
}

/// The error envelope of the distribution spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryError {
    /// The errors, usually one.
    pub errors: Vec<ErrorEntry>,
}

impl RegistryError {
    /// An envelope with a single error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { errors: vec![ErrorEntry { code, message: message.into() }] }
    }
}

/// Renders an error and its sources on one line: `outer: cause: root cause`.
pub fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some libraries repeat their source in their own message; don't print it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// An upstream error body, read leniently (registries use codes beyond the spec's list).
#[derive(Deserialize)]
struct Envelope {
    errors: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `CODE: message` of the first error in a registry error body.
pub fn registry_message(body: &[u8]) -> Option<String> {
    let env: Envelope = serde_json::from_slice(body).ok()?;
    let e = env.errors.into_iter().next()?;
    Some(if e.message.is_empty() { e.code } else { format!("{}: {}", e.code, e.message) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_serialises_as_the_spec_says() {
        let json = serde_json::to_string(&RegistryError::new(ErrorCode::NameUnknown, "no")).unwrap();
        assert_eq!(json, r#"{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}"#);
        let back: RegistryError =
            serde_json::from_str(r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"x"}]}"#).unwrap();
        assert_eq!(back.errors[0].code, ErrorCode::BlobUploadUnknown);
    }

    #[test]
    fn chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn registry_messages_are_read_from_the_error_envelope() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(registry_message(body).as_deref(), Some("MANIFEST_UNKNOWN: manifest unknown"));
        assert_eq!(registry_message(b"<html>bad gateway</html>"), None);
    }
}
