//! Who may use the controller's cloud identity (no confused deputy): the operator maps
//! namespaces — by name or by label selector — to a registry, the repository prefixes builds there
//! may pull from and push to, and the role whose session mints their credential. Default deny: a
//! repository that no entry covers gets no credential, and the status names what is missing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ecr;
use crate::crd::ImageBuild;
use crate::oci::reference;

/// An operator's mapping that cannot be used (the controller refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The JSON is not a list of entries.
    #[error("the registry mappings are not valid JSON")]
    Json(#[source] serde_json::Error),
    /// An entry is wrong.
    #[error("registry mapping {entry:?}: {message}")]
    Entry {
        /// The entry's name.
        entry: String,
        /// What is wrong.
        message: String,
    },
}

/// Namespaces selected by their labels (`matchLabels`, as in Kubernetes selectors).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Every label must have this value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One entry of the operator's mapping.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// Its name, as status messages cite it.
    pub name: String,
    /// Namespaces by name.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces by label.
    #[serde(default)]
    pub namespace_selector: Option<Selector>,
    /// The registry host (ECR: `<account>.dkr.ecr.<region>.amazonaws.com`, `public.ecr.aws`).
    pub registry: String,
    /// Repository prefixes builds may pull from (`{namespace}` stands for the build's namespace).
    #[serde(default)]
    pub pull: Vec<String>,
    /// Repository prefixes builds may push to (and pull from).
    #[serde(default)]
    pub push: Vec<String>,
    /// The role whose session mints the credential (a role per entry: cross-account registries).
    pub role_arn: String,
}

/// A repository a build touches and how.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RepoAccess {
    /// The registry host.
    pub host: String,
    /// The repository on it.
    pub repository: String,
    /// Push (and pull) rather than pull only.
    pub push: bool,
}

/// What one entry grants one build: one credential for one registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// The entry's name.
    pub entry: String,
    /// The registry host.
    pub host: String,
    /// The role to assume.
    pub role_arn: String,
    /// The repositories, each with its access.
    pub repositories: Vec<RepoAccess>,
}

/// The operator's mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mappings {
    entries: Vec<Entry>,
}

impl Mappings {
    /// Parses and checks a JSON list of entries (chart value `cloudIdentity.registries`).
    pub fn parse(json: &str) -> Result<Self, Error> {
        let entries: Vec<Entry> = serde_json::from_str(json).map_err(Error::Json)?;
        let mut names = std::collections::HashSet::new();
        for e in &entries {
            let bad = |message: &str| Error::Entry { entry: e.name.clone(), message: message.to_string() };
            if e.name.is_empty() || !names.insert(e.name.clone()) {
                return Err(bad("needs a name of its own"));
            }
            if e.namespaces.is_empty() && e.namespace_selector.is_none() {
                return Err(bad("names no namespace (namespaces or namespaceSelector)"));
            }
            if e.namespace_selector.as_ref().is_some_and(|s| s.match_labels.is_empty()) {
                // An empty selector selects every namespace, also those made later.
                return Err(bad("namespaceSelector selects every namespace: give it matchLabels"));
            }
            if e.pull.iter().chain(&e.push).any(|p| p != "*" && !is_prefix(p)) {
                return Err(bad(
                    "a prefix is not a repository path (lowercase components, {namespace}, or \"*\" alone)",
                ));
            }
            if !ecr::is_ecr(&e.registry) {
                return Err(bad(
                    "registry is not an ECR host (<account>.dkr.ecr.<region>.amazonaws.com, public.ecr.aws)",
                ));
            }
            if ecr::role_account(&e.role_arn).is_none() {
                return Err(bad("roleArn is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"));
            }
            if e.pull.iter().chain(&e.push).any(|p| p.trim_matches('/').is_empty() && p != "*") {
                return Err(bad("an empty prefix; write \"*\" for every repository"));
            }
        }
        Ok(Self { entries })
    }

    /// Whether no entry exists (cloud credentials are off).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether an entry selects namespaces by label (the controller then reads Namespaces).
    pub fn uses_selectors(&self) -> bool {
        self.entries.iter().any(|e| e.namespace_selector.is_some())
    }

