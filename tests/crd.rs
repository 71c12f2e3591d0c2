//! The CRD: no committed copy drifts from `bob crd`, every sample parses into the Rust types and
//! passes the schema's CEL rules, and each invalid variant is rejected by the rule that names it
//! (the rules run in kube-cel, Kubernetes' CEL dialect, so they are code, not text).

use std::path::{Path, PathBuf};
use std::process::Command;

use bob::crd::ImageBuild;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every committed copy of the CRD: `crds/` and anything under `charts/` or `config/` named like it.
fn crd_copies(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            crd_copies(&p, out);
        } else if p.file_name().is_some_and(|n| n == "imagebuild.yaml") {
            out.push(p);
        }
    }
}

#[test]
fn no_committed_crd_drifts_from_bob_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_bob")).arg("crd").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let mut copies = Vec::new();
    crd_copies(&root().join("crds"), &mut copies);
    crd_copies(&root().join("charts"), &mut copies);
    crd_copies(&root().join("config"), &mut copies);
    assert!(!copies.is_empty(), "crds/imagebuild.yaml is missing");
    for c in copies {
        let committed = std::fs::read_to_string(&c).unwrap();
        assert!(committed == generated, "{} drifted: run `bob crd > {}`", c.display(), c.display());
    }
}

/// The ImageBuild documents of every sample, as JSON.
fn samples() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root().join("config/samples")).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        for d in docs.into_iter().filter(|d| d["kind"] == "ImageBuild") {
            out.push((e.file_name().to_string_lossy().into_owned(), d));
        }
    }
    assert!(out.len() >= 3, "image, inline and git samples");
    out
}

