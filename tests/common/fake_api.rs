//! A fake Kubernetes API behind kube's `Client` (tower-test): a responder answers each request
//! (from state it may keep), and every call is recorded for the test to check. It is no API
//! server; it answers exactly what the controller asks for in these tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bob::crd::ImageBuild;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

/// One API call: method, path with query, JSON body.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

impl Call {
    /// `METHOD /path` without the query, for compact assertions.
    pub fn route(&self) -> String {
        format!("{} {}", self.method, self.path.split('?').next().unwrap_or_default())
    }
}

/// A kube client whose requests go to `respond`; returns it and the shared call log.
pub fn fake_api<F>(respond: F) -> (kube::Client, Arc<Mutex<Vec<Call>>>)
where
    F: Fn(&Call) -> (u16, Value) + Send + Sync + 'static,
{
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes =
                http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
            let call = Call {
                method: parts.method.clone(),
                path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, reply) = respond(&call);
            log.lock().unwrap().push(call);
            let resp = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                // A string reply is sent as plain text (pod logs).
                .body(Body::from(match reply {
                    Value::String(text) => text.into_bytes(),
                    other => serde_json::to_vec(&other).unwrap(),
                }))
                .unwrap();
            send.send_response(resp);
        }
    });
    (kube::Client::new(service, "default"), calls)
}

/// The 404 Status the API server sends for a missing object.
pub fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// A `kubernetes.io/dockerconfigjson` Secret holding `config`.
pub fn registry_secret(name: &str, config: &str) -> Value {
    use base64::Engine;
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default", "resourceVersion": "7"},
           "type": "kubernetes.io/dockerconfigjson",
           "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)}})
}

/// An ImageBuild as the API server would hand it out (name, uid, generation, creation time).
pub fn image_build(name: &str, spec: Value, status: Option<Value>) -> ImageBuild {
    let uid = format!("00000000-0000-4000-8000-{:012x}", name.bytes().map(u64::from).sum::<u64>());
    let mut v = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "generation": 1, "resourceVersion": "1",
                     "creationTimestamp": k8s_openapi::jiff::Timestamp::now().to_string()},
        "spec": spec});
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).unwrap()
}

/// The bob controller context for `client`.
pub fn context(client: kube::Client) -> Arc<bob::controller::Context> {
    Arc::new(bob::controller::Context::new(
        client,
        bob::controller::PlanConfig::default(),
        Duration::from_secs(1800),
        bob::controller::Policy::default(),
    ))
}

/// The status the controller last wrote for `name`.
pub fn last_status(calls: &[Call], name: &str) -> Option<Value> {
    calls
        .iter()
        .rev()
        .find(|c| c.method == Method::PATCH && c.path.contains(&format!("/imagebuilds/{name}/status")))
        .map(|c| c.body["status"].clone())
}

/// What the API server answers to a write the test does not care about: for a status patch,
/// an ImageBuild carrying the written status; otherwise an empty object.
pub fn default_reply(c: &Call) -> (u16, Value) {
    if c.path.contains("/imagebuilds/") {
        let name =
            c.path.split("/imagebuilds/").nth(1).unwrap_or_default().split('/').next().unwrap_or_default();
        let ib = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {}, "workspaceImageRepository": "x"}, "status": c.body["status"]});
        return (200, ib);
    }
    (200, json!({}))
}

/// A fake API that serves the registry Secret `reg`, has no pods, and accepts pod creates.
pub fn builder_api(secret: Value) -> (kube::Client, Arc<Mutex<Vec<Call>>>) {
    fake_api(move |c| match (c.method.clone(), c.route().as_str()) {
        (_, "GET /api/v1/namespaces/default/secrets/reg") => (200, secret.clone()),
        (Method::GET, r) if r.contains("/pods/") => not_found(),
        (Method::POST, r) if r.ends_with("/pods") => (201, c.body.clone()),
        _ => default_reply(c),
    })
}

/// `decide` as the engine drives it for a fixture: a plan asked for is made (once) from the
/// resolved inputs, and the decision taken again.
pub fn decide(
    ib: &ImageBuild,
    seen: &bob::controller::decide::Observed,
    cfg: &bob::controller::Settings,
) -> bob::controller::decide::Step {
    use bob::controller::decide::Step;
    match bob::controller::decide::decide(ib, seen, cfg) {
        Step::Plan => {
            let mut planned = seen.clone();
            let Some(Ok(resolved)) = &seen.resolved else { panic!("a plan before the inputs are resolved") };
            planned.plan = Some(bob::controller::plan(ib, resolved, &cfg.plan).map(Box::new));
            bob::controller::decide::decide(ib, &planned, cfg)
        }
        step => step,
    }
}
