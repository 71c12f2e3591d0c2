//! The AWS calls (feature `aws`): the controller's scoped credential — `AssumeRole` of the mapping
//! entry's role with a session policy naming only the build's repositories, then
//! `GetAuthorizationToken` with that session (`ecr-public` in `us-east-1` for `public.ecr.aws`) —
//! and a laptop's ambient token for `bob run` and `bob copy`. Credentials come from the SDK's
//! default chain (IRSA web identity, EKS Pod Identity, profiles, SSO); `AWS_ENDPOINT_URL` points
//! every call elsewhere (tests). The SDK speaks TLS with rustls on ring.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use k8s_openapi::jiff::Timestamp;

use super::ecr::{self, Registry};
use super::mapping::Grant;
use super::policy::session_policy;
use super::secret::{Minted, docker_config};

/// Why no credential was minted. Messages name the mapping entry and the AWS error code, never
/// the controller's identity (AWS's own text names it: it is logged, not put in a status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// AWS refused a call (`AccessDenied`, an expired or invalid token, a trust policy).
    #[error(
        "AWS refused {call} for registry mapping {entry:?} ({code}): the role must allow it (docs/handbook.md, \"Registry credentials\")"
    )]
    Denied {
        /// The call.
        call: &'static str,
        /// The entry.
        entry: String,
        /// AWS's error code.
        code: String,
    },
    /// A repository the build pushes to does not exist (ECR creates none on push).
    #[error(
        "repository {repository} does not exist in {host}: create it (aws ecr create-repository --repository-name {repository})"
    )]
    RepositoryNotFound {
        /// The registry.
        host: String,
        /// The repository.
        repository: String,
    },
    /// AWS did not answer, or answered something else.
    #[error("{call} failed for registry mapping {entry:?}: {message}")]
    Failed {
        /// The call.
        call: &'static str,
        /// The entry.
        entry: String,
        /// What happened (no credential in it).
        message: String,
    },
}

/// The environment's AWS configuration (credentials chain, region, `AWS_ENDPOINT_URL`), spoken
/// over hyper with rustls on ring (the SDK's default client would bring aws-lc).
pub async fn environment() -> SdkConfig {
    let loaded = loader().load().await;
    if loaded.region().is_some() {
        return loaded;
    }
    // No region in the environment (Pod Identity sets none): the controller's own STS calls go
    // to us-east-1's regional endpoint; each build's calls use its registry's region anyway.
    loader().region(Region::new("us-east-1")).load().await
}

fn loader() -> aws_config::ConfigLoader {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    // A stalled AWS answer must not hold a reconcile (or the refresher) for long.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(30))
        .build();
    aws_config::defaults(BehaviorVersion::latest()).http_client(http).timeout_config(timeouts)
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    call: &'static str,
    entry: &str,
    e: SdkError<E, aws_sdk_sts::config::http::HttpResponse>,
) -> Error {
    tracing::warn!(call, entry, error = %DisplayErrorContext(&e), "an AWS call failed");
    // A refusal whose body the SDK cannot read (no error code) is still a refusal by its status.
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code =
        e.as_service_error().and_then(|s| s.code()).map(str::to_string).or_else(|| {
            status.filter(|s| *s == 401 || *s == 403).map(|s| format!("AccessDenied (HTTP {s})"))
        });
    match code {
        Some(code)
            if code.contains("AccessDenied")
                || code.contains("Unauthorized")
                || code.contains("ExpiredToken")
                || code.contains("InvalidClientTokenId")
                || code.contains("InvalidIdentityToken") =>
        {
            Error::Denied { call, entry: entry.to_string(), code }
        }
        Some(code)
            if code.contains("PackedPolicyTooLarge")
                || code.contains("MalformedPolicyDocument")
                || code.contains("ValidationError") =>
        {
            // Waiting changes nothing: the build touches more repositories than a session
            // policy can name, or the entry's role is not one AWS accepts.
            Error::Denied { call, entry: entry.to_string(), code }
        }
        Some(code) => Error::Failed { call, entry: entry.to_string(), message: code },
        None => Error::Failed { call, entry: entry.to_string(), message: "no answer from AWS".into() },
    }
}

