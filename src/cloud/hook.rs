//! A test hook (feature `test-hooks`, never in a release build): ECR host names are served by the
//! loopback registry named by `BOB_TEST_ECR_REGISTRY` (`127.0.0.1:<port>`), so tests can use real
//! ECR names against a real `docker-registry` while moto plays the AWS APIs.

#[cfg(not(debug_assertions))]
compile_error!("the test-hooks feature is for tests only: a release build must not have it");

use std::sync::OnceLock;

/// The variable naming the loopback registry that serves ECR host names.
pub const ENV: &str = "BOB_TEST_ECR_REGISTRY";

/// The loopback registry serving ECR hosts, if the variable names one.
pub fn ecr_registry() -> Option<&'static str> {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let target = std::env::var(ENV).ok().filter(|t| !t.is_empty())?;
            // Only a loopback registry: the hook must not be able to send anything elsewhere.
            assert!(crate::oci::endpoint::is_loopback(&target), "{ENV}={target} is not a loopback registry");
            Some(target)
        })
        .as_deref()
}

/// The base URL serving `host` when it is an ECR host and the hook is set.
pub fn base_url(host: &str) -> Option<url::Url> {
    let target = ecr_registry().filter(|_| super::ecr::is_ecr(host))?;
    url::Url::parse(&format!("http://{target}/")).ok()
}
