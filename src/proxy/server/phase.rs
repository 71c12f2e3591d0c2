//! Where each client connection is in its request cycle — reading a head, serving requests, or
//! idle between them — and the table of open connections the accept loop makes room in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Limits;

/// Where a connection is in its request cycle.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Reading a request head since then.
    Head(Instant),
    /// This many requests in flight (until their responses are written or dropped).
    Busy(u32),
    /// Between requests since then.
    Idle(Instant),
    /// Closed to make room for a new connection.
    Evicted,
}

/// One connection's phase, shared by its socket, its service and the accept loop.
pub(super) struct Conn {
    phase: Mutex<Phase>,
    /// Wakes the connection's watchdog when its deadline may have moved.
    changed: Notify,
    /// Wakes the accept loop when this connection ends or has no request in flight any more.
    table_changed: Arc<Notify>,
}

impl Conn {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: between requests, they start the next request head.
    pub(super) fn read(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    /// A request head is complete; the request is in flight until the guard drops.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Evicted => Phase::Evicted,
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        };
        InFlight(self.clone())
    }

    fn end(&self) {
        let mut phase = self.phase();
        if let Phase::Busy(n) = *phase {
            *phase = if n > 1 { Phase::Busy(n - 1) } else { Phase::Idle(Instant::now()) };
        }
        drop(phase);
        self.changed.notify_one();
        self.table_changed.notify_one();
    }

    /// When the current phase runs out, and why.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        match *self.phase() {
            Phase::Head(since) => Some((since + limits.header_timeout, "header timeout")),
            Phase::Idle(since) => Some((since + limits.idle_timeout, "idle timeout")),
            Phase::Busy(_) => None,
            Phase::Evicted => Some((Instant::now(), "connection limit")),
        }
    }

    /// Completes when the connection has overstayed its phase or was evicted, with the reason.
    pub(super) async fn expired(&self, limits: &Limits) -> &'static str {
        loop {
            let changed = self.changed.notified();
            match self.deadline(limits) {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = changed => {}
                },
                None => changed.await,
            }
        }
    }
}

/// A request in flight on a connection.
pub(super) struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The open connections.
#[derive(Default)]
pub(super) struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Wakes the accept loop when a connection ends or has no request in flight any more.
    pub(super) changed: Arc<Notify>,
    next: AtomicU64,
}

impl Table {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.conns().len()
    }

    pub(super) fn open(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            phase: Mutex::new(Phase::Head(Instant::now())),
            changed: Notify::new(),
            table_changed: self.changed.clone(),
        });
        self.conns().insert(id, conn.clone());
        (id, conn)
    }

    /// Evicts the connection that has waited longest for a request head or between requests,
    /// unless one is still closing from an earlier eviction. False when every connection has a
    /// request in flight.
    pub(super) fn make_room(&self) -> bool {
        loop {
            let mut oldest: Option<(Instant, Arc<Conn>)> = None;
            for conn in self.conns().values() {
                match *conn.phase() {
                    Phase::Evicted => return true,
                    Phase::Head(since) | Phase::Idle(since)
                        if oldest.as_ref().is_none_or(|(o, _)| since < *o) =>
                    {
                        oldest = Some((since, conn.clone()));
                    }
                    _ => {}
                }
            }
            let Some((_, conn)) = oldest else { return false };
            let mut phase = conn.phase();
            // Its request head may have completed since the scan: then look again.
            if matches!(*phase, Phase::Head(_) | Phase::Idle(_)) {
                *phase = Phase::Evicted;
                drop(phase);
                conn.changed.notify_one();
                return true;
            }
        }
    }
}

/// Removes a connection from the table when its task ends, however it ends.
pub(super) struct Open {
    pub(super) table: Arc<Table>,
    pub(super) id: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.table.conns().remove(&self.id);
        self.table.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn phase(c: &Conn) -> Phase {
        *c.phase()
    }

    #[tokio::test]
    async fn room_is_made_from_the_longest_waiting_connection_never_a_busy_one() {
        let table = Table::default();
        let tick = || std::thread::sleep(Duration::from_millis(2));
        let (_, busy) = table.open();
        let in_flight = busy.begin();
        tick();
        let (_, waiting) = table.open();
        tick();
        let (_, fresh) = table.open();
        assert!(table.make_room());
        assert!(matches!(phase(&waiting), Phase::Evicted), "the oldest without a request in flight");
        assert!(matches!(phase(&busy), Phase::Busy(1)) && matches!(phase(&fresh), Phase::Head(_)));
        assert!(table.make_room(), "one is still closing");
        assert!(matches!(phase(&fresh), Phase::Head(_)), "so no second one is evicted");
        table.conns().retain(|_, c| !matches!(*c.phase(), Phase::Evicted));
        let _also_busy = fresh.begin();
        assert!(!table.make_room(), "every connection has a request in flight");
        drop(in_flight);
        assert!(matches!(phase(&busy), Phase::Idle(_)));
        assert!(table.make_room(), "a connection between requests can go");
        assert!(matches!(phase(&busy), Phase::Evicted));
    }
}
