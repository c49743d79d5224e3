//! The `switchyard` binary: `switchyard [serve] [flags]` runs the gateway; `switchyard bench`
//! measures it (see `switchyard::bench`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use switchyard::config::{HistoryStoreKind, DEFAULT_DATA_DIR};
use switchyard::hub::Durability;
use switchyard::protocol::TransportKind;
use switchyard::Config;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "A real-time chat gateway over WebSocket, SSE, long and short polling"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Compare the transports' latency, throughput, bytes and server cost (see
    /// docs/benchmarks.md).
    Bench(BenchCommand),
    /// Mint an HS256 identity token for development and tests (see --auth-hmac-secret-file).
    Token(TokenArgs),
    /// The bench's baseline: a bare tokio-tungstenite broadcast server.
    #[command(hide = true)]
    BenchBaseline {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
    },
}

/// `switchyard bench`: the bench's flags and the soak's (`--soak` runs the soak instead).
#[derive(Args)]
struct BenchCommand {
    #[command(flatten)]
    bench: switchyard::bench::BenchArgs,
    #[command(flatten)]
    soak: switchyard::bench::soak::SoakArgs,
}

#[derive(Args)]
struct TokenArgs {
    /// The HS256 secret the server is given with --auth-hmac-secret-file.
    #[arg(long)]
    hmac_secret_file: std::path::PathBuf,
    /// The user id.
    #[arg(long)]
    sub: String,
    /// The display name (default: the user id).
    #[arg(long)]
    name: Option<String>,
    /// Rooms the user may join, comma-separated: exact names, or prefixes ending in `*`.
    #[arg(long, value_delimiter = ',')]
    rooms: Option<Vec<String>>,
    /// How long the token is valid (e.g. 1h, 10m).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Transports to offer, comma-separated; the others answer 404.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "websocket,sse,long-polling,short-polling"
    )]
    transports: Vec<TransportKind>,
    /// Origins allowed to call the API cross-origin, comma-separated (`*` for any).
    /// Same-origin and non-browser clients are always allowed.
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Host names the server answers to, comma-separated (`name` or `name:port`), besides IP
    /// literals and `localhost`; other `Host` headers get 403 `forbidden_host`.
    #[arg(long, value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Largest WebSocket frame or HTTP body carrying commands, in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    max_message_bytes: usize,
    /// Sustained commands per second per session; bursts of twice this are allowed.
    #[arg(long, default_value_t = 20.0)]
    rate_limit: f64,
    /// How long a session with no transport attached lives (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    session_ttl: Duration,
    /// Every interval a WebSocket gets a ping and a visible heartbeat frame; an SSE stream
    /// without an event for an interval gets a heartbeat event (e.g. 15s). Keep it below half
    /// of any proxy's idle timeout.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Bytes of events kept per session for resume (the newest event is kept whatever its
    /// size); an older resume point gets `reset`.
    #[arg(long, default_value_t = 4 << 20)]
    replay_bytes: usize,
    /// Bytes of undelivered events a WebSocket or SSE stream may fall behind before it is
    /// closed `slow_consumer` (a single larger event is let through).
    #[arg(long, default_value_t = 1 << 20)]
    outbox_bytes: usize,
    /// Presence and typing changes are sent at once in a quiet room and at most once per
    /// this interval per room under a storm (e.g. 250ms).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    presence_interval: Duration,
    /// Rooms up to this many members tell everyone every member's name; larger rooms tell
    /// the count and a sample of names.
    #[arg(long, default_value_t = 1000)]
    presence_list_limit: usize,
    /// A room's message rate: RATE messages/s sustained, or RATE:BURST (burst defaults to
    /// twice the rate). Off by default.
    #[arg(long, value_parser = parse_rate)]
    room_rate_limit: Option<(f64, f64)>,
    /// TCP connections served at once (default: the open-files limit, raised to its hard
    /// limit, less 64).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Sessions one client address may create: RATE per second, or RATE:BURST, or `off`.
    #[arg(long, default_value = "10:30", value_parser = parse_optional_rate)]
    session_rate_limit: OptionalRate,
    /// Count loopback clients against --session-rate-limit too (they are exempt by default).
    #[arg(long)]
    session_rate_limit_loopback: bool,
    /// How long a request body may take to arrive; past it the request gets 408
    /// `request_timeout`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// How long one write of a response may wait for a client that does not read before the
    /// connection is dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    write_timeout: Duration,
    /// How long the server gives a stream it closes to take its last frames and, on a
    /// WebSocket, to answer the close frame, before it drops the connection.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    close_timeout: Duration,
    /// The kernel send buffer of each connection, in bytes (SO_SNDBUF); by default the
    /// kernel sizes it itself (up to 4 MiB on Linux).
    #[arg(long)]
    socket_send_buffer: Option<usize>,
    /// Reverse proxies trusted to name the client, comma-separated addresses or blocks
    /// (`127.0.0.1,10.0.0.0/8`): from them the client's address, host and scheme are read from
    /// `Forwarded` or `X-Forwarded-For/-Host/-Proto` (the rightmost address that is not a
    /// trusted proxy); from anyone else those headers are ignored.
    #[arg(long, value_parser = switchyard::proxy::parse_trusted, default_value = "")]
    trusted_proxies: switchyard::proxy::TrustedProxies,
    /// Turn authentication on with an HS256 secret (at least 32 bytes) read from this file:
    /// creating a session then needs a token (see `switchyard token`).
    #[arg(long, conflicts_with = "auth_public_key")]
    auth_hmac_secret_file: Option<std::path::PathBuf>,
    /// Turn authentication on with a PEM public key: RSA (RS256), P-256 (ES256) or Ed25519
    /// (EdDSA); tokens signed with any other algorithm are refused.
    #[arg(long)]
    auth_public_key: Option<std::path::PathBuf>,
    /// Where room history is kept: `sqlite` (an embedded database in --data-dir; history
    /// survives restarts), `redis://HOST:PORT[/DB]` (a Redis database, 6.2 or newer, for one
    /// server at a time; history lives as long as Redis keeps its data) or `memory` (the last
    /// --history-len messages per room; nothing survives a restart).
    #[arg(long, default_value = "sqlite", value_parser = parse_store)]
    history_store: HistoryStoreKind,
    /// Run as a node of a cluster: every node of a cluster names the same Redis (6.2 or newer,
    /// `redis://HOST:PORT[/DB]`), which holds the log, the sessions' shared state and room
    /// history (so a node needs no --data-dir). Any node serves any request of any session.
    /// Needs --node-id.
    #[arg(long, requires = "node_id", conflicts_with = "history_store", value_parser = parse_redis_url)]
    redis: Option<String>,
    /// This node's id in the cluster (letters, digits, `-`, `_` and `.`; unique among the
    /// nodes of one Redis).
    #[arg(long, requires = "redis", value_parser = parse_node_id)]
    node_id: Option<String>,
    /// The directory of the embedded history store (created if missing; one server per
    /// directory).
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: std::path::PathBuf,
    /// Messages sent as `history` when a session joins a room (and all the memory store keeps).
    #[arg(long, default_value_t = 50)]
    history_len: usize,
    /// Messages the embedded store keeps per room; older ones are deleted.
    #[arg(long, default_value_t = 10_000)]
    history_keep: usize,
    /// Messages older than this are deleted and never served (e.g. 30days, 12h).
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    history_max_age: Duration,
    /// `normal`: a message is broadcast at once and written milliseconds later (a crash can
    /// lose the last batch). `full`: broadcast only once on disk; a failed write fails the send.
    #[arg(long, default_value = "normal", value_parser = parse_durability)]
    history_durability: Durability,
    /// Serve HTTPS with this certificate chain (PEM), offering HTTP/2 and HTTP/1.1 by ALPN;
    /// SIGHUP reloads it and --tls-key without dropping connections. Without it the server
    /// speaks plain HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS):
    /// each SSE stream or WebSocket holds one, each poll or command one for its length.
    #[arg(long, default_value_t = 256)]
    max_h2_streams: u32,
    /// Serve the demo page from this directory instead of the copy built into the binary
    /// (for editing the page without rebuilding).
    #[arg(long)]
    demo_dir: Option<std::path::PathBuf>,
}

