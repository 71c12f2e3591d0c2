//! Decisions the controller makes (pure but for the clock): retry an infrastructure failure on a
//! new pod or fail for good, when a finished pod may be deleted (its evidence is in every owner's
//! status and no owner still follows it), and when a wait has outlasted the queue time limit.

use std::time::Duration;

use super::plan::{Invalid, time_limits};
use crate::crd::{ImageBuild, ImageBuildStatus};
use crate::reason::Reason;

/// Retry and cleanup settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Build pods per generation at most (1 = no retries).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles per attempt, at most 5 minutes.
    pub retry_backoff: Duration,
    /// Keep finished build pods (for debugging) instead of deleting them.
    pub keep_finished_pods: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self { max_attempts: 3, retry_backoff: Duration::from_secs(10), keep_finished_pods: false }
    }
}

/// What to do after attempt `attempts` failed for `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Start attempt `attempt` after waiting `after`.
    Retry {
        /// The next attempt's number.
        attempt: u32,
        /// How long to wait first.
        after: Duration,
    },
    /// The failure is final.
    Fail,
}

impl Policy {
    /// Retries infrastructure failures with exponential backoff; user failures never.
    pub fn after_failure(&self, reason: Reason, attempts: u32) -> AfterFailure {
        if !reason.is_retryable() || attempts >= self.max_attempts {
            return AfterFailure::Fail;
        }
        AfterFailure::Retry { attempt: attempts + 1, after: self.backoff(attempts) }
    }

    /// The wait after attempt `attempts` failed.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1));
        (self.retry_backoff.saturating_mul(factor)).min(Duration::from_secs(300))
    }
}

/// Whether an owner of `pod` no longer needs it: it follows another pod (or none), or it is
/// terminal for its generation.
pub fn owner_done(status: Option<&ImageBuildStatus>, generation: Option<i64>, pod: &str) -> bool {
    let Some(s) = status else { return false };
    let terminal = s.phase.is_some_and(|p| p.is_terminal()) && s.observed_generation == generation;
    match s.pod_name.as_deref() {
        _ if terminal => true,
        Some(other) => other != pod,
        // No pod recorded: done only when it waits for a retry on a new pod. Otherwise it may
        // have made or joined this one and lost the status write that says so.
        None => s.next_attempt_at.is_some(),
    }
}

/// The ImageBuild's queue time limit: `spec.timeouts.queue`, else the installation's default. A
/// value that is not a positive duration is an invalid spec, never replaced by the default (a
/// wait can end before the spec is planned, e.g. while its Secret is missing).
pub fn queue_limit(ib: &ImageBuild, default_limit: Duration) -> Result<Duration, Invalid> {
    Ok(time_limits(ib)?.queue.unwrap_or(default_limit))
}

/// How long a waiting ImageBuild (missing Secret, registry down, no quota) waits before the next
/// look, after waiting `waited` so far: half of that, between 5 s and 1 minute — quick while a
/// fix is likely on its way, and at most one look a minute for a wait that lasts.
pub fn wait_backoff(waited: Duration) -> Duration {
    (waited / 2).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Phase;

    #[test]
    fn infrastructure_failures_are_retried_with_backoff_up_to_the_limit() {
        let p = Policy::default();
        assert_eq!(
            p.after_failure(Reason::PodEvicted, 1),
            AfterFailure::Retry { attempt: 2, after: Duration::from_secs(10) }
        );
        assert_eq!(
            p.after_failure(Reason::RegistryUnavailable, 2),
            AfterFailure::Retry { attempt: 3, after: Duration::from_secs(20) }
        );
        assert_eq!(
            p.after_failure(Reason::PodEvicted, 3),
            AfterFailure::Fail,
            "the third attempt was the last"
        );
        assert_eq!(
            p.after_failure(Reason::BuildStepFailed, 1),
            AfterFailure::Fail,
            "user failures are never retried"
        );
        assert_eq!(p.backoff(20), Duration::from_secs(300), "capped");
    }

    #[test]
    fn a_pod_is_done_for_an_owner_that_is_terminal_or_follows_another_pod() {
        let s = |phase, pod: Option<&str>, generation| ImageBuildStatus {
            phase: Some(phase),
            pod_name: pod.map(String::from),
            observed_generation: generation,
            ..Default::default()
        };
        assert!(owner_done(Some(&s(Phase::Succeeded, Some("p1"), Some(1))), Some(1), "p1"));
        assert!(!owner_done(Some(&s(Phase::Building, Some("p1"), Some(1))), Some(1), "p1"));
        assert!(
            owner_done(Some(&s(Phase::Building, Some("p2"), Some(1))), Some(1), "p1"),
            "moved to a retry"
        );
        assert!(
            !owner_done(Some(&s(Phase::Succeeded, Some("p1"), Some(1))), Some(2), "p1"),
            "edited: not final yet"
        );
        assert!(!owner_done(None, Some(1), "p1"), "no status yet: it may still need the pod");
        let mut unrecorded = s(Phase::Pending, None, Some(1));
        assert!(!owner_done(Some(&unrecorded), Some(1), "p1"), "its create's status write may be lost");
        let now = k8s_openapi::jiff::Timestamp::now();
        unrecorded.next_attempt_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        assert!(owner_done(Some(&unrecorded), Some(1), "p1"), "waits for a retry on a new pod");
    }
}
