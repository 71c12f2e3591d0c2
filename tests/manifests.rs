//! One source of truth across the ways bob is installed: the Helm chart's RBAC rules are the
//! kustomize base's, and `kubectl kustomize config/default` holds the generated CRD and a
//! controller that runs `bob controller` with the leader Lease in its own namespace. Every
//! manifest (chart, kustomize, the planned build pod) writes the values the API server would
//! default inside atomic structs and list keys (`fieldRef.apiVersion`, `ports[].protocol`), so
//! moving an install from client-side to server-side apply meets no conflict; every duration
//! they ship parses with bob's one grammar. (The chart and kustomize output are linted and
//! schema-validated by scripts/check-manifests.)

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
fn cloud_credentials_add_only_their_own_rules_in_both_installs() {
    let docs = yaml_docs(&std::fs::read_to_string(root().join("config/rbac/cloud_role.yaml")).unwrap());
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let chart = std::fs::read_to_string(root().join("charts/bob/files/rbac-cloud-rules.yaml")).unwrap();
    let chart: Value = serde_saphyr::from_str(&chart).unwrap();
    assert_eq!(
        role["rules"], chart,
        "charts/bob/files/rbac-cloud-rules.yaml drifted from config/rbac/cloud_role.yaml"
    );
    let template = std::fs::read_to_string(root().join("charts/bob/templates/rbac.yaml")).unwrap();
    let (_, guarded) = template
        .split_once("{{- if .Values.cloudIdentity.registries }}")
        .expect("the cloud rules are conditional");
    assert!(guarded.contains(r#".Files.Get "files/rbac-cloud-rules.yaml""#));
    // Secrets: what writing, refreshing and sweeping minted credentials takes, no get/watch/update
    // beyond it; the rest is read-only.
    let rules = chart.as_array().unwrap();
    let verbs = |resource: &str| -> Vec<&str> {
        rules
            .iter()
            .filter(|r| r["resources"][0] == resource)
            .flat_map(|r| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
            .collect()
    };
    assert_eq!(verbs("secrets"), ["create", "patch", "delete"], "no list: Secrets are read by name");
    assert_eq!(verbs("networkpolicies"), ["list"]);
    assert_eq!(verbs("namespaces"), ["get"]);
    assert_eq!(rules.len(), 3);
}

#[test]
fn only_the_controller_may_write_imagebuild_status() {
    // The status records the build pod (podName, podUid) the credential refresher may feed: a
    // role that lets users write it would let them name a pod of their own (docs/credentials.md).
    let writes = |rule: &Value| {
        let has = |key: &str, wanted: &[&str]| {
            rule[key].as_array().unwrap().iter().any(|v| v == "*" || wanted.iter().any(|w| v == *w))
        };
        has("apiGroups", &["bob.dev"])
            && has("resources", &["imagebuilds/status", "imagebuilds/*"])
            && has("verbs", &["update", "patch", "create"])
    };
    let mut granted = Vec::new();
    for entry in std::fs::read_dir(root().join("config/rbac")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_docs(&std::fs::read_to_string(&path).unwrap()) {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if doc["kind"].as_str().is_some_and(|k| k.ends_with("Role"))
                && doc["rules"].as_array().unwrap().iter().any(writes)
            {
                granted.push(name);
            }
        }
    }
    granted.sort();
    assert_eq!(granted, ["bob-controller"], "roles that may write imagebuilds/status");
    // The chart's controller rules are config/rbac/role.yaml's (checked above); its other roles
    // are written out in the template, which must grant neither the status nor a wildcard.
    let template = std::fs::read_to_string(root().join("charts/bob/templates/rbac.yaml")).unwrap();
    assert!(
        !template.contains("imagebuilds/status"),
        "a chart role other than the controller's grants the status"
    );
    for line in template.lines().map(str::trim_start) {
        let field =
            ["- apiGroups:", "apiGroups:", "resources:", "verbs:"].iter().any(|f| line.starts_with(f));
        assert!(!(field && line.contains('*')), "a wildcard in the chart's RBAC: {line}");
    }
}

#[test]
fn kustomize_builds_the_crd_rbac_and_controller() {
    let docs = kustomize("config/default");
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
    let crds: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect();
    let generated: Vec<Value> = serde_saphyr::from_multiple(&bob::crd::crd_yaml()).unwrap();
    assert_eq!(crds.len(), generated.len(), "every CRD is installed");
    for want in &generated {
        let kind = &want["spec"]["names"]["kind"];
        let crd = crds.iter().find(|c| &c["spec"]["names"]["kind"] == kind).expect("each CRD is installed");
        assert_eq!(crd["spec"], want["spec"], "the kustomize CRD of {kind} is the generated one");
    }
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

/// Every value under `key`, at any depth.
fn find<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == key {
                    out.push(child);
                }
                find(child, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| find(c, key, out)),
        _ => {}
    }
}

fn all<'a>(docs: &'a [Value], key: &str) -> Vec<&'a Value> {
    let mut out = Vec::new();
    docs.iter().for_each(|d| find(d, key, &mut out));
    out
}

