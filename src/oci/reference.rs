//! The one parser of the image references users give bob: `bob copy`'s arguments, the proxy's
//! alias and mirror references, `BOB_BASE_REF` and the other build variables, an ImageBuild's
//! repositories and `FROM` images. It is oci-client's grammar plus what that grammar leaves out:
//! a lowercase repository, a registry host that is a DNS name (labels of at most 63 characters,
//! 253 in all) or a dotted IPv4 address, and a port from 1 to 65535 written without leading
//! zeros. An invalid reference fails here, before any network traffic, and the host of every
//! reference that passes makes a registry URL naming exactly that host (`registry_url`).

use std::net::Ipv4Addr;

use oci_client::{ParseError, Reference};
use url::Url;

/// Why a reference is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// oci-client's grammar refuses it (or the repository has upper case letters).
    #[error("invalid image reference {value:?}")]
    Syntax {
        /// The text given.
        value: String,
        /// Why.
        #[source]
        source: ParseError,
    },
    /// The registry host or its port cannot be a registry's.
    #[error("invalid image reference {value:?}: {why}")]
    Host {
        /// The text given.
        value: String,
        /// What is wrong with the host.
        why: String,
    },
}

/// Parses and checks a reference given by a user.
pub fn parse(value: &str) -> Result<Reference, Error> {
    let syntax = |source| Error::Syntax { value: value.to_string(), source };
    let r = Reference::try_from(value).map_err(syntax)?;
    // The grammar lets `UPPER/x` through as `docker.io/UPPER/x`; docker refuses it.
    if r.repository().bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(syntax(ParseError::NameContainsUppercase));
    }
    check_host(r.registry()).map_err(|why| Error::Host { value: value.to_string(), why })?;
    Ok(r)
}

/// Checks a registry host as a reference names it (`host`, `host:port`); `Err` says why not.
pub fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    if let Some(p) = port {
        let number = p.parse::<u16>().ok().filter(|n| *n > 0 && !p.starts_with('0'));
        if number.is_none() {
            return Err(format!("port {p:?} is not a number from 1 to 65535"));
        }
    }
    let labels = || name.split('.');
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !labels().all(label_ok) {
        return Err(format!(
            "{name:?} is not a host name (labels of letters, digits and '-', at most 63 characters each, 253 in all)"
        ));
    }
    // URL parsers read a host whose last label is a number as IPv4 (`1.2.3` is 1.2.0.3, `0x7f.1`
    // is 127.0.0.1): such a host must be a plain dotted IPv4 address, so it names one machine.
    let last = labels().next_back().unwrap_or_default();
    let hex = last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"))
        && last[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if (last.bytes().all(|b| b.is_ascii_digit()) || hex) && name.parse::<Ipv4Addr>().is_err() {
        return Err(format!("{name:?} ends in a number but is not an IPv4 address (a.b.c.d, each 0-255)"));
    }
    // The rules above are what makes a URL with exactly this host; check it rather than trust it.
    let url = registry_url("https", host).map_err(|e| format!("{host:?} is not a registry host: {e}"))?;
    let same_port =
        port.is_none_or(|p| url.port_or_known_default().map(|n| n.to_string()).as_deref() == Some(p));
    if url.host_str() != Some(name.to_ascii_lowercase().as_str()) || !same_port {
        return Err(format!("{host:?} is not a registry host"));
    }
    Ok(())
}

/// `scheme://host/` for a registry host; cannot fail for the host of a reference from `parse`.
pub fn registry_url(scheme: &str, host: &str) -> Result<Url, url::ParseError> {
    Url::parse(&format!("{scheme}://{host}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(value: &str) -> String {
        crate::oci::error::chain(&parse(value).unwrap_err())
    }

    #[test]
    fn valid_references_pass_and_make_urls() {
        for r in [
            "busybox",
            "docker.io/library/busybox:1.36",
            "Registry.Example.com:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "127.0.0.1:5000/a:t",
            "localhost/a",
            "255.255.255.255:65535/a",
            "reg-1.test:1/a__b/c.d-e:v1.0",
            "a1.b2.c3d/x",
        ] {
            let parsed = parse(r).unwrap_or_else(|e| panic!("{r}: {}", crate::oci::error::chain(&e)));
            let url = registry_url("http", parsed.registry()).unwrap();
            assert_eq!(
                url.host_str().unwrap(),
                parsed.registry().split(':').next().unwrap().to_ascii_lowercase()
            );
        }
    }

    #[test]
    fn invalid_references_say_why() {
        let cases = [
            ("127.0.0.1:99999/a:t", "port \"99999\" is not a number from 1 to 65535"),
            ("host:0/a:t", "port \"0\" is not a number from 1 to 65535"),
            ("host:05000/a:t", "port \"05000\""),
            ("UPPER/x:t", "repository name must be lowercase"),
            ("999.1.1.1/a", "ends in a number but is not an IPv4 address"),
            ("1.2.3/a", "ends in a number"),
            ("10.0.0.08/a", "ends in a number"),
            ("0x7f.1/a", "ends in a number"),
            ("evil.0x7f/a", "ends in a number"),
            ("Not A Ref", "invalid reference format"),
            ("x/y@sha256:short", "invalid reference format"),
            ("x/y@sha256:0123456789abcdef0123456789abcdef", "invalid checksum digest length"),
        ];
        for (r, needle) in cases {
            let message = why(r);
            assert!(message.starts_with(&format!("invalid image reference {r:?}")), "{message}");
            assert!(message.contains(needle), "{r}: {message:?} does not say {needle:?}");
        }
        let long_label = format!("{}.test/a", "a".repeat(64));
        assert!(why(&long_label).contains("not a host name"));
        let long_name = format!("{}test/a", "abcdefghi.".repeat(26));
        assert!(why(&long_name).contains("not a host name"));
    }
}
