//! `bob run`'s world: what the controller's decision asks to see, looked up on this machine —
//! the Secrets in the file (or the local docker config), the registry, and the build pod run as
//! local processes instead of created in a cluster. The decisions are the controller's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

use super::input::Input;
use super::pod;
use crate::controller::access::{self, Named};
use crate::controller::decide::{Access, Created, Failure, Need, Observed};
use crate::controller::engine::World;
use crate::controller::resolve::{self, GitAuth};
use crate::crd::ImageBuild;
use crate::oci::CredentialStore;
use crate::oci::client::Client;
use crate::reason::Reason;

/// The local machine as one `bob run` sees it.
pub struct Laptop<'a> {
    input: &'a Input,
    /// The docker config of the registry Secret, or of the local fallback.
    docker_config: Result<String, Failure>,
    insecure: &'a [String],
    work: &'a Path,
    bob: PathBuf,
    client: Option<Client>,
    git: Option<GitAuth>,
    /// Pods that ran, by name, with the status they ended in.
    pods: BTreeMap<String, Pod>,
}

impl<'a> Laptop<'a> {
    /// The world of a run of `input` in `work`; `docker_config` is the registry credentials
    /// (`Err` when the file's registry Secret cannot be used), `bob` the binary of the pod.
    pub fn new(
        input: &'a Input,
        docker_config: Result<String, Failure>,
        insecure: &'a [String],
        work: &'a Path,
        bob: PathBuf,
    ) -> Self {
        Self { input, docker_config, insecure, work, bob, client: None, git: None, pods: BTreeMap::new() }
    }

    fn credentials(&mut self, ib: &ImageBuild) -> Result<(), Failure> {
        let json = self.docker_config.clone()?;
        let creds = CredentialStore::inline(&json).map_err(|e| {
            Failure::new(
                Reason::SecretInvalid,
                format!("the registry credentials are not a docker config: {e}"),
            )
        })?;
        let timeout = std::time::Duration::from_secs(120);
        let client = Client::connect(creds, self.insecure, timeout, None)
            .map_err(|e| Failure::new(Reason::Internal, crate::oci::error::chain(&e)))?;
        self.client = Some(client);
        // The controller's mapping from Secrets to reasons, for the Secrets in the file.
        if let Some(name) = Named::of(ib).git {
            let place = format!("Secret {name} (in the file)");
            self.git = Some(access::git(&place, self.input.secrets.get(&name))?);
        }
        Ok(())
    }

    async fn lookup(&self, r: &crate::oci::Reference) -> crate::controller::decide::Lookup {
        match &self.client {
            Some(client) => resolve::lookup(client, r).await,
            None => Err(Failure::new(Reason::Internal, "no registry client")),
        }
    }

    /// The Secrets the pod mounts: the file's, and the registry credentials under the registry
    /// Secret's name when the file has no such Secret.
    fn secrets(&self, ib: &ImageBuild) -> pod::Secrets {
        let mut secrets = self.input.secrets.clone();
        if let (Some(auth), Ok(json)) = (&ib.spec.registry_auth, &self.docker_config) {
            secrets
                .entry(auth.secret_ref.name.clone())
                .or_insert_with(|| BTreeMap::from([(".dockerconfigjson".into(), json.clone())]));
        }
        secrets
    }
}

impl World for Laptop<'_> {
    async fn observe(&mut self, ib: &ImageBuild, need: Need, seen: &mut Observed) {
        match need {
            Need::Credentials => seen.credentials = Some(self.credentials(ib).map(|()| Access::FromSpec)),
            Need::Resolve => {
                let source = self.work.join("source");
                let result = match (&self.client, std::fs::create_dir_all(&source)) {
                    (Some(client), Ok(())) => resolve::resolve(ib, client, self.git.as_ref(), &source).await,
                    (_, Err(e)) => Err(Failure::new(
                        Reason::Internal,
                        format!("cannot create {}: {e}", source.display()),
                    )),
                    (None, _) => Err(Failure::new(Reason::Internal, "no registry client")),
                };
                seen.resolved = Some(result);
            }
            Need::Cache(r) => seen.cache = Some(self.lookup(&r).await),
            Need::Verify(r) => seen.verified = Some(self.lookup(&r).await),
            // Nothing else builds on this machine: there is always a slot.
            Need::Slots => {
                seen.slots = Some(crate::controller::decide::Slots { position: None, running: 0, max: 1 })
            }
            Need::Pod(name) => seen.pod = Some(self.pods.get(&name).cloned()),
            // Nothing to cancel on this machine but the run itself (a signal).
            Need::LogTail(_) => seen.log_tail = Some(None),
        }
    }

    async fn attempt(&mut self, ib: &ImageBuild, planned: Pod, seen: &mut Observed) {
        let name = planned.metadata.name.clone().unwrap_or_default();
        tracing::info!(pod = %name, "running the build pod's containers");
        seen.created = Some(match pod::run(&planned, &self.secrets(ib), &self.bob, self.work).await {
            Ok(status) => {
                let ran = Pod { status: Some(status), ..planned };
                self.pods.insert(name, ran.clone());
                Created::New(Box::new(ran))
            }
            Err(e) => Created::Refused { code: 500, message: crate::oci::error::chain(&e) },
        });
    }
}