fn kustomize(dir: &str) -> Vec<Value> {
    common::require("kubectl", "kubectl (shipped with these machines; any kubectl >= 1.30)");
    let out = Command::new("kubectl").args(["kustomize"]).arg(root().join(dir)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The chart's templates as YAML fragments around each line that names `key`: the line and the
/// lines that continue it, with template control lines (`{{- range }}`, `{{- end }}`) dropped and
/// each `{{ … }}` value replaced by a scalar. (Helm's library comes only as helm-sdkpy, which
/// lints but does not render; the defaults belong in what the templates write literally anyway.)
fn chart_fragments(key: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root().join("charts/bob/templates")).unwrap().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(e.path()).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !(l.trim_start().starts_with("{{") && l.trim_end().ends_with("}}")))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.contains(&format!("{key}:")) {
                continue;
            }
            let base = indent(line);
            let item = line.trim_start().starts_with("- ");
            let more = lines[i + 1..].iter().take_while(|l| {
                indent(l) > base || (!item && indent(l) == base && l.trim_start().starts_with("- "))
            });
            let mut fragment = String::new();
            for (n, l) in std::iter::once(line).chain(more).enumerate() {
                let l = &l[base.min(indent(l))..];
                let l = if n == 0 && item { format!("  {}", &l[2..]) } else { l.to_string() };
                fragment.push_str(&substitute(&l));
                fragment.push('\n');
            }
            let parsed: Value = serde_saphyr::from_str(&fragment).unwrap_or_else(|e| {
                panic!("{file}: cannot read the fragment around {key}:\n{fragment}\n{e}")
            });
            out.push(parsed);
        }
    }
    out
}

