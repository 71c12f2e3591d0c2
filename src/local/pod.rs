//! Runs a planned Pod's containers as local processes, the way kubelet would order them: init
//! containers to completion, native sidecars started and probed, then the main container. Volumes
//! become directories (emptyDir, Secret items, downward-API annotations) and each container's
//! mount paths are rewritten to them in its arguments and environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodStatus,
};
use tokio::process::{Child, Command};

/// Why the pod could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory or file could not be written.
    #[error("cannot prepare {what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Secret the pod needs is not available locally.
    #[error("Secret {name:?} (key {key:?}) is needed but not in the file; add it to the file")]
    MissingSecret {
        /// The Secret.
        name: String,
        /// The key.
        key: String,
    },
}

/// Secret data by Secret name.
pub type Secrets = BTreeMap<String, BTreeMap<String, String>>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs `pod` with its volumes under `work`; `bob` is the binary that stands in for the image's.
/// Returns the pod's status as a kubelet would report it — each container's exit code and
/// termination message (the file, or the log tail for `FallbackToLogsOnError`) — so the
/// controller's own reading of a pod (`status::observe`) says how the build ended.
pub async fn run(pod: &Pod, secrets: &Secrets, bob: &Path, work: &Path) -> Result<PodStatus, Error> {
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes = prepare_volumes(pod, secrets, work)?;
    let mut sidecars: Vec<Child> = Vec::new();
    let mut inits = Vec::new();
    let result = async {
        for c in spec.init_containers.iter().flatten() {
            let cmd = command(c, &volumes, secrets, bob, work)?;
            if c.restart_policy.as_deref() == Some("Always") {
                let log = std::fs::File::create(log_path(work, c)).map_err(io("a log file"))?;
                let mut cmd = cmd;
                cmd.stdout(Stdio::null()).stderr(log).kill_on_drop(true);
                sidecars.push(cmd.spawn().map_err(io(format!("container {}", c.name)))?);
                let child = sidecars.last_mut().expect("pushed");
                if let Err(why) = startup(c, &volumes, secrets, bob, work, child).await? {
                    tracing::warn!(container = %c.name, "{why}");
                    inits.push(crashing(c, &log_tail(work, c)));
                    return Ok(finished("Failed", inits, Vec::new()));
                }
                inits.push(state(
                    c,
                    ContainerState { running: Some(Default::default()), ..Default::default() },
                ));
            } else {
                let ended = run_to_end(cmd, Some(&log_path(work, c))).await;
                let message = termination_message(work, c, ended.exit_code != 0);
                inits.push(terminated(c, ended, message));
                if inits.last().is_some_and(failed) {
                    return Ok(finished("Failed", inits, Vec::new()));
                }
            }
        }
        let main = spec.containers.first().expect("a pod has a container");
        let ended = run_to_end(command(main, &volumes, secrets, bob, work)?, None).await;
        let message = termination_message(work, main, ended.exit_code != 0);
        let phase = if ended.exit_code == 0 { "Succeeded" } else { "Failed" };
        Ok(finished(phase, inits, vec![terminated(main, ended, message)]))
    }
    .await;
    for mut s in sidecars {
        stop(&mut s).await;
    }
    result
}

fn finished(phase: &str, inits: Vec<ContainerStatus>, mains: Vec<ContainerStatus>) -> PodStatus {
    PodStatus {
        phase: Some(phase.into()),
        init_container_statuses: Some(inits),
        container_statuses: Some(mains),
        ..Default::default()
    }
}

fn failed(c: &ContainerStatus) -> bool {
    c.state.as_ref().and_then(|s| s.terminated.as_ref()).is_some_and(|t| t.exit_code != 0)
}

fn state(c: &Container, state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        state: Some(state),
        ..Default::default()
    }
}

fn terminated(c: &Container, ended: Ended, message: Option<String>) -> ContainerStatus {
    let reason = if ended.exit_code == 0 { "Completed" } else { "Error" };
    let t = ContainerStateTerminated {
        exit_code: ended.exit_code,
        reason: Some(reason.into()),
        message: message.or(ended.error),
        ..Default::default()
    };
    state(c, ContainerState { terminated: Some(t), ..Default::default() })
}