/// The role session's name, as CloudTrail shows it: the namespace (cut to fit AWS's 64
/// characters) and a short hash of the grants, so builds of long namespaces stay apart.
fn session_name(ns: &str, g: &Grant) -> String {
    use sha2::{Digest, Sha256};
    let sum = Sha256::digest(serde_json::to_string(g).unwrap_or_default().as_bytes());
    let hash: String = sum.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let ns: String = ns.chars().take(50).collect();
    format!("bob-{ns}-{hash}")
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Mints build credentials with the controller's identity.
pub struct Minter {
    base: SdkConfig,
    session: Duration,
}

impl Minter {
    /// A minter whose sessions last `session` (15 minutes to 1 hour: AssumeRole from a role
    /// session is role chaining, which AWS caps at an hour).
    pub fn new(base: SdkConfig, session: Duration) -> Self {
        Self { base, session }
    }

    /// One credential for `grants` of a build in `ns`: a session per grant, a token per registry.
    /// `must_exist` are the repositories the build pushes its images to (not the layer cache).
    pub async fn mint(
        &self,
        ns: &str,
        grants: &[Grant],
        must_exist: &[(String, String)],
    ) -> Result<Minted, Error> {
        let now = Timestamp::now();
        let mut expires_at = now + self.session;
        let mut entries = BTreeMap::new();
        for g in grants {
            let Some(registry) = ecr::parse(&g.host) else { continue };
            let region = Region::new(registry.region().to_string());
            let fips = matches!(registry, Registry::Private { fips: true, .. })
                || self.base.use_fips().unwrap_or(false);
            let sts = aws_sdk_sts::Client::from_conf(
                aws_sdk_sts::config::Builder::from(&self.base).region(region.clone()).use_fips(fips).build(),
            );
            let session_name = session_name(ns, g);
            let out = sts
                .assume_role()
                .role_arn(&g.role_arn)
                .role_session_name(session_name)
                .policy(session_policy(g))
                .duration_seconds(self.session.as_secs().clamp(900, 43_200) as i32)
                .send()
                .await
                .map_err(|e| classify("sts:AssumeRole", &g.entry, e))?;
            let c = out.credentials().ok_or_else(|| Error::Failed {
                call: "sts:AssumeRole",
                entry: g.entry.clone(),
                message: "no credentials in the answer".into(),
            })?;
            let session_end = SystemTime::try_from(*c.expiration()).ok();
            if let Some(end) = session_end {
                expires_at = expires_at.min(timestamp(end));
            }
            let creds = aws_credential_types::Credentials::new(
                c.access_key_id(),
                c.secret_access_key(),
                Some(c.session_token().to_string()),
                session_end,
                "bob-build-session",
            );
            if let Registry::Private { account, .. } = &registry {
                let ecr = private_client(&self.base, &registry, Some(creds.clone()));
                for (host, repository) in must_exist.iter().filter(|(h, _)| h == &g.host) {
                    check_exists(&ecr, account, host, repository, &g.entry).await?;
                }
            }
            let (auth, token_end) = token(&self.base, &registry, Some(creds), &g.entry).await?;
            // A token's expiry in the past (moto's, say) is ignored: the session bounds it.
            let token_end = token_end.filter(|end| *end > now);
            let auth = auth.ok_or_else(|| Error::Failed {
                call: "GetAuthorizationToken",
                entry: g.entry.clone(),
                message: "no token in the answer".into(),
            })?;
            if let Some(end) = token_end {
                expires_at = expires_at.min(end);
            }
            entries.insert(g.host.clone(), auth);
        }
        Ok(Minted { docker_config: docker_config(&entries), minted_at: now, expires_at })
    }
}

async fn check_exists(
    ecr: &aws_sdk_ecr::Client,
    account: &str,
    host: &str,
    repository: &str,
    entry: &str,
) -> Result<(), Error> {
    match ecr.describe_repositories().registry_id(account).repository_names(repository).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_repository_not_found_exception()) => {
            Err(Error::RepositoryNotFound { host: host.to_string(), repository: repository.to_string() })
        }
        Err(e) => Err(classify("ecr:DescribeRepositories", entry, e)),
    }
}

/// Tokens for the ECR `hosts` with the environment's own identity (a laptop's profile, SSO, or
/// environment variables): `host → auth` for a docker config. No session policy: the identity is
/// the user's own.
pub async fn ambient(hosts: &[String]) -> Result<BTreeMap<String, String>, Error> {
    let base = environment().await;
    let mut out = BTreeMap::new();
    for host in hosts {
        let Some(registry) = ecr::parse(host) else { continue };
        if let (Some(t), _) = token(&base, &registry, None, "ambient").await? {
            out.insert(host.clone(), t);
        }
    }
    Ok(out)
}

/// The ECR client of a private registry: its region, FIPS when the host or the environment asks
/// for it, and `creds` (a build's session) instead of the environment's identity when given.
fn private_client(
    base: &SdkConfig,
    registry: &Registry,
    creds: Option<aws_credential_types::Credentials>,
) -> aws_sdk_ecr::Client {
    let fips = matches!(registry, Registry::Private { fips: true, .. }) || base.use_fips().unwrap_or(false);
    let mut conf = aws_sdk_ecr::config::Builder::from(base)
        .region(Region::new(registry.region().to_string()))
        .use_fips(fips);
    if let Some(c) = creds {
        conf = conf.credentials_provider(c);
    }
    aws_sdk_ecr::Client::from_conf(conf.build())
}

/// A registry token (`base64(AWS:<password>)`) and when it expires, from `ecr` for a private
/// registry or `ecr-public` in `us-east-1` for the public gallery.
async fn token(
    base: &SdkConfig,
    registry: &Registry,
    creds: Option<aws_credential_types::Credentials>,
    entry: &str,
) -> Result<(Option<String>, Option<Timestamp>), Error> {
    let at = |t: Option<&aws_sdk_ecr::primitives::DateTime>| {
        t.and_then(|t| SystemTime::try_from(*t).ok()).map(timestamp)
    };
    match registry {
        Registry::Private { .. } => {
            let out = private_client(base, registry, creds)
                .get_authorization_token()
                .send()
                .await
                .map_err(|e| classify("ecr:GetAuthorizationToken", entry, e))?;
            let data = out.authorization_data().first();
            Ok((
                data.and_then(|d| d.authorization_token()).map(str::to_string),
                at(data.and_then(|d| d.expires_at())),
            ))
        }
        Registry::Public => {
            let mut conf =
                aws_sdk_ecrpublic::config::Builder::from(base).region(Region::new(ecr::PUBLIC_REGION));
            if let Some(c) = creds {
                conf = conf.credentials_provider(c);
            }
            let out = aws_sdk_ecrpublic::Client::from_conf(conf.build())
                .get_authorization_token()
                .send()
                .await
                .map_err(|e| classify("ecr-public:GetAuthorizationToken", entry, e))?;
            let data = out.authorization_data();
            Ok((
                data.and_then(|d| d.authorization_token()).map(str::to_string),
                at(data.and_then(|d| d.expires_at())),
            ))
        }
    }
}
