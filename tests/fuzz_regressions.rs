//! Regression tests for what the fuzz targets found (docs/fuzzing.md): each holds the input the
//! fuzzer reported, inline, and the rule it broke. The targets are in `fuzz/`.

use std::collections::BTreeMap;

use bob::build::dockerfile::{Base, Dockerfile, Error};
use bob::oci::credentials::{Credential, DockerConfig, Secret, normalize_key};
use bob::proxy::ProxyError;
use bob::proxy::route::{decode_host, route};
use http::Method;

fn parse(text: &str) -> Dockerfile {
    Dockerfile::parse(text, &BTreeMap::new()).unwrap()
}

const USER_PASS: &str = "dXNlcjpwYXNz"; // base64("user:pass")

fn basic(u: &str, p: &str) -> Credential {
    Credential::Basic { username: u.into(), password: Secret::new(p) }
}

#[test]
fn comments_before_a_from_are_kept_by_pinning() {
    // Found by `fuzz/fuzz_targets/dockerfile.rs` (seed `commented-from`): the comment lines
    // were read as the first lines of the FROM, so pinning replaced the escape directive
    // and the pinned Dockerfile read `c:\` as a line continuation.
    let text = "# escape=`\n# The runtime image.\nFROM mcr.microsoft.com/dotnet/aspnet:8.0\nRUN echo c:\\\n";
    let d = parse(text);
    assert_eq!(d.froms[0].lines, (2, 2));
    let out = d.pinned(|i| format!("{i}@sha256:00"));
    assert_eq!(
        out,
        "# escape=`\n# The runtime image.\nFROM mcr.microsoft.com/dotnet/aspnet:8.0@sha256:00\nRUN echo c:\\\n"
    );
    // A comment inside a continuation is still skipped, as docker does.
    let d = parse("FROM \\\n# the base\n  busybox:1.36 AS b\n");
    assert_eq!((d.froms[0].lines, d.images()), ((0, 2), vec!["busybox:1.36"]));
}

#[test]
fn pinning_keeps_other_lines_byte_for_byte() {
    // Found by `fuzz/fuzz_targets/dockerfile.rs`: lines were split with `str::lines` and
    // joined with `\n` plus a final newline, so a last line of carriage returns lost one.
    let found = format!(
        "FROM gitpod/wan06\nFROM --plaFROM gitpod/wan06\nFROM --platform=$#UILDPLATFORMARG \
         R^GISTRY=\"registry.tEst:5000\"\nARG IMAGE='team/app\u{1e}\n{}",
        "\r".repeat(48)
    );
    let d = parse(&found);
    let out = d.pinned(|i| format!("{i}@sha256:00"));
    assert_eq!(out.lines().nth(4), found.lines().nth(4));
    // CRLF and a missing final newline stay as written.
    let d = parse("# c\r\nFROM a:1 AS x\r\nRUN b\r\r\nFROM c");
    assert_eq!(d.pinned(|i| format!("{i}@d")), "# c\r\nFROM a:1@d AS x\r\nRUN b\r\r\nFROM c@d");
}

#[test]
fn from_takes_an_image_and_optionally_as_name() {
    // Found by `fuzz/fuzz_targets/dockerfile.rs`: words after the stage name were dropped, so
    // a name ending in the escape character made the pinned FROM swallow the next line
    // (and buildah refuses such a FROM anyway).
    let found = "# esc6\u{1}e=`\n# The rEEEEE\"EEEEEEEE go build -o /out/app ./cmd/\n\nFROM build AS \
                 teEEEEElllllllllllllllllllllllllIMAlllllllllllllllllllllllllllllEEElllllllllMMMMMMMMMMMMMM\\ \
                 escape=`\nARG TAG=l|scrg";
    let none = BTreeMap::new();
    assert_eq!(Dockerfile::parse(found, &none), Err(Error::FromArguments { line: 4 }));
    for bad in ["FROM a b", "FROM a AS", "FROM a x b", "FROM a AS b c", "FROM --platform=p a b"] {
        assert_eq!(Dockerfile::parse(bad, &none), Err(Error::FromArguments { line: 1 }), "{bad}");
    }
    for good in ["FROM a", "FROM a as b", "FROM --platform=p a AS b"] {
        assert!(Dockerfile::parse(good, &none).is_ok(), "{good}");
    }
}

