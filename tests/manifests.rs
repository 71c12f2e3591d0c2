//! One source of truth across the ways bob is installed: the Helm chart's RBAC rules are the
//! kustomize base's, and `kubectl kustomize config/default` holds the generated CRD and a
//! controller that runs `bob controller` with the leader Lease in its own namespace. (The chart
//! and kustomize output are linted and schema-validated by scripts/check-manifests.)

mod common;

use std::process::Command;

use serde_json::Value;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text).unwrap().into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn the_chart_and_kustomize_grant_the_same_rules() {
    let role = std::fs::read_to_string(root().join("config/rbac/role.yaml")).unwrap();
    let role: Value = serde_saphyr::from_str(&role).unwrap();
    let chart = std::fs::read_to_string(root().join("charts/bob/files/rbac-rules.yaml")).unwrap();
    let chart: Value = serde_saphyr::from_str(&chart).unwrap();
    assert_eq!(role["rules"], chart, "charts/bob/files/rbac-rules.yaml drifted from config/rbac/role.yaml");
    let template = std::fs::read_to_string(root().join("charts/bob/templates/rbac.yaml")).unwrap();
    assert!(
        template.contains(r#".Files.Get "files/rbac-rules.yaml""#),
        "the chart's ClusterRole renders the shared rules"
    );
    let verbs: Vec<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resources"][0] == "secrets")
        .flat_map(|r| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
        .collect();
    assert_eq!(verbs, ["get"], "Secrets are read-only, and only by name");
}

#[test]
fn kustomize_builds_the_crd_rbac_and_controller() {
    common::require("kubectl", "kubectl (shipped with these machines; any kubectl >= 1.30)");
    let out =
        Command::new("kubectl").args(["kustomize"]).arg(root().join("config/default")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = yaml_docs(&String::from_utf8(out.stdout).unwrap());
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "Role",
        "ServiceAccount",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let crd = docs.iter().find(|d| d["kind"] == "CustomResourceDefinition").unwrap();
    let generated: Value = serde_saphyr::from_str(&bob::crd::crd_yaml()).unwrap();
    assert_eq!(crd["spec"], generated["spec"], "the kustomize CRD is the generated one");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["metadata"]["namespace"], "bob-system");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "controller");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let lease_ns =
        container["env"].as_array().unwrap().iter().find(|e| e["name"] == "BOB_LEASE_NAMESPACE").unwrap();
    assert_eq!(lease_ns["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
}

#[test]
fn the_handbook_explains_every_reason() {
    let handbook = std::fs::read_to_string(root().join("docs/handbook.md")).unwrap();
    for reason in bob::reason::Reason::ALL {
        assert!(handbook.contains(&format!("| `{reason}` |")), "docs/handbook.md has no row for {reason}");
    }
}
