//! One duration grammar (Go's, what the CRD's CEL `duration()` reads) wherever bob takes a
//! duration: every flag, `spec.timeouts` in the controller's plan and queue clock, and `bob run`.
//! `1h30m` works everywhere; a bare number is refused everywhere with the fix (`30s`); a bad
//! queue limit fails the generation instead of silently becoming the default.

mod common;

use std::process::Command;
use std::sync::Arc;

use bob::cli::Cli;
use bob::controller::reconcile::reconcile;
use bob::controller::{PlanConfig, Resolved, plan};
use clap::Parser;
use common::fake_api::*;
use common::flags::duration_flags;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// The smallest argument list that parses for `sub`, plus `--<long>=<value>`.
fn args(sub: &str, long: &str, value: &str) -> Vec<String> {
    let mut a = vec!["bob".to_string(), sub.to_string()];
    a.extend(match sub {
        "copy" => vec!["reg.test/a:1".to_string(), "reg.test/b:1".to_string()],
        "run" => vec!["-f".to_string(), "ib.yaml".to_string()],
        _ => vec![],
    });
    a.push(format!("--{long}={value}"));
    a
}

#[test]
fn every_duration_flag_takes_go_durations_and_refuses_bare_numbers() {
    let flags = duration_flags();
    let names: Vec<&str> = flags.iter().map(|f| f.env.as_str()).collect();
    for env in [
        "BOB_PROXY_UPSTREAM_TIMEOUT",
        "BOB_PROXY_HEADER_TIMEOUT",
        "BOB_PROXY_IDLE_TIMEOUT",
        "BOB_PROXY_UPLOAD_IDLE_TIMEOUT",
        "BOB_NO_PROGRESS_TIMEOUT",
        "BOB_PROXY_WAIT",
        "BOB_BUILD_TIMEOUT",
        "BOB_QUEUE_TIMEOUT",
        "BOB_RETRY_BACKOFF",
        "BOB_COPY_TIMEOUT",
    ] {
        assert!(names.contains(&env), "{env} is not a duration flag: {names:?}");
    }
    for flag in &flags {
        let (sub, long) = (&flag.subcommand, &flag.long);
        for ok in ["1h30m", "1.5h", "90s", "300ms", "2h45m30.5s", "10us", "5ns"] {
            let parsed = Cli::try_parse_from(args(sub, long, ok));
            assert!(parsed.is_ok(), "{sub} --{long} {ok}: {}", parsed.err().unwrap());
        }
        for (bad, needle) in [
            ("30", r#"invalid duration "30": the number 30 has no unit, e.g. 30s"#),
            ("0s", r#"duration "0s" must be positive"#),
            ("-5s", r#"duration "-5s" must be positive"#),
            ("3d", r#"unknown unit "d""#),
        ] {
            let Err(e) = Cli::try_parse_from(args(sub, long, bad)) else {
                panic!("{sub} --{long} {bad} was accepted")
            };
            assert!(e.to_string().contains(needle), "{sub} --{long} {bad}: {e}");
        }
    }
}

#[test]
fn the_binary_refuses_a_bare_number_from_the_environment_naming_the_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_bob"))
        .args(["copy", "reg.test/a:1", "reg.test/b:1"])
        .env_clear()
        .env("BOB_COPY_TIMEOUT", "120")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"invalid duration "120": the number 120 has no unit, e.g. 120s"#), "{err}");
}

/// An image-source ImageBuild with `timeouts`.
fn with_timeouts(name: &str, timeouts: Value, auth: bool) -> bob::crd::ImageBuild {
    let mut spec = json!({"source": {"image": {"ref": format!("reg.test/lib/app@{DIGEST}")}},
                          "workspaceImageRepository": "reg.test/ws", "timeouts": timeouts});
    if auth {
        spec["registryAuth"] = json!({"secretRef": {"name": "missing"}});
    }
    image_build(name, spec, None)
}

fn deadline(timeouts: Value) -> Option<i64> {
    let ib = with_timeouts("t", timeouts, false);
    let p = plan(&ib, &Resolved::default(), &PlanConfig::default()).unwrap();
    p.pod.spec.unwrap().active_deadline_seconds
}

#[test]
fn the_plan_reads_spec_time_limits_with_the_same_grammar_as_the_flags() {
    assert_eq!(deadline(json!({"build": "1h30m"})), Some(5400));
    assert_eq!(deadline(json!({"build": "1.5h", "queue": "2h45m30.5s"})), Some(5400));
    assert_eq!(deadline(json!({"build": "90.5s"})), Some(91), "rounded up, never less than the limit");
    assert_eq!(deadline(json!({})), Some(3600), "the installation's default");
}

#[test]
fn the_plan_refuses_bad_time_limits_naming_the_field() {
    for (timeouts, field, message) in [
        (
            json!({"build": "30"}),
            "spec.timeouts.build",
            r#"invalid duration "30": the number 30 has no unit, e.g. 30s (units: ns, us, ms, s, m, h)"#,
        ),
        (
            json!({"queue": "soon"}),
            "spec.timeouts.queue",
            r#"invalid duration "soon": write numbers with units, e.g. 90s, 30m or 1h30m"#,
        ),
        (json!({"queue": "0s"}), "spec.timeouts.queue", r#"duration "0s" must be positive"#),
    ] {
        let ib = with_timeouts("t", timeouts.clone(), false);
        let e = plan(&ib, &Resolved::default(), &PlanConfig::default()).unwrap_err();
        assert_eq!((e.field.as_str(), e.message.as_str()), (field, message), "{timeouts}");
    }
}

/// A fake API without Secrets: the ImageBuild waits `Pending` until its queue limit.
fn no_secrets() -> (kube::Client, Arc<std::sync::Mutex<Vec<Call>>>) {
    fake_api(|c| if c.path.contains("/secrets/") { not_found() } else { default_reply(c) })
}

async fn reconciled(timeouts: Value, age_minutes: i64) -> Value {
    let (client, calls) = no_secrets();
    let mut ib = with_timeouts("waits", timeouts, true);
    let created = Timestamp::now() - SignedDuration::from_mins(age_minutes);
    ib.metadata.creation_timestamp = Some(Time(created));
    reconcile(Arc::new(ib), context(client)).await.unwrap();
    last_status(&calls.lock().unwrap(), "waits").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queue_clock_honours_1h30m() {
    let status = reconciled(json!({"queue": "1h30m"}), 60).await;
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Pending"), Some("SecretNotFound"))
    );
    let status = reconciled(json!({"queue": "1h30m"}), 100).await;
    assert_eq!((status["phase"].as_str(), status["reason"].as_str()), (Some("Failed"), Some("QueueTimeout")));
    assert!(status["message"].as_str().unwrap().starts_with("still waiting after 5400s"), "{status:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_queue_limit_fails_the_generation_instead_of_becoming_the_default() {
    // The default (30m) would still be waiting at 10 minutes: the bad value is not replaced by it.
    for (queue, message) in [
        ("soon", r#"invalid duration "soon": write numbers with units, e.g. 90s, 30m or 1h30m"#),
        ("30", r#"invalid duration "30": the number 30 has no unit, e.g. 30s (units: ns, us, ms, s, m, h)"#),
    ] {
        let status = reconciled(json!({"queue": queue}), 10).await;
        assert_eq!(
            (status["phase"].as_str(), status["reason"].as_str(), status["message"].as_str()),
            (Some("Failed"), Some("InvalidSpec"), Some(format!("spec.timeouts.queue: {message}").as_str())),
            "{queue}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bob_run_reads_spec_time_limits_like_the_controller() {
    let reg = common::Registry::start(common::RegistryAuth::None);
    common::Direct::new(&reg.host, None).push_image("lib/app", "1", &common::small_image(7, "amd64")).await;
    let dir = tempfile::tempdir().unwrap();
    let run = |timeouts: &str| {
        let yaml = format!(
            "apiVersion: bob.dev/v1alpha1\nkind: ImageBuild\nmetadata: {{name: t}}\nspec:\n  source: {{image: {{ref: {}}}}}\n  \
             workspaceImageRepository: {}\n  timeouts: {timeouts}\n",
            reg.repo("lib/app:1"),
            reg.repo("ws")
        );
        let file = common::write_file(dir.path(), "ib.yaml", &yaml);
        let out = Command::new(env!("CARGO_BIN_EXE_bob"))
            .args(["run", "-f"])
            .arg(&file)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .output()
            .unwrap();
        let doc: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or_default();
        (out.status.success(), doc["status"].clone(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, status, _) = run("{build: 1h30m, queue: 1.5h}");
    assert!(ok, "{status:#}");
    assert_eq!(status["phase"], "Succeeded");
    // As the API server would (the CRD's rule), bob run's reader refuses a bare number: one line,
    // the rule's message, no status.
    let (ok, status, stderr) = run("{build: 1h, queue: \"30\"}");
    assert!(!ok && status.is_null(), "{status:#}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("spec.timeouts.queue") && last.contains("positive duration with a unit"),
        "{stderr}"
    );
}
