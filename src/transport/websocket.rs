//! WebSocket: `GET /v1/sessions/{id}/ws?after=N` upgrades (over HTTP/2, an extended
//! `CONNECT` on the same path opens the socket as a stream); text frames carry commands in
//! (one object or an array) and events out (one event per frame).
//!
//! On a plain TCP connection of its own, events are written through: after the upgrade the
//! attachment hands the socket's
//! [`SocketWriter`] to the hub, which writes each event's frame as it pushes it (see
//! `ws_writer.rs`). So one task per socket is enough, and it is woken only for what is rare:
//! the client's frames (read with tungstenite, commands applied at once), the heartbeat, the
//! hub's close signal, and writing what queued up while the socket was full. A client heard
//! from in no frame for two heartbeats is closed `heartbeat_timeout`; a queue that takes no
//! byte for two heartbeats, `slow_consumer`. A bad command gets an `error` event; the socket
//! stays open. Every close, whoever starts it, goes through [`close_handshake`].
//!
//! Inside TLS or on an HTTP/2 stream the hub cannot write frames itself: [`serve_pulled`]
//! fetches the events like SSE does and writes them with tungstenite, under the same rules.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::connection::DeadlineIo;
use crate::hub::{Attachment, Budget, Delivery, Hub, Session};
use crate::metrics::{Http, Metrics};
use crate::protocol::{parse_commands, CloseReason, ErrorBody, ErrorCode, TransportKind};
use crate::server::App;

use super::ws_writer::{ReadSide, SocketWriter, Stop};
use super::{full, Body, WRITE_BATCH};

/// Frames larger than this close the socket (1009) instead of getting a `too_large` event,
/// so a hostile client cannot make the server buffer without bound.
pub fn hard_frame_limit(max_message_bytes: usize) -> usize {
    (max_message_bytes * 4).max(1 << 20)
}

/// tungstenite's settings for a socket the server reads: the hard frame limit, a small read
/// buffer, and no write buffer (tungstenite writes only pongs and close replies here; events
/// bypass it).
pub fn read_config(max_message_bytes: usize, read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(hard_frame_limit(max_message_bytes)))
        .max_frame_size(Some(hard_frame_limit(max_message_bytes)))
}

/// The close code the server answers a read error with (`None`: the connection is gone,
/// nothing is sent).
pub fn close_code_for(error: &WsError) -> Option<u16> {
    match End::from_read_error(error) {
        End::Violation(code, _) => Some(code),
        _ => None,
    }
}

fn bad_request(message: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, message)
}

fn header_has_token(
    request: &Request<Incoming>,
    name: hyper::header::HeaderName,
    token: &str,
) -> bool {
    request
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Both handshakes name version 13.
fn check_version(request: &Request<Incoming>) -> Result<(), ErrorBody> {
    match request.headers().get("sec-websocket-version") {
        Some(v) if v.as_bytes() == b"13" => Ok(()),
        _ => Err(bad_request("Sec-WebSocket-Version must be 13")),
    }
}

/// Checks a WebSocket handshake request; returns the `Sec-WebSocket-Accept` value.
pub fn check_handshake(request: &Request<Incoming>) -> Result<String, ErrorBody> {
    if !header_has_token(request, UPGRADE, "websocket")
        || !header_has_token(request, CONNECTION, "upgrade")
    {
        return Err(bad_request(
            "expected a WebSocket upgrade (Upgrade: websocket)",
        ));
    }
    check_version(request)?;
    match request.headers().get(SEC_WEBSOCKET_KEY) {
        Some(key) => Ok(derive_accept_key(key.as_bytes())),
        None => Err(bad_request("missing Sec-WebSocket-Key")),
    }
}

/// The `101 Switching Protocols` answer to a handshake [`check_handshake`] accepted.
pub fn switching_protocols(accept: &str) -> Response<Body> {
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(accept).expect("base64 is a valid header value"),
    );
    response
}

/// Checks an HTTP/2 WebSocket request (RFC 8441: `CONNECT` with `:protocol websocket`).
fn check_connect(request: &Request<Incoming>) -> Result<(), ErrorBody> {
    let protocol = request.extensions().get::<hyper::ext::Protocol>();
    if request.method() != Method::CONNECT || protocol.map(|p| p.as_str()) != Some("websocket") {
        return Err(bad_request(
            "over HTTP/2 a WebSocket is an extended CONNECT with :protocol websocket",
        ));
    }
    check_version(request)?;
    Ok(())
}

