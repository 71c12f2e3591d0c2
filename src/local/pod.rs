//! Runs a planned Pod's containers as local processes, the way kubelet would order them: init
//! containers to completion, native sidecars started and probed, then the main container. Volumes
//! become directories (emptyDir, Secret items, downward-API annotations) and each container's
//! mount paths are rewritten to them in its arguments and environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
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

/// How the pod ended.
#[derive(Debug)]
pub struct Outcome {
    /// The container that failed before the main container ended, and why.
    pub failed: Option<(String, String)>,
    /// The main container's termination message.
    pub termination_message: Option<String>,
}

/// Secret data by Secret name.
pub type Secrets = BTreeMap<String, BTreeMap<String, String>>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs `pod` with its volumes under `work`; `bob` is the binary that stands in for the image's.
pub async fn run(pod: &Pod, secrets: &Secrets, bob: &Path, work: &Path) -> Result<Outcome, Error> {
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes = prepare_volumes(pod, secrets, work)?;
    let mut sidecars: Vec<Child> = Vec::new();
    let result = async {
        for c in spec.init_containers.iter().flatten() {
            let cmd = command(c, &volumes, secrets, bob, work)?;
            if c.restart_policy.as_deref() == Some("Always") {
                let log =
                    std::fs::File::create(work.join(format!("{}.log", c.name))).map_err(io("a log file"))?;
                let mut cmd = cmd;
                cmd.stdout(Stdio::null()).stderr(log).kill_on_drop(true);
                sidecars.push(cmd.spawn().map_err(io(format!("container {}", c.name)))?);
                if let Err(why) =
                    startup(c, &volumes, secrets, bob, work, sidecars.last_mut().expect("pushed")).await?
                {
                    return Ok(Outcome { failed: Some((c.name.clone(), why)), termination_message: None });
                }
            } else if let Err(why) = run_to_end(cmd).await {
                return Ok(Outcome { failed: Some((c.name.clone(), why)), termination_message: None });
            }
        }
        let main = spec.containers.first().expect("a pod has a container");
        let exit = run_to_end(command(main, &volumes, secrets, bob, work)?).await;
        let message = crate::bounded::read_to_string(
            &termination_path(work, main),
            crate::bounded::TERMINATION_MESSAGE,
        )
        .ok();
        let failed = match (&exit, &message) {
            (Err(why), None) => Some((main.name.clone(), why.clone())),
            _ => None,
        };
        Ok(Outcome { failed, termination_message: message })
    }
    .await;
    for mut s in sidecars {
        stop(&mut s).await;
    }
    result
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

/// Runs a container to its end; its output goes to our stderr (stdout is for the status).
async fn run_to_end(mut cmd: Command) -> Result<(), String> {
    cmd.stdout(std::io::stderr()).stderr(Stdio::inherit()).kill_on_drop(true);
    match cmd.status().await {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("exited with {s}")),
        Err(e) => Err(format!("cannot start: {e}")),
    }
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
