//! What kube-sim's fake kubelet ran, told by the kubelet itself rather than by the API (which
//! forgets a pod that came and went between two looks): a directory per pod it started
//! (`<pod dir>/<ns>_<name>_<uid8>`), and its log lines (`kube-sim kubelet: <ns>/<name>: ...`),
//! whose order says whether two pods ran at once. Build pods are named `bob-build-<hex>-<attempt>`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::scenario::Scenario;

/// One pod the fake kubelet started.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RanPod {
    /// The pod's name.
    pub name: String,
    /// The first 8 characters of its uid (two pods of one name have two directories).
    pub uid: String,
}

impl RanPod {
    /// `(bob-build-<hex>, attempt)` of a build pod.
    pub fn attempt(&self) -> Option<(&str, u32)> {
        let (build, n) = self.name.rsplit_once('-')?;
        Some((build, n.parse().ok()?))
    }
}

/// Every pod of namespace `ns` that the fake kubelet started so far.
pub fn ran(s: &Scenario) -> BTreeSet<RanPod> {
    let dir = s.api().pod_dir.as_ref().expect("the pods the kubelet ran are known on kube-sim only");
    let prefix = format!("{}_", s.ns);
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| {
            let (name, uid) = f.strip_prefix(&prefix)?.rsplit_once('_')?;
            Some(RanPod { name: name.to_string(), uid: uid.to_string() })
        })
        .collect()
}

/// The span of kube-sim's log lines about pod `ns/name`: (first, last) line numbers.
fn spans(log: &str, ns: &str) -> BTreeMap<String, (usize, usize)> {
    let prefix = format!("kube-sim kubelet: {ns}/");
    let mut spans = BTreeMap::new();
    for (i, line) in log.lines().enumerate() {
        let Some((name, _)) = line.split_once(&prefix).and_then(|(_, rest)| rest.split_once(": ")) else {
            continue;
        };
        spans.entry(name.to_string()).and_modify(|s: &mut (usize, usize)| s.1 = i).or_insert((i, i));
    }
    spans
}

/// What is wrong with the pods the kubelet ran for `builds` (name → final status): more than one
/// pod for an attempt, an attempt beyond `status.attempts`, or two attempts of one build running
/// at once (their kubelet log spans overlap). Cache hits (no `podName`) are checked by the caller.
pub fn attempt_problems(
    s: &Scenario,
    builds: &BTreeMap<String, Value>,
    ran: &BTreeSet<RanPod>,
) -> Vec<String> {
    let log = s.api().sim.as_ref().map(|d| d.output()).unwrap_or_default();
    let spans = spans(&log, &s.ns);
    let mut problems = Vec::new();
    for (name, st) in builds {
        let Some(pod) = st["podName"].as_str() else { continue };
        let Some((build, _)) = pod.rsplit_once('-') else { continue };
        let mut by_attempt: BTreeMap<u32, Vec<&RanPod>> = BTreeMap::new();
        for p in ran.iter().filter(|p| p.attempt().is_some_and(|(b, _)| b == build)) {
            by_attempt.entry(p.attempt().unwrap().1).or_default().push(p);
        }
        let attempts = st["attempts"].as_u64().unwrap_or(0) as u32;
        for (n, pods) in &by_attempt {
            if pods.len() > 1 {
                problems.push(format!("{name}: attempt {n} ran {} pods: {pods:?}", pods.len()));
            }
            if *n > attempts {
                problems
                    .push(format!("{name}: the kubelet ran attempt {n} but status.attempts is {attempts}"));
            }
        }
        // Attempts one after another: each attempt's last kubelet line before the next one's first.
        let lived: Vec<(u32, (usize, usize))> = by_attempt
            .keys()
            .filter_map(|n| spans.get(&format!("{build}-{n}")).map(|span| (*n, *span)))
            .collect();
        for pair in lived.windows(2) {
            let ((a, (_, a_end)), (b, (b_start, _))) = (pair[0], pair[1]);
            if b_start < a_end {
                problems.push(format!(
                    "{name}: attempt {b} started (kube-sim log line {}) while attempt {a} ran (until line {})",
                    b_start + 1,
                    a_end + 1
                ));
            }
        }
    }
    problems
}
