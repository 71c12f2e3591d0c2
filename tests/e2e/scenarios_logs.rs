//! Build logs that outlive the pod (issue 15): a finished build's pod is deleted and its log
//! stays, with no credential in it and nothing the build could change; a pod deleted with grace 0
//! mid-build, a build container killed (as close to an OOM kill as these machines allow), a
//! cancelled and a timed-out build each leave their log. `bob logs` reads each, with the user's
//! kubeconfig only.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use super::apiserver::Target;
use super::scenario::{Options, Scenario};
use super::scenarios::BUILD;

crate::scenarios!(
    a_finished_builds_log_outlives_its_pod_with_no_secret_and_untouched_by_the_build,
    a_pod_deleted_with_grace_0_mid_build_leaves_its_log,
    a_killed_build_container_leaves_its_log,
    cancelled_and_timed_out_builds_keep_their_logs,
);

/// `bob logs` with the user's kubeconfig (no registry credentials anywhere in its environment).
fn bob_logs(s: &Scenario, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bob"))
        .arg("logs")
        .args(args)
        .args(["-n", &s.ns])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", s.kubeconfig())
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The stored BuildLog as JSON.
async fn build_log(s: &Scenario, name: &str) -> Value {
    let out = s.kubectl.ok(&["get", "buildlog", name, "-n", &s.ns, "-o", "json"], None).await;
    serde_json::from_str(&out).unwrap()
}

async fn a_finished_builds_log_outlives_its_pod_with_no_secret_and_untouched_by_the_build(
    t: Target,
) -> Scenario {
    let s = Scenario::start(&t, "log_outlives_pod", Options::default()).await;
    // A RUN step shares the pod's network: it tries the proxy (the one credentialed thing it can
    // reach) and looks for API credentials; and it prints the registry password, which a build
    // should never know, so the redaction shows.
    let step = format!(
        "RUN echo e2e-line-1 && echo e2e-line-2 && echo 'pw={}' \
         && (wget -q -O /dev/null --post-data=x http://127.0.0.1:8080/v2/logs/x && echo e2e-proxy-took-it || echo e2e-proxy-refused) \
         && (test -e /var/run/secrets/kubernetes.io/serviceaccount/token && echo e2e-has-token || echo e2e-no-token) \
         && (env | grep -q KUBECONFIG && echo e2e-has-kubeconfig || echo e2e-no-kubeconfig)",
        s.password()
    );
    s.create(&[("logged", s.dockerfile(&step))]).await;
    let st = s.finished("logged", BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    let pod = st["podName"].as_str().unwrap().to_string();
    assert_eq!(st["logRefs"], json!([{"attempt": 1, "buildLog": pod}]), "{st:#}");
    s.no_pods_within(Duration::from_secs(60)).await;

    let log = build_log(&s, &pod).await;
    assert_eq!(log["spec"]["complete"], true, "{log:#}");
    let owners: Vec<&str> = log["metadata"]["ownerReferences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(owners, ["logged"], "owned by the ImageBuild: it goes with it");
    let build = &log["spec"]["containers"][0];
    assert_eq!(build["name"], "build");
    assert!(build["redacted"].as_i64().unwrap() >= 1, "the password was redacted: {build:#}");

    let out = bob_logs(&s, &["logged"]);
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for line in [
        "e2e-line-1",
        "e2e-line-2",
        "pw=<redacted>",
        "e2e-proxy-refused",
        "e2e-no-token",
        "e2e-no-kubeconfig",
    ] {
        assert!(printed.contains(line), "{line} is in the stored log:\n{printed}");
    }
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("builder:{}", s.password()));
    for secret in [s.password(), encoded.as_str()] {
        assert!(!printed.contains(secret) && !log.to_string().contains(secret), "a credential is in the log");
    }
    assert!(
        printed.contains("Writing manifest") || printed.contains("STEP 2/2"),
        "buildah's output is there"
    );

    // The same as a kubectl plugin: `kubectl bob logs`.
    let plugins = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_bob"), plugins.path().join("kubectl-bob")).unwrap();
    let path = std::env::join_paths(
        std::iter::once(plugins.path().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["bob", "logs", "logged", "-n", &s.ns])
        .env("PATH", path)
        .env("KUBECONFIG", s.kubeconfig())
        .output()
        .unwrap();
    assert!(out.status.success() && text(&out.stdout) == printed, "kubectl bob logs: {}", text(&out.stderr));

    // One clear line for what is not there.
    let out = bob_logs(&s, &["logged", "--attempt", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.lines().count() == 1 && err.contains("has no attempt 2 (attempts with a log: 1)"), "{err}");
    s.kubectl.ok(&["delete", "buildlog", &pod, "-n", &s.ns], None).await;
    let out = bob_logs(&s, &["logged"]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("is no longer kept"), "{err}");
    s
}

/// Starts a build whose RUN step prints a marker then sleeps; returns its pod once the marker
/// is in the pod's log.
async fn long_build(s: &Scenario, name: &str, spec: Value) -> String {
    s.create(&[(name, spec)]).await;
    let pod = s.printed(name, "e2e-started").await;
    // The shipper stores what it has at least every 2 s (FLUSH_EVERY): the bound on loss.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pod
}

/// `bob logs NAME --attempt N` holds the marker the attempt printed.
fn attempt_logged(s: &Scenario, name: &str, attempt: u32) {
    let out = bob_logs(s, &[name, "--attempt", &attempt.to_string()]);
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(printed.contains("e2e-started"), "attempt {attempt} of {name} kept its output:\n{printed}");
}

async fn cancel(s: &Scenario, name: &str) -> Value {
    let patch = r#"{"spec":{"cancel":true}}"#;
    s.kubectl.ok(&["patch", "imagebuild", name, "-n", &s.ns, "--type", "merge", "-p", patch], None).await;
    s.finished(name, Duration::from_secs(60)).await
}

async fn a_pod_deleted_with_grace_0_mid_build_leaves_its_log(t: Target) -> Scenario {
    let s = Scenario::start(&t, "log_grace_0", Options::default()).await;
    let pod = long_build(&s, "lost", s.dockerfile("RUN echo e2e-started && sleep 300")).await;
    s.kubectl.ok(&["delete", "pod", &pod, "-n", &s.ns, "--grace-period=0", "--force"], None).await;
    // The deleted pod is an infrastructure failure: retried on attempt 2.
    let st = s.wait("lost", "a retry", BUILD, |v| v["status"]["failure"]["reason"] == "PodDeleted").await;
    assert_eq!(st["status"]["logRefs"][0]["buildLog"], json!(pod), "{st:#}");
    attempt_logged(&s, "lost", 1);
    let st = cancel(&s, "lost").await;
    assert_eq!(st["phase"], "Cancelled", "{st:#}");
    s
}

async fn a_killed_build_container_leaves_its_log(t: Target) -> Scenario {
    let s = Scenario::start(&t, "log_killed", Options::default()).await;
    let pod = long_build(&s, "killed", s.dockerfile("RUN echo e2e-started && sleep 300")).await;
    // No memory limit is enforced here: SIGKILL the build container's process, as the OOM killer
    // would (exit 137, no result written).
    let killed = kill_build_container(&pod);
    assert!(killed > 0, "the build container's process of {pod} was found");
    let st = s
        .wait("killed", "a retry", BUILD, |v| {
            v["status"]["attempts"] == 1 && v["status"]["failure"].is_object()
        })
        .await;
    assert_eq!(st["status"]["failure"]["reason"], "PodFailed", "{st:#}");
    attempt_logged(&s, "killed", 1);
    cancel(&s, "killed").await;
    s
}

/// SIGKILLs the `bob build` process of `pod` (kube-sim runs containers as local processes and
/// gives each `SIM_POD_NAME` and `SIM_CONTAINER_NAME`); returns how many it killed.
fn kill_build_container(pod: &str) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let has = |v: String| vars.contains(&v.as_bytes());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let is_bob_build = cmdline.split(|b| *b == 0).nth(1) == Some(b"build".as_slice());
        if has(format!("SIM_POD_NAME={pod}"))
            && has("SIM_CONTAINER_NAME=build".into())
            && is_bob_build
            && let Some(p) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            killed += 1;
        }
    }
    killed
}

async fn cancelled_and_timed_out_builds_keep_their_logs(t: Target) -> Scenario {
    let s = Scenario::start(&t, "log_cancel_timeout", Options::default()).await;
    let mut spec = s.dockerfile("RUN echo e2e-started && sleep 300");
    spec["timeouts"] = json!({"build": "40s"});
    long_build(&s, "timed-out", spec).await;
    // `bob logs -f` follows the running build and ends when its containers do.
    let follower = {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bob"));
        cmd.args(["logs", "-f", "timed-out", "-n", &s.ns]).env_clear();
        cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("KUBECONFIG", s.kubeconfig());
        std::thread::spawn(move || cmd.output().unwrap())
    };
    let st = s.finished("timed-out", Duration::from_secs(90)).await;
    let followed = tokio::task::spawn_blocking(move || follower.join().unwrap()).await.unwrap();
    assert!(followed.status.success(), "{}", text(&followed.stderr));
    assert!(text(&followed.stdout).contains("e2e-started"), "followed live: {}", text(&followed.stdout));
    assert_eq!(
        (st["phase"].as_str(), st["reason"].as_str()),
        (Some("Failed"), Some("BuildTimeout")),
        "{st:#}"
    );
    attempt_logged(&s, "timed-out", 1);
    // Its pod goes first: on kube-sim pods share the host's network (and the proxy's port).
    s.no_pods_within(Duration::from_secs(60)).await;
    long_build(&s, "cancelled", s.dockerfile("RUN echo e2e-started && sleep 300 && echo other")).await;
    let st = cancel(&s, "cancelled").await;
    assert_eq!(st["phase"], "Cancelled", "{st:#}");
    attempt_logged(&s, "cancelled", 1);
    s
}
