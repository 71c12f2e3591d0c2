//! Test helpers: a real `docker-registry` per test (no auth, htpasswd, or token auth with an
//! in-process token server), a `bob proxy` process, small OCI images made without internet, and
//! moto as STS, IAM and ECR (`moto`).
//! Every process listens on a free port and is killed when its guard drops, even on panic.
#![allow(dead_code, unused_imports)]

pub mod build;
pub mod fake_api;
pub mod flags;
pub mod images;
pub mod kube_sim;
pub mod moto;
pub mod recorder;
pub mod samples;
pub mod token;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use images::*;
pub use token::TokenServer;

/// Fails with the install command when a program the test needs is missing.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(found, "`{program}` is missing: install it with `apt-get install -y {package}` (or run .ci/run)");
}

/// Installs the rustls crypto provider that bob's clients need.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A child process that is killed when dropped, with its output collected in the background.
pub struct Proc {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawns `cmd` and waits until a line of its stderr contains `marker`; returns that line.
    pub fn spawn_until(mut cmd: Command, marker: &str, timeout: Duration) -> (Self, String) {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = output.clone();
        let marker = marker.to_string();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            let mut sent = false;
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if !sent && line.contains(&marker) {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                out.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut proc = Proc { child, output };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(20)) {
                return (proc, line);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("{cmd:?} exited with {status} before it was ready:\n{}", proc.output());
            }
            assert!(Instant::now() < deadline, "{cmd:?} not ready in {timeout:?}:\n{}", proc.output());
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit; `None` if it did not.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident set size in KiB (VmHWM from /proc).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address part of a log line that says `listening on <scheme://>host:port`.
fn listen_addr(line: &str) -> String {
    let rest = &line[line.find("listening on").expect("marker") + "listening on".len()..];
    let rest = rest.trim().trim_start_matches("http://");
    rest.split(|c: char| c.is_whitespace() || c == '"').next().unwrap().to_string()
}

/// How a test registry authenticates.
pub enum RegistryAuth<'a> {
    /// No authentication.
    None,
    /// htpasswd basic auth with one user.
    Basic { user: &'a str, password: &'a str },
    /// Token auth against this token server.
    Token(&'a TokenServer),
}

/// A real `docker-registry` on `127.0.0.1:<free port>`, removed with its data when dropped.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    proc: Proc,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry with the given authentication.
    pub fn start(auth: RegistryAuth<'_>) -> Self {
        Self::start_with(auth, false)
    }

    /// Starts a registry; with `relative_urls` its upload `Location`s are paths, not URLs.
    pub fn start_with(auth: RegistryAuth<'_>, relative_urls: bool) -> Self {
        init();
        require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let auth_yaml = match auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Basic { user, password } => {
                require("htpasswd", "apache2-utils");
                let file = dir.path().join("htpasswd");
                let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap();
                assert!(out.status.success(), "htpasswd failed");
                std::fs::write(&file, out.stdout).unwrap();
                format!("auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n", file.display())
            }
            RegistryAuth::Token(ts) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                ts.realm(),
                token::SERVICE,
                token::ISSUER,
                ts.cert_path().display()
            ),
        };
        let data = dir.path().join("data");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: test-secret\n{auth_yaml}",
            data.display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&cfg).env("REGISTRY_HTTP_RELATIVEURLS", relative_urls.to_string());
        let (proc, line) = Proc::spawn_until(cmd, "listening on", Duration::from_secs(20));
        Registry { host: listen_addr(&line), proc, data, _dir: dir }
    }

    /// `<host>/<repo>`.
    pub fn repo(&self, repo: &str) -> String {
        format!("{}/{repo}", self.host)
    }

    /// The upload sessions open in the registry's storage: `<repo>/_uploads/<id>` directories
    /// that still hold the session (`startedat`) or its bytes (`data`). A cancelled session
    /// leaves only an empty-ish `hashstates` directory behind (distribution 2.8 writes the hash
    /// state once more after the cancel), which holds no data and no session.
    pub fn open_uploads(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if !path.is_dir() {
                    continue;
                }
                if path.file_name().is_some_and(|n| n == "_uploads") {
                    let sessions = std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path());
                    out.extend(sessions.filter(|s| s.join("startedat").exists() || s.join("data").exists()));
                } else {
                    walk(&path, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data.join("docker/registry/v2/repositories"), &mut out);
        out
    }

    /// How many upload sessions are open in `repo` (see `open_uploads`).
    pub fn open_uploads_in(&self, repo: &str) -> usize {
        let repo_dir = self.data.join("docker/registry/v2/repositories").join(repo);
        self.open_uploads().iter().filter(|p| p.starts_with(&repo_dir)).count()
    }
}

/// A `bob proxy` process on a free port.
pub struct ProxyProc {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The process.
    pub proc: Proc,
}

impl ProxyProc {
    /// Starts `bob proxy` with these environment variables (plus a free address and debug logs).
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with_fd_limit(env, None)
    }

    /// [`ProxyProc::start`] with at most `max_fds` open file descriptors in the proxy process
    /// (as a small `ulimit -n`), so that exhausting them takes few connections.
    pub fn start_with_fd_limit(env: &[(&str, &str)], max_fds: Option<u64>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bob"));
        if let Some(n) = max_fds {
            use std::os::unix::process::CommandExt;
            let limit = rustix::process::Rlimit { current: Some(n), maximum: Some(n) };
            // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd.arg("proxy").env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.env("BOB_PROXY_ADDR", "127.0.0.1:0").env("RUST_LOG", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (proc, line) = Proc::spawn_until(cmd, "listening on", Duration::from_secs(20));
        ProxyProc { addr: listen_addr(&line), proc }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A docker config JSON with one basic credential.
pub fn docker_config(host: &str, user: &str, password: &str) -> String {
    docker_config_for(&[(host, user, password)])
}

/// A docker config JSON with a basic credential per `(host, user, password)`.
pub fn docker_config_for(entries: &[(&str, &str, &str)]) -> String {
    use base64::Engine;
    let auths: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(host, user, password)| {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            (host.to_string(), serde_json::json!({ "auth": auth }))
        })
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

/// Writes `content` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads a whole reader (for piped children).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// Address space a `bob` run by `bob_bounded` may use: far above what it needs (about 200 MiB
/// here), far below what an unbounded read of `/dev/zero` takes, so such a read dies instead of
/// taking the machine's memory, and the test sees it.
pub const ADDRESS_SPACE_KIB: u32 = 1024 * 1024;

/// Runs `bob` with a clean environment (plus `env`) and a bounded address space, for a command
/// that must end by itself: one still running after a minute (e.g. a proxy that accepted bad
/// configuration and serves) is killed and reported.
pub fn bob_bounded(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\""));
    c.arg(env!("CARGO_BIN_EXE_bob")).args(args);
    c.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("HOME", "/nonexistent");
    c.env("RUST_LOG", "off");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("bob {args:?} still runs after a minute:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