/// A sidecar that did not start: what a kubelet shows for a container that keeps crashing.
fn crashing(c: &Container, tail: &str) -> ContainerStatus {
    let waiting = ContainerStateWaiting { reason: Some("CrashLoopBackOff".into()), ..Default::default() };
    let last =
        ContainerStateTerminated { exit_code: 1, message: Some(tail.to_string()), ..Default::default() };
    ContainerStatus {
        last_state: Some(ContainerState { terminated: Some(last), ..Default::default() }),
        ..state(c, ContainerState { waiting: Some(waiting), ..Default::default() })
    }
}

/// The termination message kubelet would report: the file, else (with `FallbackToLogsOnError`
/// and a failure) the log's tail.
fn termination_message(work: &Path, c: &Container, failed: bool) -> Option<String> {
    let file =
        crate::bounded::read_to_string(&termination_path(work, c), crate::bounded::TERMINATION_MESSAGE)
            .ok()
            .filter(|m| !m.is_empty());
    let fallback = c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    file.or_else(|| (failed && fallback).then(|| log_tail(work, c)).filter(|t| !t.is_empty()))
}

fn log_path(work: &Path, c: &Container) -> PathBuf {
    work.join(format!("{}.log", c.name))
}

/// The last 80 lines of a container's log, at most 4 KiB (what kubelet keeps).
fn log_tail(work: &Path, c: &Container) -> String {
    let text = std::fs::read(log_path(work, c)).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// Volume name → host directory, filled as kubelet would.
fn prepare_volumes(pod: &Pod, secrets: &Secrets, work: &Path) -> Result<BTreeMap<String, PathBuf>, Error> {
    let mut out = BTreeMap::new();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    for v in pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default() {
        let dir = work.join("volumes").join(&v.name);
        std::fs::create_dir_all(&dir).map_err(io(format!("volume {}", v.name)))?;
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            for item in s.items.iter().flatten() {
                let value = secrets
                    .get(&name)
                    .and_then(|d| d.get(&item.key))
                    .ok_or_else(|| Error::MissingSecret { name: name.clone(), key: item.key.clone() })?;
                write_private(&dir.join(&item.path), value)?;
            }
        }
        if let Some(d) = &v.downward_api {
            for item in d.items.iter().flatten() {
                let field = item.field_ref.as_ref().map(|f| f.field_path.as_str()).unwrap_or_default();
                let key = field.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']"));
                let value = key.and_then(|k| annotations.get(k)).cloned().unwrap_or_default();
                std::fs::write(dir.join(&item.path), value).map_err(io(format!("volume {}", v.name)))?;
            }
        }
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

fn write_private(path: &Path, value: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("a secret file"))?;
    std::io::Write::write_all(&mut f, value.as_bytes()).map_err(io("a secret file"))
}

fn termination_path(work: &Path, c: &Container) -> PathBuf {
    work.join(format!("{}.termination-log", c.name))
}

/// The process for a container: its command with `bob` replaced, mount paths rewritten, a clean
/// environment with its env (Secret references resolved) and nothing of ours but PATH and logging.
fn command(
    c: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    secrets: &Secrets,
    bob: &Path,
    work: &Path,
) -> Result<Command, Error> {
    let mut paths: Vec<(String, String)> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| Some((m.mount_path.clone(), volumes.get(&m.name)?.display().to_string())))
        .collect();
    let term = c.termination_message_path.clone().unwrap_or_else(|| "/dev/termination-log".into());
    paths.push((term, termination_path(work, c).display().to_string()));
    paths.sort_by_key(|(mp, _)| std::cmp::Reverse(mp.len()));
    let map = |s: &str| replace_paths(s, &paths);
    let argv: Vec<String> =
        c.command.iter().flatten().chain(c.args.iter().flatten()).map(|a| map(a)).collect();
    let (program, args) = argv.split_first().expect("containers have a command");
    let mut cmd = Command::new(if program == "bob" { bob.as_os_str() } else { program.as_ref() });
    cmd.args(args).env_clear().stdin(Stdio::null());
    let home = work.join(format!("home-{}", c.name));
    std::fs::create_dir_all(&home).map_err(io("a home directory"))?;
    cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("HOME", &home);
    for var in ["RUST_LOG", "BOB_LOG_FORMAT"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref())) {
            (Some(v), _) => map(v),
            (None, Some(r)) => secrets
                .get(&r.name)
                .and_then(|d| d.get(&r.key))
                .cloned()
                .ok_or_else(|| Error::MissingSecret { name: r.name.clone(), key: r.key.clone() })?,
            (None, None) => String::new(),
        };
        cmd.env(&e.name, value);
    }
    Ok(cmd)
}

