//! Controller latency (not in CI): a new ImageBuild reconciled against a mocked API (tower-test)
//! and a real registry on loopback. Cache-hit path (image source whose workspace image exists):
//! goal p50 < 10 ms to the Succeeded patch. Create path: goal p50 < 100 ms to the pod create.
//! Run: `cargo bench --bench controller` (needs docker-registry, as the tests do).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bob::controller::reconcile::reconcile;
use common::fake_api::*;
use common::*;
use serde_json::json;

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    format!("p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms ({} runs)", at(0.5), at(0.9), at(1.0), v.len())
}

fn main() {
    init();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a 5-round smoke test.
    let rounds = if std::env::args().any(|a| a == "--bench") { 200 } else { 5 };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = Registry::start(RegistryAuth::Basic { user: "bench", password: "bench-pass" });
        let config = docker_config(&reg.host, "bench", "bench-pass");
        let img = small_image(5, "amd64");
        let direct = Direct::new(&reg.host, Some(&config));
        direct.push_image("lib/app", "1", &img).await;
        let spec = |repo: &str| {
            json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo(repo),
                   "registryAuth": {"secretRef": {"name": "reg"}}})
        };
        let ws = bob::key::workspace_ref(&reg.repo("hit"), &format!("{}@{}", reg.repo("lib/app"), img.digest));
        let (repo, tag) = ws[reg.host.len() + 1..].rsplit_once(':').unwrap();
        direct.push_image(repo, tag, &img).await;

        let secret = registry_secret("reg", &config);
        let (client, calls) = builder_api(secret);
        let ctx = context(client);
        for (label, repo, want) in [("cache hit -> Succeeded patch", "hit", "Succeeded"), ("new build -> pod create", "miss", "Building")] {
            let mut times = Vec::with_capacity(rounds);
            for i in 0..rounds {
                let ib = Arc::new(image_build(&format!("{repo}-{i}"), spec(repo), None));
                let started = Instant::now();
                reconcile(ib, ctx.clone()).await.unwrap();
                times.push(started.elapsed());
            }
            let calls = calls.lock().unwrap();
            let last = last_status(&calls, &format!("{repo}-{}", rounds - 1)).unwrap();
            assert_eq!(last["phase"], want);
            println!("{label}: {}", percentiles(times));
        }
    });
}