/// Checks the handshake (HTTP/1.1 `Upgrade`, or HTTP/2 extended `CONNECT`), attaches to the
/// session and answers (`101`, or `200` on HTTP/2); the socket is served by a task on
/// `tracker`, so shutdown can wait for it.
///
/// A WebSocket on its own plain TCP connection is written through (the hub writes each
/// event's frame to the socket); one inside TLS or an HTTP/2 stream is served by
/// [`serve_pulled`], which fetches events from the session like SSE does.
pub async fn upgrade(
    app: &App,
    session_id: &str,
    after: u64,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, ErrorBody> {
    let (hub, config) = (&app.hub, &app.config);
    let http = Http::of(request.version());
    let accept = match http {
        Http::H1 => Some(check_handshake(&request)?),
        Http::H2 => {
            check_connect(&request)?;
            None
        }
    };
    // Over HTTP/1.1 the socket outlives its HTTP connection (and its permit); over HTTP/2 it
    // is a stream of a connection that keeps its own.
    let permit = match http {
        Http::H1 => Some(app.connections.clone().try_acquire_owned().map_err(|_| {
            ErrorBody::new(
                ErrorCode::ServerFull,
                "the server holds its maximum number of connections; try again later",
            )
        })?),
        Http::H2 => None,
    };
    let mut attachment = hub
        .attach_transport(session_id, TransportKind::WebSocket, after)
        .await?;
    hub.metrics().attached_over(TransportKind::WebSocket, http);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let settings = SocketSettings {
        read: read_config(config.max_message_bytes, config.ws_read_buffer),
        limits: Limits {
            heartbeat: config.heartbeat,
            close_timeout: config.close_timeout,
        },
        outbox: attachment.session().outbox_budget(),
        metrics: attachment.metrics().clone(),
    };
    let commands = Commands {
        session: attachment.session().clone(),
        hub: hub.clone(),
        max_bytes: config.max_message_bytes,
    };
    app.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
        };
        match take_stream(upgraded) {
            Ok((stream, leftover)) => {
                let close = attachment.close_signal();
                serve_tcp(stream, leftover, settings, close, |writer| {
                    // The hub writes events to the socket from now on.
                    if !attachment.write_through(writer.clone()) {
                        // Superseded between the handshake and now: say so.
                        let reason = (*attachment.close_signal().borrow())
                            .unwrap_or(CloseReason::Superseded);
                        return Err(reason);
                    }
                    Ok(SessionSocket {
                        commands,
                        attachment,
                        writer,
                    })
                })
                .await
            }
            Err(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(settings.read),
                )
                .await;
                // Boxed: a written-through socket's task need not be as large as this one.
                Box::pin(serve_pulled(
                    socket,
                    attachment,
                    commands,
                    http,
                    settings.limits,
                ))
                .await
            }
        }
        drop(permit);
    });
    Ok(match accept {
        Some(accept) => switching_protocols(&accept),
        None => Response::new(full("")),
    })
}

/// How a socket is served: tungstenite's read settings, the loop's limits, and the writer's
/// budget and metrics.
#[derive(Debug, Clone)]
pub struct SocketSettings {
    /// tungstenite's settings (see [`read_config`]).
    pub read: WebSocketConfig,
    /// Heartbeat and close deadlines.
    pub limits: Limits,
    /// Frames the writer may queue before the client counts as a slow consumer.
    pub outbox: Budget,
    /// Where delivered events are counted.
    pub metrics: Metrics,
}

/// What serves the client's side of one socket: a session for `/ws`, an echo for the
/// Autobahn example. The loop around it (heartbeats, slow consumers, the close handshake) is
/// the same for both.
pub trait Handler: Send {
    /// A text or binary message from the client.
    fn message(&self, message: Message) -> impl Future<Output = ()> + Send;
    /// Each heartbeat, after the ping.
    fn heartbeat(&self) {}
    /// The loop ended; `closing` is set when the loop itself closes the socket (slow
    /// consumer, heartbeat timeout). Called before the close handshake.
    fn finish(self, closing: Option<CloseReason>);
}

/// Takes the plain TCP stream back from hyper after an upgrade, with the bytes hyper read
/// past the handshake; gives the upgrade back when it is not one (TLS, an HTTP/2 stream).
fn take_stream(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    // The server's plain connections.
    let upgraded = match upgraded.downcast::<TokioIo<DeadlineIo<TcpStream>>>() {
        Ok(parts) => return Ok((parts.io.into_inner().into_inner(), parts.read_buf)),
        Err(upgraded) => upgraded,
    };
    // A plain HTTP/1.1 connection of the echo example.
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Ok((parts.io.into_inner(), parts.read_buf)),
        Err(upgraded) => Err(upgraded),
    }
}

