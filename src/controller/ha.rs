//! Leader election (kube-lease-manager on a `coordination.k8s.io` Lease): several replicas may
//! run, one reconciles. A replica that loses the lease stops reconciling (in-flight reconciles
//! finish first, so no build is left half-recorded) and exits for a restart as a standby.

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use super::StartError;

/// The Lease's name.
pub const LEASE: &str = "bob-controller";

/// The lease manager's task; awaiting it after the leadership channel is dropped releases the
/// Lease, so a standby takes over at once instead of after the lease duration.
pub type LeaseTask =
    tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>>;

/// Waits until this replica leads; returns the leadership channel to watch for its loss.
pub async fn lead(
    client: kube::Client,
    namespace: &str,
    identity: &str,
) -> Result<(watch::Receiver<bool>, LeaseTask), StartError> {
    let manager = LeaseManagerBuilder::new(client, LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        // A standby retries about once per lease duration: 15 s bounds a takeover.
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(StartError::Lease)?;
    let (mut leading, task) = manager.watch().await;
    tracing::info!(lease = LEASE, namespace, identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        leading.changed().await.map_err(|_| StartError::LeaseStopped)?;
    }
    tracing::info!(lease = LEASE, identity, "leading");
    Ok((leading, task))
}

/// Resolves when leadership is lost (or the lease manager stops).
pub async fn lost(mut leading: watch::Receiver<bool>) {
    while *leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            break;
        }
    }
    tracing::warn!(lease = LEASE, "lost leadership: finishing in-flight reconciles and stopping");
}
