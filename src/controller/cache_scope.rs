//! The layer cache's part of the plan (pure): whether an ImageBuild builds with a cache, and the
//! one repository its build may read and write through the proxy's `cache` alias —
//! `<repository>/<namespace>/<scope component>`. The whole scope is encoded in the last path
//! component and the namespace is always the one before it, so no choice of repository or scope
//! reaches another namespace's path; the scope defaults to the ImageBuild's name, narrower than the
//! namespace where a platform runs all its users' builds (docs/security.md, "Layer cache").

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::plan::{Invalid, repository};
use crate::crd::ImageBuild;

/// The layer cache's installation settings (controller flags, `bob run` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerCacheConfig {
    /// The global switch: `false` turns the cache off for every ImageBuild, whatever its spec.
    pub enabled: bool,
    /// The repository below which scopes live when an ImageBuild names none (none: no cache).
    pub repository: Option<String>,
    /// How old a cached step may be and still be used (buildah's `--cache-ttl`).
    pub ttl: Duration,
}

/// The default `--cache-ttl`: a week. A cached `RUN apt-get install` is reused until then, so
/// remote content a step fetched is at most a week old after a rebuild (docs/build.md).
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for LayerCacheConfig {
    fn default() -> Self {
        Self { enabled: true, repository: None, ttl: DEFAULT_TTL }
    }
}

/// The layer cache of one build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePlan {
    /// The scope's repository, `<repository>/<namespace>/<scope component>` (see
    /// [`scope_component`]): the `cache` alias's upstream, and a build key input.
    pub repository: String,
    /// Whether the build reads cached steps: not under `spec.forceRebuild` (it only writes).
    pub read: bool,
    /// How old a cached step may be.
    pub ttl: Duration,
}

/// Registries refuse repository names (host included) longer than this (distribution's limit).
const NAME_MAX: usize = 255;

/// The layer cache of `ib`: `None` for image sources, when turned off (globally or by the spec)
/// or when no repository is configured.
pub fn plan(ib: &ImageBuild, cfg: &LayerCacheConfig) -> Result<Option<CachePlan>, Invalid> {
    let spec = ib.spec.layer_cache.clone().unwrap_or_default();
    if ib.spec.source.dockerfile.is_none() || !cfg.enabled || spec.disabled {
        return Ok(None);
    }
    let (field, repo) = match (&spec.repository, &cfg.repository) {
        (Some(r), _) => ("spec.layerCache.repository", r),
        (None, Some(r)) => ("--layer-cache-repository", r),
        (None, None) => return Ok(None),
    };
    let repo = repository(field, repo.trim_end_matches('/'))?;
    let namespace = ib.metadata.namespace.as_deref().unwrap_or("default");
    let component = match &spec.scope {
        Some(scope) => {
            if !is_scope(scope) {
                return Err(Invalid::new(
                    "spec.layerCache.scope",
                    format!("{scope:?} must be lowercase path components such as alice or team-a/web"),
                ));
            }
            scope_component(ScopeOrigin::Spec, scope)
        }
        None => scope_component(ScopeOrigin::Name, ib.metadata.name.as_deref().unwrap_or_default()),
    };
    let full = format!("{repo}/{namespace}/{component}");
    if full.len() > NAME_MAX {
        let shorter = match spec.scope {
            Some(_) => "a shorter spec.layerCache.scope",
            None => "a short spec.layerCache.scope (the default is the ImageBuild's name)",
        };
        return Err(Invalid::new(
            if spec.scope.is_some() { "spec.layerCache.scope" } else { field },
            format!(
                "the cache repository {full:?} is longer than the {NAME_MAX} characters registries accept; \
                 set {shorter}, a shorter {field}, or spec.layerCache.disabled: true"
            ),
        ));
    }
    repository(field, &full)?;
    Ok(Some(CachePlan { repository: full, read: !ib.spec.force_rebuild, ttl: cfg.ttl }))
}

/// Where a scope comes from: each origin hashes in its own domain, so an ImageBuild named `alice`
/// (no scope) never lands in the scope `alice` that a platform sets for its user alice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeOrigin {
    /// `spec.layerCache.scope`.
    Spec,
    /// The ImageBuild's name, the scope when the spec names none.
    Name,
}