/// `RATE` or `RATE:BURST`, both positive.
fn parse_rate(raw: &str) -> Result<(f64, f64), String> {
    let number = |s: &str| -> Result<f64, String> {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|n| *n > 0.0 && n.is_finite())
            .ok_or_else(|| format!("{s:?} is not a positive number"))
    };
    match raw.split_once(':') {
        Some((rate, burst)) => Ok((number(rate)?, number(burst)?)),
        None => number(raw).map(|rate| (rate, rate * 2.0)),
    }
}

/// `memory`, `sqlite` or a `redis://` URL.
fn parse_store(raw: &str) -> Result<HistoryStoreKind, String> {
    match raw {
        "memory" => Ok(HistoryStoreKind::Memory),
        "sqlite" => Ok(HistoryStoreKind::Sqlite),
        url if url.starts_with("redis://") => redis::Client::open(url)
            .map(|_| HistoryStoreKind::Redis(url.to_owned()))
            .map_err(|e| format!("{url:?} is not a Redis URL: {e}")),
        _ => Err(format!(
            "{raw:?} is not a history store (memory, sqlite or redis://HOST:PORT[/DB])"
        )),
    }
}

/// A `redis://` URL.
fn parse_redis_url(raw: &str) -> Result<String, String> {
    match parse_store(raw)? {
        HistoryStoreKind::Redis(url) => Ok(url),
        _ => Err(format!("{raw:?} is not a redis://HOST:PORT[/DB] URL")),
    }
}

