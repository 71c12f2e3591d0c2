//! `bob run -f` end to end against a real registry (htpasswd) and real buildah: an image source,
//! an inline Dockerfile, a git source cloned from a local bare repository, the cache hit of a
//! second run, and a failing Dockerfile's reason and log tail in the printed status.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::build::*;
use common::*;
use serde_json::Value;

/// Runs `bob run -f` on `yaml`; returns the output and the printed status.
fn bob_run(fx: &Fixture, name: &str, yaml: &str) -> (Output, Value) {
    let out = run_file(fx.dir.path(), name, yaml);
    let doc: Value = serde_saphyr::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("status YAML: {e}\n{}\n{}", text(&out.stdout), text(&out.stderr)));
    (out, doc["status"].clone())
}

fn succeeded(out: &Output, status: &Value, reason: &str) {
    assert!(out.status.success(), "{status:#}\n{}", text(&out.stderr));
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Succeeded"), Some(reason)),
        "{status:#}"
    );
    assert_eq!(status["conditions"][0]["status"], "True");
}

/// Splits `<host>/<repo>:<tag>` into the repository and tag on the fixture's registry.
fn repo_tag<'a>(fx: &Fixture, r: &'a str) -> (&'a str, &'a str) {
    let path = &r[fx.reg.host.len() + 1..];
    path.rsplit_once(':').unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_source_is_copied_with_its_digest_then_hits_the_cache() {
    let fx = Fixture::new().await;
    let yaml = imagebuild_yaml(&fx, "from-image", &format!("    image: {{ref: \"{}\"}}", fx.from));
    let (out, status) = bob_run(&fx, "from-image", &yaml);
    succeeded(&out, &status, "Built");
    assert_eq!(
        status["output"]["digest"].as_str(),
        Some(fx.from_digest.as_str()),
        "the workspace image is the image"
    );
    assert_eq!(
        status["baseImage"]["ref"].as_str(),
        Some(format!("{}/lib/busybox@{}", fx.reg.host, fx.from_digest).as_str())
    );
    assert_eq!(status["cacheHit"], false);

    let (out, again) = bob_run(&fx, "from-image", &yaml);
    succeeded(&out, &again, "CacheHit");
    assert_eq!(again["cacheHit"], true);
    assert_eq!(again["output"], status["output"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inline_dockerfile_is_built_verified_and_cached() {
    let fx = Fixture::new().await;
    let source = format!(
        "    dockerfile:\n      inline: |\n        FROM {}\n        ARG WHO=nobody\n        RUN echo \"built for $WHO\" > /who.txt\n      buildArgs: {{WHO: bob}}",
        fx.from
    );
    let yaml = imagebuild_yaml(&fx, "inline", &source);
    let (out, status) = bob_run(&fx, "inline", &yaml);
    succeeded(&out, &status, "Built");
    assert!(text(&out.stderr).contains("STEP 3/3: RUN echo"), "the build log is shown on stderr");
    let output = status["output"]["ref"].as_str().unwrap().to_string();
    let key = status["cacheKey"].as_str().unwrap();
    assert_eq!(status["baseImage"]["ref"].as_str(), Some(format!("{}/base:{key}", fx.reg.host).as_str()));
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let (repo, tag) = repo_tag(&fx, &output);
    assert_eq!(d.manifest_digest(repo, tag).await.as_deref(), status["output"]["digest"].as_str());
    let manifest: Value = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    assert_eq!(file_in_image(&d, repo, &manifest, "who.txt").await.as_deref(), Some("built for bob\n"));

    let (out, again) = bob_run(&fx, "inline", &yaml);
    succeeded(&out, &again, "CacheHit");
    assert!(!text(&out.stderr).contains("STEP"), "nothing was built on a cache hit");
}

/// A bare repository with one commit on `main`: `sub/Dockerfile` and `sub/hello.txt`.
fn git_repo(dir: &Path, from: &str) -> (String, String) {
    require("git", "git");
    let bare = dir.join("repo.git");
    let work = dir.join("checkout");
    let git = |args: &[&str], cwd: &Path| {
        run_ok(
            Command::new("git")
                .args(["-c", "user.email=t@t", "-c", "user.name=t"])
                .args(args)
                .current_dir(cwd),
        );
    };
    std::fs::create_dir_all(work.join("sub")).unwrap();
    git(&["init", "-q", "--bare", bare.to_str().unwrap()], dir);
    std::fs::write(work.join("sub/Dockerfile"), format!("FROM {from}\nCOPY hello.txt /hello.txt\n")).unwrap();
    std::fs::write(work.join("sub/hello.txt"), "hello from git\n").unwrap();
    git(&["init", "-q", "."], &work);
    git(&["add", "."], &work);
    git(&["commit", "-q", "-m", "one"], &work);
    git(&["push", "-q", bare.to_str().unwrap(), "HEAD:refs/heads/main"], &work);
    let sha = run_ok(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(&work)).trim().to_string();
    (format!("file://{}", bare.display()), sha)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_git_source_is_cloned_at_the_resolved_commit_and_built() {
    let fx = Fixture::new().await;
    let (url, sha) = git_repo(fx.dir.path(), &fx.from);
    let source = format!(
        "    dockerfile:\n      git: {{url: \"{url}\", revision: main, dockerfilePath: sub/Dockerfile, contextPath: sub}}"
    );
    let (out, status) = bob_run(&fx, "git", &imagebuild_yaml(&fx, "git", &source));
    succeeded(&out, &status, "Built");
    assert!(text(&out.stderr).contains(&format!("checked out {sha}")), "the clone container ran");
    let mut inputs = bob::key::BuildInputs::inline("");
    inputs.source = bob::key::DockerfileSource::Git { commit: sha };
    inputs.dockerfile_path = "sub/Dockerfile".into();
    inputs.context_path = "sub".into();
    inputs.from_digests.insert(fx.from.clone(), fx.from_digest.clone());
    assert_eq!(
        status["cacheKey"].as_str(),
        Some(inputs.key().unwrap().as_str()),
        "keyed by commit and FROM digest"
    );
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let output = status["output"]["ref"].as_str().unwrap().to_string();
    let (repo, tag) = repo_tag(&fx, &output);
    let manifest: Value = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    assert_eq!(file_in_image(&d, repo, &manifest, "hello.txt").await.as_deref(), Some("hello from git\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_a_step_copies_from_is_keyed_pinned_and_pulled_through_the_proxy() {
    let fx = Fixture::new().await;
    // The same image under another name, read by COPY --from: it must reach the build only through
    // the proxy's mirror (so it must be declared), pinned to the digest the key was made with.
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let (repo, tag) = repo_tag(&fx, &fx.from);
    let manifest = d.manifest(repo, tag).await;
    d.push_manifest(repo, "tools", OCI_MANIFEST, &manifest).await;
    let tools = format!("{}/{repo}:tools", fx.reg.host);
    let source = format!(
        "    dockerfile:\n      inline: |\n        FROM {}\n        COPY --from={tools} /bin/busybox /opt/tools/busybox\n        RUN /opt/tools/busybox true",
        fx.from
    );
    let (out, status) = bob_run(&fx, "copy-from", &imagebuild_yaml(&fx, "copy-from", &source));
    succeeded(&out, &status, "Built");
    let dockerfile = format!(
        "FROM {}\nCOPY --from={tools} /bin/busybox /opt/tools/busybox\nRUN /opt/tools/busybox true\n",
        fx.from
    );
    let mut inputs = bob::key::BuildInputs::inline(&dockerfile);
    inputs.from_digests.insert(fx.from.clone(), fx.from_digest.clone());
    inputs.from_digests.insert(tools.clone(), fx.from_digest.clone());
    assert_eq!(
        status["cacheKey"].as_str(),
        Some(inputs.key().unwrap().as_str()),
        "keyed by both images' digests"
    );
    let output = status["output"]["ref"].as_str().unwrap().to_string();
    let (repo, tag) = repo_tag(&fx, &output);
    let manifest: Value = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    assert!(
        file_in_image(&d, repo, &manifest, "opt/tools/busybox").await.is_some(),
        "the copied file is there"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_end_in_a_failed_status_with_reason_and_log_tail() {
    let fx = Fixture::new().await;
    let source = format!(
        "    dockerfile:\n      inline: |\n        FROM {}\n        RUN echo boom-output && exit 7",
        fx.from
    );
    let (out, status) = bob_run(&fx, "fails", &imagebuild_yaml(&fx, "fails", &source));
    assert!(!out.status.success());
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Failed"), Some("BuildStepFailed"))
    );
    let failure = &status["failure"];
    assert_eq!(failure["container"], "build");
    assert!(failure["message"].as_str().unwrap().contains("exit code 7"), "{failure:#}");
    assert!(failure["logTail"].as_str().unwrap().contains("boom-output"), "{failure:#}");
    let last = text(&out.stderr).lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("bob: run failed: BuildStepFailed: "), "{last}");

    // A spec the API server would refuse is refused as it would be: one line naming the field;
    // nothing runs.
    let bad = imagebuild_yaml(&fx, "bad", &format!("    image: {{ref: \"{}\"}}", fx.from))
        .replace("/workspace\n", "/workspace:latest\n");
    let out = run_file(fx.dir.path(), "bad", &bad);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(out.stdout.is_empty() && err.contains("spec.workspaceImageRepository"), "{err}");
}

#[test]
fn bob_run_refuses_what_the_api_server_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let base = "apiVersion: bob.dev/v1alpha1\nkind: ImageBuild\nmetadata: {name: x}\nspec:\n  workspaceImageRepository: 127.0.0.1:1/ws\n";
    let cases = [
        (
            "  source: {image: {ref: \"127.0.0.1:1/a:1\"}}\n  forceRebuidl: true\n",
            "unknown field \"spec.forceRebuidl\"",
        ),
        (
            "  source: {image: {ref: \"127.0.0.1:1/a:1\"}, dockerfile: {inline: \"FROM x\"}}\n  baseImageRepository: 127.0.0.1:1/b\n",
            "exactly one of image or dockerfile",
        ),
        (
            "  source: {image: {ref: \"127.0.0.1:1/a:1\"}}\n  forceRebuild: \"yes\"\n",
            "must be of type boolean",
        ),
    ];
    for (spec, needle) in cases {
        let out = run_file(dir.path(), "ib", &format!("{base}{spec}"));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}: {err}");
        assert!(out.stdout.is_empty(), "no status for an ImageBuild the API server would not take");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle) && err.contains("the API server would refuse it"), "{needle}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_does_not_answer_the_cache_check_is_a_wait_not_a_miss() {
    let fx = Fixture::new().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let yaml = imagebuild_yaml(&fx, "down", &format!("    image: {{ref: \"{}\"}}", fx.from)).replace(
        &format!("workspaceImageRepository: {}/workspace", fx.reg.host),
        &format!("workspaceImageRepository: {closed}/ws"),
    );
    let out = run_file(fx.dir.path(), "down", &yaml);
    let doc: Value = serde_saphyr::from_str(&text(&out.stdout)).unwrap();
    let status = &doc["status"];
    assert_eq!(out.status.code(), Some(75), "a wait, not a failure: {}", text(&out.stderr));
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Pending"), Some("RegistryUnavailable"))
    );
    assert!(status["message"].as_str().unwrap().contains(&closed.to_string()), "{status:#}");
    assert!(status.get("podName").is_none(), "nothing was built: {status:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_clone_reads_as_the_controller_reads_it() {
    use k8s_openapi::api::core::v1::Pod;
    let dir = tempfile::tempdir().unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bob-build-x-1"},
        "spec": {"restartPolicy": "Never",
            "initContainers": [{"name": "clone", "command": ["sh", "-c", "echo fetching; echo 'fatal: repository not found' >&2; exit 128"],
                                "terminationMessagePolicy": "FallbackToLogsOnError"}],
            "containers": [{"name": "build", "command": ["sh", "-c", "echo never"]}]}}))
    .unwrap();
    let bob = std::path::PathBuf::from(env!("CARGO_BIN_EXE_bob"));
    let status = bob::local::pod::run(&pod, &Default::default(), &bob, dir.path()).await.unwrap();
    let ran = Pod { status: Some(status), ..pod };
    let bob::controller::status::PodState::Failed(f) = bob::controller::status::observe(&ran) else {
        panic!("a failed clone is a failed build: {ran:?}")
    };
    assert_eq!(f.reason, bob::reason::Reason::SourceFetchFailed);
    assert_eq!(
        (f.container.as_deref(), f.message.as_str()),
        (Some("clone"), "container clone failed with exit code 128")
    );
    assert!(f.log_tail.unwrap().contains("repository not found"), "its log is the evidence");
}
