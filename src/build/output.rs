//! Runs an engine command the way a build log needs: stdin closed (a `RUN` step waiting for
//! input fails instead of hanging), stdout and stderr streamed line by line to bob's stdout as
//! they come, the last lines kept for the failure report, and a watchdog that kills the whole
//! process group when nothing is printed for too long.

use std::collections::VecDeque;
use std::io::Write;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Lines kept for the log tail.
pub const TAIL_LINES: usize = 40;
/// Longest line kept in the tail (the log itself gets the whole line).
const TAIL_LINE_BYTES: usize = 1000;
/// How buildah 1.28 says a step was not run: its layer came from local storage or from a
/// `--cache-from` repository (then after `--> Cache pulled from remote ...`; a pulled step older
/// than `--cache-ttl` is pulled but not used, and says nothing more).
pub const CACHE_HIT: &str = "--> Using cache ";

/// How a command ended.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status (after a watchdog kill: the kill's).
    pub status: ExitStatus,
    /// Whether the watchdog killed it.
    pub silent_for: Option<Duration>,
    /// The last lines it printed.
    pub tail: Vec<String>,
    /// The last `STEP n/m: ...` line, if the engine prints them.
    pub last_step: Option<String>,
    /// Steps the engine took from a cache instead of running them (buildah's `--> Using cache`).
    pub cache_hits: u32,
}

impl Finished {
    /// Whether the command succeeded.
    pub fn success(&self) -> bool {
        self.silent_for.is_none() && self.status.success()
    }

    /// The tail as one string.
    pub fn tail_text(&self) -> String {
        let mut s = self.tail.join("\n");
        s.push('\n');
        s
    }

    /// Killed by SIGKILL (the kernel's OOM killer, or the watchdog).
    pub fn killed(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal() == Some(9)
    }
}

/// Runs `cmd`, streaming its output to stdout; kills it after `watchdog` without output.
pub async fn run(mut cmd: Command, watchdog: Duration) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, so the watchdog also ends the RUN step's processes.
    cmd.process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let (tx, mut rx) = mpsc::channel::<String>(256);
    let readers = [
        child.stdout.take().map(|o| tokio::spawn(pump(o, tx.clone()))),
        child.stderr.take().map(|e| tokio::spawn(pump(e, tx.clone()))),
    ];
    drop(tx);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut last_step = None;
    let mut cache_hits = 0;
    let mut last_output = Instant::now();
    let mut silent_for = None;
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(line) => {
                    last_output = Instant::now();
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    if line.starts_with("STEP ") {
                        last_step = Some(line.clone());
                    }
                    if line.starts_with(CACHE_HIT) {
                        cache_hits += 1;
                    }
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(super::result::shorten(&line, TAIL_LINE_BYTES));
                }
                None => break,
            },
            _ = tokio::time::sleep_until(last_output + watchdog) => {
                silent_for = Some(watchdog);
                kill_group(&child);
                break;
            }
        }
    }
    let status = child.wait().await?;
    for r in readers.into_iter().flatten() {
        r.abort();
    }
    Ok(Finished { status, silent_for, tail: tail.into(), last_step, cache_hits })
}

fn kill_group(child: &tokio::process::Child) {
    let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) else { return };
    if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
        tracing::warn!(error = %e, "cannot kill the engine's process group");
    }
}

/// Sends each line of `r` (lossy UTF-8, `\r` progress redraws split too) to `tx`.
async fn pump(r: impl AsyncRead + Unpin, tx: mpsc::Sender<String>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                for part in text.trim_end_matches(['\n', '\r']).split('\r') {
                    if tx.send(part.to_string()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_kept_and_steps_are_tracked() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'STEP 1/2: FROM x'; echo oops >&2; echo 'STEP 2/2: RUN y'; exit 3"]);
        let f = run(c, Duration::from_secs(30)).await.unwrap();
        assert_eq!(f.status.code(), Some(3));
        assert!(!f.success() && f.silent_for.is_none());
        assert_eq!(f.last_step.as_deref(), Some("STEP 2/2: RUN y"));
        assert!(f.tail.contains(&"oops".to_string()) && f.tail.len() == 3);
    }

    #[tokio::test]
    async fn cache_hits_are_counted() {
        let mut c = Command::new("sh");
        // buildah 1.28's lines: a step from the remote cache, one from local storage, one run.
        c.arg("-c").arg(
            "echo 'STEP 2/4: RUN a'; echo '--> Cache pulled from remote r/cache:0a'; \
             echo '--> Using cache 0dbf20f03e8006e9'; echo 'STEP 3/4: COPY b /b'; \
             echo '--> Using cache 95064123f0064baf'; echo 'STEP 4/4: RUN c'; echo '--> 6d6387ba6f5'",
        );
        let f = run(c, Duration::from_secs(30)).await.unwrap();
        assert_eq!(f.cache_hits, 2);
    }

    #[tokio::test]
    async fn stdin_is_closed() {
        let mut c = Command::new("sh");
        c.args(["-c", "read x; echo \"read=$?\""]);
        let f = run(c, Duration::from_secs(30)).await.unwrap();
        assert_eq!(f.tail, ["read=1"], "read sees end of input instead of waiting");
    }

    #[tokio::test]
    async fn the_watchdog_kills_a_silent_process_group() {
        let mut c = Command::new("sh");
        // The child `sleep` must die too, or it would hold the pipes open.
        c.args(["-c", "echo started; sleep 60; echo never"]);
        let f = run(c, Duration::from_millis(300)).await.unwrap();
        assert_eq!(f.silent_for, Some(Duration::from_millis(300)));
        assert!(f.killed() && f.tail == ["started"], "killed before `echo never`: {f:?}");
    }
}
