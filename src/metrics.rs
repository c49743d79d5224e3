//! Server metrics, served as Prometheus text on `GET /metrics`.
//!
//! [`Metrics`] is a cheap handle (an `Arc` inside) of plain counters, gauges and histograms
//! from `prometheus-client`. The hub holds one and counts what it sees (attachments, closes,
//! commands); transports count what they write (events, bytes, delivery latency) and the
//! errors they answer. Nothing here knows about HTTP: the router encodes [`Metrics::encode`]
//! into a response.
//!
//! The per-transport handles are created once, so counting on the delivery path is an atomic
//! add (and, for the latency histogram, one short mutex per batch), never a label lookup.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::protocol::{CloseReason, EncodedEvent, ErrorCode, TransportKind};

/// Label value for errors and commands that came through no transport (plain HTTP endpoints,
/// or a session that never attached one).
pub const NO_TRANSPORT: &str = "none";

type TransportLabel = [(&'static str, &'static str); 1];
type PairLabel = [(&'static str, &'static str); 2];

/// Counters for one transport, shared with the registry's families.
#[derive(Debug, Clone)]
pub struct TransportMetrics {
    /// Transports of this kind attached now (a held poll counts while it is held).
    pub attached: Gauge,
    /// Events written to clients.
    pub delivered: Counter,
    /// Bytes of events written, with the transport's framing, without HTTP headers.
    pub bytes: Counter,
    /// Commands received from sessions whose last transport was this one.
    pub commands: Counter,
    /// Seconds from an event's creation (encoding) to its write completing.
    pub latency: Histogram,
}

/// Counters of the history store's writer.
#[derive(Debug, Clone, Default)]
pub struct HistoryMetrics {
    /// Messages written to the store.
    pub written: Counter,
    /// Messages whose write failed (lost from history; with full durability, not sent).
    pub write_failures: Counter,
    /// Transactions committed (each a group of writes).
    pub batches: Counter,
    /// The highest message id known to be written.
    pub written_id: Gauge,
}

/// A cluster node's figures (`--redis`); zero on a single node.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    /// Log entries this node's replica applied.
    pub entries_applied: Counter,
    /// Milliseconds between the append of the last entry applied (Redis's clock) and its
    /// apply (this node's clock): how far the replica lags the log.
    pub replica_lag_ms: Gauge,
    /// Round trips to Redis for decisions (scripts) and reads of the lease or log tip; the
    /// log reader's own reads are not counted.
    pub redis_calls: Counter,
    /// Sessions ended because Redis lost the log they were built on.
    pub sessions_lost: Counter,
    /// Snapshots this node took for starting nodes.
    pub snapshots_sent: Counter,
    /// Sessions this node took from a running node's snapshot when it started.
    pub sessions_restored: Counter,
    /// Bytes of the last snapshot this node took or loaded.
    pub snapshot_bytes: Gauge,
}

/// The HTTP version a transport's requests travelled on: the label `http` of
/// `switchyard_attaches_by_http` and `switchyard_events_delivered_by_http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http {
    /// HTTP/1.1 (or 1.0).
    H1,
    /// HTTP/2, with TLS or without (h2c).
    H2,
}

impl Http {
    /// The version of a request.
    pub fn of(version: hyper::Version) -> Http {
        if version == hyper::Version::HTTP_2 {
            Http::H2
        } else {
            Http::H1
        }
    }

    /// The label value: `1.1` or `2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Http::H1 => "1.1",
            Http::H2 => "2",
        }
    }
}

/// Counters by transport and HTTP version.
#[derive(Debug, Clone)]
struct ByHttp {
    attaches: Counter,
    delivered: Counter,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    history: HistoryMetrics,
    cluster: ClusterMetrics,
    transports: [TransportMetrics; 4],
    /// Indexed by transport, then [`Http`] (H1, H2).
    by_http: [[ByHttp; 2]; 4],
    commands_without_transport: Counter,
    errors: Family<PairLabel, Counter>,
    closes: Family<PairLabel, Counter>,
    heap: Gauge,
}

/// Handle to the server's metrics. Clone it freely.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~26 s, doubling.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

