//! Two replicas while only the leader-election client meets API faults (issue 22): kube-sim fails
//! half the requests whose User-Agent starts with `bob-controller-lease` while builds keep coming,
//! and a replica that exits is started again, as a Deployment does. No replica may create a pod
//! while it does not lead, nor while another replica leads; every build ends `Built`, one attempt
//! on one pod.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::apiserver::Target;
use super::kubelet;
use super::scenario::{Options, Scenario};

crate::scenarios!(two_replicas_with_faulty_lease_renewals_never_both_create_pods);

/// Faults for the leader-election client only (its own User-Agent, `bob-controller-lease/<version>`).
/// Most of its requests fail, so a leader soon cannot renew within the lease duration (15 s) and
/// the Lease moves: the moment two replicas could both act.
const LEASE_FAULTS: &str = "rate=0.8,seed=5,agent=^bob-controller-lease";

/// The lease faults stay on at least this long, and until a leader gave up its lead, at most
/// [`MOST`]; a new build is created every [`EVERY`] meanwhile.
const LEAST: Duration = Duration::from_secs(30);
const MOST: Duration = Duration::from_secs(90);
const EVERY: Duration = Duration::from_secs(3);

/// A hang guard for the builds once the faults are off (they take seconds).
const END: Duration = Duration::from_secs(150);

async fn two_replicas_with_faulty_lease_renewals_never_both_create_pods(t: Target) -> Scenario {
    let clock = Instant::now();
    let opts = Options { replicas: 2, isolated: true, ..Default::default() };
    let mut s = Scenario::start(&t, "lease_faults", opts).await;
    let leases: Api<Lease> = Api::namespaced(s.client.clone(), &s.release.ns);
    let holder = || async {
        let lease = leases.get_opt("bob-controller").await.ok().flatten()?;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    };
    let first = super::builds::poll("a replica takes the Lease", Duration::from_secs(30), holder).await;
    s.api().faults(Some(LEASE_FAULTS)).await;
    let on = Instant::now();
    let (mut names, mut holders, mut next) = (Vec::new(), vec![first], on);
    // Until a leader that cannot renew gave up (the Lease moved, or a replica said it lost it).
    let gave_up = |s: &Scenario, holders: &[String]| {
        holders.len() > 1 || s.controllers.iter().any(|c| c.daemon.output().contains("lost leadership"))
    };
    while on.elapsed() < LEAST || (!gave_up(&s, &holders) && on.elapsed() < MOST) {
        if Instant::now() >= next {
            let name = format!("during-{}", names.len());
            s.create(&[(&name, s.dockerfile(&format!("RUN echo {name} > /lease.txt")))]).await;
            names.push(name);
            next += EVERY;
        }
        if let Some(h) = holder().await.filter(|h| holders.last() != Some(h)) {
            holders.push(h);
        }
        restart_exited(&mut s);
        lease_client_is_singled_out(&s, on);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let window = on.elapsed();
    let injected = s.api().faults(Some("")).await;
    let statuses = all_ended(&mut s, &names).await;

    let logs: Vec<(String, String, bool)> = s
        .controllers
        .iter_mut()
        .map(|c| (c.identity.clone(), c.daemon.output(), c.daemon.try_wait().is_some()))
        .collect();
    let replicas: Vec<Replica> =
        logs.iter().map(|(id, log, exited)| Replica::read(id, log, *exited)).collect();
    let kinds: Vec<String> = injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "lease faults ({LEASE_FAULTS}) for {:.1} s: injected {}; Lease holders {holders:?}; {} builds; \
         replicas (identity: lead periods, pod creates): {}; scenario {:.1} s",
        window.as_secs_f64(),
        kinds.join(", "),
        names.len(),
        replicas
            .iter()
            .map(|r| format!("{}: {}, {}", r.id, r.leads.len(), r.creates.len()))
            .collect::<Vec<_>>()
            .join("; "),
        clock.elapsed().as_secs_f64()
    );
    assert!(injected.values().sum::<u64>() > 0, "no lease request met a fault: {injected:?}");
    assert!(replicas.iter().any(|r| !r.leads.is_empty()), "no replica logged `leading`: {logs:#?}");
    assert!(
        gave_up(&s, &holders),
        "in {window:?} of failed renewals the Lease never moved from {holders:?} and no replica said it \
         lost its lead: a leader that cannot renew must stop before its lease can pass (issue 22)"
    );

    let mut problems = overlaps(&replicas);
    for (name, st) in &statuses {
        let got = (st["phase"].as_str(), st["reason"].as_str(), st["attempts"].as_u64());
        // An extra attempt only for a failure a new attempt can cure, announced (mix::problems).
        let extra = got.2.unwrap_or(0).saturating_sub(1) as usize;
        let cured = extra > 0 && super::mix::curable_retries(&s, name).await >= extra;
        if (got.0, got.1) != (Some("Succeeded"), Some("Built")) || (extra > 0 && !cured) || got.2.is_none() {
            problems.push(format!("{name}: {got:?}, not Succeeded/Built in one attempt: {}", st["message"]));
        }
    }
    problems.extend(kubelet::attempt_problems(&s, &statuses, &kubelet::ran(&s)));
    assert!(problems.is_empty(), "two replicas under lease faults: {problems:#?}");
    s
}