/// Completes an upgrade answered `101` on a plain TCP connection and serves the socket until
/// it closes (see [`serve_tcp`]).
pub async fn serve_upgrade<H: Handler>(
    on_upgrade: OnUpgrade,
    settings: SocketSettings,
    close: watch::Receiver<Option<CloseReason>>,
    handler: impl FnOnce(Arc<SocketWriter>) -> Result<H, CloseReason>,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
    };
    match take_stream(upgraded) {
        Ok((stream, leftover)) => serve_tcp(stream, leftover, settings, close, handler).await,
        Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
    }
}

/// Serves a WebSocket on its own TCP connection until it closes, its events written through
/// by a [`SocketWriter`]. `handler` builds the handler around the writer, or names the reason
/// to close at once. `close` turns `Some(reason)` when the server closes the socket for a
/// reason of its own.
async fn serve_tcp<H: Handler>(
    stream: TcpStream,
    leftover: Bytes,
    settings: SocketSettings,
    close: watch::Receiver<Option<CloseReason>>,
    handler: impl FnOnce(Arc<SocketWriter>) -> Result<H, CloseReason>,
) {
    let (read, write) = stream.into_split();
    let writer = Arc::new(SocketWriter::new(write, settings.outbox, settings.metrics));
    let read_side = ReadSide::new(read, leftover, writer.clone());
    let socket =
        WebSocketStream::from_raw_socket(read_side, Role::Server, Some(settings.read)).await;
    let close_timeout = settings.limits.close_timeout;
    match handler(writer.clone()) {
        Ok(handler) => serve(socket, writer, handler, close, settings.limits).await,
        // Boxed: an idle socket's task is as large as its future, and the close is rare.
        Err(reason) => {
            Box::pin(close_handshake(
                socket,
                &writer,
                End::Closed(reason),
                close_timeout,
            ))
            .await
        }
    }
}

/// How a socket's loop ended.
enum End {
    /// The hub (or this task) closed the transport: send the close code and reason.
    Closed(CloseReason),
    /// The client sent a close frame: answer it.
    ClientClosed,
    /// The client broke the protocol (a frame over the hard limit, invalid UTF-8, a bad
    /// frame): close with this code; its later frames cannot be parsed.
    Violation(u16, &'static str),
    /// The TCP connection ended or failed: nothing to send.
    Gone,
}

impl End {
    /// What a read from the client means for both socket loops: a text or binary message to
    /// handle, nothing (a ping or pong tungstenite answered), or the end of the socket.
    fn after_read(read: Option<Result<Message, WsError>>) -> Result<Option<Message>, End> {
        match read {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => Ok(Some(message)),
            Some(Ok(Message::Close(_))) => Err(End::ClientClosed),
            Some(Ok(_)) => Ok(None),
            Some(Err(error)) => Err(End::from_read_error(&error)),
            None => Err(End::Gone),
        }
    }

    fn from_read_error(error: &WsError) -> End {
        match error {
            WsError::Capacity(_) => End::Violation(1009, ErrorCode::TooLarge.as_str()),
            WsError::Utf8(_) => End::Violation(1007, "invalid_utf8"),
            WsError::Protocol(_) => End::Violation(1002, "protocol_error"),
            _ => End::Gone,
        }
    }
}

/// A socket loop's deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How often the server pings; a client heard from in no frame for two of them, or a
    /// queue that takes no byte for two, is closed.
    pub heartbeat: Duration,
    /// How long the close handshake may take.
    pub close_timeout: Duration,
}

/// Serves one upgraded socket until the client leaves or the server closes it.
async fn serve(
    mut socket: WebSocketStream<ReadSide>,
    writer: Arc<SocketWriter>,
    handler: impl Handler,
    mut close: watch::Receiver<Option<CloseReason>>,
    limits: Limits,
) {
    let Limits {
        heartbeat,
        close_timeout,
    } = limits;
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let mut closing = None;

    let end = loop {
        tokio::select! {
            biased;
            reason = async { close.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                break End::Closed(reason.unwrap_or(CloseReason::Expired));
            }
            stop = writer.flush_queued() => match stop {
                Stop::Failed => break End::Gone,
                Stop::Overflowed => {
                    closing = Some(CloseReason::SlowConsumer);
                    break End::Closed(CloseReason::SlowConsumer);
                }
            },
            _ = ping.tick() => {
                writer.check_progress();
                let silent = last_heard.elapsed() > heartbeat * 2
                    && !writer.progressed_within(heartbeat * 2);
                let verdict = if silent {
                    Some(CloseReason::HeartbeatTimeout)
                } else if writer.stalled_for().is_some_and(|t| t > heartbeat * 2) {
                    Some(CloseReason::SlowConsumer)
                } else {
                    None
                };
                if let Some(reason) = verdict {
                    closing = Some(reason);
                    break End::Closed(reason);
                }
                writer.ping();
                handler.heartbeat();
            }
            incoming = socket.next() => {
                last_heard = Instant::now();
                match End::after_read(incoming) {
                    Ok(Some(message)) => handler.message(message).await,
                    Ok(None) => {}
                    Err(end) => break end,
                }
            }
        }
    };
    // Detach first, so the hub writes nothing after the close frame.
    handler.finish(closing);
    // Boxed: an idle socket's task is as large as its future, and the close is rare.
    Box::pin(close_handshake(socket, &writer, end, close_timeout)).await;
}

