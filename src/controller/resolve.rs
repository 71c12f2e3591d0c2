//! What is resolved before planning (by the controller and by `bob run`): an image source's
//! digest, a git revision's commit and the Dockerfile at that commit, and every `FROM` image's
//! digest. Registry lookups use bob's client with the build's credentials; git runs `git`.

use std::path::Path;

use super::decide::Failure;
use super::pod::GIT_CREDENTIAL_HELPER;
use super::{Resolved, from_images};
use crate::bounded;
use crate::crd::{GitSource, ImageBuild};
use crate::oci::client::Client;
use crate::oci::{Reference, reference};
use crate::reason::Reason;

/// A failure to resolve, with the status reason it maps to.
pub type Error = Failure;

fn fail(reason: Reason, message: impl Into<String>) -> Error {
    Failure::new(reason, message)
}

/// Git credentials (from the source's Secret); the password prints `<redacted>`.
#[derive(Clone, Debug)]
pub struct GitAuth {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: crate::oci::Secret,
}

/// Runs `git` with the credential helper when `auth` is given; returns stdout or one line.
pub async fn git(args: &[&str], dir: Option<&Path>, auth: Option<&GitAuth>) -> Result<String, String> {
    let mut c = tokio::process::Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0").stdin(std::process::Stdio::null());
    if let Some(a) = auth {
        c.arg("-c").arg(format!("credential.helper={GIT_CREDENTIAL_HELPER}"));
        c.env("GIT_USERNAME", &a.username).env("GIT_PASSWORD", a.password.expose());
    }
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let out = c
        .output()
        .await
        .map_err(|e| format!("cannot run git ({e}); install it with `apt-get install git`"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("git failed").trim().to_string())
}

/// The commit a revision names: itself if it is a SHA, else what `git ls-remote` says (branches,
/// then tags — annotated tags peeled to their commit).
pub async fn commit(git_source: &GitSource, auth: Option<&GitAuth>) -> Result<String, Error> {
    let revision = git_source.revision.as_deref().unwrap_or("HEAD");
    let is_sha =
        (revision.len() == 40 || revision.len() == 64) && revision.bytes().all(|b| b.is_ascii_hexdigit());
    if is_sha {
        return Ok(revision.to_ascii_lowercase());
    }
    let out = git(&["ls-remote", &git_source.url, revision], None, auth)
        .await
        .map_err(|e| fail(Reason::SourceFetchFailed, format!("git ls-remote {}: {e}", git_source.url)))?;
    let refs: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('\t')).collect();
    let wanted = [
        format!("refs/heads/{revision}"),
        format!("refs/tags/{revision}^{{}}"),
        format!("refs/tags/{revision}"),
        revision.to_string(),
    ];
    wanted
        .iter()
        .find_map(|w| refs.iter().find(|(_, name)| name == w).map(|(sha, _)| sha.to_string()))
        .ok_or_else(|| {
            fail(Reason::SourceFetchFailed, format!("revision {revision:?} not found in {}", git_source.url))
        })
}

/// Fetches exactly `commit` of `url` into `dir` and checks it out (what the clone container does).
pub async fn checkout(url: &str, commit: &str, dir: &Path, auth: Option<&GitAuth>) -> Result<(), Error> {
    let step =
        |what: &str, e: String| fail(Reason::SourceFetchFailed, format!("git {what} {url} at {commit}: {e}"));
    git(&["init", "-q", "."], Some(dir), None).await.map_err(|e| step("init", e))?;
    git(&["fetch", "-q", "--depth", "1", url, commit], Some(dir), auth)
        .await
        .map_err(|e| step("fetch", e))?;
    git(&["-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"], Some(dir), None)
        .await
        .map_err(|e| step("checkout", e))?;
    Ok(())
}

/// Resolves everything the plan needs. `scratch` is an empty directory for the git checkout.
pub async fn resolve(
    ib: &ImageBuild,
    client: &Client,
    git_auth: Option<&GitAuth>,
    scratch: &Path,
) -> Result<Resolved, Error> {
    let mut resolved = fetch(ib, git_auth, scratch).await?;
    pin(ib, client, &mut resolved).await?;
    Ok(resolved)
}