/// Replaces, in one pass, each `(from, to)` path in `s` where it stands as a whole path (not part
/// of a longer name); `paths` is longest first, so `/var/lib/bob` wins over `/var`.
pub fn replace_paths(s: &str, paths: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        let before_ok = i == 0 || !is_path_char(s[..i].chars().last().unwrap_or(' '));
        let hit = before_ok
            .then(|| {
                paths.iter().find(|(from, _)| {
                    s[i..].starts_with(from.as_str())
                        && s[i + from.len()..].chars().next().is_none_or(|c| c == '/' || !is_path_char(c))
                })
            })
            .flatten();
        match hit {
            Some((from, to)) => {
                out.push_str(to);
                i += from.len();
            }
            None => {
                let c = s[i..].chars().next().expect("in bounds");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

fn is_path_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '/' | '.' | '_' | '-')
}

/// How a container's process ended.
struct Ended {
    /// Its exit code (128 + the signal for a signal, 128 when it could not start).
    exit_code: i32,
    /// Why it could not start.
    error: Option<String>,
}

/// Runs a container to its end. The main container's output goes to our stderr as it comes
/// (stdout is for the status); an init container's goes to `log` (its tail may be its termination
/// message), then to our stderr.
async fn run_to_end(mut cmd: Command, log: Option<&Path>) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    match log.map(std::fs::File::create) {
        Some(Ok(f)) => match f.try_clone() {
            Ok(g) => cmd.stdout(f).stderr(g),
            Err(_) => cmd.stdout(std::io::stderr()).stderr(Stdio::inherit()),
        },
        _ => cmd.stdout(std::io::stderr()).stderr(Stdio::inherit()),
    };
    cmd.kill_on_drop(true);
    let ended = match cmd.status().await {
        Ok(s) => Ended { exit_code: s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)), error: None },
        Err(e) => Ended { exit_code: 128, error: Some(format!("cannot start: {e}")) },
    };
    if let Some(path) = log
        && let Ok(text) = std::fs::read(path)
    {
        use std::io::Write;
        let _ = std::io::stderr().write_all(&text);
    }
    ended
}

/// Runs the startup probe until it passes, the sidecar dies, or the probe's patience ends.
async fn startup(
    c: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    secrets: &Secrets,
    bob: &Path,
    work: &Path,
    child: &mut Child,
) -> Result<Result<(), String>, Error> {
    let Some(probe) = c.startup_probe.as_ref().and_then(|p| Some((p, p.exec.as_ref()?.command.clone()?)))
    else {
        return Ok(Ok(()));
    };
    let patience = probe.0.period_seconds.unwrap_or(10) * probe.0.failure_threshold.unwrap_or(3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(patience.max(1) as u64);
    let probe_container = Container { command: Some(probe.1), args: None, ..c.clone() };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Err(format!("exited with {status} while starting (see its log)")));
        }
        let mut cmd = command(&probe_container, volumes, secrets, bob, work)?;
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if cmd.status().await.is_ok_and(|s| s.success()) {
            return Ok(Ok(()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Err(format!("startup probe failed for {patience}s")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops a sidecar: SIGTERM, then SIGKILL after a grace period.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_replaced_once_and_only_as_whole_paths() {
        let paths =
            |p: &[(&str, &str)]| p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let p = paths(&[("/workspace", "/tmp/w/workspace"), ("/tmp", "/tmp/w/tmp")]);
        assert_eq!(
            replace_paths("cd /workspace && ls /workspace/x", &p),
            "cd /tmp/w/workspace && ls /tmp/w/workspace/x"
        );
        assert_eq!(
            replace_paths("/workspace", &p),
            "/tmp/w/workspace",
            "a replacement is not replaced again"
        );
        assert_eq!(replace_paths("/var/lib/bob/tmpfile", &p), "/var/lib/bob/tmpfile");
        assert_eq!(replace_paths("/tmp", &p), "/tmp/w/tmp");
        assert_eq!(replace_paths("/workspaces/x", &p), "/workspaces/x");
    }
}
