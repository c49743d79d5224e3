//! Every limit and interval of the server, each with its documented default.
//!
//! The CLI (`main.rs`) fills a [`Config`]; tests build one with [`Config::default`] and change
//! the fields they need. Nothing here reads the environment or the network.

use std::path::PathBuf;
use std::time::Duration;

use crate::hub::{Budget, Durability, HubConfig};
use crate::protocol::TransportKind;
use crate::proxy::TrustedProxies;

/// Descriptors kept free of connections for the listener, logs and the process itself.
pub const RESERVED_FILES: usize = 64;

/// The embedded store's directory when `--data-dir` is not given, relative to the working
/// directory.
pub const DEFAULT_DATA_DIR: &str = "switchyard-data";

/// Where room history is kept (`--history-store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryStoreKind {
    /// The last `history_len` messages per room, in memory; nothing survives a restart.
    Memory,
    /// SQLite in `data_dir`: history survives restarts and crashes.
    Sqlite,
    /// The Redis at this URL (`redis://HOST:PORT[/DB]`): history lives as long as Redis
    /// keeps its data, and no data directory is needed.
    Redis(String),
}

/// A cluster node's settings (`--redis`, `--node-id`; docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The Redis every node of the cluster shares (`redis://HOST:PORT[/DB]`): the log, the
    /// sequencer's state and room history live there.
    pub redis: String,
    /// This node's id, unique in the cluster: it names the node's transports in attach
    /// leases and its hold on the presence ticker.
    pub node: String,
}

