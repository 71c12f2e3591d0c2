//! Leader election (kube-lease-manager on a `coordination.k8s.io` Lease): several replicas may
//! run, one reconciles. A replica that loses the lease, or cannot renew it in time, stops
//! reconciling (in-flight reconciles finish first, so no build is left half-recorded) and exits
//! for a restart as a standby.
//!
//! kube-lease-manager's channel turns false only once it has *read* the Lease held by another
//! replica: while its renewals fail, and its reads too, it stays true after the Lease expired and
//! a standby took it. So bob keeps the instant of its own last successful renewal (seen on the
//! lease client's requests, `renewal.rs`) in a [`Leadership`], and acts only while the Lease
//! cannot have passed to another replica.

mod renewal;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::time::Instant;

pub use renewal::RenewalLayer;

use super::StartError;
use crate::kubeclient::{self, Agent, Observer};

/// The Lease's name.
pub const LEASE: &str = "bob-controller";

/// The Lease's duration: a standby may take it this long after the holder's last renewal (by
/// the standby's clock). A standby also retries about once per duration, which bounds a takeover.
pub const DURATION: Duration = Duration::from_secs(15);

/// How long before the Lease expires the holder renews it: 10 s, so renewals happen 5 s after
/// each other and a failed one has 5 s (the lease manager's 1–2 s and 2–4 s backoffs, each
/// round up to six tries of the client) before [`MARGIN`] makes the replica stop.
pub const GRACE: Duration = Duration::from_secs(10);

/// How long before the Lease could pass to another replica this one stops acting: 5 s, as
/// client-go's leader election (15 s lease, 10 s renew deadline). It covers a write that was
/// checked just before the deadline and is still retried by the client (at most
/// `kubeclient::Policy::budget`, 3.5 s) and its last try in flight, and the skew between this
/// node's clock and the standby's, which judges the expiry by its own clock (NTP keeps nodes
/// within milliseconds; the rest of the 5 s, about 1 s, is left for it).
pub const MARGIN: Duration = Duration::from_secs(5);

/// The lease manager's task; awaiting it after the leadership channel is dropped releases the
/// Lease, so a standby takes over at once instead of after the lease duration.
pub type LeaseTask =
    tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>>;

/// Whether this replica may still act as the leader: true from its first renewal (or
/// acquisition) of the Lease until `window` after the last successful one; once it has turned
/// false it stays false (the controller stops), even if a late renewal succeeds.
#[derive(Clone, Debug)]
pub struct Leadership {
    renewed: Arc<watch::Sender<Option<Instant>>>,
    lapsed: Arc<AtomicBool>,
    window: Duration,
}

impl Leadership {
    /// A leadership that lasts `window` after each renewal (bob: [`DURATION`] - [`MARGIN`]).
    pub fn new(window: Duration) -> Self {
        Self { renewed: Arc::new(watch::channel(None).0), lapsed: Arc::default(), window }
    }

    /// Records a successful renewal whose request was sent at `at` (no later than the
    /// `renewTime` it wrote, so the window never outlasts the Lease).
    pub fn renewed(&self, at: Instant) {
        self.renewed.send_modify(|r| *r = Some(r.map_or(at, |last| last.max(at))));
    }

    /// When acting stops unless the Lease is renewed again (`None`: never renewed).
    pub fn deadline(&self) -> Option<Instant> {
        self.renewed.borrow().map(|at| at + self.window)
    }

    /// Whether this replica may write now: it renewed the Lease less than `window` ago. Cheap
    /// (a lock-free read and the clock), so it is checked before every write.
    pub fn may_act(&self) -> bool {
        if self.lapsed.load(Ordering::Acquire) {
            return false;
        }
        match self.deadline() {
            Some(deadline) if Instant::now() < deadline => true,
            Some(_) => {
                self.lapsed.store(true, Ordering::Release);
                false
            }
            None => false,
        }
    }

