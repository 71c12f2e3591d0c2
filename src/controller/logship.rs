//! Ships each build pod's log into its `BuildLog` while the build runs: the controller follows
//! the containers' output through the API server (`pods/log`, as `kubectl logs -f` does) and
//! appends it every few seconds, so a pod that is deleted, evicted or killed has left its log
//! behind — all but the last flush interval. The build itself can neither write nor delete it: it
//! has no API credentials (`automountServiceAccountToken: false`), and the proxy it can reach has
//! no route to it. Secret values the build could know are redacted before anything is stored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use super::FIELD_MANAGER;
use super::pod::CONTAINER_BUILD;
use crate::logs::store::{BUILD, BuildLog, BuildLogSpec, Redactor, SMALL, Writer};

/// How often a running build's new output is stored, at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// New output stored at once, at the latest (bytes).
pub const FLUSH_BYTES: usize = 64 << 10;

/// What to ship: one build pod.
#[derive(Clone, Debug)]
pub struct Shipment {
    /// The namespace.
    pub namespace: String,
    /// The pod (and the `BuildLog`'s name).
    pub pod: String,
    /// Its attempt.
    pub attempt: u32,
    /// The ImageBuild that asked.
    pub image_build: String,
}

/// The running shipments of this controller, one per pod.
#[derive(Default)]
pub struct Shipper {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Shipper {
    /// Starts shipping the pod's log unless that is already being done (or done).
    pub fn ensure(&self, client: kube::Client, what: Shipment, redactor: Redactor) {
        let key = format!("{}/{}", what.namespace, what.pod);
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|_, t| !t.is_finished());
        if tasks.contains_key(&key) {
            return;
        }
        tasks.insert(
            key,
            tokio::spawn(async move {
                if let Err(e) = ship(client, &what, &redactor).await {
                    tracing::warn!(pod = %what.pod, error = %crate::oci::error::chain(&e), "cannot ship the build log");
                }
            }),
        );
    }

    /// Whether the pod's log is being shipped now.
    pub fn is_shipping(&self, namespace: &str, pod: &str) -> bool {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.get(&format!("{namespace}/{pod}")).is_some_and(|t| !t.is_finished())
    }

    /// Waits (at most `patience`) until the pod's shipment ended, so a pod is deleted only after
    /// its output is stored.
    pub async fn shipped(&self, namespace: &str, pod: &str, patience: Duration) {
        let task = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).remove(&format!("{namespace}/{pod}"));
        if let Some(mut t) = task
            && tokio::time::timeout(patience, &mut t).await.is_err()
        {
            t.abort();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).values() {
            t.abort();
        }
    }
}

/// The containers whose output a build log holds, in the order they run: init containers that
/// run to completion (the clone), then the build. The proxy sidecar's access log is not the
/// build's output.
fn containers(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.unwrap_or_default().into_iter().filter(|c| c.restart_policy.is_none());
    inits.map(|c| c.name).chain(spec.containers.into_iter().map(|c| c.name)).collect()
}

async fn ship(client: kube::Client, what: &Shipment, redactor: &Redactor) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &what.namespace);
    let logs: Api<BuildLog> = Api::namespaced(client, &what.namespace);
    let Some(pod) = pods.get_opt(&what.pod).await? else { return Ok(()) };
    let stored = match logs.get_opt(&what.pod).await? {
        Some(log) if log.spec.complete => return Ok(()),
        Some(log) => log.spec.containers,
        None => {
            create(&logs, &pod, what).await?;
            Vec::new()
        }
    };
    for (i, name) in containers(&pod).iter().enumerate() {
        let resumed = stored.get(i).filter(|c| &c.name == name).cloned();
        let budget = if name == CONTAINER_BUILD { BUILD } else { SMALL };
        let mut writer = Writer::new(name, budget, resumed.clone());
        if resumed.is_none() {
            let entry = writer.flush().clone();
            patch(&logs, &what.pod, vec![json!({"op": "add", "path": "/spec/containers/-", "value": entry})])
                .await?;
        }
        let skip = resumed.map_or(0, |c| c.bytes as usize);
        follow(&pods, &logs, what, i, name, &mut writer, skip, redactor).await?;
    }
    patch(&logs, &what.pod, vec![json!({"op": "replace", "path": "/spec/complete", "value": true})]).await?;
    tracing::debug!(pod = %what.pod, "build log shipped");
    Ok(())
}

