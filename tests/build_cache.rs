//! The layer cache with real buildah, real registries and `bob proxy`: a rebuild after the last
//! step changed takes the earlier steps from the cache (buildah says so, the result counts them,
//! the image differs only in its last layer); a cache that is unreachable, read-only, or that
//! starts failing in the middle of a build never fails the build and the result says why; two
//! scopes never see each other's steps.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bob::build::BuildResult;
use bob::layer_cache::Mode;
use common::build::*;
use common::*;

/// One `bob build` in a fresh storage (a new pod) with its proxy.
struct Built {
    result: BuildResult,
    stdout: String,
    /// The base image's manifest.
    manifest: serde_json::Value,
}

fn dockerfile(fx: &Fixture, last: &str) -> String {
    format!(
        "FROM {}\nRUN echo slow-step > /slow.txt\nCOPY a.txt /a.txt\nRUN echo {last} > /last.txt\n",
        fx.from
    )
}

/// Builds `dockerfile` with the layer cache at `cache` (the scope's real repository), the proxy
/// holding `auth`, in storage `name`; panics unless the build succeeds.
async fn build(fx: &Fixture, name: &str, dockerfile: &str, cache: &str, auth: &str) -> Built {
    build_with(fx, name, dockerfile, cache, auth, &[]).await
}

/// [`build`] with more variables for `bob build`.
async fn build_with(
    fx: &Fixture,
    name: &str,
    dockerfile: &str,
    cache: &str,
    auth: &str,
    extra: &[(&str, &str)],
) -> Built {
    let (base, ws) = fx.refs(dockerfile);
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &base),
        ("BOB_PROXY_TARGET_REF", &ws),
        ("BOB_AUTH", auth),
        ("BOB_PROXY_MIRROR_REFS", &fx.pin()),
        ("BOB_PROXY_CACHE_REPOSITORY", cache),
    ]);
    let ctx = fx.context(name, dockerfile, &[("a.txt", "from the context\n")]);
    let storage = fx.dir.path().join(format!("storage-{name}"));
    let mut env = vec![
        ("BOB_FROM_REFS".to_string(), fx.pin()),
        ("BOB_LAYER_CACHE_REF".to_string(), format!("{}/cache", proxy.addr)),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let addr = proxy.addr.clone();
    let (out, result) = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        bob_build(&addr, &ctx, &storage, &env)
    })
    .await
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\nproxy:\n{}", text(&out.stderr), proxy.proc.output());
    assert!(result.base_built, "{result:?}");
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let (repo, tag) = base.trim_start_matches(&format!("{}/", fx.reg.host)).rsplit_once(':').unwrap();
    let manifest = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    Built { result, stdout, manifest }
}

