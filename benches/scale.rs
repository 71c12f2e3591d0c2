//! Scale (not in CI): 1,000 ImageBuilds in the controller's cache, reconciled by the real
//! `Controller` (for_stream) against a mocked API and a real registry on loopback (no auth, so the
//! registry's password hashing does not dominate). Goal: all reconciled in under 5 s, peak RSS
//! under 100 MiB. Run: `cargo bench --bench scale`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bob::controller::error_policy;
use bob::controller::reconcile::reconcile;
use common::fake_api::*;
use common::*;
use futures::StreamExt;
use http::Method;
use kube::runtime::controller::Controller;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn main() {
    init();
    // `cargo bench` passes --bench; under `cargo test --all-targets` this is a 20-object smoke run.
    let count = if std::env::args().any(|a| a == "--bench") { 1000 } else { 20 };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = Registry::start(RegistryAuth::None);
        let img = small_image(3, "amd64");
        let direct = Direct::new(&reg.host, None);
        direct.push_image("lib/app", "1", &img).await;
        // Half are cache hits (their workspace image exists), half start a build pod.
        let builds: Vec<_> = (0..count)
            .map(|i| {
                let repo = if i % 2 == 0 { "hit" } else { "miss" };
                let spec = json!({"source": {"image": {"ref": reg.repo("lib/app:1")}},
                                  "workspaceImageRepository": reg.repo(&format!("{repo}{i}"))});
                image_build(&format!("ib-{i}"), spec, None)
            })
            .collect();
        for i in (0..count).step_by(2) {
            let ws = bob::key::workspace_ref(&reg.repo(&format!("hit{i}")), &format!("{}@{}", reg.repo("lib/app"), img.digest));
            let (repo, tag) = ws[reg.host.len() + 1..].rsplit_once(':').unwrap();
            direct.push_image(repo, tag, &img).await;
        }
        let (client, calls) = fake_api(move |c| match (c.method.clone(), c.route().as_str()) {
            (Method::GET, r) if r.contains("/pods/") => not_found(),
            (Method::POST, r) if r.ends_with("/pods") => (201, c.body.clone()),
            _ => default_reply(c),
        });
        let (reader, writer) = reflector::store();
        let mut events = vec![watcher::Event::Init];
        events.extend(builds.into_iter().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        let stream = futures::stream::iter(events.into_iter().map(Ok)).chain(futures::stream::pending());
        let started = Instant::now();
        let results = Controller::for_stream(reflector(writer, stream).applied_objects(), reader)
            .with_config(bob::controller::controller_config(16))
            .run(reconcile, error_policy, context(client));
        let done: Vec<_> = tokio::time::timeout(Duration::from_secs(120), results.take(count).collect::<Vec<_>>())
            .await
            .expect("reconciled in time");
        let took = started.elapsed();
        let failed = done.iter().filter(|r| r.is_err()).count();
        let statuses = calls.lock().unwrap().iter().filter(|c| c.path.contains("/status")).count();
        assert_eq!(failed, 0);
        println!(
            "{count} ImageBuilds reconciled in {:.2} s ({:.2} ms each), {statuses} status writes, peak RSS {:.1} MiB",
            took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / count as f64,
            peak_rss_mib()
        );
    });
}