/// A node id: 1 to 64 letters, digits, `-`, `_` or `.` (no `:`, which separates it from an
/// attachment's number).
fn parse_node_id(raw: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&raw.len())
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "{raw:?} is not a node id (1 to 64 letters, digits, '-', '_' or '.')"
        ))
    }
}

/// `normal` or `full`.
fn parse_durability(raw: &str) -> Result<Durability, String> {
    match raw {
        "normal" => Ok(Durability::Normal),
        "full" => Ok(Durability::Full),
        _ => Err(format!("{raw:?} is not a durability (normal or full)")),
    }
}

/// A rate that can be `off`.
#[derive(Debug, Clone, Copy)]
struct OptionalRate(Option<(f64, f64)>);

/// `off`, or a rate as [`parse_rate`] reads it.
fn parse_optional_rate(raw: &str) -> Result<OptionalRate, String> {
    if raw == "off" {
        Ok(OptionalRate(None))
    } else {
        parse_rate(raw).map(|rate| OptionalRate(Some(rate)))
    }
}

impl ServeArgs {
    fn config(&self) -> Result<Config, String> {
        if !(self.rate_limit > 0.0 && self.rate_limit.is_finite()) {
            return Err("--rate-limit must be a positive number".into());
        }
        if self.transports.is_empty() {
            return Err("--transports must name at least one transport".into());
        }
        if [
            self.heartbeat,
            self.session_ttl,
            self.body_timeout,
            self.write_timeout,
            self.close_timeout,
        ]
        .iter()
        .any(Duration::is_zero)
        {
            return Err(
                "--heartbeat, --session-ttl and the --*-timeout flags must be positive".into(),
            );
        }
        if self.outbox_bytes >= self.replay_bytes {
            return Err("--outbox-bytes must be smaller than --replay-bytes, so a client closed as slow can resume".into());
        }
        if self.history_store == HistoryStoreKind::Memory
            && self.history_durability == Durability::Full
        {
            return Err(
                "--history-durability full needs a store that outlives the process (sqlite or redis://)"
                    .into(),
            );
        }
        if self.history_keep == 0 || self.history_len > self.history_keep {
            return Err("--history-keep must be at least 1 and at least --history-len".into());
        }
        if self.history_max_age.is_zero() {
            return Err("--history-max-age must be positive".into());
        }
        if self.max_message_bytes < 256 {
            return Err("--max-message-bytes must be at least 256".into());
        }
        let auth: Option<std::sync::Arc<dyn switchyard::hub::TokenVerifier>> =
            match (&self.auth_hmac_secret_file, &self.auth_public_key) {
                (Some(file), _) => Some(std::sync::Arc::new(
                    switchyard::auth::Verifier::hmac_secret_file(file)?,
                )),
                (None, Some(file)) => Some(std::sync::Arc::new(
                    switchyard::auth::Verifier::public_key_file(file)?,
                )),
                (None, None) => None,
            };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(switchyard::tls::Tls::load(cert, key)?),
            _ => None,
        };
        if self.max_h2_streams == 0 {
            return Err("--max-h2-streams must be at least 1".into());
        }
        let mut transports = self.transports.clone();
        transports.sort();
        transports.dedup();
        Ok(Config {
            transports,
            allowed_origins: self.allowed_origins.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            max_message_bytes: self.max_message_bytes,
            session_ttl: self.session_ttl,
            heartbeat: self.heartbeat,
            replay_bytes: self.replay_bytes,
            outbox_bytes: self.outbox_bytes,
            presence_interval: self.presence_interval,
            presence_list_limit: self.presence_list_limit,
            room_rate_limit: self.room_rate_limit,
            max_connections: self.max_connections,
            session_rate_limit: self.session_rate_limit.0,
            session_rate_limit_loopback: self.session_rate_limit_loopback,
            body_timeout: self.body_timeout,
            write_timeout: self.write_timeout,
            close_timeout: self.close_timeout,
            socket_send_buffer: self.socket_send_buffer,
            demo_dir: self.demo_dir.clone(),
            history_store: self.history_store.clone(),
            cluster: self
                .redis
                .clone()
                .zip(self.node_id.clone())
                .map(|(redis, node)| switchyard::config::Cluster { redis, node }),
            trusted_proxies: self.trusted_proxies.clone(),
            auth,
            data_dir: self.data_dir.clone(),
            history_len: self.history_len,
            history_keep: self.history_keep,
            history_max_age: self.history_max_age,
            durability: self.history_durability,
            tls,
            max_h2_streams: self.max_h2_streams,
            ..Config::default()
        }
        .with_rate_limit(self.rate_limit))
    }
}

