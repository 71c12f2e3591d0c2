//! The Kubernetes client of `bob controller` and `bob logs`: kube's client (configuration from
//! the kubeconfig or the in-cluster service account) with bob's retry layer (`retry.rs`) in
//! place of kube's own, and a User-Agent per role, so an API server's flow control, audit log
//! and fault injection (kube-sim `--faults agent=`) can tell the controller from its lease.

pub mod retry;

use http::{HeaderName, HeaderValue};
use kube::client::ClientBuilder;

pub use retry::{Observer, Outcome, Policy, RetryLayer};

/// Who is calling: each role sends its own User-Agent, `<agent>/<bob version>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    /// The controller's reconciles, watches and sweeps: `bob-controller/<version>`.
    Controller,
    /// The controller's leader election: `bob-controller-lease/<version>`. It starts with the
    /// controller's agent, so `^bob-controller` matches both and `^bob-controller/` the
    /// reconciles alone.
    Lease,
    /// `bob logs` (and `kubectl bob logs`): `bob-logs/<version>`.
    Logs,
}

impl Agent {
    /// The User-Agent header value.
    pub fn user_agent(self) -> String {
        let name = match self {
            Agent::Controller => "bob-controller",
            Agent::Lease => "bob-controller-lease",
            Agent::Logs => "bob-logs",
        };
        format!("{name}/{}", env!("CARGO_PKG_VERSION"))
    }
}

/// Why there is no client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither a kubeconfig nor an in-cluster service account was found or usable.
    #[error("no kubernetes configuration (kubeconfig or in-cluster service account)")]
    Config(#[source] kube::config::InferConfigError),
    /// The configuration names something the client cannot use (TLS, credentials, proxy).
    #[error("cannot build the kubernetes client")]
    Build(#[source] kube::Error),
}

/// kube's default service stack (its `GenericService`, which kube does not export by name).
pub type KubeStack = tower::util::BoxService<
    http::Request<kube::client::Body>,
    http::Response<Box<kube::client::DynBody>>,
    tower::BoxError,
>;

/// The service stack of bob's clients: kube's, wrapped in the retry layer.
pub type Stack = retry::Retry<retry::Buffered<KubeStack>>;

/// The configuration from the environment, as `kube::Client::try_default` finds it.
pub async fn config() -> Result<kube::Config, Error> {
    kube::Config::infer().await.map_err(Error::Config)
}

/// A client builder on `config` for `agent` with the default retry policy, reporting each
/// retry to `observer`; more layers may go on top before `build()`.
pub fn builder(
    mut config: kube::Config,
    agent: Agent,
    observer: Option<Observer>,
) -> Result<ClientBuilder<Stack>, Error> {
    // kube's own retry (429/503/504, up to 15 times and 1000 s) would nest inside ours.
    config.default_retry = false;
    let value = HeaderValue::from_str(&agent.user_agent()).expect("a version is a valid header value");
    config.headers.retain(|(name, _)| name != http::header::USER_AGENT);
    config.headers.push((HeaderName::from_static("user-agent"), value));
    let builder = ClientBuilder::try_from(config).map_err(Error::Build)?;
    Ok(builder.with_layer(&RetryLayer::new(Policy::default(), observer)))
}

/// The client for `agent` on `config`.
pub fn client_for(
    config: kube::Config,
    agent: Agent,
    observer: Option<Observer>,
) -> Result<kube::Client, Error> {
    Ok(builder(config, agent, observer)?.build())
}

/// The client for `agent`, configured from the environment.
pub async fn client(agent: Agent) -> Result<kube::Client, Error> {
    client_for(config().await?, agent, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_distinct_and_the_lease_one_extends_the_controller_one() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(Agent::Controller.user_agent(), format!("bob-controller/{v}"));
        assert_eq!(Agent::Lease.user_agent(), format!("bob-controller-lease/{v}"));
        assert_eq!(Agent::Logs.user_agent(), format!("bob-logs/{v}"));
    }
}
