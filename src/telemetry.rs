//! Logging: one `tracing` subscriber for every subcommand, to stderr, filtered by `RUST_LOG`
//! (default `DEFAULT_FILTER`). Access-log lines use the target `bob::access`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `info`, without kube-client's HTTP trace layer: it logs every failed API call at ERROR without
/// its meaning (a pods/log of a container that never started is expected), and bob logs each
/// failed call itself, at the level it deserves, with what it was for.
pub const DEFAULT_FILTER: &str = "info,kube_client::client::builder=off";

/// Installs the global subscriber; a second call is a no-op.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("BOB_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn kube_clients_own_error_lines_are_left_to_bob() {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(DEFAULT_FILTER))
            .with_writer(move || SharedBuf(writer.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "kube_client::client::builder", "failed with status 400 Bad Request");
            tracing::info!(target: "bob::controller", "reconciled");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("failed with status") && text.contains("reconciled"), "{text}");
    }

    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
