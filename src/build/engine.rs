//! The build engine behind one trait, so BuildKit can be added next to buildah. An engine turns
//! a build request into commands (build, then push) and reads its own failure messages into a
//! `Reason`; running them (streaming output, watchdog) is `output.rs`'s job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::reason::Reason;

/// One engine build: every path is prepared by `bob build`.
#[derive(Clone, Debug)]
pub struct EngineBuild {
    /// The Dockerfile with its `FROM`s pinned.
    pub dockerfile: PathBuf,
    /// The build context.
    pub context: PathBuf,
    /// Build arguments.
    pub build_args: BTreeMap<String, String>,
    /// Target stage.
    pub target: Option<String>,
    /// The generated `registries.conf` that sends `FROM` pulls to the proxy's mirror route.
    pub registries_conf: PathBuf,
    /// An empty docker config: the engine must not find credentials anywhere.
    pub auth_file: PathBuf,
    /// Scratch directory (HOME and TMPDIR of the engine).
    pub work: PathBuf,
    /// Name of the image in local storage.
    pub image: String,
    /// Where to push (`<proxy>/base:<tag>`, plain HTTP on loopback).
    pub push_to: String,
    /// File the engine writes the pushed manifest digest to.
    pub digest_file: PathBuf,
    /// The layer cache: where to read and write cached steps (none: build without it).
    pub cache: CacheFlags,
    /// Write no build history (`--omit-history`): a `FROM` image without one makes buildah 1.28
    /// fail to commit a second layer (`history.rs`).
    pub omit_history: bool,
}

/// The layer cache of one engine build. Steps are always committed as layers (`--layers`), so the
/// image's layers do not depend on whether a cache is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheFlags {
    /// Repository to read cached steps from (`--cache-from`).
    pub from: Option<String>,
    /// Repository to write new steps to (`--cache-to`).
    pub to: Option<String>,
    /// How old a cached step may be (`--cache-ttl`, Go duration syntax).
    pub ttl: Option<String>,
    /// Reuse no step at all, not even one in local storage (`--no-cache`: `forceRebuild`).
    pub no_cache: bool,
}

/// A failure as the engine explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// The class.
    pub reason: Reason,
    /// One line.
    pub message: String,
    /// The failing step, if any.
    pub step: Option<String>,
    /// The step's exit code, if any.
    pub exit_code: Option<i32>,
}

/// A Dockerfile build engine.
pub trait Engine: Send + Sync {
    /// The engine's name, for logs.
    fn name(&self) -> &'static str;
    /// The command that builds the image into local storage.
    fn build(&self, b: &EngineBuild) -> Command;
    /// The command that pushes it and writes the digest file.
    fn push(&self, b: &EngineBuild) -> Command;
    /// The command that removes it from local storage.
    fn remove(&self, b: &EngineBuild) -> Command;
    /// Explains a failed command from its last output lines: the engine's own error first in the
    /// message, classified by it; an error it cannot classify gets `default` (the phase's reason).
    /// `None`: the engine printed no error at all.
    fn diagnose(&self, tail: &[String], default: Reason) -> Option<Diagnosis>;
}

/// How buildah isolates `RUN` steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// chroot: no OCI runtime needed (works in unprivileged-but-root containers).
    Chroot,
    /// An OCI runtime (`--runtime`, e.g. runc).
    Oci,
}

/// buildah (`bud` + `push`), daemonless.
#[derive(Clone, Debug)]
pub struct Buildah {
    /// The buildah binary.
    pub binary: PathBuf,
    /// Storage root (`--root`).
    pub root: PathBuf,
    /// Run root (`--runroot`).
    pub runroot: PathBuf,
    /// Storage driver (`vfs` works everywhere; `overlay` is faster where the kernel allows).
    pub storage_driver: String,
    /// Isolation of `RUN` steps.
    pub isolation: Isolation,
    /// OCI runtime for `Isolation::Oci`.
    pub runtime: String,
}

impl Buildah {
    fn command(&self, b: &EngineBuild) -> Command {
        let mut c = Command::new(&self.binary);
        // The engine gets a clean environment: nothing of bob's (or the pod's) leaks into it,
        // and it cannot find a credential file in a default location.
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
            .env("HOME", &b.work)
            .env("TMPDIR", &b.work)
            .env("XDG_RUNTIME_DIR", &b.work)
            .env("REGISTRY_AUTH_FILE", &b.auth_file)
            .env("CONTAINERS_REGISTRIES_CONF", &b.registries_conf)
            .env("BUILDAH_LAYERS", "true");
        c.arg("--root").arg(&self.root).arg("--runroot").arg(&self.runroot);
        c.arg("--storage-driver").arg(&self.storage_driver);
        c.arg("--registries-conf").arg(&b.registries_conf);
        c
    }
}

