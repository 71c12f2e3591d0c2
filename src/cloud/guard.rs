//! What must hold before a build pod gets a cloud-minted credential, and after it is created
//! (pure): its namespace's NetworkPolicies block the instance metadata and EKS Pod Identity
//! endpoints, and no admission webhook gave any container a cloud identity (variables, a token,
//! `envFrom`, a mounted AWS credentials or config file).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{EnvFromSource, KeyToPath, Pod, Volume};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Link-local endpoints that hand out node or pod credentials (port 80): the instance metadata
/// service (IPv4 and IPv6) and the EKS Pod Identity agent.
pub const METADATA_ENDPOINTS: [&str; 4] =
    ["169.254.169.254", "fd00:ec2::254", "169.254.170.23", "fd00:ec2::23"];

/// Pod annotation: containers the EKS webhooks (IRSA, Pod Identity) must not give credentials to.
pub const SKIP_CONTAINERS: &str = "eks.amazonaws.com/skip-containers";

/// Environment variables through which AWS SDKs find credentials (`AWS_CONFIG_FILE` too: a
/// config file can name a role, a web identity token file or a `credential_process`).
pub const AWS_CREDENTIAL_ENV: [&str; 11] = [
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_PROFILE",
];

/// File names (a Secret or ConfigMap key, or the path it is projected to) that hold AWS
/// credentials: the SDKs' shared `credentials` and `config` files, or the keys themselves.
pub const AWS_CREDENTIAL_FILES: [&str; 5] =
    ["credentials", "config", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"];

/// The directory the AWS SDKs read `credentials` and `config` from by default (`~/.aws`).
pub const AWS_CONFIG_DIR: &str = ".aws";

/// Audiences of ServiceAccount tokens that AWS exchanges for credentials: IRSA's and Pod
/// Identity's. Tokens for other audiences (a service mesh's, Vault's) are not a cloud identity.
pub const AWS_TOKEN_AUDIENCES: [&str; 2] = ["sts.amazonaws.com", "pods.eks.amazonaws.com"];

/// The volumes the EKS webhooks add for their tokens.
pub const AWS_TOKEN_VOLUMES: [&str; 2] = ["aws-iam-token", "eks-pod-identity-token"];

/// `Ok` when the NetworkPolicies of a namespace keep pods with `labels` from reaching every
/// metadata endpoint on port 80; else why not. NetworkPolicies add up: once one selects a pod for
/// egress, what no selecting policy allows is denied.
pub fn metadata_blocked(policies: &[NetworkPolicy], labels: &BTreeMap<String, String>) -> Result<(), String> {
    let selecting: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| {
            let Some(spec) = &p.spec else { return false };
            let egress = match &spec.policy_types {
                Some(types) => types.iter().any(|t| t == "Egress"),
                None => spec.egress.is_some(),
            };
            // An absent selector is the empty one: every pod.
            egress && spec.pod_selector.as_ref().is_none_or(|s| selector_matches(s, labels))
        })
        .collect();
    if selecting.is_empty() {
        return Err("no NetworkPolicy restricts the build pods' egress".into());
    }
    for p in selecting {
        for rule in p.spec.as_ref().and_then(|s| s.egress.as_ref()).into_iter().flatten() {
            if !rule.ports.as_ref().is_none_or(|ports| ports.is_empty() || ports.iter().any(port_80)) {
                continue;
            }
            let peers = rule.to.as_deref().unwrap_or_default();
            let open = METADATA_ENDPOINTS.iter().find(|ip| {
                peers.is_empty()
                    || peers.iter().any(|peer| {
                        peer.ip_block.as_ref().is_some_and(|b| {
                            contains(&b.cidr, ip) && !b.except.iter().flatten().any(|e| contains(e, ip))
                        })
                    })
            });
            if let Some(ip) = open {
                let name = p.metadata.name.as_deref().unwrap_or("?");
                return Err(format!("NetworkPolicy {name} allows egress to the metadata endpoint {ip}"));
            }
        }
    }
    Ok(())
}

fn port_80(p: &NetworkPolicyPort) -> bool {
    if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
        return false;
    }
    match &p.port {
        None => true,
        // A named port may be anything: assume the worst.
        Some(IntOrString::String(_)) => true,
        Some(IntOrString::Int(n)) => *n == 80 || p.end_port.is_some_and(|end| *n <= 80 && 80 <= end),
    }
}

fn selector_matches(s: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = s.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = s.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
}

