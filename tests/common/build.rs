//! Fixtures for `bob build` tests: a registry with credentials holding a busybox base, the refs
//! a Dockerfile keys to, a proxy for them, and a `bob build` run with only the pod's variables.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bob::build::BuildResult;
use bob::key::{self, BuildInputs};

use super::*;

pub const PASSWORD: &str = "build-pass-5c1e";

/// A registry with basic auth holding a busybox base image, and the docker config for it.
pub struct Fixture {
    pub reg: Registry,
    pub creds: String,
    /// `<reg>/lib/busybox:1`, as a Dockerfile names it.
    pub from: String,
    /// Its manifest digest.
    pub from_digest: String,
    pub dir: tempfile::TempDir,
}

/// A one-layer image whose rootfs is busybox-static (uncompressed layer, so diff id = digest),
/// with a build history as Dockerfile-built images have.
pub fn busybox_image() -> Image {
    image_with_history(vec![busybox_layer()], "amd64")
}

/// The same image without a build history (as tools other than Dockerfile builders make them).
pub fn busybox_image_without_history() -> Image {
    image(vec![busybox_layer()], "amd64")
}

/// A layer holding busybox-static as `/bin` with its applets, `/etc/passwd` and `/tmp`.
pub fn busybox_layer() -> Vec<u8> {
    require("busybox", "busybox-static");
    let root = tempfile::tempdir().unwrap();
    for d in ["bin", "etc", "tmp", "root"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    let applets = run_ok(Command::new("/bin/busybox").arg("--list"));
    for a in applets.lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(a)).unwrap();
    }
    std::fs::write(root.path().join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let out = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(root.path())
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

impl Fixture {
    /// A registry holding the busybox base with a build history.
    pub async fn new() -> Self {
        Self::with_base(busybox_image()).await
    }

    /// A registry holding `img` as the base every Dockerfile starts from.
    pub async fn with_base(img: Image) -> Self {
        require("buildah", "buildah");
        let reg = Registry::start(RegistryAuth::Basic { user: "builder", password: PASSWORD });
        let creds = docker_config(&reg.host, "builder", PASSWORD);
        Direct::new(&reg.host, Some(&creds)).push_image("lib/busybox", "1", &img).await;
        let from = reg.repo("lib/busybox:1");
        Fixture { reg, creds, from, from_digest: img.digest, dir: tempfile::tempdir().unwrap() }
    }

    /// `from` pinned: what the controller puts in BOB_FROM_REFS and BOB_PROXY_MIRROR_REFS.
    pub fn pin(&self) -> String {
        format!("{}@{}", self.from, self.from_digest)
    }

    /// The base and workspace refs a Dockerfile's inputs key to.
    pub fn refs(&self, dockerfile: &str) -> (String, String) {
        let mut inputs = BuildInputs::inline(dockerfile);
        inputs.from_digests.insert(self.from.clone(), self.from_digest.clone());
        let base = key::base_ref(&self.reg.repo("base"), &inputs.key().unwrap());
        let ws = key::workspace_ref(&self.reg.repo("workspace"), &base);
        (base, ws)
    }

    pub fn proxy(&self, base: &str, ws: &str) -> ProxyProc {
        ProxyProc::start(&[
            ("BOB_PROXY_BASE_REF", base),
            ("BOB_PROXY_TARGET_REF", ws),
            ("BOB_AUTH", &self.creds),
            ("BOB_PROXY_MIRROR_REFS", &self.pin()),
        ])
    }

    /// A context directory with `Dockerfile` and extra files.
    pub fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let ctx = self.dir.path().join(name);
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        for (f, content) in files {
            std::fs::write(ctx.join(f), content).unwrap();
        }
        ctx
    }
}

/// An ImageBuild YAML with `source` (YAML, indented for `spec.source`) plus the registry Secret,
/// as `bob run -f` takes it.
pub fn imagebuild_yaml(fx: &Fixture, name: &str, source: &str) -> String {
    format!(
        "apiVersion: bob.dev/v1alpha1\nkind: ImageBuild\nmetadata: {{name: {name}}}\nspec:\n  source:\n{source}\n  \
         baseImageRepository: {reg}/base\n  workspaceImageRepository: {reg}/workspace\n  registryAuth: {{secretRef: {{name: reg}}}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: reg}}\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{creds}'\n",
        reg = fx.reg.host,
        creds = fx.creds
    )
}

/// Runs `bob run -f` on `yaml` (written to `dir/<name>.yaml`) with a clean environment whose
/// HOME is `dir`; returns its output.
pub fn run_file(dir: &Path, name: &str, yaml: &str) -> Output {
    let file = write_file(dir, &format!("{name}.yaml"), yaml);
    Command::new(env!("CARGO_BIN_EXE_bob"))
        .args(["run", "-f"])
        .arg(&file)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// Runs `bob build` with only the build pod's variables (no credentials), plus `extra`.
pub fn bob_build(
    proxy_addr: &str,
    ctx: &Path,
    storage: &Path,
    extra: &[(&str, &str)],
) -> (Output, BuildResult) {
    let out = bob_build_command(proxy_addr, ctx, storage, extra).output().unwrap();
    let result = last_result(&out.stdout, storage);
    (out, result)
}

/// The result JSON that `bob build` printed as its last stdout line; checks that the termination
/// message file holds the same.
pub fn last_result(stdout: &[u8], storage: &Path) -> BuildResult {
    let stdout = String::from_utf8_lossy(stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let result: BuildResult =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line {last:?}: {e}"));
    let file = std::fs::read_to_string(storage.join("termination-log")).unwrap();
    assert_eq!(file, last, "the termination message is the last stdout line");
    assert!(file.len() <= 4096);
    result
}

/// The `bob build` command with only the build pod's variables (no credentials), plus `extra`.
pub fn bob_build_command(proxy_addr: &str, ctx: &Path, storage: &Path, extra: &[(&str, &str)]) -> Command {
    std::fs::create_dir_all(storage).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_bob"));
    c.arg("build").env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c.env("RUST_LOG", "info")
        .env("BOB_PROXY_ADDR", proxy_addr)
        .env("BOB_BASE_REF", format!("{proxy_addr}/base:latest"))
        .env("BOB_TARGET_REF", format!("{proxy_addr}/target:latest"))
        .env("BOB_BUILD_BASE", "true")
        .env("BOB_DOCKERFILE_PATH", ctx.join("Dockerfile"))
        .env("BOB_CONTEXT_DIR", ctx)
        .env("BOB_TERMINATION_MESSAGE_PATH", storage.join("termination-log"))
        .env("BOB_STORAGE_ROOT", storage.join("root"))
        .env("BOB_STORAGE_RUNROOT", storage.join("run"));
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads `path` from the image's layers (newest first), via `tar`.
pub async fn file_in_image(
    d: &Direct,
    repo: &str,
    manifest: &serde_json::Value,
    path: &str,
) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    for layer in manifest["layers"].as_array().unwrap().iter().rev() {
        let digest = layer["digest"].as_str().unwrap();
        let blob = dir.path().join(&digest[7..]);
        std::fs::write(&blob, d.blob(repo, digest).await).unwrap();
        for name in [path.to_string(), format!("./{path}")] {
            let out = Command::new("tar").arg("-xOf").arg(&blob).arg(&name).output().unwrap();
            if out.status.success() {
                return Some(text(&out.stdout));
            }
        }
    }
    None
}
