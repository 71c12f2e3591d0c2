//! The one plain-HTTP rule of bob: loopback registries speak plain HTTP, everything else TLS,
//! unless an insecure-registries option names the host.
//!
//! Every registry client in bob (proxy upstream, copy, build) builds its URLs here.

use std::net::IpAddr;

use url::Url;

use super::reference;

/// Where the registry API of a host is reached, and over which scheme.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    insecure: Vec<String>,
}

impl Endpoints {
    /// Hosts (`host` or `host:port`) named here are spoken to over plain HTTP too.
    pub fn new<I, S>(insecure: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let insecure = insecure
            .into_iter()
            .map(|h| h.as_ref().trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Self { insecure }
    }

    /// Whether `host` (as written in an image reference) is spoken to over plain HTTP.
    pub fn is_plain_http(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if is_loopback(&host) {
            return true;
        }
        let bare = strip_port(&host);
        self.insecure.iter().any(|h| *h == host || *h == bare)
    }

    /// The base URL (`scheme://api-host/`) of the registry named `host` in a reference.
    ///
    /// `host` comes from a reference checked by `reference::parse` (every reference a user gives
    /// bob is), which refuses any host that would not make this URL: there is no fallback host.
    pub fn base_url(&self, host: &str) -> Url {
        #[cfg(feature = "test-hooks")]
        if let Some(url) = crate::cloud::hook::base_url(host) {
            return url;
        }
        let scheme = if self.is_plain_http(host) { "http" } else { "https" };
        reference::registry_url(scheme, api_host(host))
            .unwrap_or_else(|e| panic!("registry host {host:?} was not checked by reference::parse: {e}"))
    }

    /// Whether `url` is on the registry `host` itself (scheme, host and port), so it may get the
    /// registry's credentials; upload URLs on storage front-ends may not.
    pub fn same_origin(&self, host: &str, url: &Url) -> bool {
        let base = self.base_url(host);
        url.scheme() == base.scheme()
            && url.host_str() == base.host_str()
            && url.port_or_known_default() == base.port_or_known_default()
    }
}

/// The host that serves the registry API for a reference's registry: Docker Hub's images are
/// named `docker.io/...` but served by `registry-1.docker.io`.
pub fn api_host(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// The host without its port (`[::1]:5000` → `[::1]`, `example.com:5000` → `example.com`).
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Loopback by name or address: `localhost`, 127.0.0.0/8 and `[::1]`, with or without a port.
pub fn is_loopback(host: &str) -> bool {
    let bare = strip_port(host);
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let ip = bare.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_on_the_registry_origin() {
        let e = Endpoints::default();
        let url = |u: &str| Url::parse(u).unwrap();
        assert!(e.same_origin("127.0.0.1:5000", &url("http://127.0.0.1:5000/v2/x/blobs/uploads/1")));
        assert!(!e.same_origin("127.0.0.1:5000", &url("http://127.0.0.1:5001/v2/x/blobs/uploads/1")));
        assert!(e.same_origin("docker.io", &url("https://registry-1.docker.io:443/v2/")));
        assert!(!e.same_origin("docker.io", &url("http://registry-1.docker.io/v2/")));
        assert!(!e.same_origin("reg.test", &url("https://storage.test/upload?sig=x")));
    }

    #[test]
    fn loopback_hosts_are_plain_http() {
        let e = Endpoints::default();
        for h in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.8.9.1", "[::1]:5000", "[::1]"] {
            assert!(e.is_plain_http(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1:5000", "localhost.example.com", "[::2]:5000", "128.0.0.1"] {
            assert!(!e.is_plain_http(h), "{h}");
        }
    }

    #[test]
    fn insecure_option_names_hosts_with_or_without_port() {
        let e = Endpoints::new(["registry.test", "other.test:5000"]);
        assert!(e.is_plain_http("registry.test"));
        assert!(e.is_plain_http("registry.test:5000"));
        assert!(e.is_plain_http("other.test:5000"));
        assert!(!e.is_plain_http("other.test"));
        assert!(!e.is_plain_http("other.test:5001"));
        assert_eq!(e.base_url("other.test:5000").as_str(), "http://other.test:5000/");
        assert_eq!(e.base_url("ghcr.io").as_str(), "https://ghcr.io/");
    }

    #[test]
    #[should_panic(expected = "was not checked by reference::parse")]
    fn an_unchecked_host_never_becomes_a_url_to_somewhere_else() {
        // No fallback host: a host that skipped `reference::parse` is a bug, never a request.
        Endpoints::default().base_url("127.0.0.1:99999");
    }

    #[test]
    fn docker_hub_is_served_by_registry_1() {
        let e = Endpoints::default();
        assert_eq!(e.base_url("docker.io").as_str(), "https://registry-1.docker.io/");
        assert_eq!(api_host("quay.io"), "quay.io");
    }
}
