//! AWS for the tests: moto's server as STS, IAM and ECR, one per test on a free port, with IAM
//! enforcement on (an unsigned or badly signed call, or one no policy allows, is refused as AWS
//! would: `InvalidClientTokenId`, `SignatureDoesNotMatch`, `AccessDenied`).
//!
//! `tests/moto/serve.py` runs the server and sets up what the spec (JSON) asks for:
//!
//! ```json
//! {
//!   "account": "123456789012",          // 12 digits; optional, moto's default account if absent
//!   "region": "us-east-1",              // optional, us-east-1 if absent
//!   "repositories": ["bob/base"],       // ECR repositories, in that account and region
//!   "roles": [{"name": "controller", "actions": ["sts:AssumeRole"],
//!              "resources": ["arn:aws:iam::123456789012:role/builder"],   // or "*" (the default)
//!              "trust": "web-identity"}], // or "account" (the default)
//!   "users": [{"name": "pusher", "actions": ["ecr:GetAuthorizationToken"], "resources": "*"}]
//! }
//! ```
//!
//! Each role and user gets one inline policy allowing `actions` on `resources`; each user gets an
//! access key. Role ARNs are `arn:aws:iam::<account>:role/<name>`, so a policy may name a role of
//! the same spec. `trust: "web-identity"` trusts the test cluster's OIDC provider for
//! `sts:AssumeRoleWithWebIdentity` (what IRSA needs); `trust: "account"` trusts `sts:AssumeRole`
//! from any principal whose own policy allows it (moto cannot express "this account": see
//! serve.py), so the caller's identity policy decides.
//!
//! What moto enforces and what it does not (moto 5.2.1, read from moto/iam/access_control.py and
//! checked by tests/moto_harness.rs):
//! - enforced: the SigV4 signature, that the key exists (users' keys; assumed-role keys with their
//!   session token), the caller's inline and attached policies (Allow, explicit Deny, `Action`
//!   wildcards), and for `sts:AssumeRole` the target role's ARN against the policy's `Resource`
//!   plus the target's trust policy (principal `*` or the caller's exact ARN only);
//! - not enforced: session policies (`Policy` on AssumeRole is ignored), conditions (except
//!   `sts:ExternalId` in trust policies), resource-based policies (ECR repository policies),
//!   and `Resource` wherever moto maps no resource (it maps one for sts:AssumeRole, IAM, SQS
//!   and S3 only): ECR calls are checked against `*`, so a policy scoped to a repository ARN
//!   allows nothing;
//! - `sts:AssumeRoleWithWebIdentity` fails with a 500 under enforcement (moto requires a
//!   signature on a call that has none) and checks nothing otherwise; serve.py lets it through
//!   after checking the token's `iss` and `aud` and the role's trust policy (not the token's
//!   signature, expiry or `sub`);
//! - a denial on ECR (a JSON-protocol service) comes back as HTTP 403 with an XML body (`<Code>
//!   AccessDenied</Code>`), no `x-amzn-ErrorType` header and `text/html` as content type; real
//!   ECR answers JSON (`AccessDeniedException`). boto3 reports it with the HTTP status as its
//!   code (call.py adds the XML's code); a Rust SDK client will not find `AccessDeniedException`.
//!
//! Which Python: `<repo>/.venv/bin/python` (what `.ci/run` installs, from
//! scripts/requirements-test.txt), else `python3` from `PATH` if it imports the pinned moto with
//! boto3 (a developer's machine with moto installed globally); else the test fails with the
//! install command. The version must match the pin: serve.py leans on moto's internals.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The user name of every ECR registry credential.
pub const ECR_USER: &str = "AWS";

/// The namespace and service account the IRSA token names (`sub`); serve.py does not check it.
const SERVICE_ACCOUNT: &str = "system:serviceaccount:bob:bob";

/// How long moto may take to start and set up before the test gives up: a guard against a
/// hung server (a test that hangs forever tells nothing), far above the few seconds it takes.
const START_GUARD: Duration = Duration::from_secs(180);

/// A moto server for one test; killed, with its temporary files, when dropped.
pub struct Moto {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The account everything lives in.
    pub account: String,
    /// The region of the repositories (and of the environment given to clients).
    pub region: String,
    /// Role name -> role ARN.
    pub roles: BTreeMap<String, String>,
    /// User name -> (access key id, secret access key).
    pub users: BTreeMap<String, (String, String)>,
    /// Repository name -> repository URI (`<account>.dkr.ecr.<region>.amazonaws.com/<name>`).
    pub repositories: BTreeMap<String, String>,
    /// The projected service account token IRSA would mount (a JWT-shaped, unsigned token).
    token_file: PathBuf,
    python: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<Vec<u8>>>,
    dir: tempfile::TempDir,
}

