//! The processes below `bob build` and `bob run`, and how they end. Both commands turn SIGTERM
//! and SIGINT into a cancellation (`StopSignals`), adopt the orphans of what they start (child
//! subreaper: a `RUN` step that daemonizes stays below bob instead of moving to init), and end
//! every process below them before they exit, on every path (`end_descendants`): SIGTERM to the
//! direct children — each ends its own tree, as buildah ends its `RUN` step — then, after a grace
//! period, SIGKILL to whatever is left. The tree is read from `/proc`, so nothing escapes it by
//! changing its process group or session.
//!
//! These functions act on the whole process: only a command's entry point calls them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

/// How often the tree is read while waiting for it to end.
const POLL: Duration = Duration::from_millis(50);
/// How long SIGKILLed processes get to disappear before bob gives up on them (and says so).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// SIGTERM and SIGINT, caught from the moment `install` returns.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Catches SIGTERM and SIGINT from now on (their default action, ending bob at once and
    /// leaving its children running, no longer applies).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for the first of them; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// How a supervised piece of work ended.
#[derive(Debug)]
pub struct Supervised<T> {
    /// What the work returned; `None` when a stop signal ended it first.
    pub value: Option<T>,
    /// The stop signal that arrived (`"SIGTERM"`, `"SIGINT"`), if one did.
    pub signal: Option<&'static str>,
}

/// Runs `work` as a command's whole job: orphans are adopted, and on SIGTERM or SIGINT the tree
/// below bob is ended (`end_descendants(grace)`) while `work` is still polled — a step waiting on
/// a child sees it end — then `work` is dropped (its temporary files go with it, nothing uses
/// them any more). On every path the tree below bob has ended when this returns.
pub async fn supervise<T>(grace: Duration, work: impl Future<Output = T>) -> Supervised<T> {
    adopt_orphans();
    let mut signals = match StopSignals::install() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot catch SIGTERM and SIGINT");
            None
        }
    };
    let mut signal = None;
    let value = {
        let stopping = async {
            match signals.as_mut() {
                Some(s) => signal = Some(s.recv().await),
                None => std::future::pending().await,
            }
            tracing::warn!("{} received: stopping", signal.unwrap_or_default());
            end_descendants(grace).await;
        };
        tokio::select! {
            value = work => Some(value),
            () = stopping => None,
        }
    };
    end_descendants(grace).await;
    Supervised { value, signal }
}

/// Makes bob the child subreaper of its tree: orphans of its descendants are re-parented to bob,
/// so `end_descendants` still finds them.
pub fn adopt_orphans() {
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::warn!(error = %e, "cannot become the child subreaper; orphaned processes may outlive bob");
    }
}

/// One process as `/proc/<pid>/stat` tells it.
struct Entry {
    parent: i32,
    zombie: bool,
}

/// Every process's parent and state.
fn table() -> BTreeMap<i32, Entry> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return BTreeMap::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            let mut rest = stat.get(stat.rfind(')')? + 2..)?.split(' ');
            let state = rest.next()?;
            let parent = rest.next()?.parse().ok()?;
            Some((pid, Entry { parent, zombie: state == "Z" || state == "X" }))
        })
        .collect()
}

/// The live processes below `root` (children, their children, ...); zombies are already gone.
fn below(root: i32, table: &BTreeMap<i32, Entry>) -> (Vec<i32>, Vec<i32>) {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for (pid, e) in table {
        children.entry(e.parent).or_default().push(*pid);
    }
    let (mut direct, mut all) = (Vec::new(), Vec::new());
    let mut todo = vec![root];
    let mut seen = BTreeSet::new();
    while let Some(parent) = todo.pop() {
        for &pid in children.get(&parent).into_iter().flatten() {
            if !seen.insert(pid) {
                continue;
            }
            todo.push(pid);
            if !table[&pid].zombie {
                all.push(pid);
                if parent == root {
                    direct.push(pid);
                }
            }
        }
    }
    (direct, all)
}

fn send(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        // The process may have ended since the tree was read; that is what we want anyway.
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Ends every process below bob: SIGTERM to each direct child (again to any that appears), up to
/// `grace` for the whole tree to end, then SIGKILL to everything left until nothing is. Returns
/// at once when there is nothing below bob.
pub async fn end_descendants(grace: Duration) {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let deadline = Instant::now() + grace;
    let mut termed = BTreeSet::new();
    loop {
        let (direct, all) = below(me, &table());
        if all.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(processes = ?all, "still running after {grace:?}: killing them");
            break;
        }
        for pid in direct.into_iter().filter(|p| termed.insert(*p)) {
            send(pid, Signal::TERM);
        }
        tokio::time::sleep(POLL).await;
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let (_, all) = below(me, &table());
        if all.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::error!(processes = ?all, "processes survived SIGKILL (uninterruptible?)");
            return;
        }
        for &pid in &all {
            send(pid, Signal::KILL);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(parent: i32, zombie: bool) -> Entry {
        Entry { parent, zombie }
    }

    #[test]
    fn the_tree_below_a_process_skips_zombies_but_not_their_children() {
        let table = BTreeMap::from([
            (1, entry(0, false)),
            (10, entry(1, false)),
            (11, entry(10, false)),
            (12, entry(11, false)),
            (13, entry(10, true)),
            (14, entry(13, false)), // cannot happen for long, but must not hide a live process
            (20, entry(1, false)),
        ]);
        let (direct, mut all) = below(10, &table);
        all.sort();
        assert_eq!((direct, all), (vec![11], vec![11, 12, 14]));
        let (direct, all) = below(12, &table);
        assert!(direct.is_empty() && all.is_empty());
    }

    #[test]
    fn this_process_is_found_below_its_parent() {
        let me = std::process::id() as i32;
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        let (direct, _) = below(parent, &table());
        assert!(direct.contains(&me));
    }
}
