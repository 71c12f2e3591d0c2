//! `bob build` failures, each with its reason, a message that says what to fix, and the engine's
//! last lines — never just "exit status 1" — plus the credential boundary: neither bob build
//! nor buildah sees a credential, and a `RUN` step can pull nothing but the declared `FROM`.

mod common;

use std::process::Output;

use bob::build::BuildResult;
use bob::reason::Reason;
use common::build::*;
use common::*;

/// Asserts a failed build with `reason` whose message contains `needle`, and that bob's last
/// stderr line says the same in one line.
fn failed(out: &Output, r: &BuildResult, reason: Reason, needle: &str) {
    assert!(!out.status.success(), "expected failure: {r:?}");
    assert_eq!(r.reason, Some(reason), "{r:?}\n{}", text(&out.stderr));
    let message = r.message.as_deref().unwrap_or_default();
    assert!(message.contains(needle), "{message:?} does not contain {needle:?}");
    let last = text(&out.stderr).lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with(&format!("bob: build failed: {reason}: ")), "{last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_has_its_reason_and_a_useful_message() {
    let fx = Fixture::new().await;
    let storage = fx.dir.path().join("storage");
    let pin = fx.pin();
    let pins = [("BOB_FROM_REFS", pin.as_str())];

    // A missing Dockerfile.
    let dockerfile = format!("FROM {}\n", fx.from);
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let empty = fx.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (out, r) = bob_build(&proxy.addr, &empty, &storage, &pins);
    failed(&out, &r, Reason::DockerfileNotFound, &empty.join("Dockerfile").display().to_string());

    // A failing RUN: its step, its exit code and its output.
    let dockerfile = format!("FROM {}\nRUN echo about-to-fail && exit 3\n", fx.from);
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let ctx = fx.context("run-fails", &dockerfile, &[]);
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &pins);
    failed(&out, &r, Reason::BuildStepFailed, "step 2/2");
    assert_eq!((r.step.as_deref(), r.exit_code), (Some("RUN echo about-to-fail && exit 3"), Some(3)));
    assert!(r.message.unwrap().contains("exit code 3"));
    assert!(r.log_tail.unwrap().contains("about-to-fail"), "the tail has the step's output");

    // A silent step hits the watchdog.
    let dockerfile = format!("FROM {}\nRUN echo going-quiet && sleep 60\n", fx.from);
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let ctx = fx.context("silent", &dockerfile, &[]);
    let mut env = pins.to_vec();
    env.push(("BOB_NO_PROGRESS_TIMEOUT", "2s"));
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &env);
    failed(&out, &r, Reason::NoProgress, "printed nothing for 2s");
    assert!(r.message.unwrap().contains("STEP 2/2"), "names the step it stopped at");

    // A FROM that does not exist (declared, so the proxy asks the registry).
    let missing = fx.reg.repo("lib/nothing:9");
    let dockerfile = format!("FROM {missing}\nRUN true\n");
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &fx.reg.repo("base:x")),
        ("BOB_PROXY_TARGET_REF", &fx.reg.repo("ws:x")),
        ("BOB_AUTH", &fx.creds),
        ("BOB_PROXY_MIRROR_REFS", &missing),
    ]);
    let ctx = fx.context("missing-from", &dockerfile, &[]);
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &[]);
    failed(&out, &r, Reason::BaseImagePullFailed, &format!("FROM {missing}: the image does not exist"));

    // A FROM the proxy does not serve.
    let other = fx.reg.repo("lib/other:1");
    let ctx = fx.context("undeclared-from", &format!("FROM {other}\n"), &[]);
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &[]);
    failed(&out, &r, Reason::BaseImagePullFailed, "BOB_PROXY_MIRROR_REFS");

    // An unreachable proxy.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (out, r) = bob_build(&closed, &ctx, &storage, &[("BOB_PROXY_WAIT", "1s")]);
    failed(&out, &r, Reason::ProxyUnavailable, "is the bob proxy sidecar running?");

    // An invalid Dockerfile, found by bob before the engine runs.
    let ctx = fx.context("invalid", "RUN echo no from\n", &[]);
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &[]);
    failed(&out, &r, Reason::DockerfileInvalid, "line 1: RUN before the first FROM");

    // A Dockerfile past the input limit (a valid one: a FROM and 2 MiB of comments).
    let huge = format!("FROM {}\n{}", fx.from, "# padding\n".repeat(200_000));
    let ctx = fx.context("huge", &huge, &[]);
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &[]);
    let limit = format!("Dockerfile {} exceeds the limit of 1 MiB", ctx.join("Dockerfile").display());
    failed(&out, &r, Reason::DockerfileInvalid, &limit);
}

