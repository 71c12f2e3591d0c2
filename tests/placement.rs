//! Where build pods may go (issue 21): `spec.pod.nodeSelector` and `spec.pod.tolerations` are
//! checked against the operator's allow-lists, which by default allow nothing, so no tenant
//! steers builds onto control-plane nodes; the `capabilities` and `privileged` build modes can be
//! limited to listed namespaces. A refused ImageBuild ends `Failed` with `PolicyDenied` before any
//! Secret or registry is read, with a message naming the field, the value and the flag to change.
//! `bob run` (the library default) allows everything, as before.

mod common;

use std::time::Duration;

use bob::cli::{Cli, Command};
use bob::controller::decide::{Access, Need, Observed, Settings, Step};
use bob::controller::placement::{Error, Placement};
use bob::controller::{BuildSecurity, PlanConfig, Policy};
use bob::crd::{ImageBuild, Phase};
use bob::reason::Reason;
use clap::Parser;
use common::fake_api::decide;
use common::samples::*;
use k8s_openapi::api::core::v1::Toleration;

const CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";

/// The controller's placement from `bob controller` with `flags` (and the defaults of the rest).
fn controller(flags: &[&str]) -> Result<Placement, clap::Error> {
    let cli = Cli::try_parse_from(["bob", "controller"].iter().chain(flags))?;
    let Command::Controller(a) = cli.command else { unreachable!("parsed as controller") };
    Ok(Placement::new(&a.allowed_node_selectors, &a.allowed_tolerations, &a.build_security_namespaces))
}

fn toleration(key: Option<&str>, operator: &str, value: Option<&str>, effect: Option<&str>) -> Toleration {
    Toleration {
        key: key.map(String::from),
        operator: Some(operator.into()),
        value: value.map(String::from),
        effect: effect.map(String::from),
        toleration_seconds: None,
    }
}

