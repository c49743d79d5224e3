//! `switchyard bench`: the latency comparison of the four transports (and a bare WebSocket
//! broadcast baseline), on one machine, in one command.
//!
//! The generator lives in the crate so anyone can run it against a server they started
//! (`--url`) or one it starts itself (`--spawn`, so the server's CPU and memory are read from
//! /proc apart from the generator's). It speaks the same HTTP contract as any client and
//! must not reach into the server.
//!
//! # Layout
//!
//! - this file: flags, the run of each workload (setup, schedule, measurement window) and
//!   `--idle`.
//! - [`clients`]: subscribers per transport, publishers, what they count.
//! - [`wire`]: counted TCP connections and a small HTTP/1 client.
//! - [`process`]: the spawned server, /proc readings, pinning, the open-file limit.
//! - [`report`]: table, JSON, SVG.
//! - [`soak`]: `--soak DURATION`, a changing population checked for exactly-once delivery,
//!   with the server's memory and open files over time.
//! - [`baseline`]: the bare tokio-tungstenite broadcast server.

pub mod baseline;
pub mod clients;
pub mod process;
pub mod report;
pub mod soak;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::protocol::TransportKind;
use clients::{Receipts, Schedule, Shared, Subject, Subscription, Tally};
use process::{Machine, Spawned};
use report::{IdleRow, Latency, Report, Row};
use wire::{Connector, Http, Protocol, WireCounters};

/// Sustained commands per second one publisher session sends: under the server's default
/// limit of 20/s, so the default server is measured as it ships.
pub const PUBLISH_PER_SESSION: f64 = 15.0;

/// Flags of `switchyard bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A running server to measure, e.g. http://127.0.0.1:8080 (loopback only); or the nodes
    /// of a cluster, comma-separated (http://127.0.0.2:8080,http://127.0.0.3:8080,...): each
    /// socket goes to the next node, and each client's requests (polls, commands) to the next
    /// node in turn.
    #[arg(long, conflicts_with = "spawn")]
    pub url: Option<String>,
    /// Start `switchyard serve` as a child process on a free port (fresh for each
    /// transport) and read its CPU time and memory from /proc.
    #[arg(long)]
    pub spawn: bool,
    /// Subscribers per transport.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages per second published to the room.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long latency is measured, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Publishing before measurement starts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Length of each message's text.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Short-poll interval of the short-polling clients, in ms.
    #[arg(long, default_value_t = 250)]
    pub short_poll_ms: u64,
    /// Transports to measure, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "websocket,sse,long-polling,short-polling"
    )]
    pub transports: Vec<TransportKind>,
    /// Run all transports at once in the same room on the same messages, instead of in turn.
    #[arg(long)]
    pub concurrent: bool,
    /// Also measure the bare tokio-tungstenite broadcast server with the same WebSocket
    /// clients (needs --spawn).
    #[arg(long)]
    pub baseline: bool,
    /// Instead of the latency run: open this many idle sessions per transport and report the
    /// server's memory per session (needs --spawn).
    #[arg(long)]
    pub idle: Option<usize>,
    /// Pin the spawned server to CPU 0 and the generator to CPU 1.
    #[arg(long)]
    pub pin: bool,
    /// Spread client sockets over source addresses 127.0.0.1 ..= 127.0.0.N.
    #[arg(long, default_value_t = 16)]
    pub source_addrs: u8,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the latency CDFs here (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// A flag for the spawned server, repeatable (e.g. `--server-arg=--history-store=sqlite
    /// --server-arg=--data-dir=/tmp/bench-data --server-arg=--history-durability=full`).
    /// Unless one names `--history-store`, the server keeps history in memory, so runs do not
    /// see each other's history.
    #[arg(long = "server-arg", allow_hyphen_values = true, requires = "spawn")]
    pub server_args: Vec<String>,
    /// Speak HTTPS, trusting this certificate (PEM). With --spawn the server is started with
    /// it and --tls-key; with --url, give an https:// URL of a server using it.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, for the spawned server.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The HTTP version the clients speak: `1.1` or `2` (over TLS by ALPN, else with prior
    /// knowledge); over HTTP/2 each client's requests share its connection and WebSockets are
    /// streams (extended CONNECT).
    #[arg(long, default_value = "1.1", value_parser = ["1.1", "2"])]
    pub http: String,
    /// Subscribers whose transport ends attach again, on the next node, from the last seq
    /// they received, after the client library's backoff (250 ms doubling to 10 s, each at
    /// 50-100 % at random); publishers send a failed message again. Reports how long the
    /// resumes took and each second's latency, apart for the subscribers never cut off.
    #[arg(long)]
    pub resume: bool,
    /// Send SIGKILL to this process (a node of the cluster under test) during the run, at
    /// --kill-after into the measurement window: a resume storm (with --resume).
    #[arg(long, requires = "resume")]
    pub kill_pid: Option<i32>,
    /// When --kill-pid is killed, from the start of the measurement window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub kill_after: Duration,
    /// The switchyard binary to spawn (default: this executable).
    #[arg(long, hide = true)]
    pub server_exe: Option<PathBuf>,
}

