//! One reconcile: look at what the decision needs (`observe.rs`, reads only), decide
//! (`decide.rs`, pure), act once (`act.rs`: the build pod's create when the decision asks for
//! it, then the transition — its effects and one status write by server-side apply).

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::act::act;
use super::observe::Cluster;
use super::{Context, Error, engine};
use crate::crd::ImageBuild;

/// Reconciles one ImageBuild.
pub async fn reconcile(ib: Arc<ImageBuild>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let mut cluster = Cluster::new(&ctx, ns);
    let transition = engine::run(&ib, &ctx.settings, &mut cluster, Timestamp::now())
        .await
        .map_err(|e| Error::Stuck(e.need))?;
    act(&ib, &cluster, transition).await
}