#[test]
fn blank_lines_inside_a_continuation_are_skipped() {
    // buildah reads `FROM scratch \` + blank line + `AS x` as one instruction; ending it at
    // the blank line made the later `FROM x` a registry image instead of the stage.
    for blank in ["", "   "] {
        let d = parse(&format!("FROM scratch \\\n{blank}\nAS x\nFROM x\n"));
        let got: Vec<_> = d.froms.iter().map(|f| (f.base.clone(), f.name.clone(), f.lines)).collect();
        assert_eq!(
            got,
            [(Base::Scratch, Some("x".to_string()), (0, 2)), (Base::Stage("x".into()), None, (3, 3))]
        );
    }
}

#[test]
fn stage_names_follow_dockers_rule() {
    // Found by `fuzz/fuzz_targets/dockerfile.rs`: a name ending in the escape character was
    // written back by pinning as a line continuation, so the pinned Dockerfile read another
    // name (`te!!...\\\\` became `te!!...\\\`). Docker allows `[a-z][a-z0-9-_.]*`.
    let found = "#ckerfile:1\nFROM --platform=$`BUILoPLATFORM gom AS d/app\n\nFROM build AS te!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!:1\nFROM --platform=$`BUILoPLATFORM gom AS d/app\n\nFROM build AS te!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!#!!!%!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\\\\\\\\\\\\\\\\\\\n\n\\\\AG=tsc5666\nFROM m\\L\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\n\n\\\\AG=tsc2822\nFROM mct6asp=\\\\L\\\\\\\\\\\\\\\\\\\\\\\n\n\\\\AG=tsc2822\nFROM mcr\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\!!!!!!!p,target=/root/.A";
    let none = BTreeMap::new();
    let name_error = |text: &str| match Dockerfile::parse(text, &none) {
        Err(Error::StageName { line, name }) => Some((line, name)),
        _ => None,
    };
    assert_eq!(name_error(found), Some((2, "d/app".to_string())));
    assert_eq!(name_error("FROM a AS n\\\\"), Some((1, "n\\".to_string())));
    for bad in ["te!!", "1a", "a/b", "-a", "a$b", "a`"] {
        assert!(name_error(&format!("FROM a AS {bad}")).is_some(), "{bad}");
    }
    for good in ["a", "Build", "a.b-c_d9"] {
        assert!(Dockerfile::parse(&format!("FROM a AS {good}"), &none).is_ok(), "{good}");
    }
}

