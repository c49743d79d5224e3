//! Connection lifecycles: WebSocket close handshakes both ways, slow consumers judged by
//! progress, and a deadline on every phase (request body, response write, close).
//!
//! Clients here are real: tokio-tungstenite over TCP (some through a throttled stream), and
//! raw sockets with a small receive buffer for clients that stop reading.

mod support;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::Value;
use support::{join, metric, send, within, ws_close, ws_event, TestServer};
use switchyard::protocol::CloseReason;
use switchyard::Config;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A TCP connection to `addr` whose receive buffer is as small as the kernel allows, so that a
/// client that stops reading makes the server's writes wait soon.
async fn small_buffer_connection(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    within("a TCP connection", socket.connect(addr))
        .await
        .expect("connect")
}

/// A WebSocket client (tokio-tungstenite) over `stream`.
async fn ws_over<S>(addr: SocketAddr, session: &str, stream: S) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let url = format!("ws://{addr}/v1/sessions/{session}/ws?after=0");
    within(
        "a WebSocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("handshake")
    .0
}

/// Waits until a metric sample has `value`; on a timeout, says what the closes and the
/// attached gauges were.
async fn metric_reaches(server: &TestServer, sample: &str, value: f64) {
    let reached = tokio::time::timeout(support::WAIT, async {
        while metric(server, sample).await != value {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if reached.is_err() {
        let (_, _, body) = server.request(Method::GET, "/metrics", &[], "").await;
        let text = String::from_utf8_lossy(&body).into_owned();
        let lifecycle: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_transport_closes_total{")
                    || l.starts_with("switchyard_sessions_attached{")
            })
            .collect();
        panic!(
            "timeout after {:?}: {sample} to reach {value}; {lifecycle:#?}",
            support::WAIT
        );
    }
}

fn attached(kind: &str) -> String {
    format!("switchyard_sessions_attached{{transport=\"{kind}\"}}")
}

fn closes(kind: &str, reason: &str) -> String {
    format!("switchyard_transport_closes_total{{transport=\"{kind}\",reason=\"{reason}\"}}")
}

/// Reads until the peer closes the connection (EOF or reset); returns the bytes read.
async fn read_to_end(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    within(what, async {
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            all.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    all
}

fn quick_config() -> Config {
    Config {
        heartbeat: Duration::from_millis(250),
        close_timeout: Duration::from_millis(500),
        write_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(300),
        // Small kernel buffers, so that a client that stops reading stalls the server's
        // writes after tens of kilobytes rather than megabytes.
        socket_send_buffer: Some(16 * 1024),
        ..Config::default().with_rate_limit(10_000.0)
    }
}

#[tokio::test]
async fn a_client_close_is_answered_with_the_clients_code() {
    let server = TestServer::start().await;
    let session = server.session("closer").await;
    let mut ws = server.websocket(&session, 0).await;
    let frame = CloseFrame {
        code: 1000.into(),
        reason: "bye".into(),
    };
    within("sending a close frame", ws.close(Some(frame)))
        .await
        .expect("close");
    match within("the server's close reply", ws.next()).await {
        Some(Ok(Message::Close(Some(reply)))) => {
            assert_eq!(u16::from(reply.code), 1000);
            assert_eq!(reply.reason.as_str(), "bye");
        }
        other => panic!("expected the close reply, got {other:?}"),
    }
    // Then the server closes the TCP connection: a clean end, not a reset.
    assert!(within("the end of the connection", ws.next())
        .await
        .is_none());
    metric_reaches(&server, &attached("websocket"), 0.0).await;
}

/// Sends frames of 50 `typing` commands (about 1.6 KB, nothing echoed to the sender) without
/// a pause until the socket refuses.
async fn keep_sending<S>(mut sink: S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let batch = Value::Array(vec![
        serde_json::json!({"type": "typing", "room": "busy"});
        50
    ]);
    while sink.send(Message::text(batch.to_string())).await.is_ok() {}
}

/// Connects a client that keeps sending frames without a pause, runs `close` to make the
/// server close it, and returns the close code the client read.
async fn close_code_while_sending(
    server: &TestServer,
    session: &str,
    close: impl Future<Output = ()>,
) -> u16 {
    server.ok(session, join("busy")).await;
    let ws = server.websocket(session, 0).await;
    let (sink, mut stream) = ws.split();
    let sender = tokio::spawn(keep_sending(sink));
    // Let frames pile up in flight before the close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    close.await;
    let code = within("a close frame while sending", async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await;
    within("the sender to stop", sender).await.unwrap();
    code
}

#[tokio::test]
async fn each_server_close_code_reaches_a_client_that_keeps_sending() {
    // No rate limit to speak of: the flood must not turn into error events the client would
    // have to read (it would then be closed as a slow consumer, rightly).
    let server = TestServer::with_config(quick_config().with_rate_limit(1e9)).await;
    let hub = server.hub.clone().unwrap();

    let session = server.session("superseded").await;
    let superseded = close_code_while_sending(&server, &session, async {
        let (status, _) = server.poll(&session, 0, 0).await;
        assert_eq!(status, StatusCode::OK);
    });
    assert_eq!(superseded.await, 4000);

    let session = server.session("expired").await;
    let expired = close_code_while_sending(&server, &session, async {
        let path = format!("/v1/sessions/{session}");
        let (status, _, _) = server.request(Method::DELETE, &path, &[], "").await;
        assert_eq!(status, StatusCode::OK);
    });
    assert_eq!(expired.await, 4003);

    // The hub decides these itself under load or silence; the close path is the same.
    for (reason, code) in [
        (CloseReason::SlowConsumer, 4001),
        (CloseReason::HeartbeatTimeout, 4004),
    ] {
        let session = server.session("told").await;
        let told = close_code_while_sending(&server, &session, async {
            assert!(hub.disconnect(&session, reason).unwrap());
        });
        assert_eq!(told.await, code, "{reason:?}");
    }

    let mut server = server;
    let session = server.session("shutdown").await;
    let addr = server.addr;
    server.ok(&session, join("busy")).await;
    let ws = server.websocket(&session, 0).await;
    let (sink, mut stream) = ws.split();
    let sender = tokio::spawn(keep_sending(sink));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reader = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame from {addr}, got {other:?}"),
            }
        }
    });
    server.stop().await;
    assert_eq!(within("the shutdown close", reader).await.unwrap(), 4002);
    within("the sender to stop", sender).await.unwrap();
}

#[tokio::test]
async fn a_frame_over_the_hard_limit_gets_1009_even_if_sent_whole_before_reading() {
    let server = TestServer::start().await;
    let session = server.session("big").await;
    let mut ws = server.websocket(&session, 0).await;
    // Over the 1 MiB hard limit, written in full before the client reads anything.
    let huge = "x".repeat((1 << 20) + 1);
    within("writing a huge frame", ws.send(Message::text(huge)))
        .await
        .expect("the whole frame is written");
    assert_eq!(ws_close(&mut ws).await, (1009, "too_large".to_owned()));
}

/// Reads from `S` at most `per_tick` bytes every `tick`: a client that reads steadily but
/// slowly.
struct Throttled<S> {
    io: S,
    per_tick: usize,
    budget: usize,
    tick: Duration,
    refill: Pin<Box<Sleep>>,
}

impl<S> Throttled<S> {
    fn new(io: S, bytes_per_sec: usize) -> Self {
        let tick = Duration::from_millis(50);
        let per_tick = bytes_per_sec / 20;
        Throttled {
            io,
            per_tick,
            budget: per_tick,
            tick,
            refill: Box::pin(tokio::time::sleep(tick)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.budget == 0 {
            futures_util::ready!(self.refill.as_mut().poll(cx));
            let next = Instant::now() + self.tick;
            self.refill.as_mut().reset(next);
            self.budget = self.per_tick;
        }
        let mut chunk = vec![0u8; self.budget.min(buf.remaining())];
        let mut limited = ReadBuf::new(&mut chunk);
        futures_util::ready!(Pin::new(&mut self.io).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.put_slice(&chunk[..n]);
        self.budget -= n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Heartbeats long enough for a reader of 4 KB/s to free half of its receive buffer (the
/// kernel's threshold for telling the server) several times per stall window.
fn throttled_config() -> Config {
    Config {
        heartbeat: Duration::from_secs(1),
        ..quick_config()
    }
}

/// Reads a WebSocket for `how_long`, answering pings; returns the `message` events read.
/// Panics if the server closes it meanwhile.
async fn read_messages_for<S>(ws: &mut WebSocketStream<S>, how_long: Duration) -> usize
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut messages = 0;
    while started.elapsed() < how_long {
        let frame: Option<Result<Message, WsError>> = within("a frame", ws.next()).await;
        match frame {
            Some(Ok(Message::Text(text))) => messages += usize::from(text.contains("\"message\"")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("closed while reading, after {messages} messages: {other:?}"),
        }
    }
    messages
}

/// A sender and a reader in room `r`; returns their session ids.
async fn sender_and_reader(server: &TestServer) -> (String, String) {
    let sender = server.session("sender").await;
    server.ok(&sender, join("r")).await;
    let reader = server.session("reader").await;
    server.ok(&reader, join("r")).await;
    (sender, reader)
}

/// Steady traffic for a throttled reader: a backlog of 40 messages of 900 characters (about
/// 36 KB) at once, then 16 more at 2 per second (about 2 KB/s, against the reader's 4 KB/s).
/// Returns the publisher of the second part and the number of messages sent in all.
async fn steady_traffic(server: &TestServer, sender: String) -> (JoinHandle<()>, usize) {
    let text = "y".repeat(900);
    for i in 0..40 {
        server.ok(&sender, send("r", &text, &format!("b{i}"))).await;
    }
    let server = TestServer::attached_to(server.addr);
    let publisher = tokio::spawn(async move {
        for i in 0..16 {
            server.ok(&sender, send("r", &text, &format!("s{i}"))).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    (publisher, 56)
}

#[tokio::test]
async fn a_throttled_reader_that_keeps_up_stays_connected() {
    // Eight heartbeats of steady traffic, with a backlog the reader works through the whole
    // time: its queue is never empty, but it always moves.
    let server = TestServer::with_config(throttled_config()).await;
    let (sender, reader) = sender_and_reader(&server).await;
    let stream = Throttled::new(small_buffer_connection(server.addr).await, 4096);
    let mut ws = ws_over(server.addr, &reader, stream).await;
    let (publisher, sent) = steady_traffic(&server, sender).await;
    let messages = read_messages_for(&mut ws, Duration::from_secs(8)).await;
    within("the publisher", publisher).await.unwrap();
    let info = server
        .json(Method::GET, &format!("/v1/sessions/{reader}"), None)
        .await
        .1;
    assert_eq!(
        info["attached"], "websocket",
        "the steady reader is still attached after reading {messages} of {sent} messages"
    );
    assert_eq!(
        metric(&server, &closes("websocket", "slow_consumer")).await,
        0.0
    );
    assert_eq!(
        metric(&server, &closes("websocket", "heartbeat_timeout")).await,
        0.0
    );
    assert!(
        messages > 20,
        "the reader made progress: {messages} messages"
    );
}

#[tokio::test]
async fn a_websocket_resuming_with_a_large_backlog_is_not_closed_while_it_reads_it() {
    // 120 events of about 1 KB owed at attach time, against an outbox of 8 events: the backlog
    // does not count, and the pings queued behind it (one per heartbeat) must not either.
    let server = TestServer::with_config(Config {
        outbox_capacity: 8,
        ..throttled_config()
    })
    .await;
    let (sender, reader) = sender_and_reader(&server).await;
    let text = "k".repeat(900);
    for i in 0..120 {
        server.ok(&sender, send("r", &text, &format!("k{i}"))).await;
    }
    server.wait_for_seq(&reader, 120).await;
    let stream = Throttled::new(small_buffer_connection(server.addr).await, 8192);
    let mut ws = ws_over(server.addr, &reader, stream).await;
    // Three heartbeats of reading: at 8 KB/s the 110 KB backlog is far from drained.
    let messages = read_messages_for(&mut ws, Duration::from_secs(3)).await;
    let info = server
        .json(Method::GET, &format!("/v1/sessions/{reader}"), None)
        .await
        .1;
    assert_eq!(info["attached"], "websocket", "read {messages} messages");
    assert!(
        messages < 120,
        "the backlog was still being read: {messages}"
    );
}

#[tokio::test]
async fn a_throttled_sse_reader_that_keeps_up_stays_connected() {
    let server = TestServer::with_config(throttled_config()).await;
    let (sender, reader) = sender_and_reader(&server).await;
    let mut stream = Throttled::new(small_buffer_connection(server.addr).await, 4096);
    let request =
        format!("GET /v1/sessions/{reader}/sse?after=0 HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (publisher, _) = steady_traffic(&server, sender).await;
    let started = Instant::now();
    let mut read = 0;
    let mut chunk = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(8) {
        let n = within("SSE bytes", stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "the stream ended after {read} bytes");
        read += n;
    }
    within("the publisher", publisher).await.unwrap();
    let info = server
        .json(Method::GET, &format!("/v1/sessions/{reader}"), None)
        .await
        .1;
    assert_eq!(info["attached"], "sse", "still attached after {read} bytes");
    assert_eq!(metric(&server, &closes("sse", "slow_consumer")).await, 0.0);
}

#[tokio::test]
async fn a_stalled_websocket_reader_is_closed_at_once_and_does_not_delay_others() {
    let server = TestServer::with_config(quick_config()).await;
    let healthy = server.session("healthy").await;
    server.ok(&healthy, join("r")).await;
    let mut healthy_ws = server.websocket(&healthy, 0).await;
    // The healthy member reads all along.
    let healthy_reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while ids.len() < 300 {
            let event = ws_event(&mut healthy_ws).await;
            if event["type"] == "message" {
                ids.push(event["id"].as_u64().unwrap());
            }
        }
        (ids, healthy_ws)
    });
    let stalled = server.session("stalled").await;
    server.ok(&stalled, join("r")).await;
    // The stalled client answers nothing and reads nothing after the handshake.
    let mut raw = small_buffer_connection(server.addr).await;
    let request = format!(
        "GET /v1/sessions/{stalled}/ws?after=0 HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n\
         connection: upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    metric_reaches(&server, &attached("websocket"), 2.0).await;
    // Keep it heard from: a masked empty ping every 100 ms, so only its reading is stuck.
    let pinger = {
        let (_, mut write) = raw.into_split();
        tokio::spawn(async move {
            while write.write_all(&[0x89, 0x80, 1, 2, 3, 4]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            write
        })
    };

    server.publish_big(300).await;
    // Over 1 MB the stalled socket cannot take: it is closed slow_consumer, counted at once.
    metric_reaches(&server, &closes("websocket", "slow_consumer"), 1.0).await;
    // The healthy member got everything, in order, and was never closed.
    let (ids, _still_open) = within("the healthy member's 300 messages", healthy_reader)
        .await
        .unwrap();
    assert_eq!(metric(&server, &attached("websocket")).await, 1.0);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "in order, no gap");
    // The server lets the stalled connection go within the close timeout: its writes fail.
    within("the pinger to see the connection closed", pinger)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stalled_sse_reader_is_closed_at_once_and_its_connection_dropped() {
    let server = TestServer::with_config(quick_config()).await;
    let stalled = server.session("stalled").await;
    server.ok(&stalled, join("r")).await;
    let mut raw = small_buffer_connection(server.addr).await;
    let request =
        format!("GET /v1/sessions/{stalled}/sse?after=0 HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    raw.write_all(request.as_bytes()).await.unwrap();
    metric_reaches(&server, &attached("sse"), 1.0).await;

    server.publish_big(300).await;
    metric_reaches(&server, &closes("sse", "slow_consumer"), 1.0).await;
    metric_reaches(&server, &attached("sse"), 0.0).await;
    // The connection is dropped within the close timeout although the client never read:
    // what it then reads ends before the 1.2 MB the stream had for it.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let read = read_to_end(&mut raw, "the stalled SSE connection to end").await;
    assert!(
        read.len() < 1_000_000,
        "the connection was cut, not drained: {} bytes in {:?}",
        read.len(),
        started.elapsed()
    );
    // The session is intact and resumable.
    let info = server
        .json(Method::GET, &format!("/v1/sessions/{stalled}"), None)
        .await
        .1;
    assert_eq!(info["attached"], Value::Null);
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_with_request_timeout() {
    let server = TestServer::with_config(quick_config()).await;
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(
        b"POST /v1/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"name\":",
    )
    .await
    .unwrap();
    let reply = read_to_end(&mut raw, "the reply to a stalled body").await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":\"request_timeout\""), "{reply}");
}

#[tokio::test]
async fn an_unread_poll_reply_is_cut_at_the_write_deadline() {
    let server = TestServer::with_config(quick_config()).await;
    let reader = server.session("reader").await;
    server.ok(&reader, join("r")).await;
    server.publish_big(250).await;
    let mut raw = small_buffer_connection(server.addr).await;
    let request = format!(
        "GET /v1/sessions/{reader}/poll?after=0&wait=0 HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    // Nobody reads the 1 MB reply; past the write timeout the server drops the connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = read_to_end(&mut raw, "the unread poll reply to end").await;
    assert!(read.starts_with(b"HTTP/1.1 200"));
    assert!(
        read.len() < 1_000_000,
        "the reply was cut, not delivered whole: {} bytes",
        read.len()
    );
}

#[tokio::test]
async fn a_superseded_websocket_gets_nothing_after_the_supersede() {
    let config = Config {
        replay_window: 8,
        outbox_capacity: 4,
        ..Config::default().with_rate_limit(10_000.0)
    };
    let server = TestServer::with_config(config).await;
    let session = server.session("hopper").await;
    server.ok(&session, join("r")).await;
    for i in 0..20 {
        server.ok(&session, send("r", "hi", &format!("c{i}"))).await;
    }
    let last_seq = server
        .json(Method::GET, &format!("/v1/sessions/{session}"), None)
        .await
        .1["last_seq"]
        .as_u64()
        .unwrap();
    let mut old = server.websocket(&session, last_seq).await;
    // A resume point too old for the buffer: the new transport gets a reset and history.
    let mut new = server.sse(&session, "?after=1", &[]).await;
    let mut seen_by_old = Vec::new();
    loop {
        match within("the old socket's frames", old.next()).await {
            Some(Ok(Message::Text(text))) => {
                let event: Value = serde_json::from_str(&text).unwrap();
                seen_by_old.push(event["type"].as_str().unwrap().to_owned());
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 4000);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("expected the supersede close, got {other:?}"),
        }
    }
    assert!(
        seen_by_old.is_empty(),
        "the old socket, up to date, gets nothing more: {seen_by_old:?}"
    );
    let reset = new.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"));
    let history = new.next_event().await;
    assert_eq!(history.event.as_deref(), Some("history"));
}