#[tokio::test(flavor = "multi_thread")]
async fn neither_bob_build_nor_buildah_sees_credentials_and_run_steps_cannot_use_the_proxy() {
    let fx = Fixture::new().await;
    let storage = fx.dir.path().join("storage");
    // A RUN step that shares the pod's network tries the proxy: an undeclared image, a tag of the
    // declared repository, and a write to `base`; it also prints its environment.
    let dockerfile = format!(
        "FROM {}\nARG PROXY\nRUN env; for p in mirror/{h}/lib/secret/manifests/1 mirror/{h}/lib/busybox/manifests/2 base/manifests/x; do \
         wget -q -O /dev/null http://$PROXY/v2/$p && echo \"GOT $p\" || echo \"REFUSED $p\"; done\n",
        fx.from,
        h = fx.reg.host.replace(':', "__")
    );
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let ctx = fx.context("probe", &dockerfile, &[]);
    // A wrapper records buildah's environment and the auth file it is given, then runs buildah.
    let wrapper = fx.dir.path().join("buildah-wrapper");
    let record = fx.dir.path().join("buildah-env");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nenv >> {r}\necho \"AUTHFILE $(cat \"$REGISTRY_AUTH_FILE\")\" >> {r}\nexec buildah \"$@\"\n",
            r = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (pin, build_args) = (fx.pin(), format!(r#"{{"PROXY":"{}"}}"#, proxy.addr));
    let env = [
        ("BOB_FROM_REFS", pin.as_str()),
        ("BOB_BUILDAH", wrapper.to_str().unwrap()),
        ("BOB_BUILD_ARGS", build_args.as_str()),
    ];
    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &env);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(r.base_built);

    let log = text(&out.stdout);
    for p in ["lib/secret/manifests/1", "lib/busybox/manifests/2", "base/manifests/x"] {
        assert!(
            log.lines().any(|l| l.starts_with("REFUSED") && l.ends_with(p)),
            "{p} must be refused:\n{log}"
        );
    }
    let buildah_env = std::fs::read_to_string(&record).unwrap();
    assert!(buildah_env.lines().all(|l| l == "AUTHFILE {}" || !l.starts_with("AUTHFILE")), "{buildah_env}");
    for (name, output) in
        [("bob build stdout", &log), ("bob build stderr", &text(&out.stderr)), ("buildah env", &buildah_env)]
    {
        assert!(!output.contains(PASSWORD), "{name} contains the password");
        assert!(!output.contains(&fx.creds), "{name} contains the docker config");
        assert!(
            !output.contains("BOB_AUTH") && !output.contains("DOCKER_CONFIG"),
            "{name} names a credential variable"
        );
    }
}

/// buildah's own `Error:` line leads the message, and its words give the reason: a stage buildah
/// does not know is the Dockerfile's fault, not a pull's; a local storage error is the engine's.
/// A `COPY --from=<image>` the plan did not declare is refused before buildah runs.
#[tokio::test(flavor = "multi_thread")]
async fn buildahs_own_error_leads_the_message_and_gives_the_reason() {
    let fx = Fixture::new().await;
    let storage = fx.dir.path().join("storage");
    let pin = fx.pin();
    let other = fx.reg.repo("lib/other:1");
    let cases = [
        // bob matches stage names as Docker does (case-insensitively); buildah 1.28 does not.
        (
            "stage-case",
            format!("FROM {} AS Build\nRUN true\nFROM build\nRUN true\n", fx.from),
            Reason::DockerfileInvalid,
            "creating build container: short-name \"build\" did not resolve".to_string(),
        ),
        // An image in COPY --from is an image of the build like a FROM: pinned through the
        // proxy's mirror, which refuses one the plan did not declare — before buildah runs.
        (
            "copy-from-undeclared",
            format!("FROM {} AS a\nFROM scratch\nCOPY --from={other} /bin/busybox /x\n", fx.from),
            Reason::BaseImagePullFailed,
            format!("FROM {other} cannot be resolved through the proxy"),
        ),
        // (A local storage error such as buildah's "history lists 2 non-empty layers, but we have
        // 3 layers on disk" is no pull either: `engine.rs` tests that line. It came from FROM
        // images without a build history, which bob now builds with --omit-history.)
    ];
    for (name, dockerfile, reason, first) in cases {
        let (base, ws) = fx.refs(&dockerfile);
        let proxy = fx.proxy(&base, &ws);
        let ctx = fx.context(name, &dockerfile, &[]);
        let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &[("BOB_FROM_REFS", &pin)]);
        failed(&out, &r, reason, &first);
        let message = r.message.unwrap_or_default();
        assert!(message.starts_with(&first), "{name}: {message:?} does not start with buildah's error");
        if reason != Reason::BaseImagePullFailed {
            let tail = r.log_tail.unwrap_or_default();
            let buildah_line = format!("Error: {}", first.trim_start_matches("buildah: "));
            assert!(tail.contains(&buildah_line), "{name}: the log tail has buildah's line:\n{tail}");
        }
    }
}
