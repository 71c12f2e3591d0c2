//! SIGTERM or SIGINT to `bob build` or `bob run` while a `RUN` step runs: the whole process tree
//! ends (buildah, the step's processes, the pod's containers), bob's temporary directories are
//! removed, and the exit is truthful — a `Cancelled` result or status, a non-zero exit and one
//! last line saying which signal stopped it. And a process a `RUN` step leaves running does not
//! outlive a build that succeeds.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::build::*;
use common::*;
use rustix::process::{Pid, Signal};

/// How long bob may take to end its tree and exit after the signal: its engine grace period
/// (10 s) and `bob run`'s container grace period (20 s) with room to spare.
const EXIT_BOUND: Duration = Duration::from_secs(60);

/// A `RUN` step whose `sleep` has a command line no other process has.
fn sleeping_step(n: u32) -> (String, String) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let marker = format!("sleep 300.{}{n}{}", std::process::id(), nanos % 1000);
    (format!("RUN echo step-started && {marker}"), marker)
}

/// Live processes (not zombies) whose command line contains `needle`, other than this one.
fn pids_with(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if pid != me && String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// The process ids under `root` (children, grandchildren, ...), with their start times.
fn tree(root: i32) -> Vec<(i32, String)> {
    let stat = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    // Fields after the `(comm)`: state, ppid, ..., starttime is the 20th.
    let fields = |s: &str| s[s.rfind(')').unwrap() + 2..].split(' ').map(String::from).collect::<Vec<_>>();
    let all: Vec<(i32, i32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let f = fields(&stat(pid)?);
            Some((pid, f[1].parse().ok()?, f[19].clone()))
        })
        .collect();
    let mut found = vec![root];
    let mut out = Vec::new();
    while let Some(parent) = found.pop() {
        for (pid, ppid, start) in &all {
            if *ppid == parent {
                found.push(*pid);
                out.push((*pid, start.clone()));
            }
        }
    }
    out
}

/// Whether the process `pid` started at `start` still runs (not a zombie).
fn alive(pid: i32, start: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
        f[19] == start && f[0] != "Z"
    })
}

/// The bob process under test; when dropped (also on a failed assertion) it, the processes that
/// were below it (`snapshot`) and every process carrying one of the needles (the step's marker,
/// the test's storage path) are killed.
struct Guarded {
    child: Child,
    needles: Vec<String>,
    below: Vec<(i32, String)>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let kill = |pid: i32| {
            let _ = rustix::process::kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL);
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.below.iter().filter(|(p, start)| alive(*p, start)).for_each(|(p, _)| kill(*p));
        self.needles.iter().flat_map(|n| pids_with(n)).for_each(kill);
    }
}

impl Guarded {
    fn spawn(mut cmd: Command, logs: &Path, needles: Vec<String>) -> Self {
        std::fs::create_dir_all(logs).unwrap();
        let out = std::fs::File::create(logs.join("stdout")).unwrap();
        let err = std::fs::File::create(logs.join("stderr")).unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Guarded { child: cmd.spawn().unwrap(), needles, below: Vec::new() }
    }

