//! The moto harness (tests/common/moto.rs) is real AWS-shaped ground for the ECR tests: IAM
//! enforcement is on, so a call no policy allows is refused; the IRSA chain (web identity ->
//! controller role -> AssumeRole builder -> GetAuthorizationToken) works and is refused where a
//! policy says no; the ECR password opens a registry started with it; and the server goes away
//! with its test. What moto does not enforce is pinned here too, so that a moto upgrade that
//! changes it shows up as a failing test rather than as a test that quietly proves less.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::moto::{ECR_USER, Moto};
use common::*;
use serde_json::{Value, json};

const ACCOUNT: &str = "210987654321";
const REGION: &str = "eu-west-1";

fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// The controller scenario of the ECR feature, plus users with static keys.
fn spec() -> Value {
    let ecr_read = ["ecr:GetAuthorizationToken", "ecr:DescribeRepositories", "ecr:BatchGetImage"];
    json!({
        // Not moto's default account, so a result that names the account shows where it came from.
        "account": ACCOUNT,
        "region": REGION,
        "repositories": ["bob/base", "bob/workspace"],
        "roles": [
            {"name": "controller", "trust": "web-identity", "actions": ["sts:AssumeRole"],
             "resources": [role_arn("builder"), role_arn("denied")]},
            {"name": "builder", "trust": "account", "actions": ecr_read},
            {"name": "denied", "trust": "account",
             "actions": ["ecr:DescribeRepositories", "ecr:BatchGetImage"]},
            // Trusts anyone, allows the token, but the controller may not assume it.
            {"name": "outsider", "trust": "account", "actions": ["ecr:GetAuthorizationToken"]},
        ],
        "users": [
            {"name": "pusher", "actions": ["ecr:GetAuthorizationToken"]},
            {"name": "nobody", "actions": ["ecr:DescribeRepositories"]},
            {"name": "scoped", "actions": ["ecr:GetAuthorizationToken", "ecr:DescribeRepositories"],
             "resources": [format!("arn:aws:ecr:{REGION}:{ACCOUNT}:repository/bob/base")]},
        ],
    })
}

/// The registry credential in a GetAuthorizationToken answer: (user, password).
fn ecr_credential(answer: &Value) -> (String, String) {
    let data = &answer["authorizationData"];
    assert_eq!(data.as_array().map(Vec::len), Some(1), "one registry's token: {answer}");
    let token = STANDARD.decode(data[0]["authorizationToken"].as_str().unwrap()).unwrap();
    let token = String::from_utf8(token).unwrap();
    let (user, password) = token.split_once(':').expect("user:password");
    (user.to_string(), password.to_string())
}