/// `{{ … }}` replaced by `0`.
fn substitute(line: &str) -> String {
    let mut rest = line;
    let mut out = String::new();
    while let Some(start) = rest.find("{{") {
        let end = rest[start..].find("}}").map_or(rest.len(), |e| start + e + 2);
        out.push_str(&rest[..start]);
        out.push('0');
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The inline-Dockerfile sample's planned build pod (it projects the Dockerfile with a fieldRef).
fn planned_pod() -> Value {
    use bob::controller::{PlanConfig, Resolved, from_images, plan};
    let text = std::fs::read_to_string(root().join("config/samples/inline-dockerfile.yaml")).unwrap();
    let doc = yaml_docs(&text).into_iter().find(|d| d["kind"] == "ImageBuild").unwrap();
    let ib: bob::crd::ImageBuild = serde_json::from_value(doc).unwrap();
    let mut resolved = Resolved::default();
    let digest = format!("sha256:{}", "1".repeat(64));
    resolved.from_digests =
        from_images(&ib, &resolved).unwrap().unwrap().into_iter().map(|i| (i, digest.clone())).collect();
    serde_json::to_value(plan(&ib, &resolved, &PlanConfig::default()).unwrap().pod).unwrap()
}

#[test]
fn every_field_ref_names_the_api_version_the_server_would_default() {
    let kustomized = kustomize("config/default");
    let pod = [planned_pod()];
    let chart = chart_fragments("fieldRef");
    let written = std::fs::read_dir(root().join("charts/bob/templates"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap().matches("fieldRef").count())
        .sum::<usize>();
    assert_eq!(all(&chart, "fieldRef").len(), written, "every fieldRef in the templates was read");
    for (source, docs) in [("kustomize", &kustomized[..]), ("chart", &chart[..]), ("planned pod", &pod[..])] {
        let refs = all(docs, "fieldRef");
        assert!(!refs.is_empty(), "{source}: no fieldRef found");
        for r in refs {
            assert_eq!(r["apiVersion"], "v1", "{source}: {r}");
        }
    }
}

#[test]
fn every_port_names_the_protocol_the_server_would_default() {
    let mut docs = kustomize("config/default");
    docs.extend(kustomize("config/network-policy"));
    let chart = chart_fragments("ports");
    for (source, docs) in [("kustomize", &docs[..]), ("chart", &chart[..])] {
        let ports: Vec<&Value> = all(docs, "ports").into_iter().flat_map(|p| p.as_array().unwrap()).collect();
        assert!(ports.len() >= 3, "{source}: ports found: {ports:?}");
        for p in ports {
            assert!(matches!(p["protocol"].as_str(), Some("TCP" | "UDP")), "{source}: {p}");
        }
    }
}

#[test]
fn every_shipped_duration_parses_with_the_one_grammar() {
    use common::flags::duration_flags;
    let flags = duration_flags();
    // The chart: each env var of a duration flag, from the values the Deployment template reads,
    // with the default values and each CI values file over them.
    let template = std::fs::read_to_string(root().join("charts/bob/templates/deployment.yaml")).unwrap();
    let defaults: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root().join("charts/bob/values.yaml")).unwrap())
            .unwrap();
    let mut values = vec![defaults.clone()];
    for e in std::fs::read_dir(root().join("charts/bob/ci")).unwrap().flatten() {
        let over: Value = serde_saphyr::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
        values.push(over);
    }
    let mut checked = Vec::new();
    for flag in &flags {
        let Some(line) = template.lines().find(|l| l.contains(&format!("name: {}, ", flag.env))) else {
            continue;
        };
        let path = line.split(".Values.").nth(1).unwrap().split([' ', '|', '}']).next().unwrap();
        let pointer = format!("/{}", path.replace('.', "/"));
        for v in &values {
            if let Some(text) = v.pointer(&pointer).and_then(Value::as_str) {
                bob::duration::parse(text).unwrap_or_else(|e| panic!("chart {path}: {e}"));
            }
        }
        assert!(defaults.pointer(&pointer).is_some(), "values.yaml has {path}");
        checked.push(flag.env.as_str());
    }
    for env in ["BOB_BUILD_TIMEOUT", "BOB_QUEUE_TIMEOUT", "BOB_RETRY_BACKOFF"] {
        assert!(checked.contains(&env), "the chart sets {env}: {checked:?}");
    }
    // kustomize: env vars and arguments of duration flags.
    for d in kustomize("config/default").iter().filter(|d| d["kind"] == "Deployment") {
        for c in d["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
            for e in c["env"].as_array().into_iter().flatten() {
                if flags.iter().any(|f| e["name"] == f.env.as_str()) {
                    bob::duration::parse(e["value"].as_str().unwrap()).unwrap();
                }
            }
            let args: Vec<&str> =
                c["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            for (i, a) in args.iter().enumerate() {
                for f in &flags {
                    let long = format!("--{}", f.long);
                    if let Some(v) = a.strip_prefix(&format!("{long}=")) {
                        bob::duration::parse(v).unwrap();
                    } else if *a == long {
                        bob::duration::parse(args[i + 1]).unwrap();
                    }
                }
            }
        }
    }
    // The samples' spec.timeouts.
    for e in std::fs::read_dir(root().join("config/samples")).unwrap().flatten() {
        for d in yaml_docs(&std::fs::read_to_string(e.path()).unwrap()) {
            for (_, t) in d["spec"]["timeouts"].as_object().into_iter().flatten() {
                bob::duration::parse(t.as_str().unwrap()).unwrap();
            }
        }
    }
    // values.schema.json checks chart durations with the same grammar (and refuses signs and zero).
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("charts/bob/values.schema.json")).unwrap())
            .unwrap();
    assert_eq!(schema["definitions"]["duration"]["allOf"][0]["pattern"], bob::duration::DURATION_RE);
}