/// The scope as one distribution path component: a readable part (the scope's components joined
/// with `-`, or the ImageBuild's name made a component), then `-` and the first 16 hex digits of
/// sha256(`<origin>\0<scope or name>`), `<origin>` being `spec.layerCache.scope` or
/// `metadata.name`. One component, so the namespace is always the second-to-last component of the
/// cache path whatever the spec's repository and scope (two namespaces never meet on one path);
/// the hash keeps `a/b` and `a-b`, and a name and an equal scope, apart.
pub fn scope_component(origin: ScopeOrigin, value: &str) -> String {
    let (domain, readable) = match origin {
        ScopeOrigin::Spec => ("spec.layerCache.scope", value.replace('/', "-")),
        ScopeOrigin::Name => ("metadata.name", default_scope(value)),
    };
    let hex: String = Sha256::digest(format!("{domain}\0{value}").as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{readable}-{hex}")
}

/// Refuses references under a layer-cache repository (the spec's or the installation's, whether
/// or not this build uses a cache): a `FROM` image, an image source or a base or workspace
/// repository there would read another scope's cached steps through the proxy's mirror, or write
/// next to them, with the registry Secret's credentials — around the `cache` alias, which serves a
/// build only its own scope.
pub fn check_outside(
    ib: &ImageBuild,
    cfg: &LayerCacheConfig,
    images: &[(&str, &str)],
) -> Result<(), Invalid> {
    let spec_root = ib.spec.layer_cache.as_ref().and_then(|c| c.repository.as_deref());
    let roots: Vec<(String, String)> = [spec_root, cfg.repository.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(|r| crate::oci::reference::parse(r.trim_end_matches('/')).ok())
        .map(|r| (r.registry().to_string(), r.repository().to_string()))
        .collect();
    for (field, image) in images {
        let Ok(r) = crate::oci::reference::parse(image) else { continue };
        let (registry, repo) = (r.registry(), r.repository());
        let inside = roots.iter().any(|(host, root)| {
            host == registry
                && (repo == root || repo.strip_prefix(root.as_str()).is_some_and(|t| t.starts_with('/')))
        });
        if inside {
            return Err(Invalid::new(
                field,
                format!(
                    "{image:?} is inside the layer cache repository, which builds reach only through \
                     their own scope; name an image or repository outside it"
                ),
            ));
        }
    }
    Ok(())
}

/// The scope of an ImageBuild that names none: its name, which is a valid path component
/// (Kubernetes names are lowercase DNS subdomains); a long one is cut and made unique with a hash.
fn default_scope(name: &str) -> String {
    if is_scope(name) && name.len() <= 100 {
        return name.to_string();
    }
    let hex: String = Sha256::digest(name.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let head: String = name
        .chars()
        .take(60)
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string();
    let head: String = head.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-");
    if head.is_empty() { format!("ib-{hex}") } else { format!("{head}-{hex}") }
}

/// Whether `s` is a scope: lowercase path components, the grammar of `crd::SCOPE_RE` (which the
/// CRD's CEL rule checks on the API server), at most 128 characters.
fn is_scope(s: &str) -> bool {
    s.len() <= 128 && s.split('/').all(is_component)
}

/// distribution's path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or dashes.
fn is_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    if b.first().is_none_or(|&x| !alnum(x)) || b.last().is_none_or(|&x| !alnum(x)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !matches!(sep, "." | "_" | "__") && !sep.bytes().all(|x| x == b'-') {
            return false;
        }
    }
    true
}

/// Whole seconds in the duration grammar, for buildah's `--cache-ttl`.
pub fn ttl_arg(ttl: Duration) -> String {
    format!("{}s", ttl.as_secs().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_or_odd_names_become_valid_unique_scopes() {
        assert_eq!(default_scope("alice-ws"), "alice-ws");
        let long = "a".repeat(200);
        let s = default_scope(&long);
        assert!(is_scope(&s) && s.len() < 100 && s != default_scope(&"a".repeat(201)), "{s}");
        assert!(is_scope(&default_scope("--")), "{}", default_scope("--"));
        // The scope component is one valid component, and distinct for `a/b` and `a-b`.
        use ScopeOrigin::{Name, Spec};
        for scope in ["alice", "team-a/web", "a.b/c__d/e", &"x".repeat(128)] {
            let c = scope_component(Spec, scope);
            assert!(is_component(&c) && !c.contains('/'), "{c}");
        }
        for name in ["alice-ws", "--", &"W.x".repeat(90)] {
            let c = scope_component(Name, name);
            assert!(is_component(&c) && !c.contains('/') && c.len() <= 117, "{c}");
        }
        assert_ne!(scope_component(Spec, "a/b"), scope_component(Spec, "a-b"));
        assert!(scope_component(Spec, "team-a/web").starts_with("team-a-web-"));
        // A name and an equal scope are two scopes.
        assert_ne!(scope_component(Name, "alice"), scope_component(Spec, "alice"));
        // Pinned: `printf 'spec.layerCache.scope\0alice' | sha256sum | cut -c1-16`.
        assert_eq!(scope_component(Spec, "alice"), "alice-aef80756afa0019a");
        assert_eq!(ttl_arg(DEFAULT_TTL), "604800s");
        for good in ["alice", "team-a/web", "a.b", "a__b", "a--b", "0"] {
            assert!(is_scope(good), "{good}");
        }
        for bad in ["", "Alice", "a/", "/a", "a//b", "a..b", "a._b", "-a", "a-", "a___b", "../x", "a b"] {
            assert!(!is_scope(bad), "{bad}");
        }
    }
}