/// Runs the bench and prints its report; `Err` is a message for the user.
pub async fn run(args: BenchArgs) -> Result<Report, String> {
    validate(&args)?;
    let open_files = process::raise_open_files();
    // Read before pinning: pinning narrows the CPUs this process may use.
    let machine = Machine::read();
    if args.pin {
        process::pin_self(1).map_err(|e| format!("--pin: cannot pin the generator: {e}"))?;
    }
    let mut report = Report {
        config: config_json(&args, open_files),
        machine,
        transports: Vec::new(),
        idle: Vec::new(),
    };
    if let Some(sessions) = args.idle {
        for kind in args.transports.clone() {
            report.idle.push(idle(&args, kind, sessions).await?);
        }
        println!("\n{}", report::idle_table(&report.idle));
    } else {
        let subjects: Vec<Subject> = args
            .transports
            .iter()
            .map(|&k| Subject::Transport(k))
            .chain(args.baseline.then_some(Subject::Baseline))
            .collect();
        if args.concurrent {
            let transports: Vec<Subject> = subjects
                .iter()
                .copied()
                .filter(|s| *s != Subject::Baseline)
                .collect();
            report.transports.extend(measure(&args, &transports).await?);
            if args.baseline {
                report
                    .transports
                    .extend(measure(&args, &[Subject::Baseline]).await?);
            }
        } else {
            for subject in subjects {
                report.transports.extend(measure(&args, &[subject]).await?);
            }
        }
        println!("\nover {}", protocol(&args)?.describe());
        println!("{}", report::table(&report.transports));
        if args.resume {
            println!("{}", report::resume_table(&report.transports));
        }
        if let Some(path) = &args.svg {
            let title = format!(
                "switchyard: {} subscribers/transport, {} msg/s, {} B, {}",
                args.clients,
                args.rate,
                args.payload_bytes,
                protocol(&args)?.describe()
            );
            report::svg(&report.transports, &title, path)?;
            println!("latency CDF written to {}", path.display());
        }
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(report)
}

fn validate(args: &BenchArgs) -> Result<(), String> {
    if args.spawn == args.url.is_some() {
        return Err("give either --url http://HOST:PORT or --spawn".into());
    }
    if (args.baseline || args.idle.is_some() || args.pin) && !args.spawn {
        return Err("--baseline, --idle and --pin need --spawn".into());
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) || args.clients == 0 {
        return Err("--rate and --clients must be positive".into());
    }
    if args.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    let lanes = lanes(args.rate);
    if args.idle.is_none() && args.clients < lanes {
        return Err(format!(
            "{} msg/s needs {lanes} publishing sessions at {PUBLISH_PER_SESSION}/s each \
             (the server's per-session rate limit is 20/s): use --clients {lanes} or more",
            args.rate
        ));
    }
    if args.transports.is_empty() {
        return Err("--transports must name at least one transport".into());
    }
    if args.kill_pid.is_some() && args.kill_after >= args.duration {
        return Err("--kill-after must fall within --duration".into());
    }
    if args.resume && args.baseline {
        return Err("--resume measures switchyard's transports, not --baseline".into());
    }
    if args.spawn && args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--spawn with TLS needs both --tls-cert and --tls-key".into());
    }
    if args.baseline && (args.tls_cert.is_some() || args.http == "2") {
        return Err("--baseline speaks plain HTTP/1.1 only".into());
    }
    Ok(())
}

/// What the clients speak: `--tls-cert` and `--http`.
fn protocol(args: &BenchArgs) -> Result<Protocol, String> {
    Protocol::new(args.tls_cert.as_deref(), args.http == "2")
}

fn lanes(rate: f64) -> usize {
    (rate / PUBLISH_PER_SESSION).ceil().max(1.0) as usize
}

fn config_json(args: &BenchArgs, open_files: u64) -> serde_json::Value {
    serde_json::json!({
        "target": if args.spawn { "spawn".to_owned() } else { args.url.clone().unwrap_or_default() },
        "clients": args.clients,
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "payload_bytes": args.payload_bytes,
        "short_poll_ms": args.short_poll_ms,
        "transports": args.transports.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "tls": args.tls_cert.is_some(),
        "http": args.http,
        "concurrent": args.concurrent,
        "baseline": args.baseline,
        "idle": args.idle,
        "pin": args.pin,
        "publishers": lanes(args.rate),
        "resume": args.resume,
        "kill_after_s": args.kill_pid.map(|_| args.kill_after.as_secs_f64()),
        "open_files_limit": open_files,
    })
}

fn server_exe(args: &BenchArgs) -> Result<PathBuf, String> {
    match &args.server_exe {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}")),
    }
}