impl Engine for Buildah {
    fn name(&self) -> &'static str {
        "buildah"
    }

    fn build(&self, b: &EngineBuild) -> Command {
        let mut c = self.command(b);
        c.arg("bud").arg("--authfile").arg(&b.auth_file);
        match self.isolation {
            Isolation::Chroot => c.args(["--isolation", "chroot"]),
            Isolation::Oci => c.args(["--isolation", "oci", "--runtime", &self.runtime]),
        };
        // Loopback mirror over plain HTTP. FROMs are pinned by digest, so an image already in
        // local storage is the same image and need not be pulled again. One layer per step with
        // or without a cache, so the image's layers never depend on the cache's settings.
        c.args(["--tls-verify=false", "--format", "oci", "--layers"]);
        if let Some(from) = &b.cache.from {
            c.arg("--cache-from").arg(from);
        }
        if let Some(to) = &b.cache.to {
            c.arg("--cache-to").arg(to);
        }
        if let Some(ttl) = &b.cache.ttl {
            c.arg("--cache-ttl").arg(ttl);
        }
        if b.cache.no_cache {
            c.arg("--no-cache");
        }
        if b.omit_history {
            c.arg("--omit-history");
        }
        for (k, v) in &b.build_args {
            c.arg("--build-arg").arg(format!("{k}={v}"));
        }
        if let Some(t) = &b.target {
            c.arg("--target").arg(t);
        }
        c.arg("-f").arg(&b.dockerfile).arg("-t").arg(&b.image).arg(&b.context);
        c
    }

    fn push(&self, b: &EngineBuild) -> Command {
        let mut c = self.command(b);
        c.arg("push").arg("--authfile").arg(&b.auth_file).arg("--tls-verify=false");
        c.arg("--digestfile").arg(&b.digest_file);
        c.arg(&b.image).arg(format!("docker://{}", b.push_to));
        c
    }

    fn remove(&self, b: &EngineBuild) -> Command {
        let mut c = self.command(b);
        c.arg("rmi").arg("-f").arg(&b.image);
        c
    }

    fn diagnose(&self, tail: &[String], default: Reason) -> Option<Diagnosis> {
        diagnose_buildah(tail, default)
    }
}

/// What bob tells the user after buildah's message when the fix is in the Dockerfile.
const STAGE_HINT: &str = "a FROM names a stage that buildah does not know: buildah matches stage names exactly, \
case included (every registry image is written fully qualified by bob)";
const COPY_FROM_HINT: &str = "no stage has that name, and the build pulls only its FROM images (pinned to \
their digests, through the proxy): name the image in a stage, `FROM <image> AS <name>`, and use `--from=<name>`";

/// Reads buildah 1.28's messages: its last `Error:` line leads the message, and its words give the
/// reason (`Error: building at STEP "RUN x": exit status 2` is the step's failure; a short name
/// that did not resolve or `no stage or image found` is the Dockerfile's; `initializing source
/// docker://` is a pull; anything else is `default`).
pub fn diagnose_buildah(tail: &[String], default: Reason) -> Option<Diagnosis> {
    use crate::build::result::shorten;
    let d = |reason, message: String| Some(Diagnosis { reason, message, step: None, exit_code: None });
    if let Some(l) = tail.iter().find(|l| l.contains("no space left on device")) {
        return d(Reason::DiskFull, format!("no space left on device: {}", shorten(l.trim(), 300)));
    }
    let error = tail.iter().rev().find(|l| l.starts_with("Error: "))?;
    let error = error.trim_start_matches("Error: ").trim();
    if let Some(rest) = error.strip_prefix("building at STEP \"") {
        let (step, after) = rest.split_once("\": ").unwrap_or((rest.trim_end_matches('"'), ""));
        let step = step.trim().to_string();
        if let Some(code) = after.strip_prefix("exit status ").and_then(|c| c.trim().parse::<i32>().ok()) {
            let (reason, why) = if code == 137 {
                (Reason::OutOfMemory, "was killed (exit code 137, most likely out of memory)".to_string())
            } else {
                (Reason::BuildStepFailed, format!("failed with exit code {code}"))
            };
            return Some(Diagnosis {
                reason,
                message: format!("step `{step}` {why}"),
                step: Some(step),
                exit_code: Some(code),
            });
        }
        let reason = if after.contains("Unknown instruction") || after.contains("parse") {
            Reason::DockerfileInvalid
        } else {
            Reason::BuildStepFailed
        };
        return Some(Diagnosis {
            reason,
            message: format!("step `{step}`: {}", shorten(after, 400)),
            step: Some(step),
            exit_code: None,
        });
    }
    let shown = shorten(error, 500);
    // bob writes registry images fully qualified: a short name is a stage buildah did not find.
    if error.contains("short-name \"") && error.contains("did not resolve") {
        return d(Reason::DockerfileInvalid, format!("{shown} ({STAGE_HINT})"));
    }
    // `COPY --from=<image>`: not a stage, and not an image the build may pull.
    if error.contains("no stage or image found with that name") {
        return d(Reason::DockerfileInvalid, format!("{shown} ({COPY_FROM_HINT})"));
    }
    if error.contains("initializing source docker://") || error.starts_with("creating build container") {
        return d(Reason::BaseImagePullFailed, shown);
    }
    if error.contains("parse") || error.contains("Dockerfile") {
        return d(Reason::DockerfileInvalid, shown);
    }
    d(default, format!("buildah: {shown}"))
}

