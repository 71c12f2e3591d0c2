//! `bob build` with real buildah, a real registry that requires credentials, and `bob proxy`
//! holding them: the base comes only through the mirror route, phase 1 is skipped when the base
//! exists, every failure has its reason, and neither bob build nor buildah sees a credential.

mod common;

use common::build::*;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn builds_a_dockerfile_through_the_proxy_and_skips_phase_1_when_the_base_exists() {
    let fx = Fixture::new().await;
    let dockerfile = format!(
        "FROM {}\nRUN echo built-by-run > /run.txt && (read line || echo stdin-closed > /stdin.txt)\nENV GREETING=hello\nCOPY a.txt /a.txt\n",
        fx.from
    );
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let ctx = fx.context("ctx", &dockerfile, &[("a.txt", "copied from the context\n")]);
    let storage = fx.dir.path().join("storage");
    let pins = [("BOB_FROM_REFS", fx.pin())];
    let pins: Vec<(&str, &str)> = pins.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let (out, r) = bob_build(&proxy.addr, &ctx, &storage, &pins);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(r.base_built && r.reason.is_none(), "{r:?}");
    assert_eq!(r.base_digest, r.target_digest, "the workspace image is the base image");
    assert_eq!(r.from_digests.get(&fx.from), Some(&fx.from_digest));
    assert!(text(&out.stdout).contains("STEP 2/4: RUN echo built-by-run"), "the engine's log is streamed");

    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let (base_repo, base_tag) = base.rsplit_once(':').unwrap();
    let base_repo = base_repo.trim_start_matches(&format!("{}/", fx.reg.host));
    let (ws_repo, ws_tag) = ws.rsplit_once(':').unwrap();
    let ws_repo = ws_repo.trim_start_matches(&format!("{}/", fx.reg.host));
    assert_eq!(d.manifest_digest(base_repo, base_tag).await, r.base_digest, "pushed to the planned base tag");
    assert_eq!(d.manifest_digest(ws_repo, ws_tag).await, r.target_digest, "copied to the workspace tag");

    let manifest: serde_json::Value = serde_json::from_slice(&d.manifest(ws_repo, ws_tag).await).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&d.blob(ws_repo, manifest["config"]["digest"].as_str().unwrap()).await)
            .unwrap();
    let env: Vec<&str> =
        config["config"]["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(env.contains(&"GREETING=hello"), "{env:?}");
    assert_eq!(file_in_image(&d, ws_repo, &manifest, "run.txt").await.as_deref(), Some("built-by-run\n"));
    assert_eq!(
        file_in_image(&d, ws_repo, &manifest, "a.txt").await.as_deref(),
        Some("copied from the context\n")
    );
    assert_eq!(file_in_image(&d, ws_repo, &manifest, "stdin.txt").await.as_deref(), Some("stdin-closed\n"));

    // The same inputs again: the base exists, phase 1 is skipped, the result is the same image.
    let (out, again) = bob_build(&proxy.addr, &ctx, &storage, &pins);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!again.base_built && again.timings.build_ms.is_none(), "{again:?}");
    assert_eq!(again.target_digest, r.target_digest);
    assert!(!text(&out.stdout).contains("STEP 1/4"), "buildah did not run");
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_isolation_with_runc_runs_the_steps_too() {
    require("runc", "runc");
    let fx = Fixture::new().await;
    let dockerfile = format!("FROM {}\nRUN echo from-runc > /runc.txt\n", fx.from);
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let ctx = fx.context("runc", &dockerfile, &[]);
    let pin = fx.pin();
    let env = [("BOB_FROM_REFS", pin.as_str()), ("BOB_ISOLATION", "oci"), ("BOB_OCI_RUNTIME", "runc")];
    let (out, r) = bob_build(&proxy.addr, &ctx, &fx.dir.path().join("storage"), &env);
    assert!(out.status.success() && r.base_built, "{}\n{}", text(&out.stdout), text(&out.stderr));
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let (repo, tag) = ws.trim_start_matches(&format!("{}/", fx.reg.host)).rsplit_once(':').unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    assert_eq!(file_in_image(&d, repo, &manifest, "runc.txt").await.as_deref(), Some("from-runc\n"));
}