#[test]
fn keys_normalise_in_one_step() {
    // Found by `fuzz/fuzz_targets/docker_config.rs`: whitespace around the host inside a URL
    // stayed in the key (`"do\0\t/cker.io"` → `"do\0\t"`), so a key normalised twice differed.
    let found = "do\0\0\0\0\0\0\0\t/cker.io";
    assert_eq!(normalize_key(found), normalize_key(&normalize_key(found)));
    let c =
        DockerConfig::parse(&format!(r#"{{"auths":{{"https://r.test\t/v1/":{{"auth":"{USER_PASS}"}}}}}}"#))
            .unwrap();
    assert_eq!(c.lookup("r.test"), Some(&basic("user", "pass")));
    // Also found: whitespace after the scheme (`"\rquay.io"` looked up as a URL).
    assert_eq!(c.lookup("https://\rr.test/v1/"), Some(&basic("user", "pass")));
}

#[test]
fn mirror_repository_names_follow_the_distribution_grammar() {
    // Found by `fuzz/fuzz_targets/proxy_route.rs`: `..` and other separator runs inside a
    // component were accepted (distribution allows one `.`, one `_`, `__` or dashes).
    let found = "/v2/mirror/registry.tes/team/app/docker.it__500/team/app/docker.registry.test__500/team/app/docker..test__500/team/app/docker.io/lx/manifeststeam/app/dock459abio/lx/manifests/1.3789abcdef0123459abcdef";
    assert!(matches!(route(&Method::GET, found), Err(ProxyError::NameInvalid { .. })));
    for bad in ["a..b", "a._b", "a___b", "a.-b", "a-.b", "a_-b", "x/a..b"] {
        let p = format!("/v2/mirror/r.test/{bad}/manifests/latest");
        assert!(matches!(route(&Method::GET, &p), Err(ProxyError::NameInvalid { .. })), "{p}");
    }
    for good in ["a.b", "a_b", "a__b", "a-b", "a---b", "a.b_c__d-e", "x/y/z", "0"] {
        let p = format!("/v2/mirror/r.test/{good}/manifests/latest");
        assert!(route(&Method::GET, &p).is_ok(), "{p}");
    }
}

#[test]
fn mirror_hosts_are_hosts_a_reference_may_name() {
    // Found by `fuzz/fuzz_targets/proxy_route.rs`: any run of digits was taken as a port, and
    // any dotted run of letters, digits and dashes as a host (`999.1.1.1` makes no URL).
    let found = format!(
        "/v2/mirror/registry.test__50{}00/teap.x_y/blobs/sha256:{}",
        "3".repeat(79),
        "0123456789abcdef".repeat(4)
    );
    assert!(matches!(route(&Method::GET, &found), Err(ProxyError::NameInvalid { .. })));
    assert_eq!(decode_host("r.test__65536"), None);
    assert_eq!(decode_host("r.test__+80"), None);
    assert_eq!(decode_host("r.test__65535").as_deref(), Some("r.test:65535"));
    // The host must be one a checked reference may name, so that it makes an upstream URL.
    for bad in ["r.test__0", "r.test__080", "999.1.1.1", "1.2.3", "a-.test", "r.test__"] {
        assert_eq!(decode_host(bad), None, "{bad}");
    }
}

#[test]
fn dockerfiles_read_in_linear_time() {
    // Not reachable by the fuzzers (-max_len 8192); found by measuring: every FROM compared its
    // image with every earlier stage name, and `images()` every image with every earlier one,
    // so a 1.2 MiB Dockerfile of 40,000 stages took 32 s to read (optimised build). The
    // controller reads git Dockerfiles of any size on every reconcile. The bound is the fuzzers'
    // per-input limit (-timeout=10), for a debug build.
    let text: String = (0..40_000).map(|i| format!("FROM r.test/i{i}:1 AS s{i}\nFROM S{i}\n")).collect();
    let started = std::time::Instant::now();
    let d = parse(&text);
    assert_eq!(d.images().len(), 40_000);
    assert_eq!(d.froms[80_000 - 1].base, Base::Stage("S39999".into()));
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

#[test]
fn images_read_by_steps_are_pinned_where_they_stand() {
    // Found by `fuzz/fuzz_targets/dockerfile.rs`: pinning searched each `from=<value>` as text in
    // the instruction's lines and replaced the first match, which can be another token (here
    // `--f--from=…`, not a flag) or a comment, leaving the flag itself unpinned.
    let found = "ARG TOOLS=registry.test:250t0/ools:2\nFROM ild\nCOPY --from=r-chown=0499 --fCOPY \
                 --from=r-chY --from=r-chown=0499 --fCOPY --f--from=r-chown=0499 --fCOPY --from=r-chY \
                 --from=r-chown=0499 ---from=do\u{1}";
    let d = parse(found);
    let pinned = d.pinned(|i| format!("{i}@d"));
    assert_eq!(
        pinned.lines().nth(2),
        Some(
            "COPY --from=r-chown=0499@d --fCOPY --from=r-chY@d --from=r-chown=0499@d --fCOPY \
             --f--from=r-chown=0499 --fCOPY --from=r-chY@d --from=r-chown=0499@d ---from=do\u{1}"
        )
    );
    // An empty `--from=` names no image, also before a word that is not a flag.
    let d = parse(
        "FROM golang:1.22 AS build\nCOPY --from= --from=docker.io/library/busybox:1.36 /bin/busybox /b\n",
    );
    assert_eq!(d.images(), ["golang:1.22", "docker.io/library/busybox:1.36"]);
    let text = "FROM a\nRUN \\\n# from=tools:1 is mounted below\n    --mount=type=bind,from=tools:1,target=/t make\n";
    let pinned = parse(text).pinned(|i| format!("{i}@d"));
    assert_eq!(
        pinned,
        "FROM a@d\nRUN \\\n# from=tools:1 is mounted below\n    --mount=type=bind,from=tools:1@d,target=/t make\n"
    );
}

#[test]
fn mirror_hosts_write_the_port_one_way() {
    // Found by `fuzz/fuzz_targets/proxy_route.rs` (after 765,908 executions): a host segment
    // holding a literal `:` was taken as it stands, a second path for `<host>__<port>` that
    // `encode_host` does not give back. buildah refuses a `:` in a mirror location, so no build
    // sends one; the proxy answers one spelling only.
    let found = "/v2/mirror/krra:2/mi1ox/manifests/b.";
    assert!(matches!(route(&Method::GET, found), Err(ProxyError::NameInvalid { .. })));
    assert_eq!(decode_host("r.test:5000"), None);
    assert_eq!(decode_host("r.test__5000").as_deref(), Some("r.test:5000"));
    assert!(route(&Method::GET, "/v2/mirror/r.test__5000/team/app/manifests/1").is_ok());
}
