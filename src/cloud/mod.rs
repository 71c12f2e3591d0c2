//! Registry credentials from a cloud identity instead of a long-lived Secret (docs/credentials.md):
//! ECR host names for every partition, the operator's namespace → registry mapping (default deny),
//! the session policy that narrows each build's credential to its repositories, the per-pod Secret
//! that carries it to the proxy, the guards that keep every cloud identity out of the build pod,
//! and (feature `aws`) the AWS calls that mint it.

pub mod ambient;
#[cfg(feature = "aws")]
pub mod aws;
pub mod ecr;
pub mod guard;
#[cfg(feature = "test-hooks")]
pub mod hook;
pub mod mapping;
pub mod policy;
pub mod secret;