/// A denial by IAM enforcement on ECR, in the shape moto gives it (see tests/common/moto.rs):
/// HTTP 403, an XML body boto3 cannot parse for a JSON-protocol service, `AccessDenied` in it.
fn assert_ecr_access_denied(result: Result<Value, common::moto::AwsError>, who: &str, action: &str) {
    let e = result.expect_err("enforcement must refuse this call");
    assert_eq!(e.http_status, 403, "{e:?}");
    assert_eq!(e.body_code.as_deref(), Some("AccessDenied"), "{e:?}");
    assert_eq!(e.code, "403", "moto's ECR denials are XML, which boto3 reports by status only: {e:?}");
    assert!(e.message.contains(who) && e.message.contains(action), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_user_gets_the_ecr_token_and_its_password_opens_a_registry() {
    let moto = Moto::start(&spec());
    assert_eq!(moto.account, ACCOUNT);
    assert_eq!(moto.repositories["bob/base"], format!("{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/bob/base"));
    let answer = moto
        .call(&moto.user_env("pusher"), &[], "ecr", "get_authorization_token", &json!({}))
        .unwrap_or_else(|e| panic!("{e:?}\n{}", moto.output()));
    let (user, password) = ecr_credential(&answer);
    assert_eq!(user, ECR_USER);
    assert_eq!(password, Moto::ecr_password(ACCOUNT));
    assert_eq!(
        answer["authorizationData"][0]["proxyEndpoint"],
        format!("https://{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com")
    );

    // moto serves no registry: the ECR tests stand one in with htpasswd for that credential.
    let registry = Registry::start(RegistryAuth::Basic { user: ECR_USER, password: &password });
    let anonymous = reqwest::get(format!("http://{}/v2/", registry.host)).await.unwrap();
    assert_eq!(anonymous.status(), 401, "the registry must want the credential");
    let direct = Direct::new(&registry.host, Some(&docker_config(&registry.host, &user, &password)));
    let img = small_image(1, "amd64");
    direct.push_image("bob/base", "v1", &img).await;
    assert_eq!(direct.manifest_digest("bob/base", "v1").await, Some(img.digest));
}

#[test]
fn enforcement_refuses_what_no_policy_allows_and_bad_credentials() {
    let moto = Moto::start(&spec());
    let nobody = moto.user_env("nobody");
    assert_ecr_access_denied(
        moto.call(&nobody, &[], "ecr", "get_authorization_token", &json!({})),
        &format!("arn:aws:iam::{ACCOUNT}:user/nobody"),
        "ecr:GetAuthorizationToken",
    );
    // The same key is good for what its policy allows: the denial above is the policy's.
    let repos = moto.call(&nobody, &[], "ecr", "describe_repositories", &json!({})).unwrap();
    let mut names: Vec<&str> = repos["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["repositoryName"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["bob/base", "bob/workspace"]);

    let mut wrong_secret = moto.user_env("pusher");
    wrong_secret.iter_mut().find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY").unwrap().1 = "not-the-secret".into();
    let e = moto.call(&wrong_secret, &[], "ecr", "get_authorization_token", &json!({})).unwrap_err();
    assert_eq!((e.http_status, e.effective_code()), (403, "SignatureDoesNotMatch"), "{e:?}");

    let mut unknown_key = moto.user_env("pusher");
    unknown_key.iter_mut().find(|(k, _)| k == "AWS_ACCESS_KEY_ID").unwrap().1 = "AKIAUNKNOWNUNKNOWN00".into();
    let e = moto.call(&unknown_key, &[], "ecr", "get_authorization_token", &json!({})).unwrap_err();
    assert_eq!((e.http_status, e.effective_code()), (403, "InvalidClientTokenId"), "{e:?}");
}

#[test]
fn the_irsa_chain_reaches_the_builder_role_and_stops_where_policies_say_no() {
    let moto = Moto::start(&spec());
    let controller = moto.irsa_env("controller");

    let me = moto.call(&controller, &[], "sts", "get_caller_identity", &json!({})).unwrap();
    assert_eq!(me["Arn"], format!("arn:aws:sts::{ACCOUNT}:assumed-role/controller/bob-test-controller"));
    assert_eq!(me["Account"], ACCOUNT);
    // The web identity's own role may not read the registry; only by assuming builder.
    assert_ecr_access_denied(
        moto.call(&controller, &[], "ecr", "get_authorization_token", &json!({})),
        "assumed-role/controller/",
        "ecr:GetAuthorizationToken",
    );

    let builder = moto.role_arn("builder").to_string();
    let answer = moto
        .call(&controller, &[&builder], "ecr", "get_authorization_token", &json!({}))
        .unwrap_or_else(|e| panic!("{e:?}\n{}", moto.output()));
    assert_eq!(ecr_credential(&answer), (ECR_USER.to_string(), Moto::ecr_password(ACCOUNT)));

    // Assumable, but the role has no GetAuthorizationToken: refused at the ECR call.
    let denied = moto.role_arn("denied").to_string();
    assert_ecr_access_denied(
        moto.call(&controller, &[&denied], "ecr", "get_authorization_token", &json!({})),
        "assumed-role/denied/",
        "ecr:GetAuthorizationToken",
    );
    assert!(moto.call(&controller, &[&denied], "ecr", "describe_repositories", &json!({})).is_ok());

    // Not among the controller's AssumeRole resources: refused at AssumeRole.
    let outsider = moto.role_arn("outsider").to_string();
    let e = moto.call(&controller, &[&outsider], "sts", "get_caller_identity", &json!({})).unwrap_err();
    assert_eq!((e.http_status, e.code.as_str()), (403, "AccessDenied"), "{e:?}");
    assert_eq!(e.step, format!("sts:AssumeRole {outsider}"));
    assert!(e.message.contains("assumed-role/controller/bob-test-controller"), "{e:?}");
}

#[test]
fn web_identity_needs_a_role_that_trusts_the_cluster_and_a_token_from_it() {
    let moto = Moto::start(&spec());
    // builder trusts AssumeRole, not the cluster's web identities.
    let e = moto.call(&moto.irsa_env("builder"), &[], "sts", "get_caller_identity", &json!({})).unwrap_err();
    assert_eq!((e.http_status, e.code.as_str()), (403, "AccessDenied"), "{e:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut env = moto.irsa_env("controller");
    let garbage = write_file(dir.path(), "token", "not a token");
    env.iter_mut().find(|(k, _)| k == "AWS_WEB_IDENTITY_TOKEN_FILE").unwrap().1 =
        garbage.display().to_string();
    let e = moto.call(&env, &[], "sts", "get_caller_identity", &json!({})).unwrap_err();
    assert_eq!((e.http_status, e.code.as_str()), (400, "InvalidIdentityToken"), "{e:?}");
}

/// What moto 5.2.1 does not enforce, as recorded in tests/common/moto.rs: a test of the ECR
/// feature cannot rely on these being refused.
#[test]
fn moto_ignores_session_policies_and_ecr_resources() {
    let moto = Moto::start(&spec());
    let deny_all = json!({"Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]});
    let assumed = moto
        .call(
            &moto.irsa_env("controller"),
            &[],
            "sts",
            "assume_role",
            &json!({"RoleArn": moto.role_arn("builder"), "RoleSessionName": "narrowed",
                    "Policy": deny_all.to_string()}),
        )
        .unwrap();
    let creds = |field: &str| assumed["Credentials"][field].as_str().unwrap().to_string();
    let env =
        moto.credentials_env(&creds("AccessKeyId"), &creds("SecretAccessKey"), Some(&creds("SessionToken")));
    assert!(
        moto.call(&env, &[], "ecr", "get_authorization_token", &json!({})).is_ok(),
        "moto now applies session policies: tests/common/moto.rs and the ECR tests can rely on them"
    );

    // A policy scoped to a repository ARN: moto checks ECR calls against `*`, so it allows nothing.
    let scoped = moto.user_env("scoped");
    assert_ecr_access_denied(
        moto.call(&scoped, &[], "ecr", "describe_repositories", &json!({"repositoryNames": ["bob/base"]})),
        "user/scoped",
        "ecr:DescribeRepositories",
    );
}

#[test]
fn the_server_ends_with_its_stdin_or_sigterm_and_leaves_no_files() {
    let moto = Moto::start(&spec());
    let dir = moto.dir().to_path_buf();
    assert!(dir.join("token").is_file());
    let status = moto.stop_by_closing_stdin();
    assert!(status.success(), "serve.py exits cleanly at EOF: {status}");
    assert!(!dir.exists(), "the temporary directory goes with the server");

    let moto = Moto::start(&json!({}));
    let pid = rustix::process::Pid::from_raw(moto.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = moto.wait();
    assert!(status.success(), "serve.py exits cleanly on SIGTERM: {status}");
}

#[test]
#[should_panic(expected = "unknown spec keys ['repos']")]
fn a_misspelt_spec_key_fails_the_test_instead_of_setting_up_less() {
    Moto::start(&json!({"repos": ["bob/base"]}));
}
