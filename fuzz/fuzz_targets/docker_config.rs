//! Docker config JSON (`BOB_AUTH`, `BOB_AUTH_FILE`, a `kubernetes.io/dockerconfigjson` Secret)
//! and host matching. Input: the first line is the host to look up, the rest is the JSON.
#![no_main]

use bob::oci::CredentialStore;
use bob::oci::credentials::{Credential, DockerConfig, normalize_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (host, json) = text.split_once('\n').unwrap_or(("docker.io", text));
    let parsed = DockerConfig::parse(json);
    let store = CredentialStore::inline(json);
    assert_eq!(parsed.is_ok(), store.is_ok(), "the store and the parser disagree on {json:?}");
    let (Ok(config), Ok(store)) = (parsed, store) else { return };
    let found = config.lookup(host);
    assert_eq!(store.lookup(host), (found.cloned(), 0), "store lookup of {host:?}");
    // A registry host as in a reference (no scheme, no path) is matched case-insensitively, and
    // a key written as a URL (`https://host/v1/`) names the same registry, as docker does.
    if !host.contains('/') {
        assert_eq!(config.lookup(&host.to_ascii_uppercase()), found, "case changes the match of {host:?}");
        assert_eq!(config.lookup(&format!("https://{host}/v1/")), found, "scheme/path change {host:?}");
    }
    assert_eq!(normalize_key(&normalize_key(host)), normalize_key(host), "normalize_key not idempotent");
    let _ = format!("{config:?}");
    if let Some(cred) = found {
        // Debug output is exactly the redacted form: no secret can leak through it.
        let expected = match cred {
            Credential::Basic { username, .. } => {
                format!("Basic {{ username: {username:?}, password: \"<redacted>\" }}")
            }
            Credential::IdentityToken(_) => "IdentityToken(\"<redacted>\")".to_string(),
            Credential::RegistryToken(_) => "RegistryToken(\"<redacted>\")".to_string(),
        };
        assert_eq!(format!("{cred:?}"), expected);
    }
});