fn index(kind: TransportKind) -> usize {
    match kind {
        TransportKind::WebSocket => 0,
        TransportKind::Sse => 1,
        TransportKind::LongPolling => 2,
        TransportKind::ShortPolling => 3,
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let attached = Family::<TransportLabel, Gauge>::default();
        let delivered = Family::<TransportLabel, Counter>::default();
        let bytes = Family::<TransportLabel, Counter>::default();
        let commands = Family::<TransportLabel, Counter>::default();
        let latency = Family::<TransportLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let errors = Family::<PairLabel, Counter>::default();
        let closes = Family::<PairLabel, Counter>::default();
        let transports = TransportKind::ALL.map(|kind| {
            let label = [("transport", kind.as_str())];
            TransportMetrics {
                attached: attached.get_or_create_owned(&label),
                delivered: delivered.get_or_create_owned(&label),
                bytes: bytes.get_or_create_owned(&label),
                commands: commands.get_or_create_owned(&label),
                latency: latency.get_or_create_owned(&label),
            }
        });
        let commands_without_transport =
            commands.get_or_create_owned(&[("transport", NO_TRANSPORT)]);
        let attaches_by_http = Family::<PairLabel, Counter>::default();
        let delivered_by_http = Family::<PairLabel, Counter>::default();
        let by_http = TransportKind::ALL.map(|kind| {
            [Http::H1, Http::H2].map(|http| {
                let label = [("transport", kind.as_str()), ("http", http.as_str())];
                ByHttp {
                    attaches: attaches_by_http.get_or_create_owned(&label),
                    delivered: delivered_by_http.get_or_create_owned(&label),
                }
            })
        });
        registry.register(
            "attaches_by_http",
            "Transports attached, by transport and the HTTP version of the request (1.1 or 2)",
            attaches_by_http,
        );
        registry.register(
            "events_delivered_by_http",
            "Events written to clients, by transport and HTTP version (1.1 or 2)",
            delivered_by_http,
        );
        registry.register(
            "sessions_attached",
            "Transports attached to a session now, by transport",
            attached,
        );
        registry.register(
            "events_delivered",
            "Events written to clients, by transport",
            delivered,
        );
        registry.register(
            "bytes_written",
            "Bytes of events written to clients with their transport framing (HTTP headers not included), by transport",
            bytes,
        );
        registry.register(
            "commands_received",
            "Commands received, by the session's last attached transport",
            commands,
        );
        registry.register(
            "errors",
            "Errors answered to clients, by transport and error code",
            errors.clone(),
        );
        registry.register(
            "transport_closes",
            "Transports closed by the server, by transport and reason (superseded, slow_consumer, ...)",
            closes.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from an event's creation to the completion of its write, by transport",
            latency,
        );
        let history = HistoryMetrics::default();
        registry.register(
            "history_written",
            "Messages written to the history store",
            history.written.clone(),
        );
        registry.register(
            "history_write_failures",
            "Messages whose write to the history store failed",
            history.write_failures.clone(),
        );
        registry.register(
            "history_batches",
            "Transactions the history store committed (each a group of writes)",
            history.batches.clone(),
        );
        registry.register(
            "history_written_id",
            "The highest message id written to the history store",
            history.written_id.clone(),
        );
        let cluster = ClusterMetrics::default();
        registry.register(
            "cluster_entries_applied",
            "Log entries this cluster node applied",
            cluster.entries_applied.clone(),
        );
        registry.register(
            "cluster_replica_lag_ms",
            "Milliseconds from the append of the last log entry applied to its apply on this node",
            cluster.replica_lag_ms.clone(),
        );
        registry.register(
            "cluster_redis_calls",
            "Round trips to Redis for decisions and reads of leases or the log's tip (not the log reader's)",
            cluster.redis_calls.clone(),
        );
        registry.register(
            "cluster_sessions_lost",
            "Sessions ended because Redis lost the log they were built on",
            cluster.sessions_lost.clone(),
        );
        registry.register(
            "cluster_snapshots_sent",
            "Snapshots this cluster node took for nodes that started while it ran",
            cluster.snapshots_sent.clone(),
        );
        registry.register(
            "cluster_sessions_restored",
            "Sessions this cluster node took from a running node's snapshot when it started",
            cluster.sessions_restored.clone(),
        );
        registry.register(
            "cluster_snapshot_bytes",
            "Bytes of the last snapshot this cluster node took or loaded",
            cluster.snapshot_bytes.clone(),
        );
        let heap = Gauge::default();
        registry.register(
            "heap_bytes",
            "Bytes the server's allocator has handed out and not had back (glibc's mallinfo2; 0 where it cannot tell): its live data, without the allocator's free memory that RSS also counts",
            heap.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                history,
                cluster,
                transports,
                by_http,
                commands_without_transport,
                errors,
                closes,
                heap,
            }),
        }
    }

    /// A cluster node's counters.
    pub fn cluster(&self) -> &ClusterMetrics {
        &self.inner.cluster
    }

    /// The history store's counters.
    pub fn history(&self) -> &HistoryMetrics {
        &self.inner.history
    }

    /// The counters of one transport.
    pub fn transport(&self, kind: TransportKind) -> &TransportMetrics {
        &self.inner.transports[index(kind)]
    }

    /// Counts a batch of events written by a transport in `bytes` bytes, and each event's
    /// latency from creation until now.
    pub fn delivered<'a>(
        &self,
        kind: TransportKind,
        events: impl IntoIterator<Item = &'a EncodedEvent>,
        bytes: usize,
    ) {
        let metrics = self.transport(kind);
        let now = Instant::now();
        let mut count = 0;
        for event in events {
            count += 1;
            let latency = now.saturating_duration_since(event.created);
            metrics.latency.observe(latency.as_secs_f64());
        }
        metrics.delivered.inc_by(count);
        metrics.bytes.inc_by(bytes as u64);
    }

    /// Counts one event, created at `created`, whose frame of `bytes` bytes was just written.
    pub fn delivered_one(&self, kind: TransportKind, created: Instant, bytes: usize) {
        let metrics = self.transport(kind);
        let latency = Instant::now().saturating_duration_since(created);
        metrics.latency.observe(latency.as_secs_f64());
        metrics.delivered.inc();
        metrics.bytes.inc_by(bytes as u64);
    }

    /// Counts a transport attached by a request of this HTTP version.
    pub fn attached_over(&self, kind: TransportKind, http: Http) {
        self.inner.by_http[index(kind)][http as usize]
            .attaches
            .inc();
    }

    /// Counts events delivered over this HTTP version (with [`Metrics::delivered`] or
    /// [`Metrics::delivered_one`], which count them by transport).
    pub fn delivered_over(&self, kind: TransportKind, http: Http, count: u64) {
        self.inner.by_http[index(kind)][http as usize]
            .delivered
            .inc_by(count);
    }

    /// Counts commands from a session whose last transport was `kind`.
    pub fn commands(&self, kind: Option<TransportKind>, count: usize) {
        let counter = match kind {
            Some(kind) => &self.transport(kind).commands,
            None => &self.inner.commands_without_transport,
        };
        counter.inc_by(count as u64);
    }

    /// Counts an error answered to a client on `transport` (a transport name or
    /// [`NO_TRANSPORT`]).
    pub fn error(&self, transport: &'static str, code: ErrorCode) {
        self.inner
            .errors
            .get_or_create(&[("transport", transport), ("code", code.as_str())])
            .inc();
    }

    /// Counts a transport the server closed.
    pub fn closed(&self, kind: TransportKind, reason: CloseReason) {
        self.inner
            .closes
            .get_or_create(&[("transport", kind.as_str()), ("reason", reason.as_str())])
            .inc();
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        if let Some(bytes) = heap_in_use() {
            self.inner
                .heap
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::with_capacity(16 * 1024);
        encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Bytes in use in the allocator's heap: chunks handed out (`uordblks`) and blocks mapped on
/// their own (`hblkhd`). It walks the allocator's bins, so it is read per scrape, not kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<u64> {
    // SAFETY: mallinfo2 only reads the allocator's own bookkeeping, under its locks.
    let info = unsafe { libc::mallinfo2() };
    Some((info.uordblks + info.hblkhd) as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Event;

    #[test]
    fn counts_appear_in_the_text_format() {
        let metrics = Metrics::new();
        let event = Event::Reset { reason: "x" }.encode();
        metrics.delivered(TransportKind::Sse, [&event, &event], 100);
        metrics.error(TransportKind::WebSocket.as_str(), ErrorCode::RateLimited);
        metrics.closed(TransportKind::WebSocket, CloseReason::Superseded);
        metrics.commands(None, 3);
        let text = metrics.encode();
        assert!(text.contains("switchyard_events_delivered_total{transport=\"sse\"} 2"));
        assert!(text.contains("switchyard_bytes_written_total{transport=\"sse\"} 100"));
        assert!(text
            .contains("switchyard_errors_total{transport=\"websocket\",code=\"rate_limited\"} 1"));
        assert!(text.contains(
            "switchyard_transport_closes_total{transport=\"websocket\",reason=\"superseded\"} 1"
        ));
        assert!(text.contains("switchyard_commands_received_total{transport=\"none\"} 3"));
        assert!(text.contains("switchyard_delivery_latency_seconds_count{transport=\"sse\"} 2"));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_heap_gauge_follows_what_is_allocated() {
        let metrics = Metrics::new();
        let heap = |text: &str| -> i64 {
            let line = text
                .lines()
                .find(|l| l.starts_with("switchyard_heap_bytes "))
                .expect("a heap_bytes sample");
            line[22..].trim().parse().expect("a number")
        };
        let before = heap(&metrics.encode());
        let block = vec![1u8; 64 << 20];
        let during = heap(&metrics.encode());
        drop(block);
        assert!(during - before >= 63 << 20, "{before} then {during}");
    }
}
