//! Bounded input: every file and inline value a user hands bob (ImageBuild files, docker configs
//! from `--auth-file`, `BOB_AUTH_FILE` or `BOB_AUTH`, a Secret value in the ImageBuild file) is
//! read against a limit. Past it bob exits non-zero with one line naming the input and the limit,
//! and endless inputs (`/dev/zero`) are cut at the limit instead of filling memory.

mod common;

use std::process::Output;

use bob::oci::{Credential, CredentialStore, Secret};
use common::{bob_bounded as bob, write_file};

/// Asserts a failed run whose stderr is exactly `line`.
fn fails_with(out: &Output, line: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got {:?}:\n{err}", out.status);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines, [line], "one line expected");
}

/// A valid docker config of about `bytes` bytes (a long unused field), with one credential.
fn padded_docker_config(bytes: usize, password: &str) -> String {
    format!(
        r#"{{"auths":{{"r.test":{{"username":"u","password":"{password}"}}}},"padding":"{}"}}"#,
        "x".repeat(bytes)
    )
}

fn imagebuild(secret: &str) -> String {
    format!(
        "apiVersion: bob.dev/v1alpha1\nkind: ImageBuild\nmetadata: {{name: x}}\nspec:\n  source: {{image: {{ref: \"127.0.0.1:9/a:1\"}}}}\n  \
         workspaceImageRepository: 127.0.0.1:9/ws\n  registryAuth: {{secretRef: {{name: reg}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: reg}}\nstringData:\n  .dockerconfigjson: '{secret}'\n"
    )
}

#[test]
fn an_endless_or_huge_imagebuild_file_is_one_line() {
    let out = bob(&["run", "-f", "/dev/zero"], &[]);
    fails_with(&out, "bob: ImageBuild file /dev/zero exceeds the limit of 4 MiB");

    let dir = tempfile::tempdir().unwrap();
    let huge = imagebuild("{}") + &format!("# {}\n", "x".repeat(5 << 20));
    let file = write_file(dir.path(), "huge.yaml", &huge);
    let out = bob(&["run", "-f", file.to_str().unwrap()], &[]);
    fails_with(&out, &format!("bob: ImageBuild file {} exceeds the limit of 4 MiB", file.display()));
}

#[test]
fn a_huge_registry_secret_in_the_imagebuild_file_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "ib.yaml", &imagebuild(&padded_docker_config(2 << 20, "p")));
    let out = bob(&["run", "-f", file.to_str().unwrap()], &[]);
    fails_with(
        &out,
        "bob: cannot read registry credentials: docker config Secret reg/.dockerconfigjson exceeds the limit of 1 MiB",
    );
}

#[test]
fn a_huge_or_endless_auth_file_is_one_line_for_copy_and_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let big = write_file(dir.path(), "config.json", &padded_docker_config(2 << 20, "p"));
    let big = big.to_str().unwrap();
    for file in [big, "/dev/zero"] {
        let out = bob(&["copy", "--auth-file", file, "127.0.0.1:9/a:1", "127.0.0.1:9/b:1"], &[]);
        fails_with(
            &out,
            &format!(
                "bob: cannot read registry credentials: docker config {file} exceeds the limit of 1 MiB"
            ),
        );
        let out = bob(&["proxy"], &[("BOB_AUTH_FILE", file), ("BOB_PROXY_ADDR", "127.0.0.1:0")]);
        fails_with(
            &out,
            &format!(
                "bob: cannot load registry credentials: docker config {file} exceeds the limit of 1 MiB"
            ),
        );
    }
    // REGISTRY_AUTH_FILE is how `bob copy` and `bob run` find it too.
    let out = bob(&["copy", "127.0.0.1:9/a:1", "127.0.0.1:9/b:1"], &[("REGISTRY_AUTH_FILE", big)]);
    fails_with(
        &out,
        &format!("bob: cannot read registry credentials: docker config {big} exceeds the limit of 1 MiB"),
    );
}

#[test]
fn inline_credentials_past_the_limit_are_refused() {
    // The kernel caps one environment variable at 128 KiB, so an oversized BOB_AUTH can only
    // reach the credential store through the library (as `bob run` passes a Secret's value).
    let e = CredentialStore::inline(&padded_docker_config(1 << 20, "p")).unwrap_err();
    assert_eq!(e.to_string(), "docker config BOB_AUTH exceeds the limit of 1 MiB");
    assert!(CredentialStore::inline(&padded_docker_config(1000, "p")).is_ok());
}

#[test]
fn a_rotated_auth_file_past_the_limit_keeps_the_previous_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "config.json", &padded_docker_config(10, "old"));
    let store = CredentialStore::file(&path).unwrap();
    let old = Credential::Basic { username: "u".into(), password: Secret::new("old") };
    assert_eq!(store.lookup("r.test").0.as_ref(), Some(&old));
    // Rotate by rename, as a Secret volume update does, to a file past the limit.
    let next = write_file(dir.path(), "next.json", &padded_docker_config(2 << 20, "new"));
    std::fs::rename(&next, &path).unwrap();
    assert_eq!(store.lookup("r.test").0.as_ref(), Some(&old), "the oversized file is not loaded");
}