fn layers(m: &serde_json::Value) -> Vec<String> {
    m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

fn report(b: &Built) -> bob::layer_cache::Report {
    b.result.layer_cache.clone().unwrap_or_else(|| panic!("no layerCache in {:?}", b.result))
}

/// The step keys buildah pushed (`--> Pushing cache <proxy>/cache:<key>`).
fn pushed_keys(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("--> Pushing cache ")?.rsplit_once(':').map(|(_, k)| k.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_after_the_last_step_changed_takes_the_earlier_steps_from_the_cache() {
    let fx = Fixture::new().await;
    let cache = fx.reg.repo("bob-cache/users/alice-ws");
    let first = build(&fx, "first", &dockerfile(&fx, "one"), &cache, &fx.creds).await;
    assert_eq!(report(&first), bob::layer_cache::Report { mode: Mode::ReadWrite, hits: 0, note: None });
    // Every step went to the scope's repository under its key.
    let keys = pushed_keys(&first.stdout);
    assert_eq!(keys.len(), 3, "{}", first.stdout);
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    for k in &keys {
        assert!(d.manifest_digest("bob-cache/users/alice-ws", k).await.is_some(), "step {k} is cached");
    }

    // A new pod (fresh storage) builds the Dockerfile with only its last step changed.
    let second = build(&fx, "second", &dockerfile(&fx, "two"), &cache, &fx.creds).await;
    assert_eq!((report(&second).mode, report(&second).hits), (Mode::ReadWrite, 2));
    assert_eq!(second.stdout.matches("--> Cache pulled from remote").count(), 2, "{}", second.stdout);
    assert_eq!(second.stdout.matches("--> Using cache").count(), 2, "{}", second.stdout);
    let last_step = second.stdout.split("STEP 4/4").nth(1).expect("the last step ran");
    assert!(!last_step.contains("Using cache"), "the changed step ran: {last_step}");
    // One layer per step in both images; they differ only in the last.
    let (a, b) = (layers(&first.manifest), layers(&second.manifest));
    assert_eq!(a.len(), 4, "the base and one layer per step");
    assert_eq!((a.len(), &a[..3]), (b.len(), &b[..3]), "earlier layers are the same blobs");
    assert_ne!(a[3], b[3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn force_rebuild_builds_again_without_reading_the_cache_and_refills_it() {
    let fx = Fixture::new().await;
    let cache = fx.reg.repo("bob-cache/users/alice");
    let first = build(&fx, "first", &dockerfile(&fx, "one"), &cache, &fx.creds).await;
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let first_step = pushed_keys(&first.stdout)[0].clone();
    let cached = d.manifest_digest("bob-cache/users/alice", &first_step).await;
    // The same Dockerfile: its base exists, and every step is in the cache.
    let forced = [("BOB_FORCE_BUILD", "true"), ("BOB_LAYER_CACHE_READ", "false")];
    let again = build_with(&fx, "forced", &dockerfile(&fx, "one"), &cache, &fx.creds, &forced).await;
    let r = report(&again);
    assert_eq!((r.mode, r.hits, r.note.as_deref()), (Mode::WriteOnly, 0, None));
    assert!(
        !again.stdout.contains("Cache pulled") && !again.stdout.contains("Using cache"),
        "{}",
        again.stdout
    );
    // Every step ran and was written again; the first step's key is the same (same parent and
    // instruction) and now names the new run's image.
    let keys = pushed_keys(&again.stdout);
    assert_eq!((keys.len(), &keys[0]), (3, &first_step));
    let replaced = d.manifest_digest("bob-cache/users/alice", &first_step).await;
    assert!(replaced.is_some() && replaced != cached, "{replaced:?} replaced {cached:?}");
    assert_ne!(layers(&again.manifest)[1], layers(&first.manifest)[1], "the step ran again");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_scopes_never_see_each_others_steps() {
    let fx = Fixture::new().await;
    let alice =
        build(&fx, "alice", &dockerfile(&fx, "one"), &fx.reg.repo("bob-cache/users/alice"), &fx.creds).await;
    assert_eq!(pushed_keys(&alice.stdout).len(), 3);
    // The same steps in another scope of the same registry and namespace: nothing is found.
    let bob =
        build(&fx, "bob", &dockerfile(&fx, "two"), &fx.reg.repo("bob-cache/users/bob"), &fx.creds).await;
    assert_eq!((report(&bob).mode, report(&bob).hits), (Mode::ReadWrite, 0));
    assert!(!bob.stdout.contains("Cache pulled") && !bob.stdout.contains("Using cache"), "{}", bob.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_cache_is_left_out_and_the_build_succeeds() {
    let fx = Fixture::new().await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cache = format!("127.0.0.1:{port}/bob-cache/users/alice");
    let b = build(&fx, "unreachable", &dockerfile(&fx, "one"), &cache, &fx.creds).await;
    let r = report(&b);
    assert_eq!((r.mode, r.hits), (Mode::Off, 0));
    assert!(r.note.as_deref().unwrap().contains("unreachable"), "{r:?}");
    assert!(!b.stdout.contains("--cache") && !b.stdout.contains("Pushing cache"), "{}", b.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_cache_is_read_and_never_written() {
    let fx = Fixture::new().await;
    // The cache's registry grants anonymous callers `pull` only (token auth).
    let ts = TokenServer::start("cacher", "cache-pass-9e1b", 300).await;
    let cache_reg = Registry::start(RegistryAuth::Token(&ts));
    let cache = cache_reg.repo("bob-cache/users/alice");
    let full = docker_config_for(&[
        (&fx.reg.host, "builder", PASSWORD),
        (&cache_reg.host, "cacher", "cache-pass-9e1b"),
    ]);
    let first = build(&fx, "writer", &dockerfile(&fx, "one"), &cache, &full).await;
    assert_eq!(pushed_keys(&first.stdout).len(), 3, "filled with credentials that may push");

    // The next build's proxy has no credentials for the cache: it may read, not write.
    let second = build(&fx, "reader", &dockerfile(&fx, "two"), &cache, &fx.creds).await;
    let r = report(&second);
    assert_eq!((r.mode, r.hits), (Mode::ReadOnly, 2));
    assert!(r.note.as_deref().unwrap().contains("refused writes"), "{r:?}");
    assert!(!second.stdout.contains("Pushing cache"), "{}", second.stdout);
    assert_eq!(second.stdout.matches("--> Using cache").count(), 2);
}

/// A registry front that passes every request until `manifests` manifests were written, then
/// answers every write with 503: a cache that starts failing in the middle of a build.
struct FailingFront {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FailingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct FrontState {
    upstream: String,
    manifests: usize,
    written: AtomicUsize,
    refused: AtomicUsize,
    http: reqwest::Client,
}

async fn front(State(s): State<Arc<FrontState>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let write = matches!(method.as_str(), "POST" | "PUT" | "PATCH");
    if write && s.written.load(Ordering::SeqCst) >= s.manifests {
        s.refused.fetch_add(1, Ordering::SeqCst);
        let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"the cache front fails from now on"}]}"#;
        return (http::StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let mut out = s.http.request(method.clone(), format!("http://{}{path}", s.upstream));
    for (k, v) in req.headers() {
        if k != http::header::HOST {
            out = out.header(k, v);
        }
    }
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let resp = match out.body(body).send().await {
        Ok(r) => r,
        Err(e) => return (http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    if method == http::Method::PUT && path.contains("/manifests/") && resp.status() == 201 {
        s.written.fetch_add(1, Ordering::SeqCst);
    }
    let mut answer = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        answer = answer.header(k, v);
    }
    answer.body(Body::from_stream(resp.bytes_stream())).unwrap()
}

async fn failing_front(upstream: &str, manifests: usize) -> (FailingFront, Arc<FrontState>) {
    let state = Arc::new(FrontState {
        upstream: upstream.to_string(),
        manifests,
        written: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        http: reqwest::Client::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new().fallback(front).with_state(state.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (FailingFront { addr, task }, state)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_that_fails_in_the_middle_of_a_build_is_left_and_the_build_succeeds() {
    let fx = Fixture::new().await;
    // Relative upload URLs, so every upload request goes through the front too.
    let cache_reg = Registry::start_with(RegistryAuth::None, true);
    let (front, state) = failing_front(&cache_reg.host, 1).await;
    let cache = format!("{}/bob-cache/users/alice", front.addr);
    let b = build(&fx, "midway", &dockerfile(&fx, "one"), &cache, &fx.creds).await;
    // The probe passed, the first step was cached, the next push failed and failed buildah.
    assert_eq!(state.written.load(Ordering::SeqCst), 1);
    assert!(state.refused.load(Ordering::SeqCst) > 0);
    assert!(b.stdout.contains("Error: failed pushing cache"), "{}", b.stdout);
    let r = report(&b);
    assert_eq!(r.mode, Mode::Off);
    assert!(r.note.as_deref().unwrap().contains("push failed during the build"), "{r:?}");
    // The second attempt reused the steps the first one had built from local storage.
    let again = b.stdout.rsplit("STEP 1/4").next().unwrap();
    assert_eq!(r.hits, 2, "{again}");
    assert_eq!(again.matches("--> Using cache").count(), 2, "{again}");
    assert_eq!(layers(&b.manifest).len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_without_history_is_built_one_layer_per_step_without_the_cache() {
    // buildah 1.28 cannot commit a second layer on such an image unless told to omit history,
    // and cannot match cached steps on it: bob finds out before buildah runs.
    let fx = Fixture::with_base(busybox_image_without_history()).await;
    let cache = fx.reg.repo("bob-cache/users/alice");
    let b = build(&fx, "no-history", &dockerfile(&fx, "one"), &cache, &fx.creds).await;
    let r = report(&b);
    assert_eq!((r.mode, r.hits), (Mode::Off, 0));
    assert!(r.note.as_deref().unwrap().contains("no build history"), "{r:?}");
    assert!(!b.stdout.contains("history lists"), "no attempt failed first: {}", b.stdout);
    assert_eq!(layers(&b.manifest).len(), 4, "the base and one layer per step");
}
