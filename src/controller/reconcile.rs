//! One reconcile: look at what the decision needs (`cluster.rs`), decide once (`decide.rs`,
//! pure), act once (`cluster::act`: one status write by server-side apply, then the effects).

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::cluster::{Cluster, act};
use super::{Context, Error, engine};
use crate::crd::ImageBuild;

/// Reconciles one ImageBuild.
pub async fn reconcile(ib: Arc<ImageBuild>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let mut cluster = Cluster::new(&ctx, ns);
    let transition = engine::run(&ib, &ctx.settings, &mut cluster, Timestamp::now())
        .await
        .map_err(|e| Error::Stuck(e.need))?;
    act(&ib, &ctx, transition).await
}