/// The one place a WebSocket is closed, for the frames the hub writes through and the ones
/// tungstenite writes alike. tungstenite keeps the handshake's state and its frames go through
/// the writer's queue, so nothing follows the close frame; the whole close takes at most
/// `limit`, whatever the client does.
///
/// - The client closed: tungstenite's reply (the client's own code) is written, then the
///   server drops the connection, as RFC 6455 §7.1.1 asks of servers.
/// - The server closes: frames not yet begun are dropped (the client resumes from the last
///   seq it read), the close frame goes next, and the server reads and discards the client's
///   frames until its close comes back, so a client that was still sending reads the code
///   instead of a reset.
/// - A protocol violation: the close frame is written raw (tungstenite cannot parse what
///   follows), the server ends its side of the TCP connection, and the input is discarded
///   until the client hangs up.
async fn close_handshake(
    mut socket: WebSocketStream<ReadSide>,
    writer: &SocketWriter,
    end: End,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    match end {
        End::Gone => return,
        End::ClientClosed => {
            let _ = socket.flush().await;
        }
        End::Closed(reason) => {
            writer.discard_unsent();
            let frame = CloseFrame {
                code: reason.ws_code().into(),
                reason: reason.as_str().into(),
            };
            if socket.close(Some(frame)).await.is_ok() {
                let answered = async { while let Some(Ok(_)) = socket.next().await {} };
                let _ = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        _ = answered => {}
                        _ = writer.flush_queued() => {}
                    }
                })
                .await;
            }
        }
        End::Violation(code, reason) => {
            writer.discard_unsent();
            writer.close(code, reason);
            writer.drain_until(deadline).await;
            // The connection is failed (RFC 6455 §7.1.7): the server ends its side after the
            // close frame, then discards the input until the client hangs up, so what the
            // client was still sending cannot turn the close into a reset.
            writer.shutdown();
            let read = socket.get_mut();
            let _ = tokio::time::timeout_at(deadline, async {
                let mut discard = vec![0u8; 4096];
                while matches!(read.read(&mut discard).await, Ok(n) if n > 0) {}
            })
            .await;
            return;
        }
    }
    writer.drain_until(deadline).await;
}

/// `/ws`'s side of a written-through socket: the client's frames are commands for its
/// session.
struct SessionSocket {
    commands: Commands,
    attachment: Attachment,
    writer: Arc<SocketWriter>,
}

impl Handler for SessionSocket {
    async fn message(&self, message: Message) {
        self.commands.message(message).await
    }

    fn heartbeat(&self) {
        self.writer.heartbeat();
    }

    fn finish(self, closing: Option<CloseReason>) {
        if let Some(reason) = closing {
            self.attachment.close(reason);
        }
    }
}

/// Applies a WebSocket's frames to its session: each text frame holds commands; every failure
/// becomes an `error` event.
struct Commands {
    session: Arc<Session>,
    hub: Hub,
    max_bytes: usize,
}

impl Commands {
    async fn message(&self, message: Message) {
        match message {
            Message::Text(text) => self.handle_text(text.as_bytes()).await,
            _ => {
                let binary = ErrorBody::new(
                    ErrorCode::BadCommand,
                    "binary frames are not supported; send commands as JSON text frames",
                );
                self.report_error(&binary, None).await
            }
        }
    }

    /// Counts an error answered on the WebSocket and sends it as an `error` event.
    async fn report_error(&self, error: &ErrorBody, client_id: Option<&str>) {
        self.hub
            .metrics()
            .error(TransportKind::WebSocket.as_str(), error.code);
        self.hub.report_error(&self.session, error, client_id).await;
    }