    /// Resolves once the first renewal was recorded.
    pub async fn established(&self) {
        let mut rx = self.renewed.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Resolves when acting stops: `window` after the last renewal recorded before then.
    pub async fn lapsed(&self) {
        loop {
            match self.deadline() {
                None => self.established().await,
                Some(_) if !self.may_act() => return,
                Some(deadline) => tokio::time::sleep_until(deadline).await,
            }
        }
    }
}

/// Why a write was not sent: this replica may no longer act as the leader.
#[derive(Debug, thiserror::Error)]
#[error("this replica no longer holds the leader lease for sure")]
pub struct NotLeading;

impl From<NotLeading> for kube::Error {
    /// A write refused before it was sent reads to its caller as a failed request.
    fn from(e: NotLeading) -> Self {
        kube::Error::Service(Box::new(e))
    }
}

/// Waits until this replica leads and has renewed the Lease itself; returns the leadership
/// channel to watch for its loss. The lease manager gets a client of its own (User-Agent
/// [`Agent::Lease`]) whose successful renewals are recorded in `leadership`.
pub async fn lead(
    config: kube::Config,
    namespace: &str,
    identity: &str,
    leadership: &Leadership,
    observer: Option<Observer>,
) -> Result<(watch::Receiver<bool>, LeaseTask), StartError> {
    let renewals = RenewalLayer::new(leadership.clone(), namespace, LEASE, identity);
    let client = kubeclient::builder(config, Agent::Lease, observer)
        .map_err(StartError::Client)?
        .with_layer(&renewals)
        .build();
    let manager = LeaseManagerBuilder::new(client, LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(DURATION.as_secs())
        .with_grace(GRACE.as_secs())
        .build()
        .await
        .map_err(StartError::Lease)?;
    let (mut leading, task) = manager.watch().await;
    tracing::info!(lease = LEASE, namespace, identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        leading.changed().await.map_err(|_| StartError::LeaseStopped)?;
    }
    // The manager also says "leading" for a Lease still held under this identity by an earlier
    // run of this pod, before renewing it: act only from a renewal of this process's own.
    leadership.established().await;
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

/// Resolves when the Lease could not be renewed in time (see [`MARGIN`]).
pub async fn unrenewed(leadership: Leadership) {
    leadership.lapsed().await;
    tracing::warn!(
        lease = LEASE,
        "leader lease not renewed in time: finishing in-flight reconciles and stopping"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn acts_only_from_the_first_renewal_until_the_window_after_the_last() {
        let l = Leadership::new(WINDOW);
        assert!(!l.may_act(), "no renewal yet");
        let t0 = Instant::now();
        l.renewed(t0);
        assert!(l.may_act());
        tokio::time::advance(Duration::from_secs(6)).await;
        l.renewed(Instant::now());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(l.may_act(), "9.999 s after the second renewal");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!l.may_act(), "10 s after the second renewal");
        assert_eq!(l.deadline(), Some(t0 + Duration::from_secs(16)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_renewal_does_not_bring_it_back_and_an_older_one_does_not_shorten_it() {
        let l = Leadership::new(WINDOW);
        let t0 = Instant::now();
        l.renewed(t0 + Duration::from_secs(2));
        l.renewed(t0);
        assert_eq!(l.deadline(), Some(t0 + Duration::from_secs(12)));
        tokio::time::advance(Duration::from_secs(12)).await;
        assert!(!l.may_act());
        l.renewed(Instant::now());
        assert!(!l.may_act(), "lapsed for good");
    }

    #[tokio::test(start_paused = true)]
    async fn lapsed_resolves_at_the_deadline_of_the_last_renewal() {
        let l = Leadership::new(WINDOW);
        let t0 = Instant::now();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move {
                l.lapsed().await;
                Instant::now()
            }
        });
        tokio::time::advance(Duration::from_secs(3)).await;
        l.renewed(Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        l.renewed(Instant::now());
        let at = waiter.await.unwrap();
        assert_eq!(at, t0 + Duration::from_secs(18));
        assert!(!l.may_act());
    }
}
