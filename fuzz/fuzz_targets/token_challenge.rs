//! `WWW-Authenticate` headers from any registry bob talks to (`parse_challenge`): never panics,
//! and a Bearer challenge written back with proper quoting parses to the same challenge.
#![no_main]

use bob::oci::token::{Challenge, parse_challenge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    let Some(challenge) = parse_challenge(header) else { return };
    let Challenge::Bearer { realm, service, scope } = &challenge else { return };
    let mut again = format!("Bearer realm={}", quote(realm));
    if let Some(s) = service {
        again.push_str(&format!(",service={}", quote(s)));
    }
    if let Some(s) = scope {
        again.push_str(&format!(", scope={}", quote(s)));
    }
    assert_eq!(parse_challenge(&again).as_ref(), Some(&challenge), "{header:?} → {again:?}");
});

/// An RFC 7230 quoted-string: backslash before `"` and `\`.
fn quote(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}