/// Reloads the TLS certificate and key on every SIGHUP; a bad file is logged and the old
/// certificate kept.
fn reload_on_hangup(tls: switchyard::tls::Tls) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup()).expect("can install a SIGHUP handler");
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(message) => {
                        tracing::error!("TLS reload failed, keeping the old certificate: {message}")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(tls);
}

/// SIGINT or SIGTERM. The handlers are installed now, before the server says it listens, so a
/// signal sent right after that line is a graceful shutdown, not the default kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Bench(BenchCommand { bench, soak })) => {
            let result = match soak.soak {
                Some(_) => switchyard::bench::soak::main(bench, soak).await,
                None => switchyard::bench::run(bench).await.map(drop),
            };
            return match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(message) => {
                    eprintln!("error: {message}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some(Command::Token(args)) => {
            let rooms = args
                .rooms
                .map(|rooms| rooms.into_iter().map(|r| r.trim().to_owned()).collect());
            return match switchyard::auth::mint(
                &args.hmac_secret_file,
                &args.sub,
                args.name.as_deref(),
                rooms,
                args.ttl,
            ) {
                Ok(token) => {
                    println!("{token}");
                    std::process::ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("error: {message}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some(Command::BenchBaseline { addr }) => {
            return match switchyard::bench::baseline::main(addr).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        None => cli.serve,
    };
    let config = match args.config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return std::process::ExitCode::from(2);
        }
    };
    // The store first: a directory in use or a bad database stops the server before it listens.
    let hub = match switchyard::server::build_hub(&config).await {
        Ok(hub) => hub,
        Err(message) => {
            eprintln!("error: {message}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.addr);
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.addr);
    let shutdown = shutdown_signal();
    if let Some(tls) = config.tls.clone() {
        reload_on_hangup(tls);
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("switchyard listening on {scheme}://{addr}/");
    let transports: Vec<&str> = config.transports.iter().map(|t| t.as_str()).collect();
    tracing::info!(%addr, transports = %transports.join(","), "serving");
    match switchyard::server::serve(listener, config, hub, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_config(args: &[&str]) -> Config {
        let cli = Cli::try_parse_from(args).expect("the flags parse");
        let serve = match cli.command {
            Some(Command::Serve(serve)) => serve,
            None => cli.serve,
            Some(_) => panic!("not serve"),
        };
        serve.config().expect("a valid config")
    }

    #[test]
    fn the_default_command_and_every_serve_flag_parse_into_a_config() {
        let defaults = serve_config(&["switchyard"]);
        assert_eq!(defaults.session_rate_limit, Some((10.0, 30.0)));
        assert_eq!(defaults.room_rate_limit, None);
        assert_eq!(defaults.max_connections, None);
        assert_eq!(defaults.history_store, HistoryStoreKind::Sqlite);
        assert_eq!(
            defaults.data_dir,
            std::path::PathBuf::from("switchyard-data")
        );
        assert_eq!(defaults.history_keep, 10_000);
        assert_eq!(defaults.history_len, 50);
        assert_eq!(defaults.durability, Durability::Normal);
        let set = serve_config(&[
            "switchyard",
            "serve",
            "--session-rate-limit",
            "off",
            "--room-rate-limit",
            "5",
            "--presence-interval",
            "100ms",
            "--presence-list-limit",
            "50",
            "--replay-bytes",
            "2000000",
            "--outbox-bytes",
            "500000",
            "--body-timeout",
            "3s",
            "--write-timeout",
            "4s",
            "--close-timeout",
            "1s",
            "--socket-send-buffer",
            "65536",
            "--max-connections",
            "1000",
            "--session-rate-limit-loopback",
            "--history-store",
            "memory",
            "--history-len",
            "20",
            "--history-keep",
            "100",
            "--history-max-age",
            "1h",
            "--trusted-proxies",
            "127.0.0.1,10.0.0.0/8",
        ]);
        assert_eq!(set.trusted_proxies.0.len(), 2);
        assert!(defaults.trusted_proxies.0.is_empty());
        assert!(Cli::try_parse_from(["switchyard", "--trusted-proxies", "10.0.0.0/40"]).is_err());
        assert_eq!(set.history_store, HistoryStoreKind::Memory);
        assert_eq!((set.history_len, set.history_keep), (20, 100));
        assert_eq!(set.history_max_age, Duration::from_secs(3600));
        let full_in_memory = Cli::try_parse_from([
            "switchyard",
            "--history-store",
            "memory",
            "--history-durability",
            "full",
        ])
        .unwrap();
        assert!(full_in_memory.serve.config().is_err());
        let redis = serve_config(&[
            "switchyard",
            "--history-store",
            "redis://127.0.0.1:6379/2",
            "--history-durability",
            "full",
        ]);
        assert_eq!(
            redis.history_store,
            HistoryStoreKind::Redis("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(redis.durability, Durability::Full);
        assert!(Cli::try_parse_from(["switchyard", "--history-store", "redis://:x:y:z"]).is_err());
        assert!(Cli::try_parse_from(["switchyard", "--history-store", "postgres://h"]).is_err());
        assert_eq!(set.session_rate_limit, None);
        assert_eq!(set.room_rate_limit, Some((5.0, 10.0)));
        assert_eq!(set.presence_list_limit, 50);
        assert_eq!(set.max_connections, Some(1000));
        assert!(set.session_rate_limit_loopback);
        assert_eq!(set.close_timeout, Duration::from_secs(1));
        assert!(Cli::try_parse_from(["switchyard", "--room-rate-limit", "0"]).is_err());
        let cli =
            Cli::try_parse_from(["switchyard", "--outbox-bytes", "10", "--replay-bytes", "10"])
                .unwrap();
        assert!(
            cli.serve.config().is_err(),
            "the outbox must be under the replay budget"
        );
    }
}
