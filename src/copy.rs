//! `bob copy SRC DST`: the command around `oci::copy` — credentials, progress on a TTY or as
//! log lines, one summary line, and an exit code per failure class.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::duration;
use crate::oci::client::{self, Client, Kind};
use crate::oci::copy::copy_with_progress;
use crate::oci::transport;
use crate::oci::{CredentialStore, Reference, credentials, reference};

/// Why `bob copy` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A reference is invalid (checked before any network traffic).
    #[error(transparent)]
    Reference(#[from] reference::Error),
    /// The credentials cannot be read.
    #[error("cannot read registry credentials")]
    Credentials(#[source] credentials::Error),
    /// The client cannot be built.
    #[error("cannot build the registry client")]
    Transport(#[source] transport::Error),
    /// The copy failed.
    #[error("copy of {src} to {dst} failed")]
    Copy {
        /// Source reference.
        src: String,
        /// Destination reference.
        dst: String,
        /// Why.
        #[source]
        source: Box<client::Error>,
    },
}

impl Error {
    /// The process exit code for this failure (documented in `bob copy --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Copy { source, .. } => match source.kind() {
                Kind::NotFound => 3,
                Kind::Unauthorized => 4,
                Kind::DigestMismatch => 5,
                Kind::UnsupportedMediaType => 6,
                Kind::Unreachable => 7,
                Kind::Limit => 8,
                Kind::Other => 1,
            },
            _ => 1,
        }
    }
}

/// `bob copy` options.
#[derive(clap::Args, Clone)]
#[command(after_help = "Exit codes: 0 copied, 1 other error, 2 usage, 3 not found, 4 unauthorized, \
5 digest mismatch, 6 unsupported media type, 7 registry unreachable, 8 a limit exceeded (manifest over \
4 MiB, indexes nested more than 8 deep, more than 1,000 manifests).")]
pub struct CopyArgs {
    /// Source image reference (tag or digest; an index is copied with every platform).
    pub src: String,
    /// Destination image reference (a tag, or the source's digest).
    pub dst: String,
    /// Docker config JSON with credentials [default: $DOCKER_CONFIG/config.json, else
    /// ~/.docker/config.json, else anonymous].
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Registries (host or host:port) spoken to over plain HTTP besides loopback ones.
    #[arg(long = "insecure-registry", env = "BOB_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Blobs copied at once.
    #[arg(long, env = "BOB_COPY_JOBS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Longest wait for a registry's answer, retries included, and longest silence while a blob
    /// streams (e.g. 30s).
    #[arg(long, env = "BOB_COPY_TIMEOUT", default_value = "120s", value_parser = duration::parse)]
    pub timeout: Duration,
}

/// Parses an image reference with a clear error.
pub fn parse_ref(value: &str) -> Result<Reference, Error> {
    Ok(reference::parse(value)?)
}

/// The credential store `bob copy` uses: the file given, else the docker defaults, else none;
/// ECR registries it has no entry for get a token from the ambient AWS credentials.
async fn credentials(
    auth_file: Option<&PathBuf>,
    src: &Reference,
    dst: &Reference,
) -> Result<CredentialStore, Error> {
    let path = auth_file.cloned().or_else(credentials::default_docker_config);
    let text = match &path {
        Some(p) => credentials::read_text(p).map_err(Error::Credentials)?,
        None => "{}".to_string(),
    };
    let hosts = [(src.registry().to_string(), false), (dst.registry().to_string(), true)];
    if crate::cloud::ambient::missing(&text, &hosts).is_empty() {
        return match path {
            // The file, re-read when it changes.
            Some(p) => CredentialStore::file(p).map_err(Error::Credentials),
            None => Ok(CredentialStore::anonymous()),
        };
    }
    let completed = crate::cloud::ambient::complete(text, &hosts).await;
    CredentialStore::inline(&completed).map_err(Error::Credentials)
}

/// Runs `bob copy`: prints `<dst>@<digest>` on stdout when done.
pub async fn run(args: CopyArgs) -> Result<(), Error> {
    let (src, dst) = (parse_ref(&args.src)?, parse_ref(&args.dst)?);
    let creds = credentials(args.auth_file.as_ref(), &src, &dst).await?;
    tracing::debug!(credentials = %creds.describe(), "copy configured");
    let client =
        Client::connect(creds, &args.insecure_registries, args.timeout, None).map_err(Error::Transport)?;
    let started = Instant::now();
    let r = copy_with_progress(&client, &src, &dst, args.jobs.into()).await.map_err(|e| Error::Copy {
        src: src.whole(),
        dst: dst.whole(),
        source: Box::new(e),
    })?;
    tracing::info!(
        digest = %r.digest, manifests = r.manifests, blobs = r.blobs, skipped = r.skipped, mounted = r.mounted,
        mib = format!("{:.1}", r.bytes as f64 / (1024.0 * 1024.0)), up_to_date = r.up_to_date,
        ms = started.elapsed().as_millis() as u64, "copied {} to {}", src.whole(), dst.whole()
    );
    println!("{}@{}", dst.whole().split('@').next().unwrap_or_default(), r.digest);
    Ok(())
}