    /// Records the processes below bob now (to check, and to clean up, after it exits).
    fn snapshot(&mut self) -> Vec<(i32, String)> {
        self.below = tree(self.pid());
        self.below.clone()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until a process with `needle` in its command line runs (the `RUN` step started).
    fn wait_for(&mut self, needle: &str, logs: &Path) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while pids_with(needle).is_empty() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("bob exited with {status} before the step started:\n{}", log(logs, "stderr"));
            }
            assert!(Instant::now() < deadline, "the step did not start:\n{}", log(logs, "stderr"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` and waits (at most `EXIT_BOUND`) for bob to exit.
    fn stop(&mut self, signal: Signal, logs: &Path) -> std::process::ExitStatus {
        rustix::process::kill_process(Pid::from_raw(self.pid()).unwrap(), signal).unwrap();
        let deadline = Instant::now() + EXIT_BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bob still runs {EXIT_BOUND:?} after {signal:?}:\n{}",
                log(logs, "stderr")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

fn last_line(text: &str) -> String {
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default().to_string()
}

/// Nothing with `needle` in its command line runs any more (the tree was ended before bob exited;
/// a few seconds allow the kernel to finish tearing a killed process down).
fn gone(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids_with(needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "still running after bob exited: {needle:?} {:?}",
            pids_with(needle)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn empty_dir(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

fn name(signal: Signal) -> &'static str {
    if signal == Signal::TERM { "SIGTERM" } else { "SIGINT" }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_bob_build_ends_buildah_and_the_step_removes_its_files_and_says_cancelled() {
    let fx = Fixture::new().await;
    let pin = fx.pin();
    for (n, signal) in [(1, Signal::TERM), (2, Signal::INT)] {
        let (step, marker) = sleeping_step(n);
        let dockerfile = format!("FROM {}\n{step}\n", fx.from);
        let (base, ws) = fx.refs(&dockerfile);
        let proxy = fx.proxy(&base, &ws);
        let ctx = fx.context(&format!("stopped-{n}"), &dockerfile, &[]);
        let storage = fx.dir.path().join(format!("storage-{n}"));
        let tmp = fx.dir.path().join(format!("tmp-{n}"));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut cmd = bob_build_command(&proxy.addr, &ctx, &storage, &[("BOB_FROM_REFS", &pin)]);
        cmd.env("TMPDIR", &tmp);
        let logs = fx.dir.path().join(format!("logs-{n}"));
        let storage_needle = storage.display().to_string();
        let mut bob = Guarded::spawn(cmd, &logs, vec![marker.clone(), storage_needle.clone()]);
        bob.wait_for(&marker, &logs);
        assert!(!pids_with(&storage_needle).is_empty(), "buildah runs with the test's storage");
        let started = bob.snapshot();

        let status = bob.stop(signal, &logs);
        assert!(!status.success(), "a stopped build is not a success");
        gone(&marker);
        gone(&storage_needle);
        let left: Vec<_> = started.iter().filter(|(p, s)| alive(*p, s)).collect();
        assert!(left.is_empty(), "processes of the build left behind: {left:?}");
        empty_dir(&tmp);
        let r = last_result(log(&logs, "stdout").as_bytes(), &storage);
        assert_eq!(r.reason, Some(bob::reason::Reason::Cancelled), "{r:?}");
        let message = r.message.unwrap_or_default();
        assert!(message.contains(name(signal)), "{message:?} names the signal");
        let last = last_line(&log(&logs, "stderr"));
        assert!(last.starts_with("bob: build failed: Cancelled: "), "{last}");
        assert!(last.contains(name(signal)), "{last}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_bob_run_ends_its_containers_and_their_steps_and_removes_its_work_dir() {
    let fx = Fixture::new().await;
    for (n, signal) in [(3, Signal::INT), (4, Signal::TERM)] {
        let (step, marker) = sleeping_step(n);
        let source = format!("    dockerfile:\n      inline: |\n        FROM {}\n        {step}", fx.from);
        let file =
            write_file(fx.dir.path(), &format!("run-{n}.yaml"), &imagebuild_yaml(&fx, "stopped", &source));
        let tmp = fx.dir.path().join(format!("run-tmp-{n}"));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bob"));
        cmd.args(["run", "-f"]).arg(&file).env_clear();
        cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("HOME", fx.dir.path());
        cmd.env("TMPDIR", &tmp).env("RUST_LOG", "info");
        let logs = fx.dir.path().join(format!("run-logs-{n}"));
        let tmp_needle = tmp.display().to_string();
        let mut bob = Guarded::spawn(cmd, &logs, vec![marker.clone(), tmp_needle.clone()]);
        bob.wait_for(&marker, &logs);
        let started = bob.snapshot();
        let names: Vec<String> = started
            .iter()
            .filter_map(|(p, _)| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|c| c.trim().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "buildah"), "buildah runs under bob run: {names:?}");

        let status = bob.stop(signal, &logs);
        assert!(!status.success(), "a stopped run is not a success");
        gone(&marker);
        gone(&tmp_needle);
        let left: Vec<_> = started.iter().filter(|(p, s)| alive(*p, s)).collect();
        assert!(left.is_empty(), "processes of the run left behind: {left:?}");
        empty_dir(&tmp);
        let last = last_line(&log(&logs, "stderr"));
        assert!(last.starts_with("bob: run failed: Cancelled: ") && last.contains(name(signal)), "{last}");
        let doc: serde_json::Value = serde_saphyr::from_str(&log(&logs, "stdout")).unwrap();
        assert_eq!(doc["status"]["phase"], "Cancelled", "{doc:#}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_a_run_step_leaves_behind_does_not_outlive_a_finished_bob_build() {
    let fx = Fixture::new().await;
    let pin = fx.pin();
    let (_, marker) = sleeping_step(5);
    // The step starts a daemon in its own session and ends; the build succeeds.
    let dockerfile =
        format!("FROM {}\nRUN setsid {marker} > /dev/null 2>&1 < /dev/null & echo left-behind\n", fx.from);
    let (base, ws) = fx.refs(&dockerfile);
    let proxy = fx.proxy(&base, &ws);
    let ctx = fx.context("daemon", &dockerfile, &[]);
    let storage = fx.dir.path().join("storage-daemon");
    let cmd = bob_build_command(&proxy.addr, &ctx, &storage, &[("BOB_FROM_REFS", &pin)]);
    let logs = fx.dir.path().join("logs-daemon");
    let mut bob = Guarded::spawn(cmd, &logs, vec![marker.clone()]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = bob.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the build did not end:\n{}", log(&logs, "stderr"));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", log(&logs, "stderr"));
    assert!(log(&logs, "stdout").contains("left-behind"), "the step ran");
    gone(&marker);
}
