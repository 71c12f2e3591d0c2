//! What the API server would refuse in an ImageBuild, checked without one, so `bob run` accepts
//! exactly what `kubectl apply` would: the CRD's structural schema as the API server applies it
//! with strict field validation (kubectl's default) — unknown fields, types, required fields,
//! enums, lengths — and then the CRD's CEL rules, evaluated by kube-cel (the implementation the
//! CRD's own tests use). The schema is the one `bob crd` prints, generated from the Rust types.

use serde_json::Value;

use crate::crd::ImageBuild;

/// Every reason the API server would refuse `doc` (an ImageBuild as YAML turned JSON), in its
/// words; empty when it would accept it. `status` is not checked: a create drops it.
pub fn refusals(doc: &Value) -> Vec<String> {
    let crd = serde_json::to_value(<ImageBuild as kube::CustomResourceExt>::crd()).unwrap_or_default();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut object = doc.clone();
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    let mut out = Vec::new();
    if doc["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        out.push("metadata.name: Required value: name or generateName is required".to_string());
    }
    for (key, value) in object.as_object().into_iter().flatten() {
        if let Some(sub) = schema["properties"].get(key).filter(|_| key != "metadata") {
            structural(sub, value, key, &mut out);
        }
    }
    for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if object.get(required).is_none() {
            out.push(format!("{required}: Required value"));
        }
    }
    if out.is_empty()
        && let Err(errors) = kube_cel::validate(schema, &object, None)
    {
        out.extend(
            errors.as_slice().iter().map(|e| format!("{}: Invalid value: {}", e.field_path, e.message)),
        );
    }
    out
}

/// The structural checks of one value against its schema, at `path`.
fn structural(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() && schema["nullable"] != true {
        // The API server drops nulls before validating.
        return;
    }
    let int_or_string = schema["x-kubernetes-int-or-string"] == true;
    let ok = match schema["type"].as_str() {
        _ if int_or_string => value.is_i64() || value.is_u64() || value.is_string(),
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !ok {
        let want = schema["type"].as_str().unwrap_or("value");
        out.push(format!("{path}: Invalid value: {}: {path} in body must be of type {want}", short(value)));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        out.push(format!("{path}: Unsupported value: {}: supported values: {}", value, list.join(", ")));
    }
    if let (Some(s), Some(max)) = (value.as_str(), schema["maxLength"].as_u64())
        && s.chars().count() as u64 > max
    {
        out.push(format!("{path}: Too long: may not be more than {max} bytes"));
    }
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            for (key, v) in map {
                let child = format!("{path}.{key}");
                match (schema["properties"].get(key), &schema["additionalProperties"]) {
                    (Some(sub), _) => structural(sub, v, &child, out),
                    (None, Value::Object(_)) => structural(&schema["additionalProperties"], v, &child, out),
                    (None, Value::Bool(true)) => {}
                    (None, _) if preserve => {}
                    (None, _) => out.push(format!("strict decoding error: unknown field \"{child}\"")),
                }
            }
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(required) {
                    out.push(format!("{path}.{required}: Required value"));
                }
            }
            if let Some(max) = schema["maxProperties"].as_u64()
                && map.len() as u64 > max
            {
                out.push(format!("{path}: Too many: {}: must have at most {max} items", map.len()));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                out.push(format!("{path}: Too many: {}: must have at most {max} items", items.len()));
            }
            for (i, v) in items.iter().enumerate() {
                structural(&schema["items"], v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 { format!("{}...", s.chars().take(40).collect::<String>()) } else { s }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(spec: Value) -> Value {
        json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild", "metadata": {"name": "x"}, "spec": spec})
    }

    #[test]
    fn the_api_servers_refusals_are_bob_runs() {
        let good =
            json!({"source": {"image": {"ref": "reg.test/a:1"}}, "workspaceImageRepository": "reg.test/ws"});
        assert_eq!(refusals(&doc(good.clone())), Vec::<String>::new());
        let mut typo = good.clone();
        typo["forceRebuidl"] = json!(true);
        assert_eq!(refusals(&doc(typo)), ["strict decoding error: unknown field \"spec.forceRebuidl\""]);
        let mut both = good.clone();
        both["source"]["dockerfile"] = json!({"inline": "FROM x\n"});
        let got = refusals(&doc(both));
        assert!(got.iter().any(|e| e.contains("exactly one of image or dockerfile")), "{got:?}");
        let mut wrong_type = good;
        wrong_type["forceRebuild"] = json!("yes");
        let got = refusals(&doc(wrong_type));
        assert!(
            got[0].starts_with("spec.forceRebuild: Invalid value") && got[0].contains("boolean"),
            "{got:?}"
        );
        let got = refusals(&doc(json!({"source": {"image": {"ref": "reg.test/a:1"}}})));
        assert_eq!(got, ["spec.workspaceImageRepository: Required value"]);
    }
}
