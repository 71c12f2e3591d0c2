//! The benchmark of docs/benchmarks.md (an ignored trial, never timed in CI): on the harness, with
//! watches (not polling), ImageBuild created → `Succeeded` for a cache hit, and created → build
//! pod created, p50/p90 over `BOB_E2E_BENCH_RUNS` (default 50) runs each. The clock starts before
//! the create request is sent and stops when the watch delivers the event.
//!
//! `cargo test --release --test e2e -- --ignored benchmark --nocapture`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::mpsc;

use super::apiserver::Target;
use super::scenario::{Options, Scenario};
use super::scenarios::BUILD;

/// Runs the benchmark.
pub fn run(t: Target) -> std::pin::Pin<Box<dyn std::future::Future<Output = Scenario> + Send>> {
    Box::pin(bench(t))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(what: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "| {what} | {} | **{:.1} ms** | {:.1} ms | {:.1} ms | {:.1} ms |",
        d.len(),
        ms(percentile(&d, 0.5)),
        ms(percentile(&d, 0.9)),
        ms(d[0]),
        ms(*d.last().unwrap())
    )
}

async fn bench(t: Target) -> Scenario {
    let runs: usize = std::env::var("BOB_E2E_BENCH_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(50);
    // BOB_E2E_BENCH_HOP=fresh puts the counting proxy in front of the API server, opening a new
    // connection per request (kube-sim's 40 ms stall on kept-alive connections is gone), and
    // prints where the API time goes; BOB_E2E_BENCH_HOP=kept does the same over kept-alive
    // connections. Unset: the controller talks to the API server directly, as users run it.
    let hop = std::env::var("BOB_E2E_BENCH_HOP").ok().filter(|h| !h.is_empty());
    let opts = Options {
        counted: hop.is_some(),
        fresh_connections: hop.as_deref() == Some("fresh"),
        ..Default::default()
    };
    let counted = opts.counted;
    let s = Scenario::start(&t, "benchmark", opts).await;
    let gvk = GroupVersionKind::gvk("bob.dev", "v1alpha1", "ImageBuild");
    let builds: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), &s.ns, &ApiResource::from_gvk(&gvk));
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);

    // One watch each, open for the whole run: Succeeded ImageBuilds and new pods by owner name.
    // Each event is timed where the watch delivers it, not where the loop below reads it.
    let (done_tx, mut done) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut stream = watcher(builds.clone(), watcher::Config::default()).applied_objects().boxed();
    tokio::spawn(async move {
        while let Some(Ok(o)) = stream.next().await {
            if o.data["status"]["phase"] == "Succeeded" {
                let _ = done_tx.send((o.metadata.name.unwrap_or_default(), Instant::now()));
            }
        }
    });
    let (pod_tx, mut created) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut stream = watcher(pods.clone(), watcher::Config::default()).touched_objects().boxed();
    tokio::spawn(async move {
        while let Some(Ok(p)) = stream.next().await {
            let owner = p.metadata.owner_references.as_ref().and_then(|o| o.first()).map(|o| o.name.clone());
            let _ = pod_tx.send((owner.unwrap_or_default(), Instant::now()));
        }
    });
    let create = |name: String, spec: serde_json::Value| {
        let builds = builds.clone();
        async move {
            let ib: DynamicObject =
                serde_json::from_value(json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
                "metadata": {"name": name}, "spec": spec}))
                .unwrap();
            builds.create(&PostParams::default(), &ib).await.unwrap();
        }
    };

    // The image that every cache-hit run finds.
    let spec = s.dockerfile("RUN echo bench > /bench.txt");
    s.create(&[("seed", spec.clone())]).await;
    let st = s.finished("seed", BUILD).await;
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut hits = Vec::new();
    for i in 0..runs {
        let name = format!("hit-{i}");
        let start = Instant::now();
        create(name.clone(), spec.clone()).await;
        while !seen.contains_key(&name) {
            let (n, at) = tokio::time::timeout(Duration::from_secs(30), done.recv())
                .await
                .expect("Succeeded in 30 s")
                .unwrap();
            seen.entry(n).or_insert(at);
        }
        hits.push(seen[&name] - start);
        let st = s.get(&name).await.unwrap();
        assert_eq!(st["status"]["reason"], "CacheHit", "{st:#}");
    }

    // A new Dockerfile each run: a cache miss that creates a pod; the ImageBuild is deleted once
    // its pod exists (the pod goes with it) before the next run.
    let mut misses = Vec::new();
    for i in 0..runs {
        let name = format!("miss-{i}");
        let start = Instant::now();
        create(name.clone(), s.dockerfile(&format!("RUN echo miss-{i} > /miss.txt"))).await;
        let at = loop {
            let (owner, at) = tokio::time::timeout(Duration::from_secs(30), created.recv())
                .await
                .expect("a pod in 30 s")
                .unwrap();
            if owner == name {
                break at;
            }
        };
        misses.push(at - start);
        builds.delete(&name, &DeleteParams::default()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.pods_now().await.is_empty() {
            assert!(Instant::now() < deadline, "the pod of {name} was not collected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let how = hop.map_or("direct".to_string(), |h| format!("through the counting proxy ({h} connections)"));
    println!("\nbenchmark: {runs} runs each, API server: {} ({how}), bob {profile} build", t.describe());
    println!("| path | runs | p50 | p90 | min | max |\n|---|---|---|---|---|---|");
    println!("{}", summary("created → `Succeeded` (cache hit, no pod)", hits));
    println!("{}", summary("created → build pod created (cache miss)", misses));
    if counted {
        api_time(&s);
    }
    s
}

/// The controller's API calls during the benchmark by kind: count and mean answer time.
fn api_time(s: &Scenario) {
    let mut by: std::collections::BTreeMap<String, (usize, Duration)> = Default::default();
    for c in s.calls() {
        let Some(took) = c.took else { continue };
        if c.path.contains("watch=") {
            continue;
        }
        let path = c.path.split('?').next().unwrap();
        let kind = path
            .split('/')
            .filter(|p| {
                !p.is_empty()
                    && !p.starts_with("e2e-")
                    && !p.starts_with("bob-build-")
                    && !p.starts_with("hit-")
                    && !p.starts_with("miss-")
                    && *p != "reg"
            })
            .collect::<Vec<_>>()
            .join("/");
        let e = by.entry(format!("{} {kind}", c.method)).or_default();
        e.0 += 1;
        e.1 += took;
    }
    println!("\n| API call | count | mean |\n|---|---|---|");
    for (k, (n, t)) in by {
        println!("| {k} | {n} | {:.1} ms |", t.as_secs_f64() * 1000.0 / n as f64);
    }
}