/// Whether CIDR `cidr` contains address `ip` (different families never do).
fn contains(cidr: &str, ip: &str) -> bool {
    let (Some((net, len)), Ok(ip)) = (cidr.split_once('/'), ip.parse::<IpAddr>()) else { return false };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// What in `pod` (as the API server stored it, after admission) gives a container an AWS
/// identity, one line per container and route; empty when nothing does. The routes:
///
/// - AWS credential variables ([`AWS_CREDENTIAL_ENV`]);
/// - any `envFrom`: bob's containers never use it, and what a Secret or ConfigMap holds is not
///   known when the pod is checked (the kubelet reads it when the container starts), so every
///   source counts, unread;
/// - a mounted ServiceAccount token for AWS (IRSA's `aws-iam-token`, Pod Identity's
///   `eks-pod-identity-token`, or any token with their audience); tokens for other audiences
///   (Istio's, Linkerd's) are left alone;
/// - a mounted Secret, ConfigMap or projected volume with an item named like an AWS credentials
///   file ([`AWS_CREDENTIAL_FILES`]), or a whole Secret (bob mounts Secrets item by item only,
///   so one mounted whole is not bob's and its keys are unknown);
/// - any volume mounted into an `.aws` directory, where the SDKs look by default.
pub fn identity_leaks(pod: &Pod) -> Vec<String> {
    let Some(spec) = &pod.spec else { return Vec::new() };
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    // Ephemeral containers (`kubectl debug`) too: they may be added to a running pod, and the
    // refresher checks the pod as it is now.
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| (c.name.as_str(), c.env.as_deref(), c.env_from.as_deref(), c.volume_mounts.as_deref()));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.env.as_deref(), c.env_from.as_deref(), c.volume_mounts.as_deref()));
    let mut leaks = Vec::new();
    for (name, env, env_from, mounts) in containers.chain(ephemeral) {
        for e in env.unwrap_or_default().iter().filter(|e| AWS_CREDENTIAL_ENV.contains(&e.name.as_str())) {
            leaks.push(format!("container {name} has {}", e.name));
        }
        leaks.extend(env_from_leaks(name, env_from.unwrap_or_default()));
        for m in mounts.unwrap_or_default() {
            if let Some(v) = volumes.iter().find(|v| v.name == m.name)
                && let Some(route) = volume_route(v)
            {
                leaks.push(format!("container {name} mounts {route}"));
            }
            if m.mount_path.split('/').any(|part| part == AWS_CONFIG_DIR) {
                leaks.push(format!(
                    "container {name} mounts volume {} at {}, where AWS SDKs look for credentials",
                    m.name, m.mount_path
                ));
            }
        }
    }
    leaks
}

/// Every `envFrom` source of container `name`. Refused unread: reading the object would need
/// `get` on every ConfigMap (the controller has none) and would still be a guess, since the
/// object may change or appear (`optional`) after the check and before the kubelet reads it.
fn env_from_leaks(name: &str, sources: &[EnvFromSource]) -> Vec<String> {
    sources
        .iter()
        .map(|s| {
            let source = match (&s.secret_ref, &s.config_map_ref) {
                (Some(r), _) => format!("Secret {}", r.name),
                (None, Some(r)) => format!("ConfigMap {}", r.name),
                (None, None) => "an unknown source".to_string(),
            };
            format!("container {name} takes variables from {source} (envFrom)")
        })
        .collect()
}

/// Whether an item is named like an AWS credentials file (by its key or by the path it gets).
fn aws_item(items: &[KeyToPath]) -> Option<&str> {
    let named = |s: &str| {
        let file = s.rsplit('/').next().unwrap_or(s).to_ascii_lowercase();
        AWS_CREDENTIAL_FILES.contains(&file.as_str())
    };
    items.iter().find(|i| named(&i.key) || named(&i.path)).map(|i| i.key.as_str())
}

/// What volume `v` would give a container that mounts it, if that may be an AWS identity.
fn volume_route(v: &Volume) -> Option<String> {
    let name = &v.name;
    if AWS_TOKEN_VOLUMES.contains(&name.as_str()) {
        return Some(format!("the token volume {name}"));
    }
    if let Some(s) = &v.secret {
        let secret = s.secret_name.as_deref().unwrap_or("?");
        return match s.items.as_deref() {
            None | Some([]) => Some(format!("volume {name} with the whole Secret {secret}")),
            Some(items) => {
                aws_item(items).map(|key| format!("volume {name} with key {key} of Secret {secret}"))
            }
        };
    }
    if let Some(cm) = &v.config_map {
        // A whole ConfigMap is not suspicious by itself: service meshes mount their CA bundle so.
        let map = cm.name.as_str();
        return aws_item(cm.items.as_deref().unwrap_or_default())
            .map(|key| format!("volume {name} with key {key} of ConfigMap {map}"));
    }
    for source in v.projected.as_ref().and_then(|p| p.sources.as_deref()).unwrap_or_default() {
        if let Some(t) = &source.service_account_token
            && t.audience.as_deref().is_some_and(|a| AWS_TOKEN_AUDIENCES.contains(&a))
        {
            return Some(format!("the token volume {name}"));
        }
        if let Some(s) = &source.secret {
            let secret = s.name.as_str();
            match s.items.as_deref() {
                None | Some([]) => return Some(format!("volume {name} with the whole Secret {secret}")),
                Some(items) => {
                    if let Some(key) = aws_item(items) {
                        return Some(format!("volume {name} with key {key} of Secret {secret}"));
                    }
                }
            }
        }
        if let Some(cm) = &source.config_map
            && let Some(key) = aws_item(cm.items.as_deref().unwrap_or_default())
        {
            return Some(format!("volume {name} with key {key} of ConfigMap {}", cm.name));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn the_chart_policy_blocks_metadata_and_open_ones_do_not() {
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_string(), "bob".to_string()),
            ("app.kubernetes.io/component".to_string(), "build".to_string()),
        ]);
        let chart = policy(
            "metadata: {name: bob-build-pods}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/managed-by: bob, app.kubernetes.io/component: build}}
  policyTypes: [Ingress, Egress]
  egress:
  - ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [169.254.0.0/16, 10.0.0.0/8]}}]
    ports: [{protocol: TCP, port: 443}, {protocol: TCP, port: 80}]
",
        );
        assert_eq!(metadata_blocked(std::slice::from_ref(&chart), &labels), Ok(()));
        assert!(metadata_blocked(&[], &labels).unwrap_err().contains("no NetworkPolicy"));
        let open = policy(
            "metadata: {name: allow-all}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{}]
",
        );
        let e = metadata_blocked(&[chart.clone(), open], &labels).unwrap_err();
        assert!(e.contains("allow-all") && e.contains("169.254.169.254"), "{e}");
        let other_pods = policy(
            "metadata: {name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: []
",
        );
        assert!(metadata_blocked(&[other_pods], &labels).is_err());
        assert!(contains("fd00:ec2::/32", "fd00:ec2::254") && !contains("10.0.0.0/8", "fd00:ec2::254"));
    }
}