/// Fails at once, saying why, when the controller's Lease requests do not carry the lease
/// client's own User-Agent: `agent=^bob-controller-lease` would then fault none of them and the
/// scenario would prove nothing.
fn lease_client_is_singled_out(s: &Scenario, since: Instant) {
    let agents: BTreeMap<String, usize> = s
        .calls()
        .iter()
        .filter(|c| c.at >= since && c.path.contains("/leases"))
        .fold(BTreeMap::new(), |mut m, c| {
            *m.entry(c.agent.clone().unwrap_or_else(|| "(none)".into())).or_default() += 1;
            m
        });
    assert!(
        agents.is_empty() || agents.keys().any(|a| a.starts_with("bob-controller-lease")),
        "the controller's Lease requests carry the User-Agents {agents:?}, not \
         `bob-controller-lease/<version>`: kube-sim's `agent=^bob-controller-lease` faults none of \
         them (the leader-election client's own User-Agent comes with the retrying API client)"
    );
}

/// Starts a replica for each one that exited (a replica that loses its lease exits to stand by
/// again; the Deployment's pod would be restarted).
fn restart_exited(s: &mut Scenario) {
    let exited = s.controllers.iter_mut().filter_map(|c| c.daemon.try_wait()).count();
    let running = s.controllers.len() - exited;
    for _ in running..2 {
        match s.try_start_controller() {
            Ok(c) => eprintln!("lease_faults: started replica {} for one that exited", c.identity),
            // Its leader election met a fault at start: the next look starts it again.
            Err(e) => eprintln!("lease_faults: a replica did not start: {}", e.lines().last().unwrap_or("")),
        }
    }
}

/// Waits until every build of `names` ended (restarting replicas meanwhile); their statuses.
async fn all_ended(s: &mut Scenario, names: &[String]) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + END;
    loop {
        restart_exited(s);
        let all = s.builds().list(&ListParams::default()).await.unwrap();
        let statuses: BTreeMap<String, Value> = all
            .items
            .into_iter()
            .filter_map(|o| Some((o.metadata.name?, o.data["status"].clone())))
            .collect();
        let ended = |st: &Value| matches!(st["phase"].as_str(), Some("Succeeded" | "Failed" | "Cancelled"));
        if names.iter().all(|n| statuses.get(n).is_some_and(ended)) || Instant::now() >= deadline {
            return statuses;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What one replica's log says: when it led, and when it created pods. Times are the log's
/// RFC 3339 UTC stamps, one fixed width on one machine's clock: compared as strings.
struct Replica {
    id: String,
    /// `[from, to)` of each period it led; `to` is its `lost leadership` line, else its last
    /// line if it exited, else open ("~" sorts after every stamp).
    leads: Vec<(String, String)>,
    /// (time, line) of each `created build pod`.
    creates: Vec<(String, String)>,
}

impl Replica {
    fn read(id: &str, log: &str, exited: bool) -> Replica {
        let (mut leads, mut creates, mut from, mut last) = (Vec::new(), Vec::new(), None, String::new());
        for line in log.lines() {
            let Some(stamp) = line.split_whitespace().next().filter(|t| t.ends_with('Z')) else { continue };
            last = stamp.to_string();
            if line.contains(": leading ") {
                from.get_or_insert(last.clone());
            } else if line.contains("lost leadership") {
                leads.extend(from.take().map(|f| (f, last.clone())));
            } else if line.contains("created build pod") {
                creates.push((last.clone(), line.to_string()));
            }
        }
        let end = if exited { last } else { "~".to_string() };
        leads.extend(from.map(|f| (f, end)));
        Replica { id: id.to_string(), leads, creates }
    }
}

/// Pod creates of a replica outside its own lead periods, or inside another replica's: two
/// replicas acting at once. (A create is logged once the API server answered it; a lead period
/// opens once the Lease is taken: a create logged in another's period was at least answered in it.)
fn overlaps(replicas: &[Replica]) -> Vec<String> {
    let within =
        |t: &str, leads: &[(String, String)]| leads.iter().any(|(f, to)| f.as_str() <= t && t < to.as_str());
    let mut out = Vec::new();
    for r in replicas {
        for (t, line) in &r.creates {
            if !within(t, &r.leads) {
                out.push(format!("{} created a pod while it did not lead: {line}", r.id));
            }
            for other in replicas.iter().filter(|o| o.id != r.id && within(t, &o.leads)) {
                out.push(format!(
                    "{} created a pod while {} led ({:?}): {line}",
                    r.id, other.id, other.leads
                ));
            }
        }
    }
    out
}