/// What resolving takes from git alone: the commit and the Dockerfile (the registry part,
/// `pin`, may need a credential for the images that Dockerfile names).
pub async fn fetch(ib: &ImageBuild, git_auth: Option<&GitAuth>, scratch: &Path) -> Result<Resolved, Error> {
    super::plan::check_references(ib).map_err(|e| fail(e.reason(), e.to_string()))?;
    let mut resolved = Resolved::default();
    if let Some(git_source) = ib.spec.source.dockerfile.as_ref().and_then(|d| d.git.as_ref()) {
        let sha = commit(git_source, git_auth).await?;
        checkout(&git_source.url, &sha, scratch, git_auth).await?;
        let path = git_source.dockerfile_path.as_deref().unwrap_or("Dockerfile");
        let text = bounded::read_to_string(&scratch.join(path), bounded::DOCKERFILE).map_err(|e| {
            let (reason, what) = match e {
                bounded::Error::Read { .. } => (Reason::DockerfileNotFound, "no Dockerfile at "),
                _ => (Reason::DockerfileInvalid, ""),
            };
            let why = crate::oci::error::chain(&e);
            fail(reason, format!("{what}{path} in {} at {sha}: {why}", git_source.url))
        })?;
        resolved.git_commit = Some(sha);
        resolved.git_dockerfile = Some(text);
    }
    Ok(resolved)
}

/// The images a fetched build reads: its `FROM`s (and `COPY --from`/`RUN --mount` images).
pub fn images(ib: &ImageBuild, resolved: &Resolved) -> Result<Vec<String>, Error> {
    let images = from_images(ib, resolved).map_err(|e| fail(Reason::DockerfileInvalid, e.to_string()))?;
    Ok(images.unwrap_or_default())
}

/// Pins a fetched build's images to digests: the source image's and every image it reads.
pub async fn pin(ib: &ImageBuild, client: &Client, resolved: &mut Resolved) -> Result<(), Error> {
    if let Some(image) = &ib.spec.source.image {
        let r = parse(&image.reference)?;
        resolved.image_digest = Some(digest_of(client, &r, "the source image").await?);
    }
    for image in images(ib, resolved)? {
        let digest = digest_of(client, &parse(&image)?, &format!("FROM {image}")).await?;
        resolved.from_digests.insert(image, digest);
    }
    Ok(())
}

fn parse(image: &str) -> Result<Reference, Error> {
    reference::parse(image).map_err(|e| fail(Reason::InvalidSpec, crate::oci::error::chain(&e)))
}

async fn digest_of(client: &Client, r: &Reference, what: &str) -> Result<String, Error> {
    match client.manifest_digest(r).await {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err(fail(Reason::BaseImagePullFailed, format!("{what} {} does not exist", r.whole()))),
        Err(e) => {
            let reason = match e.kind() {
                crate::oci::client::Kind::Unreachable => Reason::RegistryUnavailable,
                _ => Reason::BaseImagePullFailed,
            };
            Err(fail(
                reason,
                format!("cannot resolve {what} {}: {}", r.whole(), crate::oci::error::chain(&e)),
            ))
        }
    }
}

/// The reason a registry failure maps to while a build waits to start or to be verified: an
/// unreachable registry is waited for, refused credentials too (the Secret may be fixed).
pub fn registry_reason(e: &crate::oci::client::Error) -> Reason {
    match e.kind() {
        crate::oci::client::Kind::Unauthorized => Reason::RegistryDenied,
        _ => Reason::RegistryUnavailable,
    }
}

/// Which digest a registry has at `r`, as the decision reads it (a failure with its reason).
pub async fn lookup(client: &Client, r: &Reference) -> super::decide::Lookup {
    client
        .manifest_digest(r)
        .await
        .map_err(|e| Failure::new(registry_reason(&e), crate::oci::error::chain(&e)))
}