/// The controller container of the chart rendered by Helm's engine (`scripts/render-chart`, from
/// the `.venv` that `.ci/run` makes) with `values` over the defaults.
fn rendered_controller(values: &Value) -> Value {
    let out = Command::new(root().join("scripts/render-chart"))
        .args(["--set-json", &values.to_string()])
        .output()
        .expect("scripts/render-chart runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = yaml_docs(&String::from_utf8(out.stdout).unwrap());
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0].clone()
}

/// The placement `bob controller` reads from the rendered container's environment: each variable
/// of a placement or build-mode flag passed as that flag (the rest keep their defaults).
fn placement_of(
    container: &Value,
) -> (bob::controller::BuildSecurity, bob::controller::placement::Placement) {
    use clap::{CommandFactory, Parser};
    let cli = bob::cli::Cli::command();
    let sub = cli.find_subcommand("controller").unwrap();
    let mut argv = vec!["bob".to_string(), "controller".to_string()];
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if !(name.starts_with("BOB_ALLOWED_") || name.starts_with("BOB_BUILD_SECURITY")) {
            continue;
        }
        let arg = sub.get_arguments().find(|a| a.get_env().is_some_and(|v| v == name));
        let arg = arg.unwrap_or_else(|| panic!("the chart sets {name}, which no flag reads"));
        argv.push(format!("--{}={}", arg.get_long().unwrap(), e["value"].as_str().unwrap()));
    }
    let parsed = bob::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let bob::cli::Command::Controller(a) = parsed.command else { unreachable!() };
    let p = bob::controller::placement::Placement::new(
        &a.allowed_node_selectors,
        &a.allowed_tolerations,
        &a.build_security_namespaces,
    );
    (a.security, p)
}

#[test]
fn the_charts_placement_values_reach_the_controller_and_default_to_nothing_allowed() {
    use bob::controller::BuildSecurity;
    use bob::controller::placement::Placement;
    let (security, defaults) = placement_of(&rendered_controller(&serde_json::json!({})));
    let want =
        Placement { node_selectors: vec![], tolerations: vec![], security_namespaces: vec!["*".into()] };
    assert_eq!((security, defaults), (BuildSecurity::UserNamespace, want));
    let values = serde_json::json!({"controller": {
        "buildSecurity": "privileged",
        "buildSecurityNamespaces": ["builds", "ci"],
        "placement": {
            "allowedNodeSelectors": ["kubernetes.io/arch", "pool=builds"],
            "allowedTolerations": ["builds:NoSchedule", "dedicated=builds:NoExecute"]
        }
    }});
    let (security, set) = placement_of(&rendered_controller(&values));
    let want = Placement {
        node_selectors: vec!["kubernetes.io/arch".parse().unwrap(), "pool=builds".parse().unwrap()],
        tolerations: vec![
            "builds:NoSchedule".parse().unwrap(),
            "dedicated=builds:NoExecute".parse().unwrap(),
        ],
        security_namespaces: vec!["builds".into(), "ci".into()],
    };
    assert_eq!((security, set), (BuildSecurity::Privileged, want));
}
