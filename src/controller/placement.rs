//! Where build pods may go, and where the near-root build modes apply (issue 21): the operator's
//! allow-lists, checked against an ImageBuild before anything is resolved. A tenant's
//! `spec.pod.nodeSelector` and `spec.pod.tolerations` must be on the lists
//! (`--allowed-node-selectors`, `--allowed-tolerations`), so nobody steers builds onto
//! control-plane nodes, or another team's node pool, unless the operator says so. The
//! `capabilities` and `privileged` build modes are root (or close to it) on the node: with
//! `--build-security-namespaces` only the listed namespaces get Dockerfile builds in them, and a
//! Dockerfile build elsewhere is refused — never quietly run in another mode, which the cluster
//! may not support (that is why the operator chose the mode). Pure: `decide` calls it, for the
//! controller and `bob run` alike.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Toleration;

use super::plan::BuildSecurity;
use crate::crd::ImageBuild;

/// The entry that allows everything in a list: any node label, any toleration (an `Exists`
/// toleration without a key included), every namespace.
pub const ANY: &str = "*";

/// The taint effects a toleration entry may name (Kubernetes' own spelling).
const EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// A refused ImageBuild, or an allow-list entry that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An entry of `--allowed-node-selectors` or `--allowed-tolerations` is malformed.
    #[error("{entry:?}: {why}")]
    Entry {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        why: String,
    },
    /// A node selector the allow-list does not name.
    #[error(
        "spec.pod.nodeSelector: {selector} is not allowed in this installation (allowed: {allowed}); \
         remove it, or ask the operator to add {selector} (or the key alone) to --allowed-node-selectors \
         (chart value controller.placement.allowedNodeSelectors)"
    )]
    NodeSelector {
        /// The selector, `key=value`.
        selector: String,
        /// The allow-list as the operator wrote it.
        allowed: String,
    },
    /// A toleration the allow-list does not cover.
    #[error(
        "spec.pod.tolerations[{index}]: {toleration} is not allowed in this installation (allowed: {allowed}); \
         remove it, or ask the operator to add {entry} to --allowed-tolerations \
         (chart value controller.placement.allowedTolerations)"
    )]
    Toleration {
        /// Its position in the list.
        index: usize,
        /// The toleration, described.
        toleration: String,
        /// The entry that would allow exactly it.
        entry: String,
        /// The allow-list as the operator wrote it.
        allowed: String,
    },
    /// A Dockerfile build in a namespace that may not use the installation's build mode.
    #[error(
        "spec.source.dockerfile: Dockerfile builds run in the {mode} mode here (--security, chart value \
         controller.buildSecurity), which is close to root on the node and allowed only in the namespaces \
         of --build-security-namespaces (chart value controller.buildSecurityNamespaces: {allowed}); \
         namespace {namespace:?} is not one: ask the operator to add it, or build in a listed namespace"
    )]
    BuildSecurity {
        /// The mode, as the flag spells it.
        mode: &'static str,
        /// The ImageBuild's namespace.
        namespace: String,
        /// The listed namespaces.
        allowed: String,
    },
}

/// An entry of `--allowed-node-selectors`: a node label key (any value), `key=value`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorRule {
    key: String,
    value: Option<String>,
}

impl FromStr for SelectorRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s == ANY || s.is_empty() {
            // Blank (an empty variable, a trailing comma): allows nothing, dropped by `Placement::new`.
            return Ok(Self { key: s.into(), value: None });
        }
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (s, None),
        };
        check_key(s, key)?;
        Ok(Self { key: key.to_string(), value })
    }
}

impl fmt::Display for SelectorRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

impl SelectorRule {
    fn allows(&self, key: &str, value: &str) -> bool {
        self.key == ANY || (self.key == key && self.value.as_deref().is_none_or(|v| v == value))
    }
}

/// An entry of `--allowed-tolerations`, in `kubectl taint` syntax: `key`, `key=value`,
/// `key:Effect` or `key=value:Effect`, or `*`. What the entry leaves out is free: `key` allows
/// any toleration of that key (`Exists` too); `key=value` only `Equal` to that value (an
/// `Exists` toleration of the key tolerates every value, more than the entry allows);
/// `key:Effect` only tolerations of that effect (one without an effect tolerates all of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TolerationRule {
    key: String,
    value: Option<String>,
    effect: Option<String>,
}

impl FromStr for TolerationRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s == ANY || s.is_empty() {
            // Blank: allows nothing, dropped by `Placement::new`.
            return Ok(Self { key: s.into(), value: None, effect: None });
        }
        let (rest, effect) = match s.rsplit_once(':') {
            Some((rest, effect)) if EFFECTS.contains(&effect) => (rest, Some(effect.to_string())),
            Some((_, effect)) => {
                let why = format!("unknown taint effect {effect:?}: one of {}", EFFECTS.join(", "));
                return Err(Error::Entry { entry: s.into(), why });
            }
            None => (s, None),
        };
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (rest, None),
        };
        check_key(s, key)?;
        Ok(Self { key: key.to_string(), value, effect })
    }
}

impl fmt::Display for TolerationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)?;
        if let Some(v) = &self.value {
            write!(f, "={v}")?;
        }
        if let Some(e) = &self.effect {
            write!(f, ":{e}")?;
        }
        Ok(())
    }
}

