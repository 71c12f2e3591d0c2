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

/// Invalid references: each is refused before any network traffic, in one line naming it. A
/// listener stands in for an HTTP(S) proxy (bob's client honours `HTTPS_PROXY`/`HTTP_PROXY`), so
/// any request bob tried — and any name it would resolve, which the proxy would do — arrives here.
#[test]
fn invalid_references_are_one_line_and_no_network_traffic() {
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let proxy = format!("http://{}", trap.local_addr().unwrap());
    let proxies =
        [("HTTPS_PROXY", proxy.as_str()), ("HTTP_PROXY", proxy.as_str()), ("ALL_PROXY", proxy.as_str())];
    // Before the fix a request went out: fail it fast rather than wait on the silent trap.
    let env = [proxies.as_slice(), &[("BOB_COPY_TIMEOUT", "2s")]].concat();
    let no_request = |what: &str| {
        assert!(trap.accept().is_err(), "{what} opened a connection");
    };
    let bad =
        ["127.0.0.1:99999/a:t", "UPPER/x:t", "host:0/a:t", "999.1.1.1/a:t", "0x7f.1/a:t", "reg.test:08/a:t"];
    for invalid in bad {
        for (src, dst) in [(invalid, "127.0.0.2:5000/b:t"), ("registry.test/a:t", invalid)] {
            let out = common::bob_bounded(&["copy", src, dst], &env);
            assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
            fails_with_one_line(&out, &format!("bob: invalid image reference {invalid:?}"));
            no_request(&format!("bob copy {src} {dst}"));
        }
    }
    // The proxy's aliases and mirror list, and the build's refs and proxy address.
    let out = common::bob_bounded(
        &["proxy"],
        &[("BOB_PROXY_TARGET_REF", bad[0]), ("BOB_PROXY_ADDR", "127.0.0.1:0")],
    );
    fails_with_one_line(&out, &format!("invalid BOB_PROXY_TARGET_REF: invalid image reference {:?}", bad[0]));
    let out = common::bob_bounded(
        &["proxy"],
        &[("BOB_PROXY_MIRROR_REFS", bad[2]), ("BOB_PROXY_ADDR", "127.0.0.1:0")],
    );
    fails_with_one_line(
        &out,
        &format!("invalid BOB_PROXY_MIRROR_REFS: invalid image reference {:?}", bad[2]),
    );
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("result");
    let result = result.to_str().unwrap();
    for (var, value) in
        [("BOB_BASE_REF", bad[0]), ("BOB_TARGET_REF", bad[1]), ("BOB_PROXY_ADDR", "127.0.0.1:99999")]
    {
        let mut env = vec![("BOB_TERMINATION_MESSAGE_PATH", result), ("BOB_PROXY_WAIT", "1s"), (var, value)];
        env.extend_from_slice(&proxies);
        let out = common::bob_bounded(&["build"], &env);
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with(&format!("bob: build failed: InvalidConfig: {var}: ")), "{err}");
        no_request(&format!("bob build with {var}={value}"));
    }
    // An ImageBuild's repositories are checked before its source image is resolved.
    let ib = format!(
        "apiVersion: bob.dev/v1alpha1\nkind: ImageBuild\nmetadata: {{name: x}}\nspec:\n  \
         source: {{image: {{ref: \"127.0.0.1:9/a:1\"}}}}\n  workspaceImageRepository: \"{}\"\n",
        bad[3].trim_end_matches(":t")
    );
    let file = common::write_file(dir.path(), "ib.yaml", &ib);
    let out = common::bob_bounded(&["run", "-f", file.to_str().unwrap()], &env);
    let needle = "bob: run failed: InvalidSpec: spec.workspaceImageRepository: invalid image reference";
    fails_with_one_line(&out, needle);
    no_request("bob run");
}
