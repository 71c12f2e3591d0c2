//! bob's Kubernetes client (`bob::kubeclient`) against a real kube-sim that injects API faults:
//! reads that a plain kube client loses all succeed, a create whose answer was lost is retried
//! and its 409 reaches the caller (who reads back), and the User-Agent tells the controller's
//! requests from its lease's, so faults can be aimed at one of them.

mod common;

use bob::kubeclient::{self, Agent};
use common::kube_sim::{KubeSim, count};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};

/// Faults kube-sim makes of a read: `drop-after` becomes `drop` for a GET.
const READ_FAULTS: &[&str] = &["drop", "429", "500"];

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some([("k".to_string(), "v".to_string())].into()),
        ..Default::default()
    }
}

/// Gets ConfigMap `name` `n` times; the errors.
async fn reads(api: &Api<ConfigMap>, name: &str, n: usize) -> Vec<kube::Error> {
    let mut errors = Vec::new();
    for _ in 0..n {
        if let Err(e) = api.get(name).await {
            errors.push(e);
        }
    }
    errors
}

#[tokio::test]
async fn reads_survive_the_faults_that_fail_a_plain_client() {
    common::init();
    let sim = KubeSim::start(None);
    let config = sim.config().await;
    // The client as bob built it before: `Client::try_default`, kube's own retry of 429/503/504.
    let plain: Api<ConfigMap> = Api::default_namespaced(kube::Client::try_from(config.clone()).unwrap());
    let bob: Api<ConfigMap> =
        Api::default_namespaced(kubeclient::client_for(config, Agent::Controller, None).unwrap());
    plain.create(&PostParams::default(), &config_map("cm")).await.unwrap();

    sim.set_faults("rate=0.3,seed=1,kinds=drop+drop-after+429+500");
    let errors = reads(&bob, "cm", 40).await;
    let met = sim.fault_counts();
    assert!(errors.is_empty(), "bob's client lost reads: {errors:?}\nfaults: {met}");
    assert!(count(&met, &["drop"]) > 0 && count(&met, &["500"]) > 0, "faults were met: {met}");

    let errors = reads(&plain, "cm", 40).await;
    let after = sim.fault_counts();
    assert!(count(&after, READ_FAULTS) > count(&met, READ_FAULTS), "{after}");
    assert!(!errors.is_empty(), "the plain client met {after} and lost no read");
    eprintln!("faults met by bob's 40 reads: {met}; by both: {after}; plain reads lost: {}", errors.len());
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_sent_again_and_its_409_reaches_the_caller() {
    common::init();
    let sim = KubeSim::start(None);
    let config = sim.config().await;
    let plain: Api<ConfigMap> = Api::default_namespaced(kube::Client::try_from(config.clone()).unwrap());
    let bob: Api<ConfigMap> =
        Api::default_namespaced(kubeclient::client_for(config, Agent::Controller, None).unwrap());
    // Seed 4 at rate 0.5: the first request meets drop-after (the create is stored, the answer
    // never comes), the second none (Python's random.Random(4), as kube-sim draws).
    let spec = "rate=0.5,seed=4,kinds=drop-after";

    sim.set_faults(spec);
    let err = bob.create(&PostParams::default(), &config_map("bob")).await.unwrap_err();
    let met = sim.set_faults("");
    assert_eq!(count(&met, &["drop-after"]), 1, "the scenario: one drop-after, then none: {met}");
    // The retry found the object its first try stored: the caller sees 409 and reads it back.
    match &err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"), "{s:?}"),
        other => panic!("not the retry's 409: {other:?}"),
    }
    assert_eq!(bob.get("bob").await.unwrap().data, config_map("bob").data);

    // The plain client is not told anything but that the connection closed, though it stored.
    sim.set_faults(spec);
    let err = plain.create(&PostParams::default(), &config_map("plain")).await.unwrap_err();
    sim.set_faults("");
    assert!(!matches!(err, kube::Error::Api(_)), "no answer: {err:?}");
    assert!(plain.get("plain").await.is_ok(), "stored all the same");
}

#[tokio::test]
async fn faults_aimed_at_the_lease_agent_miss_the_controller_client() {
    common::init();
    let sim = KubeSim::start(Some("agent=^bob-controller-lease/,rate=1,kinds=500"));
    let config = sim.config().await;
    let controller: Api<ConfigMap> =
        Api::default_namespaced(kubeclient::client_for(config.clone(), Agent::Controller, None).unwrap());
    let lease: Api<ConfigMap> =
        Api::default_namespaced(kubeclient::client_for(config, Agent::Lease, None).unwrap());
    controller.create(&PostParams::default(), &config_map("cm")).await.unwrap();
    assert!(reads(&controller, "cm", 10).await.is_empty());
    assert_eq!(count(&sim.fault_counts(), &["500"]), 0, "no fault met the controller's agent");

    match lease.get("cm").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 500, "{s:?}"),
        other => panic!("the lease agent met no fault: {other:?}"),
    }
    let met = count(&sim.fault_counts(), &["500"]);
    assert!(met > 1, "the 500 was retried before it reached the caller: {met} tries");
    eprintln!("tries of the lease agent's read: {met}");
}