/// An AWS error as `tests/moto/call.py` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    /// The error code as boto3 parsed it (the HTTP status when it could not parse the body).
    pub code: String,
    /// The HTTP status.
    pub http_status: u16,
    /// The message (the whole body when boto3 could not parse it).
    pub message: String,
    /// The `<Code>` of an XML error body boto3 could not parse (moto's denials on ECR).
    pub body_code: Option<String>,
    /// The call that failed: `sts:AssumeRole <arn>` or `<service>:<operation>`.
    pub step: String,
}

impl AwsError {
    /// The code, wherever moto put it.
    pub fn effective_code(&self) -> &str {
        self.body_code.as_deref().unwrap_or(&self.code)
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The moto version the tests need, from scripts/requirements-test.txt (the one pin).
fn pinned_moto() -> String {
    let path = repo_root().join("scripts/requirements-test.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("moto[server]=="))
        .unwrap_or_else(|| panic!("{} pins no moto[server]==<version>", path.display()))
        .trim()
        .to_string()
}

/// The Python that runs moto: see the module's documentation.
fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        let want = pinned_moto();
        let venv = repo_root().join(".venv/bin/python");
        let mut seen = Vec::new();
        for candidate in [venv, PathBuf::from("python3")] {
            let out = Command::new(&candidate)
                .args(["-c", "import boto3, moto, moto.server; print(moto.__version__)"])
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    if version == want {
                        return Ok(candidate);
                    }
                    seen.push(format!("{} has moto {version}", candidate.display()));
                }
                Ok(_) => seen.push(format!("{} cannot import moto[server] and boto3", candidate.display())),
                Err(e) => seen.push(format!("{}: {e}", candidate.display())),
            }
        }
        Err(format!(
            "moto {want} is missing ({}): install it with `python3 -m venv .venv && .venv/bin/pip install -r \
             scripts/requirements-test.txt` in {} (or run .ci/run)",
            seen.join("; "),
            repo_root().display()
        ))
    });
    match found {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// The environment both kinds of credentials share: the endpoint and region, and nothing from
/// this machine (no config or credentials files, no instance metadata).
fn base_env(moto: &Moto) -> Vec<(String, String)> {
    let missing = |name: &str| moto.dir.path().join(name).display().to_string();
    [
        ("AWS_ENDPOINT_URL", moto.endpoint.clone()),
        ("AWS_REGION", moto.region.clone()),
        // boto3 reads only this one; the Rust SDK and the IRSA webhook set both.
        ("AWS_DEFAULT_REGION", moto.region.clone()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_CONFIG_FILE", missing("no-aws-config")),
        ("AWS_SHARED_CREDENTIALS_FILE", missing("no-aws-credentials")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Moto {
    /// Starts moto and sets up `spec` (see the module's documentation); enforcement is on when
    /// this returns.
    pub fn start(spec: &Value) -> Self {
        let python = python().to_path_buf();
        let dir = tempfile::tempdir().unwrap();
        let spec_file = dir.path().join("spec.json");
        std::fs::write(&spec_file, spec.to_string()).unwrap();
        let mut cmd = Command::new(&python);
        cmd.arg(repo_root().join("tests/moto/serve.py")).arg(&spec_file);
        // Nothing of this machine's AWS setup (or moto settings) reaches the server.
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.env("PYTHONDONTWRITEBYTECODE", "1").env("PYTHONUNBUFFERED", "1");
        // stdin stays open while the test holds it; its end (drop, or this process dying) stops
        // the server.
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let mut err_pipe = child.stderr.take().unwrap();
        let err_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_GUARD).unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&line).ok();
        let Some(state) = parsed else {
            let _ = child.kill();
            let status = child.wait();
            // The child is gone, so its stderr is closed and the reader has it all.
            let _ = err_reader.join();
            panic!(
                "tests/moto/serve.py did not set up moto ({status:?}); stdout: {line:?}\n{}",
                String::from_utf8_lossy(&stderr.lock().unwrap())
            );
        };
        let strings = |key: &str| -> BTreeMap<String, String> {
            serde_json::from_value(state[key].clone()).unwrap_or_else(|e| panic!("{key} in {state}: {e}"))
        };
        let users = state["users"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, u)| {
                let field = |f: &str| u[f].as_str().unwrap().to_string();
                (name.clone(), (field("access_key_id"), field("secret_access_key")))
            })
            .collect();
        // What the EKS pod identity webhook projects: a JWT from the cluster's issuer for STS.
        // Not signed (nothing checks the signature; see the module's documentation).
        let claims = json!({
            "iss": state["oidc_issuer"],
            "aud": [state["oidc_audience"]],
            "sub": SERVICE_ACCOUNT,
            "iat": 1_700_000_000u64,
            "exp": 4_000_000_000u64,
        });
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!(
            "{}.{}.{}",
            part(&json!({"alg": "RS256", "kid": "bob-test"})),
            part(&claims),
            URL_SAFE_NO_PAD.encode("not signed")
        );
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token).unwrap();
        Moto {
            endpoint: state["endpoint"].as_str().unwrap().to_string(),
            account: state["account"].as_str().unwrap().to_string(),
            region: state["region"].as_str().unwrap().to_string(),
            roles: strings("roles"),
            users,
            repositories: strings("repositories"),
            token_file,
            python,
            child,
            stdin,
            stderr,
            dir,
        }
    }

    /// The ARN of a role of the spec.
    pub fn role_arn(&self, role: &str) -> &str {
        self.roles.get(role).unwrap_or_else(|| panic!("no role {role} in the spec: {:?}", self.roles))
    }

    /// The environment the EKS IRSA webhook gives a pod whose service account is annotated with
    /// `role`, pointed at this server: the role ARN, the token file, a session name, the endpoint
    /// and region, and no way to other credentials (no instance metadata, no config files).
    /// Ambient `AWS_*` variables must still be removed from the command: [`Moto::apply_env`].
    pub fn irsa_env(&self, role: &str) -> Vec<(String, String)> {
        let mut env = base_env(self);
        env.push(("AWS_ROLE_ARN".into(), self.role_arn(role).to_string()));
        env.push(("AWS_WEB_IDENTITY_TOKEN_FILE".into(), self.token_file.display().to_string()));
        env.push(("AWS_ROLE_SESSION_NAME".into(), format!("bob-test-{role}")));
        env.push(("AWS_STS_REGIONAL_ENDPOINTS".into(), "regional".into()));
        env
    }

    /// The environment of a client with `user`'s static access key.
    pub fn user_env(&self, user: &str) -> Vec<(String, String)> {
        let (id, secret) =
            self.users.get(user).unwrap_or_else(|| panic!("no user {user} in the spec: {:?}", self.users));
        self.credentials_env(id, secret, None)
    }

    /// The environment of a client with these keys (e.g. the `Credentials` of an AssumeRole).
    pub fn credentials_env(
        &self,
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
    ) -> Vec<(String, String)> {
        let mut env = base_env(self);
        env.push(("AWS_ACCESS_KEY_ID".into(), access_key_id.to_string()));
        env.push(("AWS_SECRET_ACCESS_KEY".into(), secret_access_key.to_string()));
        if let Some(token) = session_token {
            env.push(("AWS_SESSION_TOKEN".into(), token.to_string()));
        }
        env
    }

    /// Sets `env` on `cmd` after removing every `AWS_*` variable it would inherit, so that a
    /// developer's own credentials or profile cannot answer instead of the test's.
    pub fn apply_env(cmd: &mut Command, env: &[(String, String)]) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    }

    /// The password of the ECR registry credential moto hands `account` (user [`ECR_USER`]):
    /// moto's GetAuthorizationToken answers base64 of `AWS:<account>-auth-token`, where the
    /// account is the caller's.
    pub fn ecr_password(account: &str) -> String {
        format!("{account}-auth-token")
    }

    /// One call with boto3 (tests/moto/call.py) under `env` ([`Moto::irsa_env`] or
    /// [`Moto::user_env`]), after assuming each of `assume` (role ARNs) in turn. `operation` is
    /// boto3's snake_case name. Ok is the response without its metadata.
    pub fn call(
        &self,
        env: &[(String, String)],
        assume: &[&str],
        service: &str,
        operation: &str,
        params: &Value,
    ) -> Result<Value, AwsError> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(repo_root().join("tests/moto/call.py"));
        for arn in assume {
            cmd.args(["--assume", arn]);
        }
        cmd.args([service, operation, &params.to_string()]);
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.env("PYTHONDONTWRITEBYTECODE", "1").env("HOME", self.dir.path());
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let answer: Value = match (out.status.success(), serde_json::from_str(stdout.trim())) {
            (true, Ok(v)) => v,
            _ => panic!(
                "call.py {service} {operation} failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        if let Some(e) = answer.get("error") {
            let text = |f: &str| e[f].as_str().unwrap_or_default().to_string();
            return Err(AwsError {
                code: text("code"),
                http_status: e["http_status"].as_u64().unwrap_or_default() as u16,
                message: text("message"),
                body_code: e["body_code"].as_str().map(str::to_string),
                step: text("step"),
            });
        }
        Ok(answer["result"].clone())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory of the spec and token files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Closes the server's stdin, as the kernel does when the test process dies, and waits for
    /// the server to exit by itself.
    pub fn stop_by_closing_stdin(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        self.child.wait().unwrap()
    }

    /// Waits for the server to exit by itself (after a signal the test sent), stdin still open.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Everything the server wrote to stderr so far (its request log, tracebacks).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // Closing stdin alone would end the server; killing does not wait for it to notice.
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