/// The server's settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Transports offered in negotiation; the others answer 404 `transport_disabled`.
    pub transports: Vec<TransportKind>,
    /// Origins allowed to make cross-origin requests (`*` allows any). Same-origin requests
    /// and requests without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Host names the server answers to besides IP literals and `localhost` (`name` for any
    /// port, or `name:port`); any other `Host` gets 403 `forbidden_host` (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Largest WebSocket frame or HTTP body carrying commands, in bytes.
    pub max_message_bytes: usize,
    /// Sustained commands per second per session.
    pub rate_limit_per_sec: f64,
    /// Commands a session may send at once before the sustained rate applies.
    pub rate_limit_burst: f64,
    /// How long a session with no transport attached lives.
    pub session_ttl: Duration,
    /// How often a WebSocket gets a ping and a `heartbeat` frame (every interval), and how long
    /// an SSE stream may stay without an event before it gets a `heartbeat` event; a WebSocket
    /// silent for two intervals is closed.
    pub heartbeat: Duration,
    /// Long-poll wait when the client gives no `wait`.
    pub long_poll: Duration,
    /// Upper bound on any `wait`.
    pub max_long_poll: Duration,
    /// Interval suggested to short-polling clients.
    pub short_poll: Duration,
    /// Events kept per session for resume.
    pub replay_window: usize,
    /// Bytes kept per session for resume (event bodies count in full even where shared);
    /// the newest event is kept whatever its size.
    pub replay_bytes: usize,
    /// Undelivered events an attached stream may fall behind before it is closed with
    /// `slow_consumer`: 768, three quarters of the default replay window, so a burst of small
    /// events does not close a reader that keeps up, and the client can still resume. Keep it
    /// below `replay_window`.
    pub outbox_capacity: usize,
    /// Bytes of undelivered events an attached stream may fall behind (with more than one
    /// event) before it is closed with `slow_consumer`. Smaller than `replay_bytes`.
    pub outbox_bytes: usize,
    /// Messages sent as `history` on join (and kept per room by the memory store).
    pub history_len: usize,
    /// Where room history is kept: in memory (the default here, for tests and embedding) or
    /// in the embedded database under `data_dir` (the binary's default).
    pub history_store: HistoryStoreKind,
    /// Run as a node of a cluster on Redis; `None`: one node on its own.
    pub cluster: Option<Cluster>,
    /// The directory of the embedded store: its database and its lock file.
    pub data_dir: PathBuf,
    /// Messages kept per room by the embedded store; older ones are deleted.
    pub history_keep: usize,
    /// Messages older than this are deleted and never served, by either store.
    pub history_max_age: Duration,
    /// Whether a message is broadcast before its write (`Normal`) or after (`Full`).
    pub durability: Durability,
    /// Presence and typing changes are sent at once in a quiet room and at most once per
    /// interval per room under a storm.
    pub presence_interval: Duration,
    /// Rooms up to this many members tell everyone every name; larger rooms tell the count and
    /// a sample of names.
    pub presence_list_limit: usize,
    /// A room's message rate, `(per second, burst)`; `None`: unlimited.
    pub room_rate_limit: Option<(f64, f64)>,
    /// Sessions one client address may create, `(per second, burst)`; `None`: unlimited.
    pub session_rate_limit: Option<(f64, f64)>,
    /// Whether loopback peers count against `session_rate_limit` (by default they are
    /// exempt, for local tools and the bench).
    pub session_rate_limit_loopback: bool,
    /// Threads that push events into sessions (and write WebSocket frames through); sessions
    /// are split among them. Default: the number of cores.
    pub fanout_threads: usize,
    /// Rooms one session may be in at once.
    pub max_rooms_per_session: usize,
    /// Rooms kept by the server; the least recently used empty rooms are dropped past this.
    pub max_rooms: usize,
    /// Sessions the server holds at once.
    pub max_sessions: usize,
    /// TCP connections served at once; further connections wait in the listen backlog.
    /// `None`: the open-files limit (raised to its hard limit at start) less
    /// [`RESERVED_FILES`], so the server never fails an `accept` for want of descriptors.
    pub max_connections: Option<usize>,
    /// Recent `client_id`s remembered per session to recognise retried sends.
    pub dedup_window: usize,
    /// tungstenite's read buffer per WebSocket (its own default is 128 KiB per connection).
    pub ws_read_buffer: usize,
    /// How long a graceful shutdown waits for connections to close.
    pub shutdown_grace: Duration,
    /// The kernel's send buffer for each accepted connection (`SO_SNDBUF`); `None` keeps the
    /// kernel's autotuning (up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default). A smaller
    /// buffer bounds the memory a client that stops reading pins in the kernel, and lets the
    /// server see it stall sooner.
    pub socket_send_buffer: Option<usize>,
    /// Reading a request's headers (hyper's own deadline).
    pub header_timeout: Duration,
    /// Reading a request body (`POST /v1/sessions`, `/commands`): past it, 408 `request_timeout`.
    pub body_timeout: Duration,
    /// How long one write of a response (a poll reply, a JSON answer) may wait for the client
    /// to read before the connection is dropped. An open SSE stream waits two heartbeats
    /// instead and is then closed `slow_consumer`.
    pub write_timeout: Duration,
    /// The close of a stream the server decided to end: the WebSocket close handshake (our
    /// close frame out, the client's back) and the last frames of an SSE stream. Past it the
    /// connection is dropped, whatever the client does.
    pub close_timeout: Duration,
    /// Serve HTTPS with this certificate and key (`--tls-cert`, `--tls-key`), offering HTTP/2
    /// and HTTP/1.1 by ALPN; `None`: plain HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
    pub tls: Option<crate::tls::Tls>,
    /// Streams one HTTP/2 connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`):
    /// a browser's tabs of one origin share one connection, each SSE stream or WebSocket
    /// holding one stream, each poll or command one for its length.
    pub max_h2_streams: u32,
    /// Serve the demo from this directory instead of the embedded copy (for page development).
    pub demo_dir: Option<PathBuf>,
    /// Peers whose `Forwarded` / `X-Forwarded-*` headers name the client; everyone else's
    /// are ignored. None by default.
    pub trusted_proxies: TrustedProxies,
    /// Verifies identity tokens when authentication is on (`--auth-hmac-secret-file`,
    /// `--auth-public-key`); `None`: anyone may create a session with any name.
    pub auth: Option<std::sync::Arc<dyn crate::hub::TokenVerifier>>,
}