/// The server under test: spawned (and stopped when done) or given by `--url`.
enum Target {
    Spawned(Spawned),
    Url(Vec<SocketAddr>),
}

impl Target {
    fn open(args: &BenchArgs, baseline: bool) -> Result<Target, String> {
        if args.spawn {
            let exe = server_exe(args)?;
            let mut command = vec![];
            if baseline {
                command.push("bench-baseline");
            } else {
                command.push("serve");
                if !args
                    .server_args
                    .iter()
                    .any(|a| a.starts_with("--history-store"))
                {
                    command.extend(["--history-store", "memory"]);
                }
                command.extend(args.server_args.iter().map(String::as_str));
                if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                    for (flag, file) in [("--tls-cert", cert), ("--tls-key", key)] {
                        command.push(flag);
                        command.push(
                            file.to_str()
                                .ok_or("--tls-cert and --tls-key must be UTF-8 paths")?,
                        );
                    }
                }
            }
            Spawned::start(&exe, &command, args.pin.then_some(0)).map(Target::Spawned)
        } else {
            let scheme = if args.tls_cert.is_some() {
                "https://"
            } else {
                "http://"
            };
            let mut addrs = Vec::new();
            for url in args.url.as_deref().unwrap_or_default().split(',') {
                let hostport = url
                    .strip_prefix(scheme)
                    .ok_or_else(|| {
                        format!("--url must start with {scheme} (got {url:?}; https:// goes with --tls-cert)")
                    })?
                    .trim_end_matches('/');
                let addr: SocketAddr = hostport
                    .parse()
                    .map_err(|e| format!("--url {url:?}: {e} (give HOST:PORT as an IP)"))?;
                if !addr.ip().is_loopback() {
                    return Err("the bench only targets loopback addresses (127.0.0.x)".into());
                }
                addrs.push(addr);
            }
            Ok(Target::Url(addrs))
        }
    }

    /// Where the server listens: every node of a cluster.
    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Target::Spawned(s) => vec![s.addr],
            Target::Url(addrs) => addrs.clone(),
        }
    }

    fn spawned(&self) -> Option<&Spawned> {
        match self {
            Target::Spawned(s) => Some(s),
            Target::Url(_) => None,
        }
    }

    fn close(self) {
        if let Target::Spawned(s) = self {
            s.stop();
        }
    }
}

#[derive(Deserialize)]
struct Created {
    session: String,
    /// How long the server may hold presence changes (0 from servers that do not say).
    #[serde(default)]
    presence_interval_ms: u64,
}

/// Creates `count` sessions over a few parallel connections; returns their ids and the
/// server's presence interval.
async fn create_sessions(
    connector: &Arc<Connector>,
    wire: &Arc<WireCounters>,
    prefix: &str,
    count: usize,
) -> Result<(Vec<String>, Duration), String> {
    let workers = 8.min(count.max(1));
    let mut set = JoinSet::new();
    for worker in 0..workers {
        let connector = connector.clone();
        let wire = wire.clone();
        let prefix = prefix.to_owned();
        set.spawn(async move {
            let mut http = connector.http(&wire).await.map_err(|e| e.to_string())?;
            let mut made = Vec::new();
            for i in (worker..count).step_by(workers) {
                let body = format!("{{\"name\":\"{prefix}{i}\"}}");
                let (status, body) = http
                    .call(Method::POST, "/v1/sessions", body)
                    .await
                    .map_err(|e| format!("POST /v1/sessions: {e}"))?;
                if !status.is_success() {
                    return Err(format!(
                        "POST /v1/sessions answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                let created: Created = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                made.push((i, created));
            }
            Ok::<_, String>(made)
        });
    }
    let mut sessions = vec![String::new(); count];
    let mut presence_interval = Duration::ZERO;
    while let Some(done) = set.join_next().await {
        for (i, created) in done.map_err(|e| e.to_string())?? {
            sessions[i] = created.session;
            presence_interval =
                presence_interval.max(Duration::from_millis(created.presence_interval_ms));
        }
    }
    Ok((sessions, presence_interval))
}

async fn command(http: &mut Http, session: &str, body: String) -> Result<(), String> {
    let path = format!("/v1/sessions/{session}/commands");
    let (status, reply) = http
        .call(Method::POST, &path, body)
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "POST {path} answered {status}: {}",
            String::from_utf8_lossy(&reply)
        ))
    }
}

/// A session's last seq, as `GET /v1/sessions/{id}` reports it.
async fn last_seq(http: &mut Http, session: &str) -> Result<u64, String> {
    let path = format!("/v1/sessions/{session}");
    let (status, reply) = http
        .call(Method::GET, &path, "")
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let info: serde_json::Value = serde_json::from_slice(&reply)
        .map_err(|e| format!("GET {path} answered {status} with no JSON: {e}"))?;
    info["last_seq"]
        .as_u64()
        .ok_or_else(|| format!("GET {path} answered {status} without last_seq: {info}"))
}

