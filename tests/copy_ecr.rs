//! `bob copy` on a laptop with ECR: a registry the docker config has no entry for gets a token
//! from the ambient AWS credentials (moto with IAM enforcement on, a real `docker-registry` that
//! accepts only that token, reached under the ECR host name through the `test-hooks` hook); a
//! user AWS refuses gets the registry's own refusal (exit 4) and a warning naming the AWS error;
//! a docker config entry wins over the ambient credentials.

mod common;

use std::process::{Command, Output};

use common::moto::Moto;
use common::*;
use serde_json::json;

const ACCOUNT: &str = "123456789012";
const ECR: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

fn bob_copy(moto: &Moto, user: &str, registry: &str, auth: Option<&std::path::Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bob"));
    c.args(["copy", &format!("{ECR}/src/app:1"), &format!("{ECR}/dst/app:1")]);
    c.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c.env("HOME", "/nonexistent").env("RUST_LOG", "info").env("BOB_TEST_ECR_REGISTRY", registry);
    Moto::apply_env(&mut c, &moto.user_env(user));
    if let Some(a) = auth {
        c.arg("--auth-file").arg(a);
    }
    c.output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ecr_without_a_config_entry_uses_the_ambient_aws_credentials() {
    // ECR host names reach the loopback registry only through the test hook.
    if !cfg!(feature = "test-hooks") {
        panic!(
            "this test needs the test hook: run it with `cargo test --features test-hooks` (as scripts/test does)"
        );
    }
    let moto = Moto::start(&json!({
        "account": ACCOUNT,
        "users": [
            {"name": "laptop", "actions": ["ecr:GetAuthorizationToken"]},
            {"name": "nobody", "actions": ["ecr:DescribeRepositories"]},
        ],
    }));
    let password = Moto::ecr_password(ACCOUNT);
    let reg = Registry::start(RegistryAuth::Basic { user: "AWS", password: &password });
    let creds = docker_config(&reg.host, "AWS", &password);
    let direct = Direct::new(&reg.host, Some(&creds));
    let img = small_image(7, "amd64");
    direct.push_image("src/app", "1", &img).await;

    // No docker config at all: the token comes from the user's AWS credentials.
    let out = bob_copy(&moto, "laptop", &reg.host, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{ECR}/dst/app:1@{}", img.digest));
    assert_eq!(direct.manifest_digest("dst/app", "1").await.as_deref(), Some(img.digest.as_str()));
    assert!(!err.contains(&password), "no credential in the log");

    // AWS refuses this user: a warning naming the refusal, then the registry's 401 (exit 4).
    let out = bob_copy(&moto, "nobody", &reg.host, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("no ECR token from the ambient AWS credentials") && err.contains("AccessDenied"),
        "{err}"
    );

    // An entry in the auth file wins: the refused user does not matter, no AWS call is made.
    let dir = tempfile::tempdir().unwrap();
    let auth = write_file(dir.path(), "config.json", &docker_config(ECR, "AWS", &password));
    let out = bob_copy(&moto, "nobody", &reg.host, Some(&auth));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("ambient AWS credentials"), "{err}");
}
