//! WebSocket: `GET /v1/sessions/{id}/ws?after=N` upgrades; text frames carry commands in
//! (one object or an array) and events out (one event per frame).
//!
//! Events are written through: after the upgrade the attachment hands the socket's
//! [`SocketWriter`] to the hub, which writes each event's frame as it pushes it (see
//! `ws_writer.rs`). So one task per socket is enough, and it is woken only for what is rare:
//! the client's frames (read with tungstenite, commands applied at once), the heartbeat, the
//! hub's close signal, and writing what queued up while the socket was full. A client heard
//! from in no frame for two heartbeats is closed `heartbeat_timeout`; a queue that takes no
//! byte for two heartbeats, `slow_consumer`. A bad command gets an `error` event; the socket
//! stays open. Every close, whoever starts it, goes through [`close_handshake`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::connection::DeadlineIo;
use crate::hub::{Attachment, Hub, Session};
use crate::protocol::{parse_commands, CloseReason, ErrorBody, ErrorCode, TransportKind};
use crate::server::App;

use super::ws_writer::{ReadSide, SocketWriter, Stop};
use super::{full, Body};

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

/// Checks the handshake, attaches to the session and answers `101`; the socket is served by
/// a task on `tracker`, so shutdown can wait for it.
pub fn upgrade(
    app: &App,
    session_id: &str,
    after: u64,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, ErrorBody> {
    let (hub, config) = (&app.hub, &app.config);
    if !header_has_token(&request, UPGRADE, "websocket")
        || !header_has_token(&request, CONNECTION, "upgrade")
    {
        return Err(bad_request(
            "expected a WebSocket upgrade (Upgrade: websocket)",
        ));
    }
    if request
        .headers()
        .get("sec-websocket-version")
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(bad_request("Sec-WebSocket-Version must be 13"));
    }
    let accept = match request.headers().get(SEC_WEBSOCKET_KEY) {
        Some(key) => derive_accept_key(key.as_bytes()),
        None => return Err(bad_request("missing Sec-WebSocket-Key")),
    };
    let permit = app.connections.clone().try_acquire_owned().map_err(|_| {
        ErrorBody::new(
            ErrorCode::ServerFull,
            "the server holds its maximum number of connections; try again later",
        )
    })?;
    let attachment = hub.attach(session_id, TransportKind::WebSocket, after)?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    let limits = Limits {
        heartbeat: config.heartbeat,
        max_message_bytes: config.max_message_bytes,
        close_timeout: config.close_timeout,
    };
    let ws_config = read_config(config.max_message_bytes, config.ws_read_buffer);
    let hub = hub.clone();
    app.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
        };
        // Take the TCP stream back from hyper: the hub writes events to its write half.
        let parts = match upgraded.downcast::<TokioIo<DeadlineIo<TcpStream>>>() {
            Ok(parts) => parts,
            Err(_) => return tracing::error!("upgraded connection is not a TCP stream"),
        };
        let (read, write) = parts.io.into_inner().into_inner().into_split();
        let writer = Arc::new(SocketWriter::new(
            write,
            attachment.session().outbox_budget(),
            attachment.metrics().clone(),
        ));
        let read_side = ReadSide::new(read, parts.read_buf, writer.clone());
        let socket =
            WebSocketStream::from_raw_socket(read_side, Role::Server, Some(ws_config)).await;
        serve(socket, writer, attachment, &hub, limits).await;
        drop(permit);
    });
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok(response)
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
    fn from_read_error(error: &WsError) -> End {
        match error {
            WsError::Capacity(_) => End::Violation(1009, ErrorCode::TooLarge.as_str()),
            WsError::Utf8(_) => End::Violation(1007, "invalid_utf8"),
            WsError::Protocol(_) => End::Violation(1002, "protocol_error"),
            _ => End::Gone,
        }
    }
}

/// The settings a socket's task needs.
#[derive(Debug, Clone, Copy)]
struct Limits {
    heartbeat: Duration,
    max_message_bytes: usize,
    close_timeout: Duration,
}

/// Serves one upgraded socket until the client leaves or the hub closes the transport.
async fn serve(
    mut socket: WebSocketStream<ReadSide>,
    writer: Arc<SocketWriter>,
    mut attachment: Attachment,
    hub: &Hub,
    limits: Limits,
) {
    let Limits {
        heartbeat,
        max_message_bytes: max_bytes,
        close_timeout,
    } = limits;
    let session = attachment.session().clone();
    let mut close = attachment.close_signal();
    if !attachment.write_through(writer.clone()) {
        // Superseded between the handshake and now: say so.
        let reason = (*close.borrow()).unwrap_or(CloseReason::Superseded);
        drop(attachment);
        return Box::pin(close_handshake(
            socket,
            &writer,
            End::Closed(reason),
            close_timeout,
        ))
        .await;
    }
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();

    let end = loop {
        tokio::select! {
            biased;
            reason = async { close.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                break End::Closed(reason.unwrap_or(CloseReason::Expired));
            }
            stop = writer.flush_queued() => match stop {
                Stop::Failed => break End::Gone,
                Stop::Overflowed => {
                    attachment.close(CloseReason::SlowConsumer);
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
                    attachment.close(reason);
                    break End::Closed(reason);
                }
                writer.ping();
                writer.heartbeat();
            }
            incoming = socket.next() => {
                last_heard = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => handle_text(hub, &session, text.as_bytes(), max_bytes).await,
                    Some(Ok(Message::Binary(_))) => report_error(hub,
                        &session,
                        &ErrorBody::new(
                            ErrorCode::BadCommand,
                            "binary frames are not supported; send commands as JSON text frames",
                        ),
                        None,
                    ),
                    Some(Ok(Message::Close(_))) => break End::ClientClosed,
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break End::from_read_error(&error),
                    None => break End::Gone,
                }
            }
        }
    };
    // Detach first, so the hub writes nothing after the close frame.
    drop(attachment);
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
///   follows) and the input is discarded until the client hangs up.
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
            let read = socket.get_mut();
            let hung_up = async {
                let mut discard = vec![0u8; 4096];
                while matches!(read.read(&mut discard).await, Ok(n) if n > 0) {}
            };
            let _ = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = hung_up => {}
                    _ = writer.flush_queued() => {}
                }
            })
            .await;
        }
    }
    writer.drain_until(deadline).await;
}

/// Counts an error answered on the WebSocket and sends it as an `error` event.
fn report_error(hub: &Hub, session: &Arc<Session>, error: &ErrorBody, client_id: Option<&str>) {
    hub.metrics()
        .error(TransportKind::WebSocket.as_str(), error.code);
    hub.push_error(session, error, client_id);
}

/// Applies the commands in one text frame; each failure becomes an `error` event.
async fn handle_text(hub: &Hub, session: &Arc<Session>, text: &[u8], max_bytes: usize) {
    if text.len() > max_bytes {
        let error = ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "frame of {} bytes is over the {max_bytes}-byte limit",
                text.len()
            ),
        );
        report_error(hub, session, &error, None);
        return;
    }
    let parsed = match parse_commands(text) {
        Ok(parsed) => parsed,
        Err(error) => {
            report_error(hub, session, &error, None);
            return;
        }
    };
    let results = hub.execute(session, parsed.commands).await;
    for (result, client_id) in results.iter().zip(&parsed.client_ids) {
        if let Some(error) = &result.error {
            report_error(hub, session, error, client_id.as_deref());
        }
    }
}
