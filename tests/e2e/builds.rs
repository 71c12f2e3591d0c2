//! What scenarios do in their world: ImageBuild specs on the scenario's registry, creating them
//! with kubectl, watching them until a status holds, the pods, the registry's digests, the
//! controller's API calls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

use super::common::Direct;
use super::scenario::Scenario;

impl Scenario {
    /// The spec of an inline Dockerfile `FROM <busybox>` plus `steps`, with the Secret.
    pub fn dockerfile(&self, steps: &str) -> Value {
        json!({
            "source": {"dockerfile": {"inline": format!("FROM {}\n{steps}\n", self.from)}},
            "baseImageRepository": format!("{}/base", self.repos),
            "workspaceImageRepository": format!("{}/workspace", self.repos),
            "registryAuth": {"secretRef": {"name": "reg"}},
        })
    }

    /// The spec of an image source (the busybox base), with the Secret.
    pub fn image_source(&self) -> Value {
        json!({
            "source": {"image": {"ref": self.from}},
            "workspaceImageRepository": format!("{}/workspace", self.repos),
            "registryAuth": {"secretRef": {"name": "reg"}},
        })
    }

    /// `kubectl apply` of ImageBuilds (`(name, spec)`), in one request stream.
    pub async fn create(&self, builds: &[(&str, Value)]) {
        let stream: String = builds
            .iter()
            .map(|(name, spec)| {
                let ib = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
                                "metadata": {"name": name, "namespace": self.ns}, "spec": spec});
                format!("---\n{ib}\n")
            })
            .collect();
        self.kubectl.ok(&["apply", "-f", "-"], Some(&stream)).await;
    }

    pub(super) fn builds(&self) -> Api<DynamicObject> {
        self.builds_in(&self.ns)
    }

    fn builds_in(&self, ns: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("bob.dev", "v1alpha1", "ImageBuild");
        Api::namespaced_with(self.client.clone(), ns, &ApiResource::from_gvk(&gvk))
    }

    /// The ImageBuild as JSON, if it exists.
    pub async fn get(&self, name: &str) -> Option<Value> {
        self.builds().get_opt(name).await.unwrap().map(|o| serde_json::to_value(o).unwrap())
    }

    /// Watches the ImageBuild until `pred` holds for it (as JSON); returns it. Panics after
    /// `timeout`, naming `what`.
    pub async fn wait(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_in(&self.ns, name, what, timeout, pred).await
    }

    /// `wait` for an ImageBuild in namespace `ns`.
    pub async fn wait_in(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher(self.builds_in(ns), cfg).applied_objects().boxed();
        let last = Arc::new(Mutex::new(Value::Null));
        let seen = last.clone();
        let found = tokio::time::timeout(timeout, async move {
            while let Some(ev) = stream.next().await {
                let Ok(obj) = ev else { continue };
                let v = serde_json::to_value(obj).unwrap();
                *seen.lock().unwrap() = v.clone();
                if pred(&v) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            _ => panic!(
                "{name}: not {what} in {timeout:?}; last seen status: {:#}",
                last.lock().unwrap()["status"]
            ),
        }
    }

    /// Waits until the ImageBuild's phase is terminal; returns its status.
    pub async fn finished(&self, name: &str, timeout: Duration) -> Value {
        let terminal =
            |v: &Value| matches!(v["status"]["phase"].as_str(), Some("Succeeded" | "Failed" | "Cancelled"));
        self.wait(name, "finished", timeout, terminal).await["status"].clone()
    }

    /// Waits for `phase` with `reason`; returns the status.
    pub async fn reaches(&self, name: &str, phase: &str, reason: &str, timeout: Duration) -> Value {
        self.reaches_in(&self.ns, name, phase, reason, timeout).await
    }

    /// `reaches` for an ImageBuild in namespace `ns`.
    pub async fn reaches_in(
        &self,
        ns: &str,
        name: &str,
        phase: &str,
        reason: &str,
        timeout: Duration,
    ) -> Value {
        let what = format!("{phase} {reason}");
        let v = self
            .wait_in(ns, name, &what, timeout, |v| {
                v["status"]["reason"] == reason
                    || matches!(v["status"]["phase"].as_str(), Some("Succeeded" | "Failed" | "Cancelled"))
            })
            .await;
        let s = v["status"].clone();
        assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some(phase), Some(reason)), "{name}: {s:#}");
        s
    }

    /// The pods in the build namespace now.
    pub async fn pods_now(&self) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default()).await.unwrap().items
    }

    /// Waits until the build namespace has no pod.
    pub async fn no_pods_within(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pods = self.pods_now().await;
            if pods.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pods still there after {timeout:?}: {:?}",
                pods.iter().map(|p| p.metadata.name.clone().unwrap_or_default()).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The digest the registry serves for `reference` (`<registry>/<repo>:<tag>`).
    pub async fn registry_digest(&self, reference: &str) -> Option<String> {
        let path = reference
            .strip_prefix(&format!("{}/", self.registry_host))
            .expect("a ref in the scenario's registry");
        let (repo, tag) = path.rsplit_once(':').unwrap();
        Direct::new(&self.registry_host, Some(&self.creds)).manifest_digest(repo, tag).await
    }

    /// The controllers' API calls so far.
    pub fn calls(&self) -> Vec<super::counter::Call> {
        self.counter.as_ref().expect("the counter runs until the scenario ends").calls()
    }
}

impl Scenario {
    /// Waits until ImageBuild `name` builds and its build container printed `marker`; returns
    /// the pod.
    pub async fn printed(&self, name: &str, marker: &str) -> String {
        let v = self
            .wait(name, "Building", super::scenarios::BUILD, |v| v["status"]["phase"] == "Building")
            .await;
        let pod = v["status"]["podName"].as_str().unwrap().to_string();
        let what = format!("{name}: {marker:?} in the build container's log (the RUN step started)");
        poll(&what, super::scenarios::BUILD, || async {
            let log = self
                .kubectl
                .run(&["logs", &pod, "-c", "build", "-n", &self.ns], None)
                .await
                .unwrap_or_default();
            log.contains(marker).then_some(())
        })
        .await;
        pod
    }
}

/// Polls `f` every 200 ms until it gives something; panics after `timeout`, naming `what`.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