    /// The grants for `needs` of a build in namespace `ns` (with its labels), one per registry:
    /// the first entry for the namespace and registry that covers all of them. Only ECR
    /// repositories need one; pulls from `public.ecr.aws` are anonymous unless the build also
    /// pushes there. `Err` names the first repository no entry covers.
    pub fn grant(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        needs: &[RepoAccess],
    ) -> Result<Vec<Grant>, String> {
        let mut by_host: BTreeMap<&str, Vec<&RepoAccess>> = BTreeMap::new();
        for n in needs.iter().filter(|n| ecr::is_ecr(&n.host)) {
            if !is_repository(&n.repository) {
                return Err(format!("{}/{} is not a repository name", n.host, n.repository));
            }
            by_host.entry(n.host.as_str()).or_default().push(n);
        }
        let mut grants = Vec::new();
        for (host, wanted) in by_host {
            if host == ecr::PUBLIC_HOST && wanted.iter().all(|w| !w.push) {
                continue;
            }
            let candidates: Vec<&Entry> = self
                .entries
                .iter()
                .filter(|e| e.registry.eq_ignore_ascii_case(host) && selects(e, ns, labels))
                .collect();
            let Some(entry) = candidates.iter().find(|e| wanted.iter().all(|w| covers(e, ns, w))) else {
                let first = candidates.first();
                let missing =
                    wanted.iter().find(|w| first.is_none_or(|e| !covers(e, ns, w))).expect("one is missing");
                let what = if missing.push { "push to" } else { "pull from" };
                let hint = match first {
                    Some(e) => format!(
                        "entry {:?} does not cover it: add {:?} to its {}",
                        e.name,
                        missing.repository,
                        if missing.push { "push" } else { "pull" }
                    ),
                    None => format!("no entry maps namespace {ns} to {host}"),
                };
                return Err(format!(
                    "no registry mapping lets namespace {ns} {what} {host}/{} ({hint} in the controller's cloudIdentity.registries, or set spec.registryAuth.secretRef)",
                    missing.repository
                ));
            };
            let mut repositories: Vec<RepoAccess> = wanted.into_iter().cloned().collect();
            repositories.sort();
            repositories.dedup();
            grants.push(Grant {
                entry: entry.name.clone(),
                host: host.to_string(),
                role_arn: entry.role_arn.clone(),
                repositories,
            });
        }
        Ok(grants)
    }
}

/// A repository name as distribution has it: lowercase components joined by `/`, each starting
/// and ending with a letter or digit, with `.`, `_`, `-` inside (so no `*`, `..` or upper case).
fn is_repository(name: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    name.split('/').all(|c| {
        let b = c.as_bytes();
        b.first().is_some_and(alnum)
            && b.last().is_some_and(alnum)
            && b.iter().all(|x| alnum(x) || b"._-".contains(x))
            && !c.contains("..")
    })
}

/// A mapping prefix: a repository path, where `{namespace}` may stand for a component.
fn is_prefix(prefix: &str) -> bool {
    is_repository(&prefix.trim_matches('/').replace("{namespace}", "ns"))
}

