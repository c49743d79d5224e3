//! WebSocket: `GET /v1/sessions/{id}/ws?after=N` upgrades; text frames carry commands in
//! (one object or an array) and events out (one event per frame).
//!
//! Two tasks per socket. The writer runs a `biased` select over: the hub's close signal, the
//! heartbeat, the reader's end and the session's next events (fed frame by frame and flushed
//! once per batch). The reader reads the client's frames and applies their commands; it is a
//! task of its own so that a delivery does not poll the socket for reading (with
//! tungstenite that zero-fills the read buffer on every attempt: ~17 % of the server's CPU
//! per delivery at 1000 subscribers, see docs/benchmarks.md). A write that
//! blocks is abandoned when the hub closes the transport (`slow_consumer`, `superseded`,
//! `shutdown`) or when it outlasts two heartbeats. A bad command gets an `error` event; the
//! socket stays open. The hot loop is generic over `Sink + Stream` so it runs without a socket
//! in unit tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;

use crate::hub::{Attachment, Delivery, Hub, Session};
use crate::protocol::{parse_commands, CloseReason, Command, ErrorBody, ErrorCode};

use super::{full, Body, MAX_BATCH};

/// Frames larger than this close the socket (1009) instead of getting a `too_large` event,
/// so a hostile client cannot make the server buffer without bound.
pub fn hard_frame_limit(max_message_bytes: usize) -> usize {
    (max_message_bytes * 4).max(1 << 20)
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
    hub: &Hub,
    tracker: &TaskTracker,
    connections: &Arc<Semaphore>,
    session_id: &str,
    after: u64,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, ErrorBody> {
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
    let permit = connections.clone().try_acquire_owned().map_err(|_| {
        ErrorBody::new(
            ErrorCode::ServerFull,
            "the server holds its maximum number of connections; try again later",
        )
    })?;
    let attachment = hub.attach(session_id, crate::protocol::TransportKind::WebSocket, after)?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    let config = hub.config();
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.ws_read_buffer)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(hard_frame_limit(config.max_message_bytes)))
        .max_frame_size(Some(hard_frame_limit(config.max_message_bytes)));
    let hub = hub.clone();
    tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                serve(socket, attachment, &hub).await;
                drop(permit);
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
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
    /// The hub closed the transport: send the close code and reason.
    Closed(CloseReason),
    /// A frame over the hard limit: close with 1009.
    TooBig,
    /// The client went away or the socket failed: nothing to send.
    Gone,
}

