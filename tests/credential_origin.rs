//! Registry credentials go only to the registry's origin and to the token realm of its own
//! challenge. A real `docker-registry` with token auth sits behind a recording front (its origin
//! as clients see it) that sends a blob read, or an upload, on to a storage host; the storage host
//! answers 401 with a challenge naming another token realm. Neither the storage host nor that
//! realm may ever see credentials, the registry must keep authenticating as before, and no body a
//! client of the proxy reads may name a realm.

mod common;

use std::process::Command;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bob::oci::CredentialStore;
use bob::oci::Reference;
use bob::oci::transport;
use common::recorder::{Front, Recorder};
use common::*;

const USER: &str = "builder";
const PASSWORD: &str = "origin-pass-7";

/// The registry behind its front, the legitimate token server, the storage host and the
/// attacker's realm it names.
struct Scene {
    token: TokenServer,
    _registry: Registry,
    storage: Recorder,
    evil: Recorder,
    front: Front,
    image: Image,
}

impl Scene {
    async fn start() -> Self {
        let token = TokenServer::start(USER, PASSWORD, 300).await;
        let registry = Registry::start_with(RegistryAuth::Token(&token), true);
        let evil = Recorder::start(|_: Request| async {
            ([("content-type", "application/json")], r#"{"token":"evil-token","expires_in":300}"#)
                .into_response()
        })
        .await;
        let challenge = format!(r#"Bearer realm="{}/token",service="evil""#, evil.url());
        let body =
            format!(r#"{{"errors":[{{"code":"UNAUTHORIZED","message":"log in at {}/token"}}]}}"#, evil.url());
        // Storage redirects once more (repeated redirects), then asks for credentials.
        let storage = Recorder::start(move |req: Request| {
            let (challenge, body) = (challenge.clone(), body.clone());
            async move {
                match req.uri().path().strip_prefix("/blobs/") {
                    Some(rest) => {
                        let to = format!("/again/{rest}?X-Amz-Signature=s3cr3t");
                        (axum::http::StatusCode::FOUND, [("location", to)]).into_response()
                    }
                    None => unauthorized(&challenge, body),
                }
            }
        })
        .await;
        let front = Front::start(&registry.host, &storage.addr).await;
        let image = small_image(31, "amd64");
        Direct::new(&registry.host, Some(&docker_config(&registry.host, USER, PASSWORD)))
            .push_image("ws", "t", &image)
            .await;
        Scene { token, _registry: registry, storage, evil, front, image }
    }

    fn creds(&self) -> String {
        docker_config(self.front.host(), USER, PASSWORD)
    }

    fn layer(&self) -> String {
        self.image.layers[0].digest.clone()
    }

    /// Nothing but the registry's origin and its own realm ever saw credentials; the attacker's
    /// realm saw nothing at all.
    fn assert_credentials_stayed_home(&self) {
        assert!(!self.storage.seen().is_empty(), "the trap was not reached");
        assert!(
            self.storage.authorized().is_empty(),
            "storage got credentials: {:?}",
            self.storage.authorized()
        );
        assert!(self.evil.seen().is_empty(), "the storage host's realm was asked: {:?}", self.evil.seen());
    }

    /// The front's newest request for `path_part` carried a token the real token server issued.
    fn assert_authenticated_with_a_real_token(&self, path_part: &str) {
        let seen = self.front.recorder.seen();
        let last =
            seen.iter().rev().find(|s| s.uri.contains(path_part)).expect("request reached the registry");
        let auth = last.authorization.clone().unwrap_or_default();
        let token = auth.strip_prefix("Bearer ").unwrap_or_else(|| panic!("not a bearer token: {auth:?}"));
        assert!(self.token.issued().iter().any(|t| t == token), "token not from the registry's realm");
    }

    fn assert_no_realm_in(&self, text: &str) {
        for realm in [format!("{}/token", self.evil.url()), self.token.realm()] {
            assert!(!text.contains(&realm), "a token realm reached the client: {text}");
        }
        assert!(!text.contains(&self.evil.addr), "the storage host's realm reached the client: {text}");
    }
}

fn unauthorized(challenge: &str, body: String) -> Response {
    let headers = [("www-authenticate", challenge.to_string()), ("content-type", "application/json".into())];
    (axum::http::StatusCode::UNAUTHORIZED, headers, body).into_response()
}

/// Status and body of a request through the proxy.
async fn call(req: reqwest::RequestBuilder) -> (u16, String) {
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_never_sends_credentials_to_a_storage_host_or_the_realm_it_names() {
    let s = Scene::start().await;
    let target = format!("{}/ws:t", s.front.host());
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &target), ("BOB_AUTH", &s.creds())]);
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}/v2/target/{p}", proxy.url());
    let mut bodies = String::new();
    let (status, body) = call(http.get(url("manifests/t")).header("accept", OCI_MANIFEST)).await;
    assert_eq!(status, 200, "{body}");

    // 1. A blob read redirected to storage, which asks for credentials.
    s.front.traps.lock().unwrap().redirect_blobs.push(s.layer());
    let (status, body) = call(http.get(url(&format!("blobs/{}", s.layer())))).await;
    s.assert_credentials_stayed_home();
    assert!(
        s.storage.seen().iter().any(|r| r.uri.starts_with("/again/")),
        "the second redirect was followed"
    );
    assert_eq!(status, 502, "a storage host asking for credentials is the upstream's failure: {body}");
    bodies.push_str(&body);
    let (status, body) = call(http.get(url("manifests/t")).header("accept", OCI_MANIFEST)).await;
    assert_eq!(status, 200, "the registry still authenticates after the storage's 401: {body}");
    s.assert_authenticated_with_a_real_token("/manifests/t");

