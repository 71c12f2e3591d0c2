//! A long-running child process of a scenario (kube-sim, a controller replica, `kubectl proxy`)
//! with its output in a log file: readiness by a line in the log, signals by name, and a stop
//! on drop — SIGTERM first, so kube-sim can kill the processes of its pods, then SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// A child process whose stdout and stderr go to `log`.
pub struct Daemon {
    /// What it is, for messages.
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `cmd` with its output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Daemon { name: name.to_string(), log: log.to_path_buf(), child, exited: None }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it wrote so far.
    pub fn output(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Its last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a line contains `needle`; panics with the log when it exits or time runs out.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Some(status) = self.try_wait() {
                panic!("{} exited ({status}) before logging {needle:?}:\n{}", self.name, self.tail(40));
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} in {timeout:?}:\n{}",
                self.name,
                self.tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (no-op once it exited).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_wait().is_none() {
            let pid = Pid::from_raw(self.pid() as i32).expect("a child pid");
            let _ = kill_process(pid, signal);
        }
    }

    /// Its exit status, if it exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.signal(Signal::TERM);
        if self.wait_exit(grace).is_none() {
            self.signal(Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}