/// Reads `switchyard_events_delivered_total` per transport from `/metrics`, summed over a
/// cluster's nodes.
async fn scrape_delivered(connector: &Connector) -> Option<Vec<(String, u64)>> {
    let wire = Arc::new(WireCounters::default());
    // One connection to each node; each request goes to the next.
    let mut http = connector.http(&wire).await.ok()?;
    let mut delivered: Vec<(String, u64)> = Vec::new();
    for _ in 0..connector.targets() {
        let (status, body) = http.call(Method::GET, "/metrics", "").await.ok()?;
        if !status.is_success() {
            return None;
        }
        let text = String::from_utf8_lossy(&body);
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("switchyard_events_delivered_total{transport=\"")
            else {
                continue;
            };
            let Some((name, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let value: u64 = value.trim().parse().ok()?;
            match delivered.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum += value,
                None => delivered.push((name.to_owned(), value)),
            }
        }
    }
    Some(delivered)
}

/// A reading of the clocks at one instant of the run.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    server_cpu: Option<Duration>,
    generator_cpu: Option<Duration>,
}

fn snapshot(server: Option<&Spawned>) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        server_cpu: server.and_then(Spawned::cpu_time),
        generator_cpu: process::cpu_time("self"),
    }
}

/// One subject's subscribers, ready to start.
struct Group {
    tally: Arc<Tally>,
    subscriptions: Vec<Subscription>,
}

/// Runs one workload: `subjects` share one room (one subject unless `--concurrent`).
async fn measure(args: &BenchArgs, subjects: &[Subject]) -> Result<Vec<Row>, String> {
    let baseline = subjects == [Subject::Baseline];
    let target = Target::open(args, baseline)?;
    let result = measure_on(args, subjects, &target).await;
    target.close();
    result
}

async fn measure_on(
    args: &BenchArgs,
    subjects: &[Subject],
    target: &Target,
) -> Result<Vec<Row>, String> {
    let names: Vec<&str> = subjects.iter().map(|s| s.name()).collect();
    let connector =
        Arc::new(Connector::new(&target.addrs(), args.source_addrs).with_protocol(protocol(args)?));
    let schedule = new_schedule(args);
    eprintln!(
        "{}: {} subscribers each, {} msg/s over {} publisher(s), warm-up {:?}, measuring {:?}",
        names.join("+"),
        args.clients,
        args.rate,
        schedule.lanes,
        args.warmup,
        args.duration
    );
    let setup_started = Instant::now();
    let control_wire = Arc::new(WireCounters::default());
    let mut control = connector
        .http(&control_wire)
        .await
        .map_err(|e| format!("cannot reach the server at {:?}: {e}", target.addrs()))?;
    let setup = join_room(args, subjects, &connector, &mut control, &schedule).await?;
    let (mut tasks, lane_senders) = attach_subscribers(&setup, &connector, &schedule);
    wait_attached(args, &setup.groups, &schedule).await?;
    let join_secs = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "  {} members joined with transports attached in {join_secs:.2} s",
        args.clients * setup.groups.len()
    );
    // The joins' last presence_diff may still be held by the server: let it go out before
    // the server's counters are read, so they count only the run's messages.
    tokio::time::sleep(setup.presence_interval * 2).await;
    let measured = publish_and_measure(
        args,
        &names,
        &setup.groups,
        &schedule,
        lane_senders,
        target,
        &connector,
    )
    .await;
    schedule.stop.cancel();
    let mut receipts: Vec<Vec<Receipts>> = setup.groups.iter().map(|_| Vec::new()).collect();
    while let Some(done) = tasks.join_next().await {
        let (g, r) = done.map_err(|e| e.to_string())?;
        receipts[g].push(r);
    }
    if args.url.is_some() {
        // Leave the shared server as we found it (transports are closed already).
        let publishers = setup.publishers.iter();
        for session in setup.sessions.iter().map(|(_, _, s)| s).chain(publishers) {
            let _ = control
                .call(Method::DELETE, &format!("/v1/sessions/{session}"), "")
                .await;
        }
    }
    let rows = report_rows(
        args,
        &setup.groups,
        &schedule,
        &measured,
        &receipts,
        join_secs,
    );
    print_rows(&rows);
    Ok(rows)
}

/// The publishing schedule of one run: how many messages, when, over how many lanes.
fn new_schedule(args: &BenchArgs) -> Arc<Schedule> {
    let total = (args.rate * (args.warmup + args.duration).as_secs_f64()).ceil() as u64;
    let run_id = format!("{:08x}", rand::random::<u32>());
    Arc::new(Schedule {
        payload_bytes: args.payload_bytes.max(run_id.len() + 16),
        run_id,
        rate: args.rate,
        total,
        warmup: (args.rate * args.warmup.as_secs_f64()).ceil() as u64,
        lanes: lanes(args.rate),
        t0: OnceLock::new(),
        window: OnceLock::new(),
        published: (0..total).map(|_| AtomicBool::new(false)).collect(),
        publish_errors: AtomicU64::new(0),
        first_publish_error: Mutex::new(None),
        stop: CancellationToken::new(),
    })
}

