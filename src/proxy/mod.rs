//! `bob proxy`: the registry reverse proxy that alone holds the registry credentials in a build
//! pod. It maps the aliases `base` and `target` to the planned repositories and `cache` to the
//! scope's layer cache repository, serves the declared `FROM` images read-only on a mirror route,
//! and refuses everything else.

pub mod error;
pub mod forward;
pub mod handler;
pub mod mirror;
pub mod route;
pub mod server;
mod tags;
pub mod uploads;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

pub use crate::oci::transport::TransportOptions as UpstreamOptions;
pub use error::ProxyError;
pub use handler::{AliasTarget, Proxy};

use crate::duration;
use crate::oci::transport::Transport;
use crate::oci::{CredentialStore, Endpoints, credentials};

/// Configuration errors and failures of the proxy process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An alias reference is invalid.
    #[error("invalid {var}")]
    Reference {
        /// The variable that holds it.
        var: &'static str,
        /// Why it is invalid (the error names the value).
        #[source]
        source: crate::oci::reference::Error,
    },
    /// The layer cache repository is not a repository.
    #[error("invalid BOB_PROXY_CACHE_REPOSITORY {value:?}: a repository without tag or digest")]
    CacheRepository {
        /// The value given.
        value: String,
    },
    /// The mirror references do not parse.
    #[error("invalid BOB_PROXY_MIRROR_REFS")]
    Mirror(#[source] mirror::Error),
    /// The credentials cannot be loaded.
    #[error("cannot load registry credentials")]
    Credentials(#[source] credentials::Error),
    /// The listen address is not `host:port`.
    #[error("invalid listen address {addr:?} (expected ip:port)")]
    Address {
        /// The address given.
        addr: String,
    },
    /// The listen address is not loopback and that was not allowed explicitly.
    #[error(
        "refusing to listen on {addr}: not a loopback address, and the proxy holds registry credentials \
         (set --allow-non-loopback or BOB_PROXY_ALLOW_NON_LOOPBACK=true to allow it)"
    )]
    NotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// The listen socket cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client cannot be built.
    #[error("cannot build the upstream HTTP client")]
    Client(#[source] reqwest::Error),
    /// The registry client could not be built.
    #[error("cannot build the registry client")]
    Transport(#[source] crate::oci::transport::Error),
    /// `--check` found no proxy answering.
    #[error("no proxy answers on {addr}")]
    Check {
        /// The address probed.
        addr: SocketAddr,
    },
}

/// `bob proxy` options. Every option has an environment variable (the build pod sets those).
#[derive(clap::Args, Clone)]
pub struct ProxyArgs {
    /// Address to listen on; loopback, so only containers of the pod can reach it.
    #[arg(long, env = "BOB_PROXY_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Allow a listen address beyond loopback (anyone who reaches it can use the credentials).
    #[arg(long, env = "BOB_PROXY_ALLOW_NON_LOOPBACK")]
    pub allow_non_loopback: bool,
    /// Real image reference that the `base` alias maps to (e.g. registry.example/base:<key>).
    #[arg(long, env = "BOB_PROXY_BASE_REF")]
    pub base_ref: Option<String>,
    /// Real image reference that the `target` alias maps to (the workspace image).
    #[arg(long, env = "BOB_PROXY_TARGET_REF")]
    pub target_ref: Option<String>,
    /// Real repository that the `cache` alias maps to: this build's layer cache scope (e.g.
    /// registry.example/bob-cache/<namespace>/<scope>-<hash>); its tags are build-step keys.
    #[arg(long, env = "BOB_PROXY_CACHE_REPOSITORY")]
    pub cache_repository: Option<String>,
    /// Refuse writes to `base` (image sources: the base is an existing image).
    #[arg(long, env = "BOB_PROXY_BASE_READ_ONLY")]
    pub base_read_only: bool,
    /// The `FROM` references the mirror route may serve, comma- or space-separated.
    #[arg(long, env = "BOB_PROXY_MIRROR_REFS", default_value = "")]
    pub mirror_refs: String,
    /// Docker config JSON file with registry credentials (re-read when it changes).
    #[arg(long, env = "BOB_AUTH_FILE", conflicts_with = "auth")]
    pub auth_file: Option<PathBuf>,
    /// Docker config JSON given inline (for local use; prefer --auth-file in a cluster).
    #[arg(long, env = "BOB_AUTH", hide_env_values = true)]
    pub auth: Option<String>,
    /// Registries (host or host:port) spoken to over plain HTTP besides loopback ones.
    #[arg(long = "insecure-registry", env = "BOB_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Longest wait for an upstream answer, retries included, and longest silence while a body
    /// streams (e.g. 30s, 500ms).
    #[arg(long, env = "BOB_PROXY_UPSTREAM_TIMEOUT", default_value = "120s", value_parser = duration::parse)]
    pub upstream_timeout: Duration,
    /// Retries of idempotent upstream requests on connection errors, 5xx and 429.
    #[arg(long, env = "BOB_PROXY_RETRIES", default_value_t = 3)]
    pub retries: u32,
    /// Longest wait for a client's complete request head; slower clients are disconnected.
    #[arg(long, env = "BOB_PROXY_HEADER_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    pub header_timeout: Duration,
    /// Longest idle time of a kept-alive client connection between two requests.
    #[arg(long, env = "BOB_PROXY_IDLE_TIMEOUT", default_value = "120s", value_parser = duration::parse)]
    pub idle_timeout: Duration,
    /// Most client connections at once; at the limit the longest-waiting idle one is closed.
    #[arg(long, env = "BOB_PROXY_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most upload sessions open at once; further upload starts get 429 TOOMANYREQUESTS.
    #[arg(long, env = "BOB_PROXY_MAX_UPLOADS", default_value_t = uploads::DEFAULT_MAX as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_uploads: u32,
    /// Idle time after which an upload session is dropped and its upstream upload cancelled.
    #[arg(long, env = "BOB_PROXY_UPLOAD_IDLE_TIMEOUT", default_value = "5m", value_parser = duration::parse)]
    pub upload_idle_timeout: Duration,
    /// Exit 0 if a proxy answers on the address, 1 otherwise (the pod's exec startup probe).
    #[arg(long)]
    pub check: bool,
}

impl ProxyArgs {
    /// Arguments for a proxy with the given aliases and defaults for everything else.
    pub fn for_refs(base_ref: Option<String>, target_ref: Option<String>) -> Self {
        Self {
            addr: "127.0.0.1:0".into(),
            base_ref,
            target_ref,
            cache_repository: None,
            base_read_only: false,
            mirror_refs: String::new(),
            auth_file: None,
            auth: None,
            insecure_registries: Vec::new(),
            upstream_timeout: Duration::from_secs(120),
            retries: 3,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 256,
            max_uploads: uploads::DEFAULT_MAX as u32,
            upload_idle_timeout: uploads::DEFAULT_IDLE,
            allow_non_loopback: false,
            check: false,
        }
    }

    /// The listener's limits.
    pub fn limits(&self) -> server::Limits {
        server::Limits {
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
        }
    }

    /// Validates the configuration and builds the proxy state.
    pub fn build(&self) -> Result<Proxy, Error> {
        let alias = |var: &'static str, value: &Option<String>| -> Result<Option<AliasTarget>, Error> {
            value
                .as_deref()
                .filter(|v| !v.trim().is_empty())
                .map(|v| {
                    crate::oci::reference::parse(v.trim())
                        .map(|r| AliasTarget::from(&r))
                        .map_err(|source| Error::Reference { var, source })
                })
                .transpose()
        };
        let base = alias("BOB_PROXY_BASE_REF", &self.base_ref)?;
        let target = alias("BOB_PROXY_TARGET_REF", &self.target_ref)?;
        let cache = match self.cache_repository.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => {
                let bad = || Error::CacheRepository { value: v.to_string() };
                // A repository only: buildah names the tags (the steps' keys).
                let r = crate::oci::reference::parse(v).map_err(|_| bad())?;
                if r.digest().is_some() || v.rsplit('/').next().is_some_and(|last| last.contains(':')) {
                    return Err(bad());
                }
                Some(AliasTarget::from(&r))
            }
            None => None,
        };
        let mirror = mirror::MirrorPolicy::parse(&self.mirror_refs).map_err(Error::Mirror)?;
        let creds = match (&self.auth_file, &self.auth) {
            (Some(path), _) => CredentialStore::file(path),
            (None, Some(json)) => CredentialStore::inline(json),
            (None, None) => Ok(CredentialStore::anonymous()),
        }
        .map_err(Error::Credentials)?;
        let opts = UpstreamOptions {
            read_timeout: self.upstream_timeout,
            request_timeout: self.upstream_timeout,
            retries: self.retries,
            ..Default::default()
        };
        let endpoints = Endpoints::new(&self.insecure_registries);
        tracing::info!(
            base = ?base, target = ?target, cache = ?cache, base_read_only = self.base_read_only,
            mirror = ?mirror.refs().iter().map(|r| r.whole()).collect::<Vec<_>>(),
            credentials = %creds.describe(), "proxy configured"
        );
        let upstream = Transport::new(Arc::new(creds), endpoints, opts).map_err(Error::Transport)?;
        Ok(Proxy {
            base,
            target,
            cache,
            base_read_only: self.base_read_only,
            mirror,
            upstream,
            uploads: uploads::Uploads::new(self.upload_idle_timeout, self.max_uploads as usize),
        })
    }

    fn socket_addr(&self) -> Result<SocketAddr, Error> {
        let addr = self.addr.trim().trim_start_matches("http://");
        let addr =
            addr.strip_prefix("localhost:").map(|p| format!("127.0.0.1:{p}")).unwrap_or(addr.to_string());
        addr.parse().map_err(|_| Error::Address { addr: self.addr.clone() })
    }
}

