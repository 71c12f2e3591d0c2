//! Registry plumbing shared by every registry client in bob: the plain-HTTP rule, docker
//! credentials, the token flow and the distribution-spec error format.

mod blob;
pub mod client;
pub mod copy;
pub mod credentials;
pub mod endpoint;
pub mod error;
pub mod manifest;
pub mod reference;
pub mod token;
pub mod transport;

pub use credentials::{Credential, CredentialStore, Secret};
pub use endpoint::Endpoints;
pub use error::{ErrorCode, RegistryError};
pub use oci_client::Reference;
