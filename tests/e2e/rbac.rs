//! Every API call the controller made, checked against the RBAC rules the chart grants its
//! ServiceAccount. kube-sim stores RBAC objects but does not enforce them (its README, "Known
//! differences"), so without this a call the chart forgot would pass here and fail on a cluster.

use serde_json::Value;

use super::counter::Call;
use super::install::Release;

/// What RBAC sees of a request.
#[derive(Debug, PartialEq)]
struct Access {
    group: String,
    resource: String,
    namespace: Option<String>,
    verb: &'static str,
}

/// The access a request needs; `None` for non-resource URLs (discovery, `/version`), which every
/// authenticated user may read.
fn access(call: &Call) -> Option<Access> {
    let (path, query) = call.path.split_once('?').unwrap_or((&call.path, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, named) = match rest {
        [] => return None,
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub, ..] => (format!("{r}/{sub}"), true),
    };
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (call.method.as_str(), named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, _) => "get",
        ("GET", false, _) => "list",
        ("POST", _, _) => "create",
        ("PATCH", _, _) => "patch",
        ("PUT", _, _) => "update",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        _ => "unknown",
    };
    Some(Access { group, resource, namespace, verb })
}

fn allows(rule: &Value, a: &Access) -> bool {
    let has =
        |key: &str, want: &str| rule[key].as_array().is_some_and(|l| l.iter().any(|v| v == want || v == "*"));
    has("apiGroups", &a.group) && has("resources", &a.resource) && has("verbs", a.verb)
}

/// Panics listing every call that the chart's ClusterRole (anywhere) or Role (in the release
/// namespace) does not allow.
pub fn check(release: &Release, calls: &[Call]) {
    let rules = |kind: &str| -> Vec<&Value> {
        release
            .docs
            .iter()
            .filter(|d| d["kind"] == kind)
            .flat_map(|d| d["rules"].as_array().into_iter().flatten())
            .collect()
    };
    let (cluster, role) = (rules("ClusterRole"), rules("Role"));
    assert!(!cluster.is_empty(), "the chart renders a ClusterRole");
    let checked: Vec<(&Call, Access)> = calls.iter().filter_map(|c| Some((c, access(c)?))).collect();
    assert!(!checked.is_empty(), "the controller made no API call that RBAC governs");
    let mut denied: Vec<String> = checked
        .iter()
        .filter(|(_, a)| {
            let in_release = a.namespace.as_deref() == Some(release.ns.as_str());
            !(cluster.iter().any(|r| allows(r, a)) || (in_release && role.iter().any(|r| allows(r, a))))
        })
        .map(|(c, a)| format!("{} {} ({} {}.{})", c.method, c.path, a.verb, a.resource, a.group))
        .collect();
    denied.dedup();
    assert!(denied.is_empty(), "calls the chart's RBAC does not allow the controller: {denied:#?}");
}

/// The request → access mapping on known requests (a trial of its own: it needs no API server).
pub fn mapping_self_check() {
    let call = |method: &str, path: &str| {
        access(&Call {
            at: std::time::Instant::now(),
            method: method.into(),
            path: path.into(),
            took: None,
            agent: None,
        })
    };
    let a = call("PATCH", "/apis/bob.dev/v1alpha1/namespaces/n/imagebuilds/x/status?force=true").unwrap();
    assert_eq!((a.group.as_str(), a.resource.as_str(), a.verb), ("bob.dev", "imagebuilds/status", "patch"));
    let a = call("GET", "/api/v1/pods?labelSelector=a&watch=true").unwrap();
    assert_eq!((a.resource.as_str(), a.namespace, a.verb), ("pods", None, "watch"));
    assert_eq!(call("GET", "/api/v1/namespaces/n/pods/p/log").unwrap().resource, "pods/log");
    assert_eq!(call("GET", "/api/v1/namespaces/n/secrets").unwrap().verb, "list");
    let a = call("POST", "/apis/coordination.k8s.io/v1/namespaces/n/leases?").unwrap();
    assert_eq!(
        (a.group.as_str(), a.namespace.as_deref(), a.verb),
        ("coordination.k8s.io", Some("n"), "create")
    );
    assert!(call("GET", "/version").is_none());
}