    // 2. An upload whose Location is on storage, which answers the PATCH with 401.
    s.front.traps.lock().unwrap().uploads_to_storage = true;
    let r = http.post(url("blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/v2/target/blobs/uploads/"), "the client sees a proxy session: {location}");
    let patch = http.patch(format!("{}{location}", proxy.url())).header("content-range", "0-3").body("data");
    let (status, body) = call(patch).await;
    s.assert_credentials_stayed_home();
    assert_eq!(status, 502, "{body}");
    bodies.push_str(&body);
    s.front.traps.lock().unwrap().uploads_to_storage = false;
    let (status, body) = call(http.get(url(&format!("blobs/{}", s.image.config.digest)))).await;
    s.assert_credentials_stayed_home();
    assert_eq!((status, body.len()), (200, s.image.config.bytes.len()), "later reads authenticate");
    s.assert_authenticated_with_a_real_token(&s.image.config.digest);

    s.assert_no_realm_in(&bodies);
    s.assert_credentials_stayed_home();
    assert!(!proxy.proc.output().contains("s3cr3t"), "a storage URL's signature was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_refused_by_the_registry_does_not_tell_the_client_where_its_realm_is() {
    let s = Scene::start().await;
    let target = format!("{}/ws:t", s.front.host());
    let wrong = docker_config(s.front.host(), USER, "not-the-password");
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &target), ("BOB_AUTH", &wrong)]);
    let http = reqwest::Client::new();
    let url = format!("{}/v2/target/manifests/t", proxy.url());
    let (status, body) = call(http.get(url).header("accept", OCI_MANIFEST)).await;
    assert_eq!(status, 401, "{body}");
    s.assert_no_realm_in(&body);
    let anonymous = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &target)]);
    let push = format!("{}/v2/target/blobs/uploads/", anonymous.url());
    let (status, body) = call(http.post(push)).await;
    assert_eq!(status, 401, "the registry's own 401 becomes the proxy's words: {body}");
    s.assert_no_realm_in(&body);
}

fn bob_copy(src: &str, dst: &str, auth: &std::path::Path) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bob"));
    c.args(["copy", "--jobs", "1", src, dst]).arg("--auth-file").arg(auth);
    c.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("HOME", "/nonexistent");
    c.output().unwrap()
}

fn client(creds: &str) -> bob::oci::client::Client {
    let store = CredentialStore::inline(creds).unwrap();
    bob::oci::client::Client::connect(store, &[], Duration::from_secs(30), None).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_never_sends_credentials_to_a_storage_host_a_source_layer_redirects_to() {
    let s = Scene::start().await;
    let dst = Registry::start(RegistryAuth::None);
    s.front.traps.lock().unwrap().redirect_blobs.push(s.layer());
    let dir = tempfile::tempdir().unwrap();
    let auth = write_file(dir.path(), "config.json", &s.creds());
    let out = bob_copy(&format!("{}/ws:t", s.front.host()), &dst.repo("ws:t"), &auth);
    let stderr = String::from_utf8_lossy(&out.stderr);
    s.assert_credentials_stayed_home();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("asked for credentials"), "{stderr}");
    s.assert_no_realm_in(&stderr);
    assert!(!stderr.contains("s3cr3t"), "a storage URL's signature was printed: {stderr}");
    s.assert_credentials_stayed_home();

    // One client, several requests: the storage's 401 changes nothing for the next ones.
    let c = client(&s.creds());
    let host = s.front.host();
    let err = c.blob(host, "ws", &s.layer()).await.expect_err("the redirected read fails");
    assert!(
        matches!(err, bob::oci::client::Error::Transport(transport::Error::ForeignChallenge { .. })),
        "{err}"
    );
    let r: Reference = format!("{host}/ws:t").parse().unwrap();
    assert_eq!(c.manifest(&r).await.unwrap().digest, s.image.digest);
    s.assert_authenticated_with_a_real_token("/manifests/t");
    s.assert_credentials_stayed_home();
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_never_sends_credentials_to_a_storage_host_an_upload_goes_to() {
    let s = Scene::start().await;
    let src = Registry::start(RegistryAuth::None);
    Direct::new(&src.host, None).push_image("app", "v1", &s.image).await;
    s.front.traps.lock().unwrap().uploads_to_storage = true;
    let dir = tempfile::tempdir().unwrap();
    let auth = write_file(dir.path(), "config.json", &s.creds());
    let out = bob_copy(&src.repo("app:v1"), &format!("{}/copied:v1", s.front.host()), &auth);
    let stderr = String::from_utf8_lossy(&out.stderr);
    s.assert_credentials_stayed_home();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    s.assert_no_realm_in(&stderr);

    let c = client(&s.creds());
    let host = s.front.host();
    let location = c.start_upload(host, "copied").await.unwrap();
    assert!(location.as_str().contains(&s.storage.addr), "the upload goes to storage: {location}");
    let body = reqwest::Body::from(s.image.config.bytes.clone());
    let err = c.patch_upload(host, "copied", location, body).await.unwrap_err();
    assert!(
        matches!(err, bob::oci::client::Error::Transport(transport::Error::ForeignChallenge { .. })),
        "{err}"
    );
    s.front.traps.lock().unwrap().uploads_to_storage = false;
    let r: Reference = format!("{host}/ws:t").parse().unwrap();
    assert_eq!(c.manifest_digest(&r).await.unwrap(), Some(s.image.digest.clone()));
    s.assert_authenticated_with_a_real_token("/ws/manifests/t");
    s.assert_credentials_stayed_home();
}