/// The image-source sample (no privilege in any mode) with these knobs.
fn placed(selector: &[(&str, &str)], tolerations: Vec<Toleration>) -> ImageBuild {
    let mut ib = sample("image-source.yaml");
    let pod = ib.spec.pod.get_or_insert_with(Default::default);
    pod.node_selector = (!selector.is_empty())
        .then(|| selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    pod.tolerations = (!tolerations.is_empty()).then_some(tolerations);
    ib
}

/// The inline sample with the placement its comment shows.
fn sample_placed() -> ImageBuild {
    let mut ib = sample("inline-dockerfile.yaml");
    let pod = ib.spec.pod.get_or_insert_with(Default::default);
    pod.node_selector = Some([("kubernetes.io/arch".to_string(), "amd64".to_string())].into());
    pod.tolerations = Some(vec![toleration(Some("builds"), "Exists", None, Some("NoSchedule"))]);
    ib
}

fn check(p: &Placement, ib: &ImageBuild) -> Result<(), Error> {
    p.check(ib, BuildSecurity::UserNamespace)
}

#[test]
fn by_default_the_controller_allows_no_node_selector_and_no_toleration() {
    let p = controller(&[]).unwrap();
    let cp = toleration(Some(CONTROL_PLANE), "Exists", None, Some("NoSchedule"));
    assert!(matches!(check(&p, &placed(&[], vec![cp])), Err(Error::Toleration { index: 0, .. })));
    let master = toleration(Some("node-role.kubernetes.io/master"), "Exists", None, None);
    assert!(check(&p, &placed(&[], vec![master])).is_err());
    assert!(matches!(check(&p, &placed(&[(CONTROL_PLANE, "")], vec![])), Err(Error::NodeSelector { .. })));
    // What the inline sample shows in a comment, kubernetes.io/arch and a `builds` toleration:
    // both need the operator. The sample itself places nothing, so it builds on a default install.
    assert!(matches!(check(&p, &sample_placed()), Err(Error::NodeSelector { .. })));
    assert_eq!(check(&p, &sample("inline-dockerfile.yaml")), Ok(()));
    assert_eq!(check(&p, &placed(&[], vec![])), Ok(()), "no knobs: nothing to refuse");
    assert_eq!(check(&p, &sample("git-dockerfile.yaml")), Ok(()));
}

#[test]
fn listed_selectors_and_tolerations_are_allowed_and_control_plane_still_refused() {
    let p = controller(&[
        "--allowed-node-selectors=kubernetes.io/arch,pool=builds",
        "--allowed-tolerations=builds:NoSchedule",
    ])
    .unwrap();
    let builds = toleration(Some("builds"), "Exists", None, Some("NoSchedule"));
    assert_eq!(
        check(&p, &placed(&[("kubernetes.io/arch", "arm64"), ("pool", "builds")], vec![builds])),
        Ok(())
    );
    assert_eq!(check(&p, &sample_placed()), Ok(()), "the sample's commented knobs, once listed");
    assert!(check(&p, &placed(&[("pool", "gpu")], vec![])).is_err(), "pool=builds allows only that value");
    let cp = toleration(Some(CONTROL_PLANE), "Exists", None, Some("NoSchedule"));
    let refused =
        check(&p, &placed(&[], vec![toleration(Some("builds"), "Exists", None, Some("NoSchedule")), cp]));
    assert!(matches!(refused, Err(Error::Toleration { index: 1, .. })), "{refused:?}");
    assert!(check(&p, &placed(&[(CONTROL_PLANE, "")], vec![])).is_err());
}

#[test]
fn an_exists_toleration_without_a_key_is_refused_unless_everything_is_allowed() {
    let every_taint = toleration(None, "Exists", None, None);
    let empty_key = toleration(Some(""), "Exists", None, Some("NoSchedule"));
    let p = controller(&["--allowed-tolerations=builds,node-role.kubernetes.io/control-plane:NoExecute"])
        .unwrap();
    for t in [every_taint.clone(), empty_key] {
        let e = check(&p, &placed(&[], vec![t])).unwrap_err();
        assert!(e.to_string().contains("tolerates every taint"), "{e}");
    }
    let star = controller(&["--allowed-tolerations=*"]).unwrap();
    assert_eq!(
        check(&star, &placed(&[], vec![every_taint])),
        Ok(()),
        "`*` is the operator's explicit choice"
    );
}

#[test]
fn a_toleration_entry_allows_exactly_what_it_names() {
    let p = controller(&["--allowed-tolerations=dedicated=builds:NoSchedule,spot"]).unwrap();
    let allowed = |t: Toleration| check(&p, &placed(&[], vec![t])).is_ok();
    assert!(allowed(toleration(Some("dedicated"), "Equal", Some("builds"), Some("NoSchedule"))));
    assert!(
        !allowed(toleration(Some("dedicated"), "Equal", Some("gpu"), Some("NoSchedule"))),
        "another value"
    );
    assert!(
        !allowed(toleration(Some("dedicated"), "Exists", None, Some("NoSchedule"))),
        "Exists: every value"
    );
    assert!(
        !allowed(toleration(Some("dedicated"), "Equal", Some("builds"), None)),
        "no effect: every effect"
    );
    assert!(!allowed(toleration(Some("dedicated"), "Equal", Some("builds"), Some("NoExecute"))));
    // A key alone: any operator, value and effect of that key.
    assert!(allowed(toleration(Some("spot"), "Exists", None, None)));
    assert!(allowed(toleration(Some("spot"), "Equal", Some("true"), Some("NoExecute"))));
    assert!(!allowed(toleration(Some("spotty"), "Exists", None, None)));
}

#[test]
fn malformed_entries_stop_the_controller_at_startup() {
    for flag in [
        "--allowed-tolerations=builds:NoSchedul",
        "--allowed-node-selectors=bad key",
        "--allowed-node-selectors=*=x",
    ] {
        let e = controller(&[flag]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag}: {e}");
    }
    let e = controller(&["--allowed-tolerations=builds:NoSchedul"]).unwrap_err().to_string();
    assert!(e.contains("NoSchedule, PreferNoSchedule, NoExecute"), "{e}");
    // Blank entries (an empty variable, a stray comma) are no entries, not errors.
    let blank = controller(&[
        "--allowed-tolerations=",
        "--allowed-node-selectors=,",
        "--build-security-namespaces=a,,",
    ]);
    let want =
        Placement { node_selectors: vec![], tolerations: vec![], security_namespaces: vec!["a".into()] };
    assert_eq!(blank.unwrap(), want);
    assert_eq!(
        controller(&["--allowed-tolerations=,builds"]).unwrap(),
        controller(&["--allowed-tolerations=builds"]).unwrap()
    );
}

#[test]
fn near_root_modes_are_refused_outside_the_listed_namespaces() {
    let p = controller(&["--build-security-namespaces=builds, ci"]).unwrap();
    let mut ib = sample("inline-dockerfile.yaml");
    ib.spec.pod = None;
    assert_eq!(ib.metadata.namespace.as_deref(), Some("default"));
    for mode in [BuildSecurity::Capabilities, BuildSecurity::Privileged] {
        let e = p.check(&ib, mode).unwrap_err();
        assert!(matches!(&e, Error::BuildSecurity { namespace, .. } if namespace == "default"), "{e:?}");
    }
    assert_eq!(p.check(&ib, BuildSecurity::UserNamespace), Ok(()), "no privilege on the node: anywhere");
    assert_eq!(p.check(&sample("image-source.yaml"), BuildSecurity::Privileged), Ok(()), "copies need none");
    for ns in ["builds", "ci"] {
        ib.metadata.namespace = Some(ns.into());
        assert_eq!(p.check(&ib, BuildSecurity::Privileged), Ok(()), "{ns} is listed");
    }
    let every = controller(&[]).unwrap();
    ib.metadata.namespace = Some("default".into());
    assert_eq!(
        every.check(&ib, BuildSecurity::Privileged),
        Ok(()),
        "default `*`: the mode applies everywhere"
    );
}

#[test]
fn refusals_name_the_field_the_value_and_what_the_operator_changes() {
    let p = controller(&["--build-security-namespaces=builds"]).unwrap();
    let cp = toleration(Some(CONTROL_PLANE), "Exists", None, Some("NoSchedule"));
    let m = check(&p, &placed(&[], vec![cp])).unwrap_err().to_string();
    for part in [
        "spec.pod.tolerations[0]",
        "node-role.kubernetes.io/control-plane:NoSchedule (operator Exists: any value)",
        "allowed: none",
        "--allowed-tolerations",
        "controller.placement.allowedTolerations",
    ] {
        assert!(m.contains(part), "{part:?} missing from: {m}");
    }
    let m = check(&p, &placed(&[("kubernetes.io/arch", "amd64")], vec![])).unwrap_err().to_string();
    for part in ["spec.pod.nodeSelector", "kubernetes.io/arch=amd64", "--allowed-node-selectors"] {
        assert!(m.contains(part), "{part:?} missing from: {m}");
    }
    let mut ib = sample("git-dockerfile.yaml");
    ib.metadata.namespace = Some("team-a".into());
    let m = p.check(&ib, BuildSecurity::Capabilities).unwrap_err().to_string();
    for part in [
        "capabilities mode",
        "\"team-a\"",
        "--build-security-namespaces",
        "controller.buildSecurityNamespaces",
    ] {
        assert!(m.contains(part), "{part:?} missing from: {m}");
    }
}

fn settings(placement: Placement, security: BuildSecurity) -> Settings {
    Settings {
        plan: PlanConfig { placement, security, ..Default::default() },
        policy: Policy::default(),
        queue_timeout: Duration::from_secs(1800),
        max_concurrent_builds: None,
    }
}

#[test]
fn a_refused_build_fails_with_policy_denied_before_anything_is_read() {
    let now = "2026-11-30T12:00:00Z".parse().unwrap();
    let mut ib = sample_placed();
    ib.metadata.generation = Some(1);
    let cfg = settings(controller(&[]).unwrap(), BuildSecurity::UserNamespace);
    let Step::Act(t) = decide(&ib, &Observed::at(now), &cfg) else {
        panic!("a refusal needs nothing observed")
    };
    let s = t.status.expect("a terminal status");
    assert_eq!((s.phase, s.reason), (Some(Phase::Failed), Some(Reason::PolicyDenied)));
    assert!(s.message.unwrap().starts_with("spec.pod.nodeSelector: kubernetes.io/arch=amd64 is not allowed"));
    assert!(s.pod_name.is_none());
    // Allowed: the build goes on to ask for its credentials, then plans as before.
    let allowed =
        controller(&["--allowed-node-selectors=kubernetes.io/arch", "--allowed-tolerations=builds"]);
    let cfg = settings(allowed.unwrap(), BuildSecurity::UserNamespace);
    assert_eq!(decide(&ib, &Observed::at(now), &cfg), Step::Observe(Need::Credentials));
    let mut seen = Observed::at(now);
    seen.credentials = Some(Ok(Access::FromSpec));
    seen.resolved = Some(Ok(resolved_for(&ib)));
    assert!(matches!(decide(&ib, &seen, &cfg), Step::Observe(Need::Pod(_))));
    // The privileged mode outside its namespaces: the same reason.
    ib.spec.pod = None;
    let cfg =
        settings(controller(&["--build-security-namespaces=builds"]).unwrap(), BuildSecurity::Privileged);
    let Step::Act(t) = decide(&ib, &Observed::at(now), &cfg) else { panic!("refused at once") };
    assert_eq!(t.status.unwrap().reason, Some(Reason::PolicyDenied));
}

#[test]
fn bob_run_and_the_library_default_allow_everything_as_before() {
    let p = PlanConfig::default().placement;
    let cp = toleration(Some(CONTROL_PLANE), "Exists", None, None);
    let ib = placed(&[(CONTROL_PLANE, "")], vec![cp, toleration(None, "Exists", None, None)]);
    assert_eq!(check(&p, &ib), Ok(()));
    assert_eq!(p.check(&sample_placed(), BuildSecurity::Privileged), Ok(()));
}
