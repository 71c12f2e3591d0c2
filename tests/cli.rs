//! The `bob` binary's contract: bad configuration exits non-zero with one line that says what to
//! fix, and `bob proxy --check` is a usable exec probe.

mod common;

use std::process::{Command, Output};

fn bob(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bob"));
    c.args(args).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Asserts a failed run with exactly one line on stderr that contains `needle`.
fn fails_with_one_line(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{err}");
    assert!(lines[0].contains(needle), "{:?} does not mention {needle:?}", lines[0]);
}

#[test]
fn invalid_auth_json_is_one_clear_line() {
    let out =
        bob(&["proxy"], &[("BOB_AUTH", "{not json"), ("BOB_PROXY_ADDR", "127.0.0.1:0"), ("RUST_LOG", "off")]);
    fails_with_one_line(&out, "invalid docker config JSON");
}

#[test]
fn missing_auth_file_is_one_clear_line() {
    let out = bob(&["proxy", "--auth-file", "/nonexistent/config.json"], &[("RUST_LOG", "off")]);
    fails_with_one_line(&out, "/nonexistent/config.json");
}

#[test]
fn malformed_refs_are_named() {
    let out = bob(&["proxy"], &[("BOB_PROXY_TARGET_REF", "Not A Ref"), ("RUST_LOG", "off")]);
    fails_with_one_line(&out, "BOB_PROXY_TARGET_REF");
    let out = bob(&["proxy"], &[("BOB_PROXY_MIRROR_REFS", "x/y@sha256:short"), ("RUST_LOG", "off")]);
    fails_with_one_line(&out, "BOB_PROXY_MIRROR_REFS");
    let out = bob(&["proxy"], &[("BOB_PROXY_ADDR", "nowhere"), ("RUST_LOG", "off")]);
    fails_with_one_line(&out, "invalid listen address");
}

#[test]
fn address_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = bob(&["proxy"], &[("BOB_PROXY_ADDR", &addr), ("RUST_LOG", "off")]);
    fails_with_one_line(&out, &format!("cannot listen on {addr}"));
}

#[test]
fn check_probes_a_running_proxy() {
    let proxy = common::ProxyProc::start(&[]);
    let ok = bob(&["proxy", "--check"], &[("BOB_PROXY_ADDR", &proxy.addr)]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    drop(proxy);
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = bob(&["proxy", "--check"], &[("BOB_PROXY_ADDR", &free)]);
    fails_with_one_line(&out, "no proxy answers");
}

#[test]
fn help_never_shows_inline_credentials() {
    let out =
        bob(&["proxy", "--help"], &[("BOB_AUTH", r#"{"auths":{"x":{"auth":"c2VjcmV0OnNlY3JldA=="}}}"#)]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("BOB_AUTH") && !help.contains("c2VjcmV0"), "{help}");
}

#[test]
fn listening_beyond_loopback_needs_an_explicit_option_and_warns() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bob"))
            .arg("proxy")
            .env_clear()
            .env("BOB_PROXY_ADDR", addr)
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A proxy that starts listening never exits by itself: give it a bound, then kill it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bob proxy listened on {addr} without --allow-non-loopback");
        }
        let out = child.wait_with_output().unwrap();
        fails_with_one_line(&out, "loopback");
    }
    let proxy = common::ProxyProc::start(&[
        ("BOB_PROXY_ADDR", "0.0.0.0:0"),
        ("BOB_PROXY_ALLOW_NON_LOOPBACK", "true"),
    ]);
    let log = proxy.proc.output();
    assert!(log.contains("WARN") && log.contains("loopback"), "one warning line:\n{log}");
    // The exec probe still works (it probes loopback on the same port).
    let ok = bob(&["proxy", "--check"], &[("BOB_PROXY_ADDR", &proxy.addr)]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}