/// The `registries.conf` that maps each `FROM` registry to the proxy's mirror route (`location`
/// remaps the prefix, so there is no fallback to the real registry), with short names off.
pub fn registries_conf(proxy: &str, hosts: &[String]) -> String {
    let mut out = String::from("unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n");
    for h in hosts {
        // `:` is not allowed in a location path; the proxy decodes `host__port`.
        let encoded = h.replace(':', "__");
        out.push_str(&format!(
            "\n[[registry]]\nprefix = \"{h}\"\nlocation = \"{proxy}/mirror/{encoded}\"\ninsecure = true\n"
        ));
    }
    out
}

/// Writes `content` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, content: &str) -> std::io::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, content)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    fn diagnose(text: &str) -> Option<Diagnosis> {
        diagnose_buildah(&lines(text), Reason::EngineFailed)
    }

    #[test]
    fn buildah_failures_are_diagnosed() {
        let step =
            diagnose("STEP 3/3: RUN false\nError: building at STEP \"RUN false\": exit status 1").unwrap();
        assert_eq!(
            (step.reason, step.step.as_deref(), step.exit_code),
            (Reason::BuildStepFailed, Some("RUN false"), Some(1))
        );
        let oom = diagnose("Error: building at STEP \"RUN big\": exit status 137").unwrap();
        assert_eq!(oom.reason, Reason::OutOfMemory);
        let bad = diagnose("Error: building at STEP \"FOO \": Build error: Unknown instruction: \"FOO\" &x")
            .unwrap();
        assert_eq!(bad.reason, Reason::DockerfileInvalid);
        let pull = diagnose("Error: creating build container: initializing source docker://x").unwrap();
        assert_eq!(pull.reason, Reason::BaseImagePullFailed);
        let disk = diagnose("write /var/x: no space left on device\nError: exit status 1").unwrap();
        assert_eq!(disk.reason, Reason::DiskFull);
        assert_eq!(diagnose("all good"), None);
    }

    /// buildah 1.28's own lines, as `tests/build_failures.rs` gets them from real builds.
    #[test]
    fn buildahs_error_leads_the_message_and_gives_the_reason() {
        let stage = "creating build container: short-name \"build\" did not resolve to an alias and no \
                     unqualified-search registries are defined in \"/tmp/b/registries.conf\"";
        let d = diagnose(&format!("[2/2] STEP 1/2: FROM build\nError: {stage}")).unwrap();
        assert_eq!(d.reason, Reason::DockerfileInvalid, "a stage buildah does not know is no pull failure");
        assert!(d.message.starts_with(stage) && d.message.contains("case included"), "{}", d.message);

        let copy = "COPY --from=reg.test/lib/other:1: no stage or image found with that name";
        let d = diagnose(&format!("Trying to pull reg.test/lib/other:1...\nError: {copy}")).unwrap();
        assert_eq!(d.reason, Reason::DockerfileInvalid);
        assert!(d.message.starts_with(copy) && d.message.contains("FROM <image> AS <name>"), "{}", d.message);

        // A local storage error mentions `initializing source` too: it is not a pull.
        let local = "committing container for step {RUN true}: copying layers and metadata for container \
                     \"eefb\": initializing source containers-storage:8af7-working-container: internal error: \
                     history lists 2 non-empty layers, but we have 3 layers on disk";
        let d = diagnose(&format!("Error: {local}")).unwrap();
        assert_eq!((d.reason, d.message), (Reason::EngineFailed, format!("buildah: {local}")));
        let push = diagnose_buildah(&lines("Error: writing blob: broken pipe"), Reason::PushFailed).unwrap();
        assert_eq!(
            (push.reason, push.message.as_str()),
            (Reason::PushFailed, "buildah: writing blob: broken pipe")
        );
    }

    #[test]
    fn registries_conf_remaps_hosts_to_the_mirror_route() {
        let conf = registries_conf("127.0.0.1:8080", &["reg.test:5000".into(), "docker.io".into()]);
        assert!(
            conf.contains("prefix = \"reg.test:5000\"\nlocation = \"127.0.0.1:8080/mirror/reg.test__5000\"")
        );
        assert!(conf.contains("location = \"127.0.0.1:8080/mirror/docker.io\""));
        assert!(conf.contains("short-name-mode = \"disabled\""));
    }
}