impl TolerationRule {
    fn allows(&self, t: &Toleration) -> bool {
        if self.key == ANY {
            return true;
        }
        // No key: with `Exists` it tolerates every taint (control-plane ones too); only `*` covers it.
        let Some(key) = t.key.as_deref().filter(|k| !k.is_empty()) else { return false };
        let exists = t.operator.as_deref() == Some("Exists");
        let value_ok = match &self.value {
            None => true,
            Some(v) => !exists && t.value.as_deref().unwrap_or_default() == v,
        };
        let effect_ok = match &self.effect {
            None => true,
            Some(e) => t.effect.as_deref() == Some(e.as_str()),
        };
        self.key == key && value_ok && effect_ok
    }

    /// The entry that allows exactly `t` (what the refusal suggests): `*` for one without a key.
    fn exact(t: &Toleration) -> String {
        let Some(key) = t.key.clone().filter(|k| !k.is_empty()) else { return ANY.into() };
        let exists = t.operator.as_deref() == Some("Exists");
        Self { key, value: if exists { None } else { t.value.clone() }, effect: t.effect.clone() }.to_string()
    }
}

/// How a refusal shows a toleration: its entry syntax, and the operator when it is `Exists`.
fn describe(t: &Toleration) -> String {
    match t.key.as_deref().filter(|k| !k.is_empty()) {
        None => "a toleration without a key (operator Exists: it tolerates every taint, control-plane ones included)"
            .into(),
        Some(_) if t.operator.as_deref() == Some("Exists") => {
            format!("{} (operator Exists: any value)", TolerationRule::exact(t))
        }
        Some(_) => TolerationRule::exact(t),
    }
}

fn check_key(entry: &str, key: &str) -> Result<(), Error> {
    let ok = !key.is_empty()
        && key.len() <= 317
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        return Ok(());
    }
    let why =
        format!("{key:?} is not a label or taint key (letters, digits, '-', '_', '.', an optional prefix/)");
    Err(Error::Entry { entry: entry.into(), why })
}

/// The installation's allow-lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// What `spec.pod.nodeSelector` may contain.
    pub node_selectors: Vec<SelectorRule>,
    /// What `spec.pod.tolerations` may contain.
    pub tolerations: Vec<TolerationRule>,
    /// Namespaces whose Dockerfile builds may run in the `capabilities` or `privileged` mode
    /// (`*`: all).
    pub security_namespaces: Vec<String>,
}

/// Everything allowed: `bob run`'s, where the build runs on this machine (no nodes to keep it
/// off, no tenants). The controller's defaults are its flags' (nothing allowed).
impl Default for Placement {
    fn default() -> Self {
        Self {
            node_selectors: vec![SelectorRule { key: ANY.into(), value: None }],
            tolerations: vec![TolerationRule { key: ANY.into(), value: None, effect: None }],
            security_namespaces: vec![ANY.into()],
        }
    }
}

impl Placement {
    /// The controller's lists, from its flags; blank entries are dropped (`a, b,` is `a` and `b`;
    /// an empty variable is an empty list).
    pub fn new(
        node_selectors: &[SelectorRule],
        tolerations: &[TolerationRule],
        namespaces: &[String],
    ) -> Self {
        Self {
            node_selectors: node_selectors.iter().filter(|r| !r.key.is_empty()).cloned().collect(),
            tolerations: tolerations.iter().filter(|r| !r.key.is_empty()).cloned().collect(),
            security_namespaces: namespaces
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
        }
    }

    /// Whether `ib` may run with the installation's build mode `security`, where it asks to.
    pub fn check(&self, ib: &ImageBuild, security: BuildSecurity) -> Result<(), Error> {
        let knobs = ib.spec.pod.as_ref();
        for (key, value) in knobs.and_then(|p| p.node_selector.as_ref()).into_iter().flatten() {
            if !self.node_selectors.iter().any(|r| r.allows(key, value)) {
                let allowed = listed(&self.node_selectors);
                return Err(Error::NodeSelector { selector: format!("{key}={value}"), allowed });
            }
        }
        for (index, t) in knobs.and_then(|p| p.tolerations.as_ref()).into_iter().flatten().enumerate() {
            if !self.tolerations.iter().any(|r| r.allows(t)) {
                let (toleration, entry) = (describe(t), TolerationRule::exact(t));
                return Err(Error::Toleration {
                    index,
                    toleration,
                    entry,
                    allowed: listed(&self.tolerations),
                });
            }
        }
        let mode = match security {
            // No privilege on the node: every namespace may have it.
            BuildSecurity::UserNamespace => return Ok(()),
            BuildSecurity::Capabilities => "capabilities",
            BuildSecurity::Privileged => "privileged",
        };
        if ib.spec.source.dockerfile.is_none() {
            // Image sources only copy; their build container is unprivileged in every mode.
            return Ok(());
        }
        let namespace = ib.metadata.namespace.clone().unwrap_or_default();
        if self.security_namespaces.iter().any(|n| n == ANY || *n == namespace) {
            return Ok(());
        }
        Err(Error::BuildSecurity { mode, namespace, allowed: listed(&self.security_namespaces) })
    }
}

fn listed<T: fmt::Display>(entries: &[T]) -> String {
    match entries {
        [] => "none".into(),
        _ => entries.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "),
    }
}