/// Serves one upgraded socket until the client leaves or the hub closes the transport.
pub async fn serve<S>(socket: S, mut attachment: Attachment, hub: &Hub)
where
    S: Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Unpin,
    S: Send + 'static,
{
    let heartbeat = hub.config().heartbeat;
    let mut close = attachment.close_signal();
    let mut close_while_writing = attachment.close_signal();
    let (mut sink, stream) = socket.split();
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let heard = Arc::new(LastHeard::new());
    // The client's frames are read by a task of their own: polled in the select below, the
    // socket would be read (and tungstenite's read buffer zero-filled) after every delivery.
    let mut reader = AbortOnDrop(tokio::spawn(read_commands(
        stream,
        hub.clone(),
        attachment.session().clone(),
        heard.clone(),
    )));

    let end = loop {
        // A close from the hub first, then the heartbeat, then the client leaving, then
        // delivery: a long burst of events must not starve pings.
        tokio::select! {
            biased;
            reason = async { close.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                break End::Closed(reason.unwrap_or(CloseReason::Expired));
            }
            _ = ping.tick() => {
                if heard.elapsed() > heartbeat * 2 {
                    break End::Closed(CloseReason::HeartbeatTimeout);
                }
                let ping = sink.send(Message::Ping(Default::default()));
                if let Err(end) = write_unless_closed(ping, &mut close_while_writing, heartbeat * 2).await {
                    break end;
                }
            }
            ended = &mut reader.0 => break ended.unwrap_or(End::Gone),
            delivery = attachment.next(MAX_BATCH) => match delivery {
                Delivery::Closed(reason) => break End::Closed(reason),
                Delivery::Events(events) => {
                    let mut bytes = 0;
                    let write = async {
                        for (seq, event) in &events {
                            let json = event.to_json(*seq);
                            bytes += frame_header_len(json.len()) + json.len();
                            sink.feed(Message::text(json)).await?;
                        }
                        sink.flush().await
                    };
                    if let Err(end) = write_unless_closed(write, &mut close_while_writing, heartbeat * 2).await {
                        break end;
                    }
                    let metrics = attachment.metrics();
                    metrics.delivered(attachment.kind(), events.iter().map(|(_, e)| e), bytes);
                }
            },
        }
    };
    drop(attachment);
    reader.0.abort();
    let frame = match end {
        End::Closed(reason) => Some(CloseFrame {
            code: CloseCode::from(reason.ws_code()),
            reason: reason.as_str().into(),
        }),
        End::TooBig => Some(CloseFrame {
            code: CloseCode::Size,
            reason: ErrorCode::TooLarge.as_str().into(),
        }),
        End::Gone => None,
    };
    if let Some(frame) = frame {
        // The client may be the reason we are closing: never wait on it for long.
        let _ = timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
    let _ = timeout(Duration::from_secs(1), sink.close()).await;
}

/// When the client was last heard from, as milliseconds since the socket opened.
struct LastHeard {
    opened: Instant,
    millis: AtomicU64,
}

impl LastHeard {
    fn new() -> Self {
        LastHeard {
            opened: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    fn heard(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.millis.store(now, Ordering::Relaxed);
    }

    fn elapsed(&self) -> Duration {
        let last = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// Aborts the reader task when the socket's task ends, however it ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the client's frames and applies their commands until the client leaves.
async fn read_commands<S>(
    mut stream: S,
    hub: Hub,
    session: Arc<Session>,
    heard: Arc<LastHeard>,
) -> End
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let max_bytes = hub.config().max_message_bytes;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                heard.heard();
                handle_text(&hub, &session, text.as_bytes(), max_bytes);
            }
            Some(Ok(Message::Binary(_))) => {
                heard.heard();
                hub.push_error(
                    &session,
                    &ErrorBody::new(
                        ErrorCode::BadCommand,
                        "binary frames are not supported; send commands as JSON text frames",
                    ),
                    None,
                );
            }
            Some(Ok(Message::Close(_))) | None => return End::Gone,
            Some(Ok(_)) => heard.heard(),
            Some(Err(WsError::Capacity(_))) => return End::TooBig,
            Some(Err(_)) => return End::Gone,
        }
    }
}

/// Bytes of an unmasked (server-to-client) frame header for a payload of `len` bytes.
fn frame_header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Runs a write unless the hub closes the transport first or it outlasts `limit` (a client
/// that stopped reading). `Ok` when the write finished or the hub closed the transport (the
/// loop then reads the reason from the attachment).
async fn write_unless_closed(
    write: impl std::future::Future<Output = Result<(), WsError>>,
    close: &mut tokio::sync::watch::Receiver<Option<CloseReason>>,
    limit: Duration,
) -> Result<(), End> {
    tokio::select! {
        biased;
        _ = close.wait_for(Option::is_some) => Ok(()),
        written = timeout(limit, write) => match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Closed(CloseReason::HeartbeatTimeout)),
        },
    }
}

/// Applies the commands in one text frame; each failure becomes an `error` event.
fn handle_text(
    hub: &Hub,
    session: &std::sync::Arc<crate::hub::Session>,
    text: &[u8],
    max_bytes: usize,
) {
    if text.len() > max_bytes {
        let error = ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "frame of {} bytes is over the {max_bytes}-byte limit",
                text.len()
            ),
        );
        hub.push_error(session, &error, None);
        return;
    }
    let commands = match parse_commands(text) {
        Ok(commands) => commands,
        Err(error) => {
            hub.push_error(session, &error, None);
            return;
        }
    };
    let client_ids: Vec<Option<String>> = commands
        .iter()
        .map(|c| {
            c.as_ref()
                .ok()
                .and_then(Command::client_id)
                .map(str::to_owned)
        })
        .collect();
    let results = hub.execute(session, commands);
    for (result, client_id) in results.iter().zip(&client_ids) {
        if let Some(error) = &result.error {
            hub.push_error(session, error, client_id.as_deref());
        }
    }
}
