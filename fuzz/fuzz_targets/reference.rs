//! Image references as users and ImageBuild specs write them: bob's checked parser
//! (`bob::oci::reference::parse`, oci-client's grammar plus the host, port and case rules), then
//! the plain-HTTP rule and registry URL (`Endpoints`, `strip_port`, `is_loopback`) on whatever
//! registry it accepted.
//!
//! Invariants: a checked reference's `whole()` passes the check again and names the same
//! reference; its registry makes a base URL naming exactly that host and port (`base_url`
//! panics on any other), over plain HTTP when the registry is named insecure; what the checked
//! parser accepts, oci-client accepts; the host helpers never panic on any string.
#![no_main]

use bob::oci::Reference;
use bob::oci::endpoint::{Endpoints, is_loopback, strip_port};
use bob::oci::reference::{check_host, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Host helpers take any string (an `--insecure-registry` value, an upload URL's host).
    let bare = strip_port(text);
    assert!(text.starts_with(bare), "strip_port({text:?}) = {bare:?} is not a prefix");
    let _ = is_loopback(text);
    let Ok(reference) = parse(text) else { return };
    assert!(Reference::try_from(text).is_ok(), "{text:?} passed the check but not oci-client");
    let whole = reference.whole();
    let again = parse(&whole).unwrap_or_else(|e| panic!("{text:?} passed, its whole() {whole:?} not: {e}"));
    assert_eq!(
        (again.registry(), again.repository(), again.tag(), again.digest()),
        (reference.registry(), reference.repository(), reference.tag(), reference.digest()),
        "{text:?} → {whole:?} does not round-trip"
    );
    assert_eq!(again.whole(), whole, "whole() is not a fixed point for {text:?}");
    let host = reference.registry();
    assert!(check_host(host).is_ok());
    assert_eq!(strip_port(strip_port(host)), strip_port(host), "strip_port not idempotent on {host:?}");
    assert_eq!(
        is_loopback(host),
        is_loopback(strip_port(host)),
        "the port changes loopback-ness of {host:?}"
    );
    let endpoints = Endpoints::new([host]);
    let url = endpoints.base_url(host);
    assert_eq!(url.scheme(), "http", "{host:?} is named insecure, so plain HTTP");
    assert_eq!(url.path(), "/", "{host:?} gives a base URL with a path: {url}");
    assert!(endpoints.same_origin(host, &url), "{host:?} is not its own origin: {url}");
    let (name, port) = host.rsplit_once(':').map_or((host, None), |(n, p)| (n, Some(p)));
    let api = bob::oci::endpoint::api_host(host);
    if api == host {
        assert_eq!(url.host_str(), Some(name.to_ascii_lowercase().as_str()), "{host:?} → {url}");
        let url_port = url.port_or_known_default().map(|n| n.to_string());
        match port {
            Some(p) => assert_eq!(url_port.as_deref(), Some(p), "{host:?} → {url}"),
            None => assert_eq!(url.port(), None, "{host:?} → {url}"),
        }
    }
    let secure = Endpoints::default().base_url(host);
    assert_eq!(secure.scheme() == "http", is_loopback(host), "{host:?} → {secure}");
});