    /// Applies the commands in one text frame; each failure becomes an `error` event.
    async fn handle_text(&self, text: &[u8]) {
        let max_bytes = self.max_bytes;
        if text.len() > max_bytes {
            let error = ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "frame of {} bytes is over the {max_bytes}-byte limit",
                    text.len()
                ),
            );
            self.report_error(&error, None).await;
            return;
        }
        let parsed = match parse_commands(text) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.report_error(&error, None).await;
                return;
            }
        };
        let results = self.hub.execute(&self.session, parsed.commands).await;
        for (result, client_id) in results.iter().zip(&parsed.client_ids) {
            if let Some(error) = &result.error {
                self.report_error(error, client_id.as_deref()).await;
            }
        }
    }
}

/// Serves a WebSocket inside TLS or an HTTP/2 stream, where the hub cannot write frames
/// itself: the task fetches events from the session (as SSE does) and writes them with
/// tungstenite. The rules are the write-through socket's: a ping and a `heartbeat` frame each
/// heartbeat, `heartbeat_timeout` for a client heard from in no frame (and that took no
/// batch) for two, and `slow_consumer` for a write that does not finish in two (or an outbox
/// the task cannot drain); every close ends with a close frame when the stream still takes
/// one. The client's frames are read before events are fetched, so a steady stream of events
/// cannot starve its pongs and commands.
async fn serve_pulled<S>(
    mut socket: WebSocketStream<S>,
    mut attachment: Attachment,
    commands: Commands,
    http: Http,
    limits: Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Limits {
        heartbeat,
        close_timeout,
    } = limits;
    let metrics = attachment.metrics().clone();
    let mut close = attachment.close_signal();
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let mut closing = None;
    let stalled = heartbeat * 2;
    let end = loop {
        tokio::select! {
            biased;
            reason = async { close.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                break End::Closed(reason.unwrap_or(CloseReason::Expired));
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > stalled {
                    closing = Some(CloseReason::HeartbeatTimeout);
                    break End::Closed(CloseReason::HeartbeatTimeout);
                }
                let beat = async {
                    socket.feed(Message::Ping(Bytes::new())).await?;
                    socket.feed(Message::text(r#"{"type":"heartbeat"}"#)).await?;
                    socket.flush().await
                };
                match tokio::time::timeout(stalled, beat).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break End::Gone,
                    Err(_) => {
                        closing = Some(CloseReason::SlowConsumer);
                        break End::Gone;
                    }
                }
            }
            incoming = socket.next() => {
                last_heard = Instant::now();
                match End::after_read(incoming) {
                    Ok(Some(message)) => commands.message(message).await,
                    Ok(None) => {}
                    Err(end) => break end,
                }
            }
            delivery = attachment.next(WRITE_BATCH) => match delivery {
                Delivery::Closed(reason) => break End::Closed(reason),
                Delivery::Events(events) => {
                    let mut bytes = 0;
                    let write = async {
                        for (seq, event) in &events {
                            let json = event.to_json(*seq);
                            bytes += json.len();
                            socket.feed(Message::text(json)).await?;
                        }
                        socket.flush().await
                    };
                    match tokio::time::timeout(stalled, write).await {
                        Ok(Ok(())) => {
                            // The client took the batch: as good as hearing from it (its
                            // pongs may have waited behind the write).
                            last_heard = Instant::now();
                            metrics.delivered(TransportKind::WebSocket, events.iter().map(|(_, e)| e), bytes);
                            metrics.delivered_over(TransportKind::WebSocket, http, events.len() as u64);
                        }
                        Ok(Err(_)) => break End::Gone,
                        // A frame is half written: no close frame can follow it.
                        Err(_) => {
                            closing = Some(CloseReason::SlowConsumer);
                            break End::Gone;
                        }
                    }
                }
            },
        }
    };
    if let Some(reason) = closing {
        attachment.close(reason);
    }
    drop(attachment);
    let deadline = Instant::now() + close_timeout;
    let _ = tokio::time::timeout_at(deadline, async {
        let frame = match end {
            End::Gone => return,
            // tungstenite queued the reply (the client's code): send it.
            End::ClientClosed => return drop(socket.flush().await),
            End::Closed(reason) => CloseFrame {
                code: reason.ws_code().into(),
                reason: reason.as_str().into(),
            },
            End::Violation(code, reason) => CloseFrame {
                code: code.into(),
                reason: reason.into(),
            },
        };
        if socket.close(Some(frame)).await.is_ok() {
            // Wait for the client's close frame, discarding what comes before it.
            while let Some(Ok(_)) = socket.next().await {}
        }
    })
    .await;
}
