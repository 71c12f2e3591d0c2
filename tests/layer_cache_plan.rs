//! The layer cache in the plan (pure, no cluster): when an ImageBuild builds with a cache (the
//! controller's default repository, the spec's own, its off switch and the global one), the one
//! repository its scope maps to (never outside its namespace, per ImageBuild by default), how the
//! build reaches it (only as the proxy's `cache` alias) and what `forceRebuild` does with it.

use std::collections::BTreeMap;

use bob::controller::cache_scope::ScopeOrigin::{Name, Spec};
use bob::controller::cache_scope::scope_component;
use bob::controller::pod::pod_name;
use bob::controller::{LayerCacheConfig, Plan, PlanConfig, Resolved, from_images, plan};
use bob::crd::{ImageBuild, LayerCacheSpec};
use k8s_openapi::api::core::v1::{Container, Pod};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const CACHE: &str = "registry.example.com/bob-cache";

fn sample(file: &str) -> ImageBuild {
    let text =
        std::fs::read_to_string(format!("{}/config/samples/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    serde_json::from_value(docs.into_iter().find(|d| d["kind"] == "ImageBuild").unwrap()).unwrap()
}

fn resolved(ib: &ImageBuild) -> Resolved {
    let mut r = Resolved { image_digest: Some(DIGEST.into()), ..Default::default() };
    r.from_digests = from_images(ib, &r).unwrap().unwrap().into_iter().map(|i| (i, DIGEST.into())).collect();
    r
}

fn config(enabled: bool, repository: Option<&str>) -> PlanConfig {
    PlanConfig {
        layer_cache: LayerCacheConfig {
            enabled,
            repository: repository.map(String::from),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn planned(ib: &ImageBuild, cfg: &PlanConfig) -> Plan {
    plan(ib, &resolved(ib), cfg).unwrap()
}

fn env(pod: &Pod, name: &str) -> BTreeMap<String, String> {
    let spec = pod.spec.as_ref().unwrap();
    let c: &Container =
        spec.init_containers.iter().flatten().chain(&spec.containers).find(|c| c.name == name).unwrap();
    c.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect()
}

/// The cache repository the proxy maps `cache` to, if any.
fn cache_of(p: &Plan) -> Option<String> {
    env(&p.pod, "proxy").get("BOB_PROXY_CACHE_REPOSITORY").cloned()
}

fn named(ns: &str, name: &str, cache: Option<LayerCacheSpec>) -> ImageBuild {
    let mut ib = sample("inline-dockerfile.yaml");
    ib.metadata.namespace = Some(ns.into());
    ib.metadata.name = Some(name.into());
    ib.spec.layer_cache = cache;
    ib
}

#[test]
fn the_cache_comes_from_the_controller_default_or_the_spec_and_can_be_turned_off() {
    let ib = sample("inline-dockerfile.yaml");
    // No repository anywhere: no cache, and nothing about one in the pod.
    let p = planned(&ib, &PlanConfig::default());
    assert!(p.layer_cache.is_none() && cache_of(&p).is_none());
    assert!(!env(&p.pod, "build").keys().any(|k| k.starts_with("BOB_LAYER_CACHE")));

    // The controller's default: the scope is the ImageBuild's own, below its namespace.
    let p = planned(&ib, &config(true, Some(CACHE)));
    let scope = format!("{CACHE}/default/{}", scope_component(Name, "inline-dockerfile"));
    assert_eq!(cache_of(&p).as_deref(), Some(scope.as_str()));
    let build = env(&p.pod, "build");
    assert_eq!(
        build["BOB_LAYER_CACHE_REF"], "127.0.0.1:8080/cache",
        "the build reaches it only via the proxy"
    );
    assert_eq!(
        (build["BOB_LAYER_CACHE_READ"].as_str(), build["BOB_LAYER_CACHE_TTL"].as_str()),
        ("true", "604800s")
    );
    assert!(
        !build.values().any(|v| v.contains(CACHE)),
        "the build never sees the real repository: {build:?}"
    );

    // The spec's repository wins over the default.
    let own = LayerCacheSpec { repository: Some("reg.test/own-cache".into()), ..Default::default() };
    let p = planned(&named("default", "inline-dockerfile", Some(own.clone())), &config(true, Some(CACHE)));
    assert_eq!(
        cache_of(&p).as_deref(),
        Some(format!("reg.test/own-cache/default/{}", scope_component(Name, "inline-dockerfile")).as_str())
    );

    // Off in the spec, or off globally even where the spec names a repository.
    let off = LayerCacheSpec { disabled: true, ..Default::default() };
    assert!(planned(&named("default", "x", Some(off)), &config(true, Some(CACHE))).layer_cache.is_none());
    assert!(planned(&named("default", "x", Some(own)), &config(false, Some(CACHE))).layer_cache.is_none());

    // An image source builds nothing, so it has no cache.
    let image = sample("image-source.yaml");
    assert!(planned(&image, &config(true, Some(CACHE))).layer_cache.is_none());
}

#[test]
fn force_rebuild_writes_the_cache_but_reads_nothing() {
    let mut ib = sample("inline-dockerfile.yaml");
    ib.spec.force_rebuild = true;
    let p = planned(&ib, &config(true, Some(CACHE)));
    assert_eq!(p.layer_cache.as_ref().map(|c| c.read), Some(false));
    assert_eq!(env(&p.pod, "build")["BOB_LAYER_CACHE_READ"], "false");
    assert!(cache_of(&p).is_some(), "it still writes");
    // And it builds the base again even where it exists, cache or not.
    assert_eq!(env(&p.pod, "build")["BOB_FORCE_BUILD"], "true");
    assert_eq!(env(&planned(&ib, &PlanConfig::default()).pod, "build")["BOB_FORCE_BUILD"], "true");
    let unforced = sample("inline-dockerfile.yaml");
    assert!(!env(&planned(&unforced, &PlanConfig::default()).pod, "build").contains_key("BOB_FORCE_BUILD"));
}

#[test]
fn scopes_are_per_imagebuild_by_default_and_never_leave_the_namespace() {
    let cfg = config(true, Some(CACHE));
    let of = |ns: &str, name: &str, scope: Option<&str>| {
        let spec = scope.map(|s| LayerCacheSpec { scope: Some(s.into()), ..Default::default() });
        cache_of(&planned(&named(ns, name, spec), &cfg)).unwrap()
    };
    // Narrower than a namespace: two ImageBuilds of one namespace have two caches.
    assert_eq!(of("users", "alice-ws", None), format!("{CACHE}/users/{}", scope_component(Name, "alice-ws")));
    assert_ne!(of("users", "alice-ws", None), of("users", "bob-ws", None));
    assert_ne!(of("team-a", "ws", None), of("team-b", "ws", None));
    // A platform's scope shares one cache between ImageBuilds, within the namespace only.
    assert_eq!(of("users", "alice-ws", Some("alice")), of("users", "alice-tools", Some("alice")));
    assert_eq!(of("users", "x", Some("alice")), format!("{CACHE}/users/{}", scope_component(Spec, "alice")));
    assert!(of("users", "x", Some("alice")).ends_with("/users/alice-aef80756afa0019a"));
    assert_eq!(
        of("team-a", "x", Some("team-b/ws")),
        format!("{CACHE}/team-a/{}", scope_component(Spec, "team-b/ws"))
    );
    // A scope cannot climb out of its namespace or be anything but path components.
    for bad in ["../other/ws", "Alice", "a//b", "/abs"] {
        let spec = LayerCacheSpec { scope: Some(bad.into()), ..Default::default() };
        let ib = named("users", "x", Some(spec));
        let e = plan(&ib, &resolved(&ib), &cfg).unwrap_err();
        assert_eq!(e.field, "spec.layerCache.scope", "{bad}: {e}");
    }
    // A name too long for a repository still gets its own valid scope.
    let long = "w".repeat(250);
    let repo = of("users", &long, None);
    assert!(repo.len() <= 255 && bob::oci::reference::parse(&repo).is_ok(), "{repo}");
    assert_ne!(repo, of("users", &"w".repeat(249), None));
}

#[test]
fn imagebuilds_of_one_dockerfile_in_two_scopes_get_two_keys_two_images_and_two_pods() {
    // The same Dockerfile in scopes `alice` and `mallory`: a build that reads mallory's cache may
    // hold steps mallory planted, so nothing it made is alice's — not the base, not the workspace
    // image, not the pod (issue 21).
    let cfg = config(true, Some(CACHE));
    let scoped = |name: &str, scope: &str| {
        let spec = LayerCacheSpec { scope: Some(scope.into()), ..Default::default() };
        planned(&named("users", name, Some(spec)), &cfg)
    };
    let alice = scoped("alice-ws", "alice");
    let mallory = scoped("mallory-ws", "mallory");
    assert_ne!(alice.key, mallory.key);
    assert_ne!(alice.base_ref, mallory.base_ref);
    assert_ne!(alice.workspace_ref, mallory.workspace_ref);
    assert_ne!(alice.pod.metadata.name, mallory.pod.metadata.name);
    assert_eq!(alice.inputs.as_ref().unwrap().layer_cache, cache_of(&alice), "the scope is a key input");
    // Within one scope they still share everything: a second ImageBuild of alice's is a hit.
    let alice_tools = scoped("alice-tools", "alice");
    assert_eq!((&alice.key, &alice.workspace_ref), (&alice_tools.key, &alice_tools.workspace_ref));
    assert_eq!(alice.pod.metadata.name, alice_tools.pod.metadata.name);
    let ib = named("users", "alice-ws", None);
    let secret = ib.spec.registry_auth.as_ref().map(|a| a.secret_ref.name.as_str());
    assert_eq!(alice.pod.metadata.name.clone().unwrap(), pod_name(secret, &alice.workspace_ref, 1));
    // A build without a cache reads no scope: its image is nobody's steps but its own.
    let off = planned(&named("users", "alice-ws", None), &PlanConfig::default());
    assert_eq!(off.inputs.as_ref().unwrap().layer_cache, None);
    assert_ne!(off.key, alice.key);
    assert_ne!(off.pod.metadata.name, alice.pod.metadata.name);
    // forceRebuild writes the scope without reading it, and keeps the scope's key: the scope's
    // tag only ever holds images made from its own steps.
    let mut forced = named(
        "users",
        "alice-ws",
        Some(LayerCacheSpec { scope: Some("alice".into()), ..Default::default() }),
    );
    forced.spec.force_rebuild = true;
    assert_eq!(planned(&forced, &cfg).key, alice.key);
}

#[test]
fn the_namespace_is_always_the_second_to_last_component_of_the_cache_path() {
    // The issue's walk-around: namespace `dev` naming `<cache>/prod` as its repository and `web`
    // as its scope must not reach namespace `prod`'s scope `dev/web`.
    let cfg = config(true, None);
    let path = |ns: &str, repo: &str, scope: &str| {
        let spec =
            LayerCacheSpec { repository: Some(repo.into()), scope: Some(scope.into()), ..Default::default() };
        cache_of(&planned(&named(ns, "x", Some(spec)), &cfg)).unwrap()
    };
    let dev = path("dev", &format!("{CACHE}/prod"), "web");
    let prod = path("prod", CACHE, "dev/web");
    assert_ne!(dev, prod);
    let components = |p: &str| p.rsplit('/').map(String::from).collect::<Vec<_>>();
    assert_eq!(components(&dev)[1], "dev");
    assert_eq!(components(&prod)[1], "prod");

    // Every (namespace, repository, scope) triple of a small universe that authors could choose:
    // no two with different namespaces share a path, and the namespace reads back from the path.
    let namespaces = ["dev", "prod", "team-a", "a"];
    let repos: Vec<String> = ["", "/prod", "/dev", "/prod/dev", "/a", "/team-a/web"]
        .iter()
        .map(|suffix| format!("{CACHE}{suffix}"))
        .collect();
    let scopes = ["web", "dev/web", "prod/web", "prod", "dev", "a/b", "a-b", "web/dev", "team-a/web"];
    let mut seen: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for ns in namespaces {
        for repo in &repos {
            for scope in scopes {
                let p = path(ns, repo, scope);
                assert_eq!(components(&p)[1], ns, "{p}");
                assert!(bob::oci::reference::parse(&p).is_ok(), "{p}");
                let triple = (ns.to_string(), repo.clone(), scope.to_string());
                if let Some(other) = seen.insert(p.clone(), triple.clone()) {
                    panic!("{other:?} and {triple:?} share the cache path {p}");
                }
            }
        }
    }
    assert_eq!(seen.len(), namespaces.len() * repos.len() * scopes.len());
}

#[test]
fn an_imagebuild_named_like_a_scope_is_not_in_that_scope() {
    // The platform sets `scope: alice` for user alice; mallory names her ImageBuild `alice` and
    // sets no scope (an admission policy may forbid setting one): two scopes, two keys.
    let cfg = config(true, Some(CACHE));
    let platform = LayerCacheSpec { scope: Some("alice".into()), ..Default::default() };
    let alice = planned(&named("users", "alice-ws", Some(platform)), &cfg);
    let squatter = planned(&named("users", "alice", None), &cfg);
    assert_ne!(cache_of(&alice), cache_of(&squatter));
    assert_ne!(alice.key, squatter.key);
    assert_ne!(alice.pod.metadata.name, squatter.pod.metadata.name);
}

#[test]
fn a_cache_path_too_long_for_a_registry_says_what_to_shorten() {
    let long_root = format!("{CACHE}/{}", "r".repeat(120));
    let scope = LayerCacheSpec { scope: Some("s".repeat(120)), ..Default::default() };
    let ib = named("users", "x", Some(scope));
    let e = plan(&ib, &resolved(&ib), &config(true, Some(&long_root))).unwrap_err();
    assert_eq!(e.field, "spec.layerCache.scope", "{e}");
    assert!(e.message.contains("255") && e.message.contains("spec.layerCache.disabled"), "{e}");
    // With the default scope (the name, cut to 60 characters and a hash) the message says a
    // scope can be set.
    let longer_root = format!("{CACHE}/{}", "r".repeat(170));
    let ib = named("users", &"n".repeat(120), None);
    let e = plan(&ib, &resolved(&ib), &config(true, Some(&longer_root))).unwrap_err();
    assert_eq!(e.field, "--layer-cache-repository", "{e}");
    assert!(e.message.contains("set a short spec.layerCache.scope"), "{e}");
}

#[test]
fn nothing_a_build_reads_or_writes_may_sit_inside_a_layer_cache_repository() {
    // Around the `cache` alias: a `FROM` of another scope's cached step would be served by the
    // proxy's mirror with the Secret's credentials; a base or workspace repository there would
    // write next to another scope's steps. Refused for the installation's root whether or not
    // the ImageBuild uses the cache, and for the spec's own root.
    let cfg = config(true, Some(CACHE));
    let other_scope = format!("{CACHE}/users/{}", scope_component(Spec, "bob"));
    let step = format!("{other_scope}:{}", "a".repeat(64));
    let mut from_cache = named("users", "x", Some(LayerCacheSpec { disabled: true, ..Default::default() }));
    from_cache.spec.source.dockerfile.as_mut().unwrap().inline = Some(format!("FROM {step}\nRUN true\n"));
    let e = plan(&from_cache, &resolved(&from_cache), &cfg).unwrap_err();
    assert_eq!(e.field, "spec.source.dockerfile", "{e}");
    assert!(e.message.contains("inside the layer cache repository"), "{e}");

    let mut base_in_cache = named("users", "x", None);
    base_in_cache.spec.base_image_repository = Some(other_scope.clone());
    let e = plan(&base_in_cache, &resolved(&base_in_cache), &cfg).unwrap_err();
    assert_eq!(e.field, "spec.baseImageRepository", "{e}");

    let mut image = sample("image-source.yaml");
    image.spec.source.image.as_mut().unwrap().reference = step.clone();
    image.spec.layer_cache = Some(LayerCacheSpec { repository: Some(CACHE.into()), ..Default::default() });
    let e = plan(&image, &resolved(&image), &PlanConfig::default()).unwrap_err();
    assert_eq!(e.field, "spec.source.image.ref", "{e}");

    // A sibling repository whose name merely starts like the root is outside it.
    let mut sibling = named("users", "x", None);
    sibling.spec.workspace_image_repository = format!("{CACHE}-workspaces/images");
    assert!(plan(&sibling, &resolved(&sibling), &cfg).is_ok());
}
