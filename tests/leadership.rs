//! The leader stops acting before its Lease can pass to another replica: with its lease
//! requests failing (kube-sim faults on the lease agent), `Leadership::may_act` turns false
//! before the Lease's `renewTime + leaseDurationSeconds`, while kube-lease-manager still says
//! "leading" when a standby has taken the Lease; and a replica that may not act writes nothing.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bob::controller::ha::{self, Leadership};
use bob::controller::reconcile::reconcile;
use bob::controller::{Context, PlanConfig, Policy};
use common::fake_api::*;
use common::kube_sim::{KubeSim, count};
use common::*;
use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::json;

/// When the Lease may pass to another replica, as a standby judges it.
async fn expiry(leases: &Api<Lease>) -> SystemTime {
    let spec = leases.get(ha::LEASE).await.unwrap().spec.unwrap();
    let renewed: SystemTime = spec.renew_time.expect("renewTime").0.into();
    renewed + Duration::from_secs(spec.lease_duration_seconds.expect("leaseDurationSeconds") as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_cannot_renew_stops_acting_before_its_lease_expires() {
    common::init();
    let sim = KubeSim::start(None);
    let config = sim.config().await;
    let leadership = Leadership::new(ha::DURATION - ha::MARGIN);
    let (leading, _task) = ha::lead(config.clone(), "default", "replica-a", &leadership, None).await.unwrap();
    assert!(leadership.may_act() && *leading.borrow());

    // From now on every request of the lease agent fails; the test's own client has another.
    sim.set_faults("agent=^bob-controller-lease/,rate=1,kinds=drop+500");
    let plain = kube::Client::try_from(config).unwrap();
    let leases: Api<Lease> = Api::namespaced(plain.clone(), "default");
    let expires = expiry(&leases).await;
    // A standby, with a client the faults miss.
    let standby = LeaseManagerBuilder::new(plain, ha::LEASE)
        .with_identity("replica-b")
        .with_duration(ha::DURATION.as_secs())
        .with_grace(ha::GRACE.as_secs())
        .build()
        .await
        .unwrap();
    let (mut standby_leading, _standby_task) = standby.watch().await;

    tokio::time::timeout(Duration::from_secs(30), leadership.lapsed()).await.expect("lapsed");
    let stopped = SystemTime::now();
    assert!(!leadership.may_act());
    assert!(stopped < expires, "stopped acting at {stopped:?}, the Lease expires at {expires:?}");
    let early = expires.duration_since(stopped).unwrap();

    tokio::time::timeout(Duration::from_secs(40), standby_leading.wait_for(|l| *l))
        .await
        .expect("the standby takes over")
        .unwrap();
    let taken = SystemTime::now();
    assert!(taken >= expires, "the standby waited for the expiry");
    eprintln!(
        "stopped acting {early:?} before the expiry; the standby led {:?} after it",
        taken.duration_since(expires).unwrap()
    );
    assert!(count(&sim.fault_counts(), &["drop", "500"]) > 0, "{}", sim.fault_counts());
    assert!(expiry(&leases).await > expires, "the standby renewed the Lease as its own");
    // Why bob keeps its own clock: the lease manager cannot read the Lease either, so it still
    // says this replica leads while the standby does.
    assert!(*leading.borrow(), "kube-lease-manager's channel of the old leader");
    assert!(!leadership.may_act(), "bob's check stays false");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_may_not_act_writes_nothing() {
    let reg = Registry::start(RegistryAuth::None);
    let img = small_image(7, "amd64");
    Direct::new(&reg.host, None).push_image("lib/app", "1", &img).await;
    let spec = json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo("ws")});
    let context = |leadership: Leadership| {
        let (client, calls) = builder_api(json!({}));
        let mut ctx =
            Context::new(client, PlanConfig::default(), Duration::from_secs(1800), Policy::default());
        ctx.leadership = Some(leadership);
        (Arc::new(ctx), calls)
    };
    let writes = |calls: &[Call]| -> Vec<String> {
        calls.iter().filter(|c| c.method != Method::GET).map(Call::route).collect()
    };

    // Renewed just now: the reconcile writes its pod and status.
    let leading = Leadership::new(ha::DURATION - ha::MARGIN);
    leading.renewed(tokio::time::Instant::now());
    let (ctx, calls) = context(leading);
    reconcile(Arc::new(image_build("b", spec.clone(), None)), ctx).await.unwrap();
    let done = writes(&calls.lock().unwrap());
    assert!(done.iter().any(|w| w.starts_with("POST") && w.ends_with("/pods")), "{done:?}");

    // Its window over (a zero window lapses at once): nothing is written, the reconcile fails.
    let lapsed = Leadership::new(Duration::ZERO);
    lapsed.renewed(tokio::time::Instant::now());
    let (ctx, calls) = context(lapsed);
    let err = reconcile(Arc::new(image_build("b", spec, None)), ctx).await.unwrap_err();
    assert_eq!(err.label(), "not_leading");
    let done = writes(&calls.lock().unwrap());
    assert!(done.is_empty(), "no write: {done:?}");
}
