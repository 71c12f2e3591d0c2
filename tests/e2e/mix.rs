//! A mix of ImageBuilds created at once and what each must end as: a cache hit of an image that
//! already exists, image sources, Dockerfile builds and a Dockerfile whose `RUN` fails. A phase
//! creates a mix, waits until every build ended and its pods are gone, and records the outcomes,
//! the pods the fake kubelet ran and the controller's API calls meanwhile (the fault scenarios
//! and their benchmark compare phases with and without API faults).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kube::api::ListParams;
use serde_json::{Value, json};

use super::kubelet::{self, RanPod};
use super::scenario::Scenario;

/// What a build of the mix is, and so how it must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The spec of an image that exists: `Succeeded`/`CacheHit`, no pod.
    Hit,
    /// An image source (no Dockerfile): `Succeeded`/`Built`, the image itself.
    Image,
    /// A Dockerfile: `Succeeded`/`Built`, never a cache hit of what it just built.
    Dockerfile,
    /// A Dockerfile whose `RUN` fails: `Failed`/`BuildStepFailed`.
    Fails,
}

/// One ImageBuild of a mix.
pub struct Build {
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Its spec.
    pub spec: Value,
}

/// The spec that every [`Kind::Hit`] uses: build it once first ([`Mix::seed`]).
pub fn hit_spec(s: &Scenario) -> Value {
    s.dockerfile("RUN echo seed > /seed.txt")
}

/// `counts` builds of each kind (hits, image sources, Dockerfiles, failures), named
/// `<tag>-<kind>-<i>`; every spec but the hits' is new in this scenario (`tag` is in its content).
pub fn builds(s: &Scenario, tag: &str, counts: [usize; 4]) -> Vec<Build> {
    let mut out = Vec::new();
    let kinds = [Kind::Hit, Kind::Image, Kind::Dockerfile, Kind::Fails];
    // Interleaved (one of each kind, then the next), so that every wave of a long mix is a mix.
    let most = counts.iter().copied().max().unwrap_or(0);
    for i in 0..most {
        for (kind, _) in kinds.into_iter().zip(counts).filter(|(_, n)| i < *n) {
            let (short, spec) = match kind {
                Kind::Hit => ("hit", hit_spec(s)),
                Kind::Image => {
                    // The image is the same; a repository of its own makes its workspace image new.
                    let mut spec = s.image_source();
                    spec["workspaceImageRepository"] = json!(format!("{}/images-{tag}-{i}", s.repos));
                    ("image", spec)
                }
                Kind::Dockerfile => ("df", s.dockerfile(&format!("RUN echo {tag}-{i} > /built.txt"))),
                Kind::Fails => ("fails", s.dockerfile(&format!("RUN echo {tag}-{i}-fails && false"))),
            };
            out.push(Build { name: format!("{tag}-{short}-{i}"), kind, spec });
        }
    }
    out
}

/// What a phase did.
pub struct Phase {
    /// Each build's final status (or its last one, if it did not end in time).
    pub statuses: BTreeMap<String, Value>,
    /// The builds that did not end in time.
    pub unfinished: Vec<String>,
    /// The controller's API calls from the first create until the last pod was gone.
    pub calls: usize,
    /// The pods the fake kubelet started meanwhile.
    pub ran: BTreeSet<RanPod>,
    /// The pods still there a while after every build ended (the controller deletes finished
    /// build pods).
    pub left: Vec<String>,
    /// From the first create until every build ended and its pods were gone.
    pub took: Duration,
}

impl Phase {
    /// The controller's API calls per build.
    pub fn calls_per_build(&self) -> f64 {
        self.calls as f64 / self.statuses.len().max(1) as f64
    }
}

fn terminal(st: &Value) -> bool {
    matches!(st["phase"].as_str(), Some("Succeeded" | "Failed" | "Cancelled"))
}

