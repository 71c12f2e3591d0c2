//! The session policy of one build's credential (pure): the actions a build needs on exactly its
//! repositories — pull on the sources and `FROM`s, push on base, workspace and layer cache — and
//! the token call. AWS intersects it with the role's own policy, so the credential can never do
//! more than this, whatever the role may.

use serde_json::{Value, json};

use super::ecr::{self, Registry};
use super::mapping::Grant;

/// What pulling takes on a private repository (`BatchImportUpstreamImage` and `CreateRepository`:
/// the first pull through an ECR pull-through cache rule creates the repository and imports).
pub const PULL: [&str; 5] = [
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchImportUpstreamImage",
    "ecr:CreateRepository",
];

/// What pushing takes on a private repository, pulling included (`DescribeRepositories`: the
/// controller checks a repository exists before a build that pushes to it starts).
pub const PUSH: [&str; 8] = [
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
    "ecr:PutImage",
    "ecr:InitiateLayerUpload",
    "ecr:UploadLayerPart",
    "ecr:CompleteLayerUpload",
    "ecr:DescribeRepositories",
];

/// What pushing takes on a public repository (public pulls need no credential).
pub const PUBLIC_PUSH: [&str; 6] = [
    "ecr-public:BatchCheckLayerAvailability",
    "ecr-public:PutImage",
    "ecr-public:InitiateLayerUpload",
    "ecr-public:UploadLayerPart",
    "ecr-public:CompleteLayerUpload",
    "ecr-public:DescribeRepositories",
];

/// The session policy for `grant` (compact JSON: AWS limits its packed size).
pub fn session_policy(grant: &Grant) -> String {
    let registry = ecr::parse(&grant.host);
    let account = ecr::role_account(&grant.role_arn).unwrap_or("*");
    // Each repository once, in the statement of its access (AWS limits a session policy's packed
    // size, about 2 KiB: listing pushed repositories in the pull statement too would halve it).
    let arns = |push: bool| -> Vec<String> {
        let mut v: Vec<String> = grant
            .repositories
            .iter()
            .filter(|r| r.push == push)
            .map(|r| {
                registry.as_ref().map_or_else(String::new, |reg| reg.repository_arn(&r.repository, account))
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let statement = |actions: &[&str], resources: Vec<String>| json!({"Effect": "Allow", "Action": actions, "Resource": resources});
    let mut statements: Vec<Value> = Vec::new();
    match registry {
        Some(Registry::Public) => {
            statements.push(json!({"Effect": "Allow", "Action": ["ecr-public:GetAuthorizationToken", "sts:GetServiceBearerToken"], "Resource": "*"}));
            let push = arns(true);
            if !push.is_empty() {
                statements.push(statement(&PUBLIC_PUSH, push));
            }
        }
        _ => {
            statements
                .push(json!({"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"}));
            let pull = arns(false);
            if !pull.is_empty() {
                statements.push(statement(&PULL, pull));
            }
            let push = arns(true);
            if !push.is_empty() {
                statements.push(statement(&PUSH, push));
            }
        }
    }
    json!({"Version": "2012-10-17", "Statement": statements}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::mapping::RepoAccess;

    #[test]
    fn names_only_the_build_repositories() {
        let host = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
        let repo = |r: &str, push| RepoAccess { host: host.into(), repository: r.into(), push };
        let g = Grant {
            entry: "e".into(),
            host: host.into(),
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            repositories: vec![repo("base/ubuntu", false), repo("ws/app", true)],
        };
        let p: Value = serde_json::from_str(&session_policy(&g)).unwrap();
        let s = p["Statement"].as_array().unwrap();
        assert_eq!(s[0]["Action"], "ecr:GetAuthorizationToken");
        assert_eq!(s[1]["Resource"], json!(["arn:aws:ecr:us-east-1:123456789012:repository/base/ubuntu"]));
        assert!(s[1]["Action"].as_array().unwrap().iter().all(|a| a != "ecr:PutImage"), "pull only");
        assert_eq!(s[2]["Resource"], json!(["arn:aws:ecr:us-east-1:123456789012:repository/ws/app"]));
        let push = s[2]["Action"].as_array().unwrap();
        assert!(
            push.iter().any(|a| a == "ecr:CompleteLayerUpload")
                && push.iter().any(|a| a == "ecr:BatchGetImage")
        );
        assert_eq!(s.len(), 3);
        // Twenty repositories of realistic length: each ARN once.
        let many = Grant {
            repositories: (0..20)
                .map(|i| repo(&format!("workspaces/team-platform-{i}/some-service-name"), i % 2 == 0))
                .collect(),
            ..g.clone()
        };
        let text = session_policy(&many);
        assert_eq!(text.matches("repository/workspaces/team-platform-7/").count(), 1, "{text}");
        let public = Grant {
            host: "public.ecr.aws".into(),
            repositories: vec![RepoAccess {
                host: "public.ecr.aws".into(),
                repository: "alias/app".into(),
                push: true,
            }],
            ..g
        };
        let text = session_policy(&public);
        assert!(
            text.contains("sts:GetServiceBearerToken")
                && text.contains("arn:aws:ecr-public::123456789012:repository/app"),
            "{text}"
        );
    }
}
