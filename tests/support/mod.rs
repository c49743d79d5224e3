//! Test support: a real switchyard server on 127.0.0.1:0 and small real clients for each
//! transport (WebSocket, SSE, long and short polling) plus plain HTTP.
//!
//! Every wait goes through [`within`], which fails the test with what it was waiting for.

#![allow(dead_code)]

pub mod proxy;
pub mod redis;
pub mod scenarios;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use switchyard::protocol::TransportKind;
use switchyard::Config;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timeout after {WAIT:?}: {what}"),
    }
}

/// A server running in this test's runtime.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every node requests go to, round robin (a cluster's), or just `addr`.
    nodes: Vec<SocketAddr>,
    next: std::sync::atomic::AtomicUsize,
    /// The server's session core, for tests that act on it directly.
    pub hub: Option<switchyard::hub::Hub>,
    /// With `SWITCHYARD_TEST_CLUSTER=1`: the Redis of the one-node cluster the server is.
    redis: Option<redis::RedisServer>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with the default configuration.
    pub async fn start() -> Self {
        Self::with_config(Config::default()).await
    }

    /// Starts a server with `config` on 127.0.0.1, port 0. With the environment variable
    /// `SWITCHYARD_TEST_CLUSTER=1` (and a config with the in-memory history store), the
    /// server is a node of a cluster of its own, on a `redis-server` the test starts: the
    /// suite then checks cluster mode against what one node does.
    pub async fn with_config(mut config: Config) -> Self {
        let redis = match std::env::var("SWITCHYARD_TEST_CLUSTER").as_deref() {
            Ok("1") if config.history_store == switchyard::config::HistoryStoreKind::Memory => {
                let redis = redis::RedisServer::start().await;
                config.cluster = Some(switchyard::config::Cluster {
                    redis: redis.url(),
                    node: "test".into(),
                });
                Some(redis)
            }
            _ => None,
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel();
        let hub = switchyard::server::build_hub(&config)
            .await
            .expect("open the history store");
        let handle = tokio::spawn(switchyard::server::serve(
            listener,
            config,
            hub.clone(),
            async {
                let _ = rx.await;
            },
        ));
        TestServer {
            addr,
            nodes: vec![addr],
            next: Default::default(),
            hub: Some(hub),
            redis,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A handle for making requests to a server started elsewhere (e.g. in another task).
    pub fn attached_to(addr: SocketAddr) -> Self {
        Self::round_robin(&[addr])
    }

    /// A handle that sends each request, each transport and each poll to the next of
    /// `nodes` (a cluster's), round robin.
    pub fn round_robin(nodes: &[SocketAddr]) -> Self {
        TestServer {
            addr: nodes[0],
            nodes: nodes.to_vec(),
            next: Default::default(),
            hub: None,
            redis: None,
            shutdown: None,
            handle: None,
        }
    }

    /// Whether the server is a one-node cluster (`SWITCHYARD_TEST_CLUSTER=1`).
    pub fn clustered(&self) -> bool {
        self.redis.is_some()
    }

    /// Every node requests go to.
    pub fn nodes(&self) -> &[SocketAddr] {
        &self.nodes
    }

    /// The node for the next request.
    pub fn pick(&self) -> SocketAddr {
        let at = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.nodes[at % self.nodes.len()]
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            within("the server to shut down", handle)
                .await
                .expect("server task")
                .expect("server result");
        }
    }

    /// Makes an HTTP request and reads the whole reply.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let response = self.send(method, path, headers, body).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = within("an HTTP body", response.into_body().collect())
            .await
            .expect("read body")
            .to_bytes();
        (status, headers, body)
    }

    /// Makes an HTTP request and returns the response with its body still streaming.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> hyper::Response<Incoming> {
        let addr = self.pick();
        let stream = within("a TCP connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("http handshake");
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).expect("valid request");
        within("an HTTP response", sender.send_request(request))
            .await
            .expect("send request")
    }

    /// Makes a JSON request on a fresh connection; `None` if the server cannot be reached or
    /// the connection breaks (a server killed mid-test).
    pub async fn try_json(
        &self,
        method: Method,
        path: &str,
        body: Value,
    ) -> Option<(StatusCode, Value)> {
        let addr = self.pick();
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .body(Full::new(Bytes::from(body.to_string())))
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status();
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&bytes).ok()?))
    }

    /// Makes a JSON request; returns the status and the parsed JSON body.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, bytes) = self.request(method, path, &[], body).await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path} answered non-JSON ({e}): {bytes:?}"));
        (status, value)
    }

    /// Creates a session; returns its id.
    pub async fn session(&self, name: &str) -> String {
        let (status, body) = self
            .json(Method::POST, "/v1/sessions", Some(json!({ "name": name })))
            .await;
        assert_eq!(status, StatusCode::CREATED, "create session: {body}");
        body["session"].as_str().expect("session id").to_owned()
    }

    /// Posts commands (one object or an array); returns the status and reply.
    pub async fn commands(&self, session: &str, commands: Value) -> (StatusCode, Value) {
        self.json(
            Method::POST,
            &format!("/v1/sessions/{session}/commands"),
            Some(commands),
        )
        .await
    }

    /// Posts commands that must all succeed.
    pub async fn ok(&self, session: &str, commands: Value) -> Value {
        let (status, reply) = self.commands(session, commands.clone()).await;
        assert_eq!(status, StatusCode::OK, "{commands} -> {reply}");
        reply
    }

    /// Opens a transport of `kind` on a session, resuming after `after`.
    pub async fn attach(&self, kind: TransportKind, session: &str, after: u64) -> Client {
        let inner = match kind {
            TransportKind::WebSocket => Inner::Ws(Box::new(self.websocket(session, after).await)),
            TransportKind::Sse => {
                Inner::Sse(self.sse(session, &format!("?after={after}"), &[]).await)
            }
            TransportKind::LongPolling | TransportKind::ShortPolling => Inner::Poll {
                wait_ms: if kind == TransportKind::LongPolling {
                    5000
                } else {
                    0
                },
                queue: VecDeque::new(),
            },
        };
        Client {
            nodes: self.nodes.clone(),
            polls: self.next.load(std::sync::atomic::Ordering::Relaxed),
            session: session.to_owned(),
            kind,
            last_seq: after,
            inner,
        }
    }

    /// Opens a WebSocket to a session.
    pub async fn websocket(&self, session: &str, after: u64) -> Ws {
        let url = format!(
            "ws://{}/v1/sessions/{session}/ws?after={after}",
            self.pick()
        );
        let (socket, _) = within(
            "a WebSocket handshake",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("websocket handshake");
        socket
    }

    /// Opens an SSE stream to a session with the given query and extra headers.
    pub async fn sse(&self, session: &str, query: &str, headers: &[(&str, &str)]) -> SseStream {
        let response = self
            .send(
                Method::GET,
                &format!("/v1/sessions/{session}/sse{query}"),
                headers,
                Bytes::new(),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "sse status");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseStream {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// Sends `count` messages of 4000 characters to room `r` from a fresh member, one request
    /// each (a batch would be over the body limit).
    pub async fn publish_big(&self, count: usize) {
        let sender = self.session("sender").await;
        self.ok(&sender, join("r")).await;
        let text = "z".repeat(4000);
        for i in 0..count {
            self.ok(&sender, send("r", &text, &format!("m{i}"))).await;
        }
    }

    /// Waits until a session's last seq is at least `seq`: events reach sessions through the
    /// fan-out threads a moment after the command that made them is answered.
    pub async fn wait_for_seq(&self, session: &str, seq: u64) {
        let path = format!("/v1/sessions/{session}");
        within(&format!("session {session} to reach seq {seq}"), async {
            loop {
                let (_, info) = self.json(Method::GET, &path, None).await;
                if info["last_seq"].as_u64().is_some_and(|last| last >= seq) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// One poll; returns the reply.
    pub async fn poll(&self, session: &str, after: u64, wait_ms: u64) -> (StatusCode, Value) {
        self.json(
            Method::GET,
            &format!("/v1/sessions/{session}/poll?after={after}&wait={wait_ms}"),
            None,
        )
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A client-side WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Reads the next text frame as JSON, skipping pings and pongs; panics on close.
pub async fn ws_event<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Value {
    loop {
        match within("a WebSocket frame", ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                let event: Value = serde_json::from_str(&text).expect("event JSON");
                if event == json!({"type": "heartbeat"}) {
                    continue;
                }
                return event;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected an event frame, got {other:?}"),
        }
    }
}

/// Reads frames until a close frame; returns its code and reason.
pub async fn ws_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> (u16, String) {
    loop {
        match within("a WebSocket close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Sends a JSON command over a WebSocket.
pub async fn ws_send<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    command: Value,
) {
    within(
        "a WebSocket send",
        ws.send(Message::text(command.to_string())),
    )
    .await
    .expect("ws send");
}

/// One parsed SSE block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` line.
    pub id: Option<String>,
    /// The `event:` line.
    pub event: Option<String>,
    /// The `data:` line(s).
    pub data: String,
    /// Comment lines (`: ...`).
    pub comments: Vec<String>,
}

/// A client-side SSE stream.
pub struct SseStream {
    body: Incoming,
    buffer: String,
}

impl SseStream {
    /// Reads the SSE stream in a response body (of any HTTP version).
    pub fn new(body: Incoming) -> Self {
        SseStream {
            body,
            buffer: String::new(),
        }
    }

    /// The next block (comments included), or `None` when the stream ended.
    pub async fn next_block(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: None,
                    data: String::new(),
                    comments: Vec::new(),
                };
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        event.comments.push(comment.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "id" => event.id = Some(value.to_owned()),
                            "event" => event.event = Some(value.to_owned()),
                            "data" => event.data.push_str(value),
                            _ => {}
                        }
                    }
                }
                return Some(event);
            }
            match within("an SSE chunk", self.body.frame()).await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer
                            .push_str(std::str::from_utf8(&data).expect("SSE is UTF-8"));
                    }
                }
                Some(Err(e)) => panic!("SSE stream failed: {e}"),
                None => return None,
            }
        }
    }

    /// The next data-carrying block (events and the final close), skipping comments, the
    /// `ready` event that starts every stream and `heartbeat` events.
    pub async fn next_event(&mut self) -> SseEvent {
        loop {
            let block = self.next_block().await.expect("SSE stream ended early");
            let unsequenced = matches!(block.event.as_deref(), Some("ready" | "heartbeat"));
            if unsequenced {
                assert!(
                    block.id.is_none(),
                    "{} carries no id: {block:?}",
                    block.event.as_deref().unwrap_or("")
                );
            }
            if !block.data.is_empty() && !unsequenced {
                return block;
            }
        }
    }
}

enum Inner {
    Ws(Box<Ws>),
    Sse(SseStream),
    Poll {
        wait_ms: u64,
        queue: VecDeque<Value>,
    },
}

/// A session observed over one transport: yields events one by one, tracking the last seq.
pub struct Client {
    /// Where polls go, round robin.
    nodes: Vec<SocketAddr>,
    polls: usize,
    /// Session id.
    pub session: String,
    /// The transport in use.
    pub kind: TransportKind,
    /// Seq of the last event returned.
    pub last_seq: u64,
    inner: Inner,
}

impl Client {
    /// The next event, checking its seq follows the last one.
    pub async fn next(&mut self) -> Value {
        let event = match &mut self.inner {
            Inner::Ws(ws) => ws_event(ws).await,
            Inner::Sse(stream) => {
                let block = stream.next_event().await;
                assert_eq!(
                    block.event.as_deref(),
                    Some(block_type(&block)),
                    "{block:?}"
                );
                assert!(block.id.is_some(), "an SSE event without id: {block:?}");
                let event: Value = serde_json::from_str(&block.data).expect("SSE data JSON");
                assert_eq!(block.id, Some(event["seq"].to_string()), "id line = seq");
                event
            }
            Inner::Poll { wait_ms, queue } => {
                let wait_ms = *wait_ms;
                let mut conflicts = 0;
                loop {
                    if let Some(event) = queue.pop_front() {
                        break event;
                    }
                    let path = format!(
                        "/v1/sessions/{}/poll?after={}&wait={wait_ms}",
                        self.session, self.last_seq
                    );
                    self.polls += 1;
                    let node = self.nodes[self.polls % self.nodes.len()];
                    let (status, reply) = poll_json(node, &path).await;
                    if status == StatusCode::CONFLICT {
                        // An abandoned poll the server has not noticed yet: retry shortly.
                        conflicts += 1;
                        assert!(conflicts < 200, "poll kept getting 409: {reply}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    assert_eq!(status, StatusCode::OK, "poll: {reply}");
                    assert!(reply.get("closed").is_none(), "poll closed: {reply}");
                    queue.extend(reply["events"].as_array().expect("events").iter().cloned());
                    if queue.is_empty() && wait_ms == 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        };
        let seq = event["seq"].as_u64().expect("seq");
        assert_eq!(
            seq,
            self.last_seq + 1,
            "seq must follow {}: {event}",
            self.last_seq
        );
        self.last_seq = seq;
        event
    }

    /// The next event of the given type, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let event = self.next().await;
            if event["type"] == kind {
                return event;
            }
        }
    }
}

fn block_type(block: &SseEvent) -> &str {
    let start = block.data.find("\"type\":\"").map(|i| i + 8).unwrap_or(0);
    let end = block.data[start..]
        .find('"')
        .map(|i| i + start)
        .unwrap_or(start);
    &block.data[start..end]
}

/// A GET whose reply is JSON, on a fresh connection.
pub async fn poll_json(addr: SocketAddr, path: &str) -> (StatusCode, Value) {
    TestServer::attached_to(addr)
        .json(Method::GET, path, None)
        .await
}

/// The value of one sample line of `GET /metrics` (0 when absent).
pub async fn metric(server: &TestServer, sample: &str) -> f64 {
    let (_, _, body) = server.request(Method::GET, "/metrics", &[], "").await;
    let text = String::from_utf8(body.to_vec()).expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A `send` command.
pub fn send(room: &str, text: &str, client_id: &str) -> Value {
    json!({"type": "send", "room": room, "text": text, "client_id": client_id})
}

/// A `join` command.
pub fn join(room: &str) -> Value {
    json!({"type": "join", "room": room})
}

/// The event without its `ts` fields (including those of history messages).
pub fn without_ts(mut event: Value) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("ts");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut event);
    event
}

/// A `switchyard serve` child process on a loopback address, port 0; killed when dropped.
pub struct ServerProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl ServerProcess {
    /// Starts `switchyard serve ARGS --addr 127.0.0.1:0` and waits for it to listen.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1", args).await
    }

    /// Starts `switchyard serve ARGS --addr IP:0` (a loopback address) and waits for it to
    /// listen.
    pub async fn start_on(ip: &str, args: &[&str]) -> Self {
        ServerProcess::start_within(ip, args, WAIT).await
    }

    /// [`ServerProcess::start_on`], waiting up to `wait` for it to listen.
    pub async fn start_within(ip: &str, args: &[&str], wait: Duration) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("serve")
            .args(args)
            .args(["--addr", &format!("{ip}:0")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn switchyard");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(wait, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("timeout after {wait:?}: the server to print its address"))
            .expect("read stdout")
            .expect("the server exited before listening");
        let addr = line
            .trim()
            .strip_prefix("switchyard listening on http://")
            .or_else(|| line.trim().strip_prefix("switchyard listening on https://"))
            .and_then(|rest| rest.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess { addr, child }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// A client handle for requests to this server.
    pub fn client(&self) -> TestServer {
        TestServer::attached_to(self.addr)
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = within("the server to exit after SIGTERM", self.child.wait())
            .await
            .expect("wait");
        assert!(status.success(), "exit after SIGTERM: {status}");
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        within("the server to die", self.child.wait())
            .await
            .expect("wait");
    }
}

/// A short `switchyard bench` of every transport at once against `url` (one server, or a
/// cluster's nodes comma-separated), `clients` subscribers each, 20 msg/s for a second.
pub fn short_bench(url: String, clients: usize) -> switchyard::bench::BenchArgs {
    switchyard::bench::BenchArgs {
        url: Some(url),
        spawn: false,
        clients,
        rate: 20.0,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(200),
        payload_bytes: 40,
        short_poll_ms: 100,
        transports: TransportKind::ALL.to_vec(),
        concurrent: true,
        baseline: false,
        idle: None,
        pin: false,
        source_addrs: 4,
        json: None,
        svg: None,
        quiet: true,
        server_args: Vec::new(),
        server_exe: None,
        tls_cert: None,
        tls_key: None,
        http: "1.1".into(),
        resume: false,
        kill_pid: None,
        kill_after: Duration::ZERO,
    }
}

/// Polls `ready` every 20 ms until it says yes (`true`) or `child` exits first (`false`): for
/// a server of the tests' own (Redis, a proxy, chromedriver) to start listening.
pub async fn until_ready<F: Future<Output = bool>>(
    child: &mut tokio::process::Child,
    mut ready: impl FnMut() -> F,
) -> bool {
    loop {
        if ready().await {
            return true;
        }
        if child.try_wait().expect("the child's status").is_some() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `switchyard serve ARGS` expecting it to stop at start; returns its stderr.
pub async fn failing_start(args: &[&str]) -> String {
    let output = within(
        "the server to exit at start",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("serve")
            .args(args)
            .args(["--addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run switchyard");
    assert!(
        !output.status.success(),
        "the server should have refused to start: {args:?}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}