fn schema() -> Value {
    let crd = serde_json::to_value(<ImageBuild as kube::CustomResourceExt>::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn errors(obj: &Value) -> Vec<String> {
    match kube_cel::validate(&schema(), obj, None) {
        Ok(()) => Vec::new(),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn samples_parse_and_pass_the_cel_rules() {
    for (name, doc) in samples() {
        let ib: ImageBuild = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(ib.spec.source.image.is_some() != ib.spec.source.dockerfile.is_some(), "{name}");
        assert_eq!(errors(&doc), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn each_invalid_spec_is_rejected_by_its_rule() {
    let inline = samples().into_iter().find(|(n, _)| n == "inline-dockerfile.yaml").unwrap().1;
    let image = samples().into_iter().find(|(n, _)| n == "image-source.yaml").unwrap().1;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "both sources",
            with(&inline, "/spec/source/image", json!({"ref": "busybox:1"})),
            "exactly one of image or dockerfile",
        ),
        ("no source", with(&image, "/spec/source", json!({})), "exactly one of image or dockerfile"),
        (
            "inline and git",
            with(&inline, "/spec/source/dockerfile/git", json!({"url": "https://g.test/r.git"})),
            "exactly one of inline or git",
        ),
        (
            "no base repository",
            without(&inline, "/spec/baseImageRepository"),
            "baseImageRepository is required",
        ),
        (
            "repository with a tag",
            with(&inline, "/spec/workspaceImageRepository", json!("reg.test/ws:latest")),
            "without tag or digest",
        ),
        (
            "upper-case path",
            with(&inline, "/spec/baseImageRepository", json!("reg.test/Team/base")),
            "without tag or digest",
        ),
        (
            "bad image ref",
            with(&image, "/spec/source/image/ref", json!("reg.test/x:bad tag")),
            "must be an image reference",
        ),
        (
            "bad build arg",
            with(&inline, "/spec/source/dockerfile/buildArgs", json!({"NO-DASH": "x"})),
            "build argument names",
        ),
        (
            "absolute dockerfile path",
            with(
                &inline,
                "/spec/source/dockerfile",
                json!({"git": {"url": "https://g.test/r.git", "dockerfilePath": "/etc/passwd"}}),
            ),
            "relative path",
        ),
        (
            "not a git url",
            with(&inline, "/spec/source/dockerfile", json!({"git": {"url": "ftp:/x"}})),
            "must be a git URL",
        ),
        (
            "layer cache repository with a tag",
            with(&inline, "/spec/layerCache", json!({"repository": "reg.test/cache:latest"})),
            "without tag or digest",
        ),
        (
            "layer cache scope with capitals",
            with(&inline, "/spec/layerCache", json!({"scope": "Alice"})),
            "lowercase path components",
        ),
        (
            "layer cache scope climbing out",
            with(&inline, "/spec/layerCache", json!({"scope": "../other-namespace/x"})),
            "lowercase path components",
        ),
        (
            "layer cache scope with an empty component",
            with(&inline, "/spec/layerCache", json!({"scope": "team//web"})),
            "lowercase path components",
        ),
    ];
    for (what, obj, needle) in cases {
        let errs = errors(&obj);
        assert!(errs.iter().any(|e| e.contains(needle)), "{what}: expected {needle:?} in {errs:?}");
    }
    // A layer cache with a repository and a scope of path components is fine.
    let cache = json!({"repository": "localhost:5000/bob-cache", "scope": "team-a/web", "disabled": false});
    assert_eq!(errors(&with(&inline, "/spec/layerCache", cache)), Vec::<String>::new());
    // Digest references and host:port repositories are fine.
    let ok = with(
        &image,
        "/spec/source/image/ref",
        json!(format!("localhost:5000/a/b@sha256:{}", "0".repeat(64))),
    );
    assert_eq!(errors(&ok), Vec::<String>::new());
}

fn with(v: &Value, pointer: &str, value: Value) -> Value {
    let mut v = v.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() { &mut v } else { v.pointer_mut(parent).unwrap() };
    target[key] = value;
    v
}

fn without(v: &Value, pointer: &str) -> Value {
    let mut v = v.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent).unwrap().as_object_mut().unwrap().remove(key);
    v
}

/// Every schema node that carries CEL rules, with its rules.
fn rule_nodes(node: &Value, out: &mut Vec<(Value, Vec<String>)>) {
    if let Some(rules) = node.get("x-kubernetes-validations").and_then(Value::as_array) {
        out.push((node.clone(), rules.iter().map(|r| r["rule"].as_str().unwrap().to_string()).collect()));
    }
    for key in ["properties", "additionalProperties", "items"] {
        match node.get(key) {
            Some(Value::Object(m)) if key == "properties" => m.values().for_each(|c| rule_nodes(c, out)),
            Some(c @ Value::Object(_)) => rule_nodes(c, out),
            _ => {}
        }
    }
}

#[test]
fn every_rule_is_within_the_api_servers_cost_budget() {
    let mut nodes = Vec::new();
    rule_nodes(&schema(), &mut nodes);
    let count: usize = nodes.iter().map(|(_, r)| r.len()).sum();
    assert!(count >= 12, "rules found: {count}");
    for (node, rules) in nodes {
        let compiled = kube_cel::compile_schema(&node);
        for rule in rules {
            // (Scope is proven by evaluating the rules on the samples above; kube-cel's static scope
            // check does not know comprehension variables such as `k` in `self.all(k, ...)`.)
            let warnings = kube_cel::estimate_rule_cost(&rule, &compiled);
            assert!(
                warnings.is_empty(),
                "{rule}: {:?}",
                warnings.iter().map(|w| &w.message).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn the_controllers_types_read_objects_written_by_a_newer_crd() {
    // A newer bob may add spec fields, phases and reasons; an older controller (an upgrade in
    // progress, a rollback) must still read the object, or its watch of every ImageBuild fails.
    let newer = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild", "metadata": {"name": "n"},
        "spec": {"source": {"image": {"ref": "reg.test/a:1"}}, "workspaceImageRepository": "reg.test/ws",
                 "cache": {"scope": "team"}},
        "status": {"phase": "Archived", "reason": "SomethingNew", "observedGeneration": 1,
                   "failure": {"reason": "SomethingNew", "message": "x"},
                   "layerCache": {"mode": "SomethingNew", "hits": 2},
                   "logRefs": [{"attempt": 1, "buildLog": "p-1", "bytes": 9}]}});
    let ib: ImageBuild = serde_json::from_value(newer).expect("a newer object reads");
    let s = ib.status.unwrap();
    assert_eq!((s.phase, s.reason), (None, None), "unknown values read as unknown");
    assert_eq!(s.failure.unwrap().reason, bob::reason::Reason::Internal);
    assert_eq!(s.layer_cache, None, "a layer cache mode of a newer bob reads as unknown");
    let known = json!({"phase": "Failed", "reason": "PodRejected"});
    let s: bob::crd::ImageBuildStatus = serde_json::from_value(known).unwrap();
    assert_eq!((s.phase, s.reason), (Some(bob::crd::Phase::Failed), Some(bob::reason::Reason::PodRejected)));
}

/// Inputs on both sides of the duration grammar (Go's `time.ParseDuration`).
const DURATIONS: &[&str] = &[
    "1h30m",
    "1.5h",
    "90s",
    "300ms",
    "2h45m30.5s",
    "10us",
    "10µs",
    "10μs",
    "5ns",
    "+5s",
    ".5s",
    "1.s",
    "0",
    "-0",
    "+0",
    "0s",
    "-5s",
    "-1.5h",
    "1h1h",
    "0h5s",
    "9223372036854775807ns",
    "",
    "30",
    "1h30",
    "1.5",
    "3d",
    "3 days",
    "1H",
    "1h 30m",
    "1h ",
    "soon",
    " 30s",
    ".s",
    "-",
    "+",
    "+-5s",
    "--5s",
    "1e3s",
    "1..5s",
    "s",
    "h1",
    "1hm",
    "1sec",
    "30m!",
];

/// What kube-cel (Kubernetes' CEL dialect) makes of `rule` on the string `value`.
fn rule_passes(rule: &str, value: &str) -> Result<bool, String> {
    let schema =
        json!({"type": "string", "x-kubernetes-validations": [{"rule": rule, "message": "refused"}]});
    match kube_cel::validate(&schema, &json!(value), None) {
        Ok(()) => Ok(true),
        Err(e) if e.iter().all(|e| e.to_string().ends_with("refused")) => Ok(false),
        Err(e) => Err(e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
    }
}

#[test]
fn the_rules_duration_form_is_the_parsers_grammar() {
    let form = format!("self.matches(r'{}')", bob::duration::DURATION_RE);
    for input in DURATIONS.iter().copied().chain(["9999999999h", "2562048h"]) {
        let matched = rule_passes(&form, input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        // The form cannot see overflow; only the parsers (Go's and bob's) refuse it.
        let parsed = match bob::duration::parse_nanos(input) {
            Ok(_) | Err(bob::duration::Error::OutOfRange { .. }) => true,
            Err(_) => false,
        };
        assert_eq!(
            matched,
            parsed,
            "{input:?}: regex {matched}, parser {:?}",
            bob::duration::parse_nanos(input)
        );
    }
}

#[test]
fn duration_fields_refuse_with_the_rules_message_never_a_cel_error() {
    let inline = samples().into_iter().find(|(n, _)| n == "inline-dockerfile.yaml").unwrap().1;
    let message = bob::crd::DURATION_MESSAGE;
    for field in ["queue", "build"] {
        let pointer = format!("/spec/timeouts/{field}");
        for (value, want) in [
            ("1h30m", vec![]),
            ("soon", vec![format!("spec.timeouts.{field}: {message}")]),
            ("30", vec![format!("spec.timeouts.{field}: {message}")]),
            ("-5s", vec![format!("spec.timeouts.{field}: {message}")]),
            ("0s", vec![format!("spec.timeouts.{field}: {message}")]),
        ] {
            assert_eq!(errors(&with(&inline, &pointer, json!(value))), want, "{field}: {value:?}");
        }
    }
    // Every input: the rule passes exactly where bob's parser takes the value. Skipped: what
    // kube-cel's own `duration()` (the `cel` crate's parser) reads unlike Go's, which the API
    // server's cel-go uses: the `µs`/`μs` spellings and a signed lone zero (`+0`) are errors there.
    let rule = bob::crd::duration_rule();
    for input in DURATIONS.iter().filter(|d| !d.contains(['µ', 'μ']) && **d != "+0") {
        let passes = rule_passes(&rule, input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(passes, bob::duration::parse(input).is_ok(), "{input:?}");
    }
}