/// The `BuildLog`, owned by the ImageBuilds that own the pod: it outlives the pod and goes with
/// the last of them (and at the latest after the retention time).
async fn create(logs: &Api<BuildLog>, pod: &Pod, what: &Shipment) -> Result<(), kube::Error> {
    let mut log = BuildLog::new(
        &what.pod,
        BuildLogSpec {
            image_build: what.image_build.clone(),
            pod: what.pod.clone(),
            attempt: what.attempt as i32,
            containers: Vec::new(),
            complete: false,
        },
    );
    let owners = pod.owner_references().iter().filter(|o| o.kind == "ImageBuild").cloned();
    log.meta_mut().owner_references = Some(
        owners
            .map(|mut o| {
                o.controller = None;
                o
            })
            .collect(),
    );
    log.meta_mut().labels = pod.metadata.labels.clone();
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match logs.create(&params, &log).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        other => other.map(drop),
    }
}

async fn patch(logs: &Api<BuildLog>, name: &str, ops: Vec<serde_json::Value>) -> Result<(), kube::Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(kube::Error::SerdeError)?;
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    logs.patch(name, &params, &Patch::Json::<()>(patch)).await.map(drop)
}

/// Stores container `name`'s output (entry `index` of the log) until the container ends or the
/// pod is gone; `skip` bytes were stored before (a resumed shipment re-reads the output).
#[allow(clippy::too_many_arguments)]
async fn follow(
    pods: &Api<Pod>,
    logs: &Api<BuildLog>,
    what: &Shipment,
    index: usize,
    name: &str,
    writer: &mut Writer,
    mut skip: usize,
    redactor: &Redactor,
) -> Result<(), kube::Error> {
    let store = |writer: &mut Writer| {
        let entry = writer.flush().clone();
        let op = json!({"op": "replace", "path": format!("/spec/containers/{index}"), "value": entry});
        patch(logs, &what.pod, vec![op])
    };
    loop {
        let params = LogParams { container: Some(name.to_string()), follow: true, ..Default::default() };
        match pods.log_stream(&what.pod, &params).await {
            Ok(stream) => {
                let mut lines = stream.lines();
                let mut flushed = Instant::now();
                loop {
                    let next = tokio::time::timeout(FLUSH_EVERY, lines.try_next()).await;
                    let line = match next {
                        Ok(Ok(Some(line))) => line,
                        Ok(Ok(None)) | Ok(Err(_)) => break,
                        // Quiet: store what waits.
                        Err(_) => {
                            if writer.pending() > 0 {
                                store(writer).await?;
                                flushed = Instant::now();
                            }
                            continue;
                        }
                    };
                    if skip > 0 {
                        skip = skip.saturating_sub(line.len() + 1);
                        continue;
                    }
                    let (text, n) = redactor.apply(&line);
                    writer.redacted(n);
                    writer.line(&text);
                    if writer.pending() >= FLUSH_BYTES || flushed.elapsed() >= FLUSH_EVERY {
                        store(writer).await?;
                        flushed = Instant::now();
                    }
                }
                store(writer).await?;
                if ended(pods, &what.pod, name).await? {
                    return Ok(());
                }
                // The stream was cut before the container ended: read it again, past what is kept.
                skip = writer.flush().bytes as usize;
            }
            // The pod is gone: what was shipped is the log.
            Err(kube::Error::Api(e)) if e.code == 404 => return store(writer).await,
            // Not started yet (400 "waiting to start"), or the API hiccupped.
            Err(e) => {
                if ended(pods, &what.pod, name).await? {
                    return store(writer).await;
                }
                tracing::debug!(pod = %what.pod, container = name, error = %e, "build log not readable yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Whether container `name` has ended (or its pod is gone or being deleted).
async fn ended(pods: &Api<Pod>, pod: &str, name: &str) -> Result<bool, kube::Error> {
    let Some(p) = pods.get_opt(pod).await? else { return Ok(true) };
    let status = p.status.unwrap_or_default();
    let all =
        status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    let terminated =
        all.filter(|c| c.name == name).any(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()));
    let pod_over = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    Ok(terminated || pod_over || p.metadata.deletion_timestamp.is_some())
}

/// How often expired build logs are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Deletes build logs older than `retention` (in `namespace`, or all), now and every
/// `SWEEP_EVERY`; an ImageBuild's logs go with it anyway (they are owned by it).
pub async fn sweep(client: kube::Client, namespace: Option<String>, retention: Duration) {
    loop {
        if let Err(e) = sweep_once(&client, namespace.as_deref(), retention).await {
            tracing::warn!(error = %e, "cannot delete expired build logs");
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// One sweep; returns how many logs were deleted.
pub async fn sweep_once(
    client: &kube::Client,
    namespace: Option<&str>,
    retention: Duration,
) -> Result<usize, kube::Error> {
    let logs: Api<BuildLog> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut deleted = 0;
    for log in logs.list(&Default::default()).await?.items {
        let created = log.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let expired = created.is_some_and(|c| now.duration_since(c).unsigned_abs() > retention);
        let ns = log.namespace().unwrap_or_default();
        if expired {
            let api: Api<BuildLog> = Api::namespaced(client.clone(), &ns);
            let uid = log.uid().unwrap_or_default();
            super::act::delete_exact(&api, &log.name_any(), &uid, None).await?;
            deleted += 1;
            tracing::info!(buildlog = %log.name_any(), namespace = %ns, "deleted an expired build log");
        }
    }
    Ok(deleted)
}

/// The values a build's output must never carry: the registry credentials of its docker config
/// and its git password.
pub fn secret_values(docker_config: Option<&str>, git_password: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = git_password.map(str::to_string).into_iter().collect();
    let config: serde_json::Value =
        docker_config.and_then(|c| serde_json::from_str(c).ok()).unwrap_or_default();
    for entry in config["auths"].as_object().into_iter().flat_map(|m| m.values()) {
        for key in ["auth", "password", "identitytoken", "registrytoken"] {
            if let Some(v) = entry[key].as_str() {
                out.push(v.to_string());
            }
        }
        let decoded = entry["auth"].as_str().and_then(|a| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(a).ok()
        });
        if let Some(password) = decoded
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| d.split_once(':').map(|(_, p)| p.to_string()))
        {
            out.push(password);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secrets_of_a_docker_config_and_a_git_password_are_found() {
        let auth = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode("user:registry-pass-1")
        };
        let config = format!(
            r#"{{"auths":{{"reg.test":{{"auth":"{auth}"}},"b.test":{{"identitytoken":"refresh-xyz-1"}}}}}}"#
        );
        let mut got = secret_values(Some(&config), Some("git-pass-2"));
        got.sort();
        let mut want = vec![auth, "registry-pass-1".to_string(), "refresh-xyz-1".into(), "git-pass-2".into()];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn the_log_holds_the_run_to_completion_containers_in_order() {
        let pod: Pod = serde_json::from_value(json!({"spec": {
            "initContainers": [{"name": "clone"}, {"name": "proxy", "restartPolicy": "Always"}],
            "containers": [{"name": "build"}]}}))
        .unwrap();
        assert_eq!(containers(&pod), ["clone", "build"]);
    }
}