/// The proxy's HTTP surface; tests call it without a socket.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new().fallback(handler::handle).with_state(proxy)
}

/// Serves the proxy on `listener` within `limits` until `shutdown` completes, cancelling expired
/// upload sessions upstream in the background.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: server::Limits,
    shutdown: impl Future<Output = ()>,
) {
    let sweeper = tokio::spawn(uploads::sweep(proxy.clone()));
    server::serve(listener, router(proxy), limits, shutdown).await;
    sweeper.abort();
}

/// Runs `bob proxy` (or its `--check`) until SIGTERM/SIGINT.
pub async fn run(args: ProxyArgs) -> Result<(), Error> {
    let addr = args.socket_addr()?;
    if args.check {
        return check(addr).await;
    }
    if !addr.ip().is_loopback() {
        if !args.allow_non_loopback {
            return Err(Error::NotLoopback { addr });
        }
        tracing::warn!(%addr, "listening beyond loopback: whoever reaches this address can use the registry credentials");
    }
    let proxy = Arc::new(args.build()?);
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
    // Tests and `bob run` read the real port from this line when they ask for port 0.
    tracing::info!("bob proxy listening on http://{local}");
    serve(listener, proxy, args.limits(), shutdown()).await;
    Ok(())
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

async fn check(addr: SocketAddr) -> Result<(), Error> {
    let probe =
        if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(Error::Client)?;
    match client.get(format!("http://{probe}/v2/")).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        _ => Err(Error::Check { addr: probe }),
    }
}