/// The subscribers of a run, joined to its room.
struct Setup {
    groups: Vec<Group>,
    /// `(group, index, session id)` of every session created.
    sessions: Vec<(usize, usize, String)>,
    /// The longest presence interval the server named.
    presence_interval: Duration,
    /// With `--resume`, sessions that only publish (one per lane): a publisher that sends a
    /// message again is sent the original once more (the retry echo), which a subscriber
    /// would count as a duplicate.
    publishers: Vec<String>,
}

/// Phase 1: creates each subject's sessions and joins them to the run's room, before any
/// transport attaches: the presence of N joins lands in replay buffers, and each transport
/// then resumes from its session's last seq as the server reports it.
async fn join_room(
    args: &BenchArgs,
    subjects: &[Subject],
    connector: &Arc<Connector>,
    control: &mut Http,
    schedule: &Schedule,
) -> Result<Setup, String> {
    let room = schedule.room();
    let short_poll = Duration::from_millis(args.short_poll_ms);
    let control_wire = Arc::new(WireCounters::default());
    let mut presence_interval = Duration::ZERO;
    let mut groups = Vec::new();
    let mut sessions_made: Vec<(usize, usize, String)> = Vec::new();
    for (g, subject) in subjects.iter().enumerate() {
        let sessions = match subject {
            Subject::Baseline => vec![String::new(); args.clients],
            Subject::Transport(_) => {
                let prefix = format!("b{g}-");
                let (ids, interval) =
                    create_sessions(connector, &control_wire, &prefix, args.clients).await?;
                presence_interval = presence_interval.max(interval);
                ids
            }
        };
        for (i, s) in sessions.iter().enumerate() {
            if !s.is_empty() {
                sessions_made.push((g, i, s.clone()));
            }
        }
        let subscriptions = sessions
            .into_iter()
            .map(|session| Subscription {
                subject: *subject,
                session,
                after: 0,
                room: room.clone(),
                short_poll,
            })
            .collect();
        groups.push(Group {
            tally: Arc::new(match args.resume {
                true => Tally::new(*subject).resuming(),
                false => Tally::new(*subject),
            }),
            subscriptions,
        });
    }
    let publishers = match args.resume {
        true => {
            create_sessions(connector, &control_wire, "pub-", schedule.lanes)
                .await?
                .0
        }
        false => Vec::new(),
    };
    let join = serde_json::json!({"type": "join", "room": room}).to_string();
    for session in sessions_made.iter().map(|(_, _, s)| s).chain(&publishers) {
        command(control, session, join.clone()).await?;
    }
    for (g, i, session) in &sessions_made {
        groups[*g].subscriptions[*i].after = last_seq(control, session).await?;
    }
    Ok(Setup {
        groups,
        sessions: sessions_made,
        presence_interval,
        publishers,
    })
}

/// Phase 2: attaches every subscriber; lane L publishes through subscriber L of the first
/// group (over its WebSocket, or over HTTP for the other transports), or with `--resume`
/// through publisher session L over HTTP, sending a failed message again (a message written
/// to a socket that then breaks may or may not have been taken: only a reply says). Returns
/// the subscribers' tasks and each lane's sender.
fn attach_subscribers(
    setup: &Setup,
    connector: &Arc<Connector>,
    schedule: &Arc<Schedule>,
) -> (JoinSet<(usize, Receipts)>, Vec<mpsc::Sender<u64>>) {
    let gate = Arc::new(Semaphore::new(64));
    let mut lane_senders = Vec::new();
    let mut lane_receivers: Vec<Option<mpsc::Receiver<u64>>> = Vec::new();
    for _ in 0..schedule.lanes {
        let (tx, rx) = mpsc::channel::<u64>(schedule.total as usize + 1);
        lane_senders.push(tx);
        lane_receivers.push(Some(rx));
    }
    let publisher_wire = Arc::new(WireCounters::default());
    let resume = !setup.publishers.is_empty();
    let publish = |session: &str, room: &str, lane| {
        tokio::spawn(clients::publish_http(
            connector.clone(),
            publisher_wire.clone(),
            schedule.clone(),
            session.to_owned(),
            room.to_owned(),
            lane,
            resume,
        ));
    };
    for (session, lane) in setup.publishers.iter().zip(&mut lane_receivers) {
        let lane = lane.take().expect("each lane once");
        publish(session, &schedule.room(), lane);
        tokio::spawn(clients::hold(
            connector.clone(),
            publisher_wire.clone(),
            schedule.clone(),
            session.clone(),
        ));
    }
    let mut tasks: JoinSet<(usize, Receipts)> = JoinSet::new();
    for (g, group) in setup.groups.iter().enumerate() {
        let shared = Shared {
            connector: connector.clone(),
            schedule: schedule.clone(),
            tally: group.tally.clone(),
            gate: gate.clone(),
        };
        for (i, sub) in group.subscriptions.iter().enumerate() {
            let lane = if g == 0 && i < schedule.lanes {
                lane_receivers[i].take()
            } else {
                None
            };
            let lane = match (sub.subject, lane) {
                (Subject::Transport(TransportKind::WebSocket) | Subject::Baseline, lane) => lane,
                (_, Some(rx)) => {
                    publish(&sub.session, &sub.room, rx);
                    None
                }
                (_, None) => None,
            };
            let (sub, shared) = (sub.clone(), shared.clone());
            tasks.spawn(async move { (g, clients::subscribe(sub, shared, lane).await) });
        }
    }
    (tasks, lane_senders)
}