/// Creates `builds` in waves of `wave` (each wave in one kubectl request, the next once the
/// previous ended), waits up to `timeout` for all, then until the namespace has no pod (up to
/// 30 s: the controller deletes finished build pods, and those deletes are part of the cost).
/// The controller's calls are counted from `since`.
pub async fn run(s: &Scenario, builds: &[Build], wave: usize, timeout: Duration, since: Instant) -> Phase {
    let before = kubelet::ran(s);
    let start = since;
    let deadline = Instant::now() + timeout;
    let mut statuses = BTreeMap::new();
    let mut unfinished = Vec::new();
    for chunk in builds.chunks(wave.max(1)) {
        let stream: Vec<(&str, Value)> = chunk.iter().map(|b| (b.name.as_str(), b.spec.clone())).collect();
        s.create(&stream).await;
        let names: BTreeSet<&str> = chunk.iter().map(|b| b.name.as_str()).collect();
        loop {
            let all = s.builds().list(&ListParams::default()).await.unwrap();
            let now: BTreeMap<String, Value> = all
                .items
                .into_iter()
                .filter_map(|o| {
                    let name = o.metadata.name.clone()?;
                    names.contains(name.as_str()).then(|| (name, o.data["status"].clone()))
                })
                .collect();
            let done = now.len() == names.len() && now.values().all(terminal);
            if done || Instant::now() >= deadline {
                unfinished.extend(now.iter().filter(|(_, st)| !terminal(st)).map(|(n, _)| n.clone()));
                unfinished.extend(names.iter().filter(|n| !now.contains_key(**n)).map(|n| n.to_string()));
                statuses.extend(now);
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let gone = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let left: Vec<String> = s.pods_now().await.into_iter().filter_map(|p| p.metadata.name).collect();
        if left.is_empty() || Instant::now() >= gone {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let end = Instant::now();
    let calls = s.calls().iter().filter(|c| c.at >= start && c.at < end).count();
    let ran = kubelet::ran(s).difference(&before).cloned().collect();
    Phase { statuses, unfinished, calls, ran, left, took: end - start }
}

/// What is wrong with the outcome of each build of `builds` in `phase`; `seeded` is the status
/// of the build that made the image the hits find.
pub async fn problems(s: &Scenario, builds: &[Build], phase: &Phase, seeded: &Value) -> Vec<String> {
    let mut out: Vec<String> = phase.unfinished.iter().map(|n| format!("{n}: did not end")).collect();
    if !phase.left.is_empty() {
        out.push(format!("build pods left behind: {:?}", phase.left));
    }
    for b in builds {
        let Some(st) = phase.statuses.get(&b.name) else { continue };
        let got = (st["phase"].as_str().unwrap_or("-"), st["reason"].as_str().unwrap_or("-"));
        let want = match b.kind {
            Kind::Hit => ("Succeeded", "CacheHit"),
            Kind::Image | Kind::Dockerfile => ("Succeeded", "Built"),
            Kind::Fails => ("Failed", "BuildStepFailed"),
        };
        if got != want {
            out.push(format!("{}: {got:?}, not {want:?}: {}", b.name, st["message"]));
            continue;
        }
        if b.kind == Kind::Hit {
            if st["output"] != seeded["output"] || !st["podName"].is_null() {
                out.push(format!("{}: a hit of {} with no pod, not {st}", b.name, seeded["output"]));
            }
            continue;
        }
        // A new attempt only for a failure a new attempt can cure, announced as such (a
        // registry that refuses a push under load is one); never for an API call that failed.
        let attempts = st["attempts"].as_u64().unwrap_or(0);
        if attempts != 1 {
            let retries = retries(s, &b.name).await;
            let cured = retries
                .iter()
                .filter(|r| !r.contains("(ApiUnavailable") && !r.contains("(PodDeleted"))
                .count();
            if attempts == 0 || cured < attempts as usize - 1 {
                out.push(format!("{}: {attempts} attempts, not 1; its retries: {retries:?}", b.name));
            }
        }
        if b.kind == Kind::Fails {
            continue;
        }
        let output = st["output"]["ref"].as_str().unwrap_or_default();
        let pushed = match output.is_empty() {
            true => None,
            false => s.registry_digest(output).await,
        };
        if st["output"]["digest"].as_str().is_none() || st["output"]["digest"].as_str() != pushed.as_deref() {
            out.push(format!("{}: output {} but the registry has {pushed:?}", b.name, st["output"]));
        }
        if b.kind == Kind::Image && st["output"]["digest"].as_str() != Some(s.from_digest.as_str()) {
            out.push(format!("{}: an image source's output is the image {}", b.name, s.from_digest));
        }
    }
    out.extend(kubelet::attempt_problems(s, &phase.statuses, &phase.ran));
    // A hit runs no pod: the kubelet ran none of the seed build's pod during the phase.
    if let Some(seed_pod) = seeded["podName"].as_str().and_then(|p| p.rsplit_once('-')) {
        let again: Vec<_> =
            phase.ran.iter().filter(|p| p.attempt().is_some_and(|(b, _)| b == seed_pod.0)).collect();
        if !again.is_empty() {
            out.push(format!("the cache hits' image was built again: {again:?}"));
        }
    }
    out
}

/// One line per outcome (phase, reason) with its count.
pub fn outcomes(phase: &Phase) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for st in phase.statuses.values() {
        let key = format!("{}/{}", st["phase"].as_str().unwrap_or("-"), st["reason"].as_str().unwrap_or("-"));
        *out.entry(key).or_default() += 1;
    }
    out
}

/// How many of ImageBuild `name`'s retries were for a failure a new attempt can cure (a registry
/// refusing a push under load), not for an API call that failed (the faults' business).
pub async fn curable_retries(s: &Scenario, name: &str) -> usize {
    let notes = retries(s, name).await;
    notes.iter().filter(|r| !r.contains("(ApiUnavailable") && !r.contains("(PodDeleted")).count()
}

/// The notes of the `Retrying` Events of ImageBuild `name` (`attempt N failed (REASON: ...)`).
async fn retries(s: &Scenario, name: &str) -> Vec<String> {
    use k8s_openapi::api::core::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(s.client.clone(), &s.ns);
    let list = events.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
    list.into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name) && e.reason.as_deref() == Some("Retrying")
        })
        .filter_map(|e| e.message)
        .collect()
}
