//! A kube-sim (`../shared/tools/kube-sim`, the fake API server of the end-to-end suite) per
//! test, on a free port, without a kubelet: for tests of bob's Kubernetes client under the
//! faults it injects (`--faults`, `/_sim/faults`). Stopped (SIGTERM, then SIGKILL) and its
//! directory removed when dropped, even on panic.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running kube-sim.
pub struct KubeSim {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The kubeconfig it wrote (plain HTTP, no credentials).
    pub kubeconfig: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KubeSim {
    /// Starts one with `--faults faults` (if any); fails, saying where it looked, when kube-sim
    /// is not beside the checkout.
    pub fn start(faults: Option<&str>) -> Self {
        let server = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/kube-sim/server.py");
        // Never a silent pass: these tests need kube-sim beside the checkout, as CI has it.
        assert!(
            server.is_file(),
            "no kube-sim at {}: check out ../shared beside this repository (README: \"End-to-end tests\")",
            server.display()
        );
        super::require("python3", "python3");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        let log = dir.path().join("kube-sim.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(&server).args(["--port", "0", "--kubeconfig-out"]).arg(&kubeconfig);
        if let Some(f) = faults {
            cmd.args(["--faults", f]);
        }
        cmd.env("PYTHONUNBUFFERED", "1").env_remove("KUBECONFIG");
        cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        let child = cmd.spawn().expect("python3 server.py");
        let mut sim = KubeSim { child, addr: String::new(), kubeconfig, log, _dir: dir };
        let line = sim.wait_for_line("kube-sim listening on http://");
        sim.addr = line.rsplit("http://").next().unwrap().trim().to_string();
        sim.wait_for_line("kubeconfig written");
        sim
    }

    /// Everything it logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kube-sim exited ({status}) before {needle:?}:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "kube-sim did not log {needle:?}:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A kube config for its kubeconfig (kube's own default retry still on, as `try_default`).
    pub async fn config(&self) -> kube::Config {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap()
    }

    /// The counts of the faults injected so far (`GET /_sim/faults`).
    pub fn fault_counts(&self) -> Value {
        self.get("/_sim/faults")
    }

    /// Replaces the faults from now on (`set=SPEC`; empty: none); answers the counts so far.
    pub fn set_faults(&self, spec: &str) -> Value {
        let encoded: String = spec
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.get(&format!("/_sim/faults?set={encoded}"))
    }

    /// A GET without a User-Agent (so `agent=` faults never meet it), as JSON.
    fn get(&self, path: &str) -> Value {
        let mut conn = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(conn, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }
}

/// The sum of the counts of `kinds` in a `/_sim/faults` answer.
pub fn count(counts: &Value, kinds: &[&str]) -> u64 {
    kinds.iter().map(|k| counts[*k].as_u64().unwrap_or(0)).sum()
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