fn selects(e: &Entry, ns: &str, labels: &BTreeMap<String, String>) -> bool {
    e.namespaces.iter().any(|n| n == ns)
        || e.namespace_selector
            .as_ref()
            .is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Whether a prefix covers a repository: path components (`team` covers `team` and `team/x`, not
/// `teams`), `{namespace}` replaced, `*` covers all.
fn prefix_covers(prefix: &str, ns: &str, repository: &str) -> bool {
    if prefix == "*" {
        return true;
    }
    let p = prefix.replace("{namespace}", ns);
    let p = p.trim_matches('/');
    repository == p || repository.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
}

fn covers(e: &Entry, ns: &str, w: &RepoAccess) -> bool {
    let push = e.push.iter().any(|p| prefix_covers(p, ns, &w.repository));
    push || (!w.push && e.pull.iter().any(|p| prefix_covers(p, ns, &w.repository)))
}

/// The repositories a build touches: push to the base and workspace repositories (and the layer
/// cache), pull from the source image and each `FROM` image (as written, e.g. after `ARG`s).
pub fn needs(ib: &ImageBuild, from_images: &[String], cache_repository: Option<&str>) -> Vec<RepoAccess> {
    let spec = &ib.spec;
    let mut out = Vec::new();
    let mut add = |value: &str, push: bool| {
        if let Ok(r) = reference::parse(value) {
            out.push(RepoAccess {
                // One spelling per registry: host names are case-insensitive.
                host: r.registry().to_ascii_lowercase(),
                repository: r.repository().to_string(),
                push,
            });
        }
    };
    add(&spec.workspace_image_repository, true);
    if spec.source.dockerfile.is_some()
        && let Some(base) = &spec.base_image_repository
    {
        add(base, true);
    }
    if let Some(image) = &spec.source.image {
        add(&image.reference, false);
    }
    for image in from_images {
        add(image, false);
    }
    if let Some(cache) = cache_repository {
        add(cache, true);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "123456789012.dkr.ecr.us-gov-west-1.amazonaws.com";

    fn mappings() -> Mappings {
        Mappings::parse(&format!(
            r#"[{{"name": "team-a", "namespaces": ["team-a"], "registry": "{HOST}",
                 "pull": ["base"], "push": ["ws/{{namespace}}"], "roleArn": "arn:aws-us-gov:iam::123456789012:role/a"}},
                {{"name": "labelled", "namespaceSelector": {{"matchLabels": {{"bob.dev/ecr": "on"}}}}, "registry": "{HOST}",
                 "push": ["ws/{{namespace}}"], "roleArn": "arn:aws-us-gov:iam::123456789012:role/l"}}]"#
        ))
        .unwrap()
    }

    fn need(repo: &str, push: bool) -> RepoAccess {
        RepoAccess { host: HOST.into(), repository: repo.into(), push }
    }

    #[test]
    fn namespaces_get_only_what_an_entry_covers() {
        let m = mappings();
        let none = BTreeMap::new();
        let g = m.grant("team-a", &none, &[need("ws/team-a/app", true), need("base/ubuntu", false)]).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].entry.as_str(), g[0].repositories.len()), ("team-a", 2));
        // another namespace: no entry at all
        let e = m.grant("team-b", &none, &[need("ws/team-b/app", true)]).unwrap_err();
        assert!(e.contains("no entry maps namespace team-b") && !e.contains("role"), "{e}");
        // its own namespace's prefix only
        let e = m.grant("team-a", &none, &[need("ws/team-b/app", true)]).unwrap_err();
        assert!(e.contains("push to") && e.contains("entry \"team-a\""), "{e}");
        // pull prefixes do not allow a push; `base` does not cover `baseline`
        assert!(m.grant("team-a", &none, &[need("base/x", true)]).is_err());
        assert!(m.grant("team-a", &none, &[need("baseline", false)]).is_err());
        // Names outside distribution's grammar never reach a policy (a `*` would be a wildcard).
        for bad in ["*", "ws/team-a/*", "ws/team-a/../team-b", "ws/team-a/App"] {
            assert!(m.grant("team-a", &none, &[need(bad, true)]).is_err(), "{bad}");
        }
        // by label
        let labels = BTreeMap::from([("bob.dev/ecr".to_string(), "on".to_string())]);
        let g = m.grant("team-c", &labels, &[need("ws/team-c/x", true)]).unwrap();
        assert_eq!(g[0].entry, "labelled");
        // non-ECR hosts need nothing
        let other = RepoAccess { host: "ghcr.io".into(), repository: "x".into(), push: true };
        assert!(m.grant("team-b", &none, &[other]).unwrap().is_empty());
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            r#"[{"name": "x", "registry": "123456789012.dkr.ecr.us-east-1.amazonaws.com", "roleArn": "arn:aws:iam::123456789012:role/r"}]"#,
            r#"[{"name": "x", "namespaces": ["a"], "registry": "ghcr.io", "roleArn": "arn:aws:iam::123456789012:role/r"}]"#,
            r#"[{"name": "x", "namespaces": ["a"], "registry": "123456789012.dkr.ecr.us-east-1.amazonaws.com", "roleArn": "r"}]"#,
            r#"[{"name": "x", "namespaces": ["a"], "registry": "123456789012.dkr.ecr.us-east-1.amazonaws.com", "roleArn": "arn:aws:iam::123456789012:role/r", "extra": 1}]"#,
            r#"[{"name": "x", "namespaceSelector": {"matchLabels": {}}, "registry": "123456789012.dkr.ecr.us-east-1.amazonaws.com", "roleArn": "arn:aws:iam::123456789012:role/r"}]"#,
            r#"[{"name": "x", "namespaces": ["a"], "push": ["Team-*"], "registry": "123456789012.dkr.ecr.us-east-1.amazonaws.com", "roleArn": "arn:aws:iam::123456789012:role/r"}]"#,
        ] {
            assert!(Mappings::parse(bad).is_err(), "{bad}");
        }
    }
}