/// Waits until every subscriber is attached (at most two minutes); fails on the first that
/// could not.
async fn wait_attached(
    args: &BenchArgs,
    groups: &[Group],
    schedule: &Schedule,
) -> Result<(), String> {
    let expected = args.clients * groups.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready: usize = groups
            .iter()
            .map(|g| g.tally.ready.load(Ordering::Relaxed))
            .sum();
        let failed: u64 = groups
            .iter()
            .map(|g| g.tally.disconnects.load(Ordering::Relaxed))
            .sum();
        if ready == expected {
            return Ok(());
        }
        if failed > 0 || Instant::now() > deadline {
            schedule.stop.cancel();
            return Err(format!(
                "only {ready} of {expected} subscribers attached ({failed} failed); \
                 see the warnings above"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What was read around the measurement window.
struct Measured {
    start: Snapshot,
    end: Snapshot,
    wire_start: Vec<u64>,
    wire_end: Vec<u64>,
    delivered_start: Vec<u64>,
    metrics_before: Option<Vec<(String, u64)>>,
    metrics_after: Option<Vec<(String, u64)>>,
    peak_rss: Option<u64>,
}

/// Phase 3: publishes on schedule through the warm-up and the window, reads the server and
/// the subscribers at both ends of the window, and lets the last messages arrive.
async fn publish_and_measure(
    args: &BenchArgs,
    names: &[&str],
    groups: &[Group],
    schedule: &Arc<Schedule>,
    lane_senders: Vec<mpsc::Sender<u64>>,
    target: &Target,
    connector: &Connector,
) -> Measured {
    let metrics_before = scrape_delivered(connector).await;
    // The schedule: message k is due at t0 + k / rate.
    let t0 = Instant::now() + Duration::from_millis(300);
    let window = (t0 + args.warmup, t0 + args.warmup + args.duration);
    let _ = schedule.t0.set(t0);
    let _ = schedule.window.set(window);
    // A thread of its own: tokio's timer wheel has 1 ms granularity and would add up to a
    // millisecond to every message; a thread sleeping in nanosleep wakes within ~0.1 ms.
    let scheduler = {
        let schedule = schedule.clone();
        std::thread::spawn(move || {
            for k in 0..schedule.total {
                if let Some(due) = schedule.due(k) {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                let lane = (k % schedule.lanes as u64) as usize;
                if lane_senders[lane].try_send(k).is_err() {
                    schedule.publish_failed(format!("lane {lane} is not keeping up"));
                }
            }
        })
    };
    let progress = progress_bar(args, names, window.1 - t0);
    let ticker = {
        let (progress, groups_tallies) = (
            progress.clone(),
            groups.iter().map(|g| g.tally.clone()).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            loop {
                let elapsed = Instant::now().saturating_duration_since(t0);
                progress.set_position(elapsed.as_millis() as u64);
                let delivered: u64 = groups_tallies
                    .iter()
                    .map(|t| t.delivered.load(Ordering::Relaxed))
                    .sum();
                progress.set_message(format!("{delivered} delivered"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let server = target.spawned();
    if let Some(pid) = args.kill_pid {
        let at = window.0 + args.kill_after;
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
            let killed = unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
            let second = at.saturating_duration_since(t0).as_secs_f64();
            match killed {
                true => eprintln!("  killed process {pid} (SIGKILL) at {second:.1} s"),
                false => eprintln!(
                    "!!! could not kill process {pid}: {}",
                    std::io::Error::last_os_error()
                ),
            }
        });
    }
    tokio::time::sleep_until(window.0.into()).await;
    let start = snapshot(server);
    let wire_start: Vec<u64> = groups.iter().map(|g| g.tally.wire.total()).collect();
    let delivered_start: Vec<u64> = groups
        .iter()
        .map(|g| g.tally.in_window.load(Ordering::Relaxed))
        .collect();
    tokio::time::sleep_until(window.1.into()).await;
    let end = snapshot(server);
    let wire_end: Vec<u64> = groups.iter().map(|g| g.tally.wire.total()).collect();
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    // Let the last messages arrive: a short poller sees them on its next poll.
    let drain = (Duration::from_millis(args.short_poll_ms) * 4).max(Duration::from_secs(2));
    tokio::time::sleep(drain).await;
    ticker.abort();
    progress.finish_and_clear();
    Measured {
        start,
        end,
        wire_start,
        wire_end,
        delivered_start,
        metrics_before,
        metrics_after: scrape_delivered(connector).await,
        peak_rss: server.and_then(Spawned::memory).map(|(_, hwm)| hwm),
    }
}

/// Phase 4: one row per subject from the tallies, the receipts and the readings.
fn report_rows(
    args: &BenchArgs,
    groups: &[Group],
    schedule: &Schedule,
    measured: &Measured,
    receipts: &[Vec<Receipts>],
    join_secs: f64,
) -> Vec<Row> {
    let published = schedule
        .published
        .iter()
        .filter(|p| p.load(Ordering::Relaxed))
        .count() as u64;
    let publish_errors = schedule.publish_errors.load(Ordering::Relaxed);
    if let Some(first) = schedule
        .first_publish_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        eprintln!("!!! {publish_errors} publish errors; the first: {first}");
    }
    let Measured {
        start,
        end,
        wire_start,
        wire_end,
        delivered_start,
        metrics_before,
        metrics_after,
        peak_rss,
    } = measured;
    let wall = end.at - start.at;
    let in_window_all: u64 = groups
        .iter()
        .map(|g| g.tally.in_window.load(Ordering::Relaxed))
        .sum::<u64>()
        - delivered_start.iter().sum::<u64>();
    let server_cpu = match (start.server_cpu, end.server_cpu) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let generator_cpu = match (start.generator_cpu, end.generator_cpu) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let percent = |cpu: Duration| 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    let mut rows = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let tally = &group.tally;
        let in_window = tally.in_window.load(Ordering::Relaxed) - delivered_start[g];
        let lost = receipts[g].iter().map(|r| r.lost(schedule)).sum();
        let histogram = tally
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let name = tally.subject.name();
        let server_events_delivered = match (metrics_before, metrics_after) {
            (Some(before), Some(after)) => {
                let value = |list: &Vec<(String, u64)>| {
                    list.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
                };
                value(after).zip(value(before)).map(|(a, b)| a - b)
            }
            _ => None,
        };
        rows.push(Row {
            transport: name.to_owned(),
            clients: args.clients,
            rate: args.rate,
            join_secs,
            published,
            publish_errors,
            delivered: tally.delivered.load(Ordering::Relaxed),
            expected: published * args.clients as u64,
            lost,
            duplicated: tally.duplicates.load(Ordering::Relaxed),
            out_of_order: tally.out_of_order.load(Ordering::Relaxed),
            seq_gaps: tally.seq_gaps.load(Ordering::Relaxed),
            errors: tally.errors.load(Ordering::Relaxed),
            disconnects: tally.disconnects.load(Ordering::Relaxed),
            deliveries_per_sec: in_window as f64 / wall.as_secs_f64(),
            latency_ms: Latency::of(&histogram),
            bytes_per_delivery: (wire_end[g] - wire_start[g]) as f64 / in_window.max(1) as f64,
            server_cpu_us_per_delivery: server_cpu
                .map(|cpu| cpu.as_micros() as f64 / in_window_all.max(1) as f64),
            server_cpu_percent: server_cpu.map(percent),
            server_peak_rss_bytes: *peak_rss,
            server_events_delivered,
            generator_cpu_percent: generator_cpu.map(percent),
            histogram: Some(histogram),
            resume: resumes(tally, &receipts[g]),
        });
    }
    rows
}

/// What `--resume` measured for one subject.
fn resumes(tally: &Tally, receipts: &[Receipts]) -> Option<report::Resumes> {
    let storm = tally.storm.as_ref()?;
    let storm = storm.lock().unwrap_or_else(|e| e.into_inner());
    let of = |list: &[hdrhistogram::Histogram<u64>], at: usize| {
        list.get(at).filter(|h| !h.is_empty()).map(Latency::of)
    };
    let seconds = storm
        .survivors
        .len()
        .max(storm.resumed.len())
        .max(storm.cuts.len())
        .max(storm.resumes.len());
    Some(report::Resumes {
        cut_subscribers: receipts.iter().filter(|r| r.was_cut()).count() as u64,
        resumed: storm.resume_us.len(),
        resume_ms: Latency::of(&storm.resume_us),
        seconds: (0..seconds)
            .map(|at| report::Second {
                second: at,
                survivors_ms: of(&storm.survivors, at),
                resumed_ms: of(&storm.resumed, at),
                cuts: storm.cuts.get(at).copied().unwrap_or(0),
                resumes: storm.resumes.get(at).copied().unwrap_or(0),
            })
            .collect(),
    })
}

/// One line per row on stderr, with a warning for an unhealthy run.
fn print_rows(rows: &[Row]) {
    for row in rows {
        // Resumed transports are sent some events twice (once on the socket that broke).
        let counted = row.server_events_delivered.filter(|_| row.resume.is_none());
        if let Some(counted) = counted.filter(|&n| n != row.delivered) {
            eprintln!(
                "  note: {}: the server's /metrics counted {counted} events delivered, the \
                 bench {} messages (they differ by error events or a reply in flight at the end)",
                row.transport, row.delivered
            );
        }
        eprintln!(
            "  {}: {} delivered, p50 {:.2} ms, p99 {:.2} ms{}",
            row.transport,
            row.delivered,
            row.latency_ms.p50,
            row.latency_ms.p99,
            if row.unhealthy() {
                "  !!! LOSS, DUPLICATES, REORDERING OR ERRORS: see below"
            } else {
                ""
            }
        );
    }
}

fn progress_bar(args: &BenchArgs, names: &[&str], length: Duration) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length.as_millis() as u64);
    let style = ProgressStyle::with_template("{prefix:>14} [{bar:30}] {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(names.join("+"));
    bar
}

/// `--idle N`: opens N sessions with `kind` attached and reads the server's memory.
async fn idle(args: &BenchArgs, kind: TransportKind, sessions: usize) -> Result<IdleRow, String> {
    let target = Target::open(args, false)?;
    let result = idle_on(args, kind, sessions, &target).await;
    target.close();
    result
}

async fn idle_on(
    args: &BenchArgs,
    kind: TransportKind,
    sessions: usize,
    target: &Target,
) -> Result<IdleRow, String> {
    let server = target.spawned().ok_or("--idle needs --spawn")?;
    let connector =
        Arc::new(Connector::new(&target.addrs(), args.source_addrs).with_protocol(protocol(args)?));
    let wire = Arc::new(WireCounters::default());
    eprintln!("{kind}: opening {sessions} idle sessions");
    // Warm the server up (allocator arenas, runtime) with one session before the first reading.
    let (warm, _) = create_sessions(&connector, &wire, "w", 1).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before, _) = server.memory().ok_or("cannot read the server's memory")?;
    let (ids, _) = create_sessions(&connector, &wire, "i", sessions).await?;
    let schedule = Arc::new(Schedule {
        run_id: "idle".into(),
        rate: 1.0,
        total: 0,
        warmup: 0,
        lanes: 1,
        payload_bytes: 0,
        t0: OnceLock::new(),
        window: OnceLock::new(),
        published: Vec::new(),
        publish_errors: AtomicU64::new(0),
        first_publish_error: Mutex::new(None),
        stop: CancellationToken::new(),
    });
    let tally = Arc::new(Tally::new(Subject::Transport(kind)));
    let shared = Shared {
        connector: connector.clone(),
        schedule: schedule.clone(),
        tally: tally.clone(),
        gate: Arc::new(Semaphore::new(64)),
    };
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(sessions as u64)
    };
    progress.set_prefix(kind.as_str());
    let mut tasks = JoinSet::new();
    for session in ids {
        let sub = Subscription {
            subject: Subject::Transport(kind),
            session,
            after: 0,
            room: String::new(),
            short_poll: Duration::from_millis(args.short_poll_ms),
        };
        let shared = shared.clone();
        tasks.spawn(clients::subscribe(sub, shared, None));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while tally.ready.load(Ordering::Relaxed) + (tally.disconnects.load(Ordering::Relaxed) as usize)
        < sessions
        && Instant::now() < deadline
    {
        progress.set_position(tally.ready.load(Ordering::Relaxed) as u64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.finish_and_clear();
    // Let the server settle (short pollers keep polling through this), then read.
    let settle = Duration::from_secs(3);
    let cpu_start = server.cpu_time();
    tokio::time::sleep(settle).await;
    let cpu = server.cpu_time().zip(cpu_start).map(|(b, a)| b - a);
    let (rss_after, _) = server.memory().ok_or("cannot read the server's memory")?;
    let attached = tally.ready.load(Ordering::Relaxed);
    let failed = tally.disconnects.load(Ordering::Relaxed);
    schedule.stop.cancel();
    while tasks.join_next().await.is_some() {}
    if failed > 0 || attached < sessions {
        eprintln!("!!! {kind}: only {attached} of {sessions} sessions attached ({failed} failed)");
    }
    let row = IdleRow {
        transport: kind.as_str().to_owned(),
        sessions,
        attached,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_session: rss_after.saturating_sub(rss_before) as f64 / attached.max(1) as f64,
        server_cpu_percent: cpu.map(|c| 100.0 * c.as_secs_f64() / settle.as_secs_f64()),
    };
    eprintln!(
        "  {kind}: {:.2} KiB per session ({attached} attached)",
        row.bytes_per_session / 1024.0
    );
    Ok(row)
}
