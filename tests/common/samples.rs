//! The samples in `config/samples/` as the planner sees them (pure, no cluster): each sample
//! with what the resolver would find, its plan, and readers of the planned pod's containers.

use std::collections::BTreeMap;

use bob::controller::{Plan, PlanConfig, Resolved, from_images, plan};
use bob::crd::ImageBuild;
use k8s_openapi::api::core::v1::{Container, Pod};

pub const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub fn sample(file: &str) -> ImageBuild {
    let text =
        std::fs::read_to_string(format!("{}/config/samples/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let doc = docs.into_iter().find(|d| d["kind"] == "ImageBuild").unwrap();
    let mut ib: ImageBuild = serde_json::from_value(doc).unwrap();
    ib.metadata.uid = Some("6c3c8a5e-0000-4000-8000-000000000001".into());
    ib
}

/// The Dockerfile the git sample's repository holds at COMMIT (what the resolver would read).
pub const GIT_DOCKERFILE: &str =
    "ARG BASE=registry.example.com/library/golang:1.22\nFROM $BASE AS dev\nRUN go version\n";

pub fn resolved_for(ib: &ImageBuild) -> Resolved {
    let mut r = Resolved {
        image_digest: Some(DIGEST.into()),
        git_commit: Some(COMMIT.into()),
        git_dockerfile: ib
            .spec
            .source
            .dockerfile
            .as_ref()
            .and_then(|d| d.git.as_ref())
            .map(|_| GIT_DOCKERFILE.into()),
        ..Default::default()
    };
    r.from_digests =
        from_images(ib, &r).unwrap().unwrap().into_iter().map(|i| (i, DIGEST.to_string())).collect();
    r
}

pub fn planned(file: &str) -> (ImageBuild, Plan) {
    let ib = sample(file);
    let p = plan(&ib, &resolved_for(&ib), &PlanConfig::default()).unwrap();
    (ib, p)
}

pub fn containers(pod: &Pod) -> Vec<&Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers.iter().flatten().chain(&spec.containers).collect()
}

pub fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    containers(pod).into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name} container"))
}

pub fn env(c: &Container) -> BTreeMap<String, String> {
    c.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect()
}

pub fn mounts(c: &Container) -> Vec<String> {
    c.volume_mounts.iter().flatten().map(|m| m.name.clone()).collect()
}