impl Default for Config {
    fn default() -> Self {
        // The hub's defaults are the hub's: the server repeats none of them.
        let hub = HubConfig::default();
        Config {
            transports: TransportKind::ALL.to_vec(),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_message_bytes: 16 * 1024,
            rate_limit_per_sec: hub.rate_limit_per_sec,
            rate_limit_burst: hub.rate_limit_burst,
            session_ttl: hub.session_ttl,
            heartbeat: Duration::from_secs(15),
            long_poll: Duration::from_millis(25_000),
            max_long_poll: Duration::from_millis(60_000),
            short_poll: Duration::from_millis(1000),
            replay_window: hub.replay_window,
            replay_bytes: hub.replay_bytes,
            outbox_capacity: hub.outbox.events as usize,
            outbox_bytes: hub.outbox.bytes as usize,
            history_len: hub.history_len,
            history_store: HistoryStoreKind::Memory,
            cluster: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            history_keep: 10_000,
            history_max_age: hub.history_max_age,
            durability: hub.durability,
            presence_interval: hub.presence_interval,
            presence_list_limit: hub.presence_list_limit,
            room_rate_limit: hub.room_rate_limit,
            session_rate_limit: Some((10.0, 30.0)),
            session_rate_limit_loopback: false,
            fanout_threads: hub.fanout_threads,
            max_rooms_per_session: hub.max_rooms_per_session,
            max_rooms: hub.max_rooms,
            max_sessions: hub.max_sessions,
            max_connections: None,
            dedup_window: hub.dedup_window,
            ws_read_buffer: 1024,
            shutdown_grace: Duration::from_secs(4),
            socket_send_buffer: None,
            header_timeout: Duration::from_secs(30),
            tls: None,
            max_h2_streams: 256,
            body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            demo_dir: None,
            trusted_proxies: TrustedProxies::default(),
            auth: None,
        }
    }
}

impl Config {
    /// The session core's part of these settings.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            rate_limit_per_sec: self.rate_limit_per_sec,
            rate_limit_burst: self.rate_limit_burst,
            session_ttl: self.session_ttl,
            replay_window: self.replay_window,
            replay_bytes: self.replay_bytes,
            outbox: Budget {
                events: self.outbox_capacity as u64,
                bytes: self.outbox_bytes as u64,
            },
            history_len: self.history_len,
            history_max_age: self.history_max_age,
            durability: self.durability,
            presence_interval: self.presence_interval,
            presence_list_limit: self.presence_list_limit,
            room_rate_limit: self.room_rate_limit,
            fanout_threads: self.fanout_threads,
            max_rooms_per_session: self.max_rooms_per_session,
            max_rooms: self.max_rooms,
            max_sessions: self.max_sessions,
            dedup_window: self.dedup_window,
            tokens: self.auth.clone(),
        }
    }

    /// The connection cap in force: the configured one or, by default, the open-files limit
    /// (the soft limit raised to the hard one first) less [`RESERVED_FILES`]; never more than
    /// that, since a connection without a descriptor cannot be accepted.
    pub fn connection_cap(&self) -> usize {
        let files = rlimit::increase_nofile_limit(u64::MAX)
            .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
            .unwrap_or(1024);
        let most = (files as usize).saturating_sub(RESERVED_FILES).max(1);
        match self.max_connections {
            Some(asked) if asked > most => {
                tracing::warn!(
                    asked,
                    most,
                    "--max-connections is over the open-files limit; using the limit"
                );
                most
            }
            Some(asked) => asked,
            None => most,
        }
    }

    /// Whether a transport is enabled.
    pub fn enabled(&self, kind: TransportKind) -> bool {
        self.transports.contains(&kind)
    }

    /// Sets the sustained rate; the burst is twice that, as documented for `--rate-limit`.
    pub fn with_rate_limit(mut self, per_sec: f64) -> Self {
        self.rate_limit_per_sec = per_sec;
        self.rate_limit_burst = per_sec * 2.0;
        self
    }
}
