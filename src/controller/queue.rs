//! The build queue (pure): at most `--max-concurrent-builds` build pods run cluster-wide; the
//! ImageBuilds waiting for a slot start first in, first out (creation time, then uid).

use crate::crd::{ImageBuild, Phase};

/// Whether an ImageBuild waits for a build slot: new or queued in its current generation, with
/// no pod yet. (Pending ones waiting for a Secret or a retry backoff do not hold places.)
pub fn is_waiting(ib: &ImageBuild) -> bool {
    let Some(s) = &ib.status else { return true };
    let current = s.observed_generation == ib.metadata.generation;
    match s.phase {
        None => true,
        Some(Phase::Queued) => true,
        Some(Phase::Pending) => s.reason.is_none(),
        // Building, Verifying or terminal: only a new generation needs a slot again.
        Some(_) => !current,
    }
}

/// The FIFO order: creation time, then uid.
fn order_key(ib: &ImageBuild) -> (Option<i64>, String) {
    let created = ib.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second());
    (created, ib.metadata.uid.clone().unwrap_or_default())
}

/// `None` when `me` may start a pod now; else its 1-based place in the queue.
pub fn position<'a>(
    me: &ImageBuild,
    all: impl IntoIterator<Item = &'a ImageBuild>,
    running: usize,
    max: usize,
) -> Option<usize> {
    let mine = order_key(me);
    let ahead = all
        .into_iter()
        .filter(|ib| ib.metadata.uid != me.metadata.uid && is_waiting(ib) && order_key(ib) < mine)
        .count();
    let free = max.saturating_sub(running);
    if ahead < free { None } else { Some(ahead - free + 1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ImageBuildStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ib(uid: &str, created: i64, phase: Option<Phase>) -> ImageBuild {
        let mut ib = ImageBuild::new("x", Default::default());
        ib.metadata.uid = Some(uid.into());
        ib.metadata.generation = Some(1);
        ib.metadata.creation_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap()));
        ib.status = phase.map(|p| ImageBuildStatus {
            phase: Some(p),
            observed_generation: Some(1),
            ..Default::default()
        });
        ib
    }

    #[test]
    fn builds_start_first_in_first_out_within_the_limit() {
        let all = [
            ib("a", 10, Some(Phase::Queued)),
            ib("b", 20, None),
            ib("c", 20, None),
            ib("d", 5, Some(Phase::Succeeded)),
        ];
        // Two slots, one taken: only the oldest waiting one starts.
        assert_eq!(position(&all[0], &all, 1, 2), None);
        assert_eq!(position(&all[1], &all, 1, 2), Some(1));
        assert_eq!(position(&all[2], &all, 1, 2), Some(2), "same second: uid breaks the tie");
        // Terminal ImageBuilds hold no place; a full cluster queues everyone.
        assert_eq!(position(&all[0], &all, 2, 2), Some(1));
    }

    #[test]
    fn only_new_and_queued_builds_wait_for_a_slot() {
        assert!(is_waiting(&ib("a", 1, None)) && is_waiting(&ib("a", 1, Some(Phase::Queued))));
        assert!(
            !is_waiting(&ib("a", 1, Some(Phase::Building))) && !is_waiting(&ib("a", 1, Some(Phase::Failed)))
        );
        let mut edited = ib("a", 1, Some(Phase::Succeeded));
        edited.metadata.generation = Some(2);
        assert!(is_waiting(&edited), "a new generation needs a slot again");
    }
}
