//! The wire contract shared by every transport: commands a client sends, events it receives,
//! transport names and error codes, and how an event is encoded once and stamped with a
//! per-session `seq`.
//!
//! This module owns the JSON shapes and the validation rules of docs/protocol.md. It must not
//! know about sessions, rooms or HTTP: the hub applies commands, transports frame events.

use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest room name, in characters (`A-Za-z0-9_.-`).
pub const MAX_ROOM_LEN: usize = 64;
/// Longest user name, in characters.
pub const MAX_NAME_LEN: usize = 32;
/// Longest message text, in characters.
pub const MAX_TEXT_LEN: usize = 4000;
/// Longest `client_id`, in characters.
pub const MAX_CLIENT_ID_LEN: usize = 64;
/// Most commands accepted in one batch (one HTTP body or one WebSocket frame).
pub const MAX_COMMANDS_PER_REQUEST: usize = 100;

/// The four ways a client can attach to its session. The names are the wire names used in
/// negotiation, flags, docs and the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportKind {
    /// One WebSocket carrying commands in and events out.
    WebSocket,
    /// A `text/event-stream` response; commands go to `POST /commands`.
    Sse,
    /// A poll held open until an event exists (`wait > 0`).
    LongPolling,
    /// A poll answered at once (`wait = 0`).
    ShortPolling,
}

impl TransportKind {
    /// Every transport, in the client's preferred fallback order.
    pub const ALL: [TransportKind; 4] = [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
        TransportKind::ShortPolling,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::Sse => "sse",
            TransportKind::LongPolling => "long-polling",
            TransportKind::ShortPolling => "short-polling",
        }
    }

    /// Whether the client attaches for one request at a time (polling) rather than a stream.
    pub fn is_poll(self) -> bool {
        matches!(
            self,
            TransportKind::LongPolling | TransportKind::ShortPolling
        )
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!("unknown transport {s:?} (expected websocket, sse, long-polling or short-polling)")
            })
    }
}

/// Why the server closed a transport. Each has a WebSocket close code, and the same name is
/// sent in SSE's final `close` event and in a held long poll's `closed` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Another transport attached to the same session.
    Superseded,
    /// The client fell more than the outbox capacity behind; resume from the last seq.
    SlowConsumer,
    /// The server is shutting down.
    Shutdown,
    /// The session no longer exists (TTL expiry or `DELETE`).
    Expired,
    /// No pong (or any frame) within two heartbeat intervals.
    HeartbeatTimeout,
    /// The session's identity token expired without a `refresh`: the session is over.
    TokenExpired,
}

impl CloseReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Superseded => "superseded",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Expired => "expired",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::TokenExpired => "token_expired",
        }
    }

    /// The WebSocket close code that carries this reason.
    pub fn ws_code(self) -> u16 {
        match self {
            CloseReason::Superseded => 4000,
            CloseReason::SlowConsumer => 4001,
            CloseReason::Shutdown => 4002,
            CloseReason::Expired => 4003,
            CloseReason::HeartbeatTimeout => 4004,
            CloseReason::TokenExpired => 4005,
        }
    }
}

/// Stable error codes. Each is documented in docs/protocol.md; the HTTP status for each is
/// chosen in one place, `error.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown command type, missing or wrong-typed field.
    BadCommand,
    /// A frame or body over `--max-message-bytes`.
    TooLarge,
    /// Room name not 1-64 of `A-Za-z0-9_.-`.
    InvalidRoom,
    /// User name empty, over 32 characters or containing control characters.
    InvalidName,
    /// Message text empty or over 4000 characters.
    InvalidText,
    /// `send`, `typing` or `leave` for a room the session has not joined.
    NotInRoom,
    /// Joining more rooms than a session may be in at once.
    TooManyRooms,
    /// More commands than the session's rate limit allows.
    RateLimited,
    /// No such session (never existed, expired or deleted).
    UnknownSession,
    /// `after`/`Last-Event-ID` names a seq this session never produced.
    InvalidAfter,
    /// An `ack` names a seq this session never produced.
    InvalidAck,
    /// A poll while another poll of the same session is held.
    PollInProgress,
    /// A query parameter or header that cannot be read.
    BadRequest,
    /// No such endpoint.
    NotFound,
    /// The transport is disabled on this server (`--transports`).
    TransportDisabled,
    /// The endpoint exists but not for this method.
    MethodNotAllowed,
    /// A cross-origin request from an origin not in `--allowed-origins`.
    ForbiddenOrigin,
    /// A `Host` that is neither an IP literal, `localhost` nor in `--allowed-hosts`.
    ForbiddenHost,
    /// The server holds its maximum number of sessions.
    ServerFull,
    /// The server is shutting down.
    ShuttingDown,
    /// A request body did not arrive within `--body-timeout`.
    RequestTimeout,
    /// The history store could not take or read messages (its queue is full, a write or read
    /// failed); a `send` that gets it was not broadcast.
    HistoryUnavailable,
    /// A cluster node (`--redis`) cannot reach Redis, or its copy of the log lags too far to
    /// answer now; nothing was done. Retry, on this node or another.
    BackendUnavailable,
    /// Authentication is on and the request carried no token.
    TokenMissing,
    /// The token is not a well-formed JWT, or lacks a required claim (`sub`, `exp`).
    TokenMalformed,
    /// The token's signature does not verify with the server's key.
    TokenBadSignature,
    /// The token is unsigned (`alg: none`).
    TokenUnsigned,
    /// The token is signed with another algorithm than the server's key takes.
    TokenWrongAlgorithm,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token's `nbf` is still ahead.
    TokenNotYetValid,
    /// The token does not allow this: a `join` outside its `rooms`, or a `refresh` for
    /// another user.
    Forbidden,
    /// A fault inside the server; details are logged, never sent.
    Internal,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadCommand => "bad_command",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::InvalidText => "invalid_text",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::InvalidAfter => "invalid_after",
            ErrorCode::InvalidAck => "invalid_ack",
            ErrorCode::PollInProgress => "poll_in_progress",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TransportDisabled => "transport_disabled",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ForbiddenOrigin => "forbidden_origin",
            ErrorCode::ForbiddenHost => "forbidden_host",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::HistoryUnavailable => "history_unavailable",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::TokenMissing => "token_missing",
            ErrorCode::TokenMalformed => "token_malformed",
            ErrorCode::TokenBadSignature => "token_bad_signature",
            ErrorCode::TokenUnsigned => "token_unsigned",
            ErrorCode::TokenWrongAlgorithm => "token_wrong_algorithm",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenNotYetValid => "token_not_yet_valid",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error as the client sees it: a stable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ErrorBody {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong, for people; may change between versions.
    pub message: String,
    /// For `rate_limited`: milliseconds after which a retry can succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ErrorBody {
    /// An error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The same error, telling the client when a retry can succeed (rounded up to a
    /// millisecond).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after_ms = Some(wait.as_micros().div_ceil(1000) as u64);
        self
    }
}

/// A command from a client, already validated. Serializes back to the JSON it was read from
/// (the fuzz checks round-trip it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Join a room (creating it), receive its history and announce presence.
    Join {
        /// Room name.
        room: String,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: String,
    },
    /// Send a message to a joined room.
    Send {
        /// Room name.
        room: String,
        /// Message text, 1-4000 characters.
        text: String,
        /// Chosen by the client; a retry with the same id is not broadcast twice.
        client_id: String,
    },
    /// Tell the other members of a joined room that this user is typing.
    Typing {
        /// Room name.
        room: String,
    },
    /// Ask for a page of a joined room's older messages (scrollback); answered with a
    /// `history_page` event.
    History {
        /// Room name.
        room: String,
        /// Messages with ids below this one; `None`: the newest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// At most this many messages, 1-200; `None`: [`DEFAULT_PAGE`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Extend the session with a new identity token for the same user, before the current
    /// one expires (authentication on).
    Refresh {
        /// The new token (a JWT).
        token: String,
    },
    /// The client has processed every event up to `seq`: the session may forget them (and
    /// the echoes of its sends among them).
    Ack {
        /// The seq acknowledged.
        seq: u64,
    },
}

/// Messages in a `history_page` when the command gives no `limit`.
pub const DEFAULT_PAGE: usize = 50;
/// The largest `limit` a `history` command may ask for.
pub const MAX_PAGE: usize = 200;

const COMMAND_TYPES: [&str; 7] = [
    "join", "leave", "send", "typing", "history", "refresh", "ack",
];

impl Command {
    /// The `client_id` of a `send`.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Command::Send { client_id, .. } => Some(client_id),
            _ => None,
        }
    }

    /// The room the command names (every command but `refresh` and `ack` names one).
    pub fn room(&self) -> Option<&str> {
        match self {
            Command::Join { room }
            | Command::Leave { room }
            | Command::Send { room, .. }
            | Command::Typing { room }
            | Command::History { room, .. } => Some(room),
            Command::Refresh { .. } | Command::Ack { .. } => None,
        }
    }

    /// Reads one command from a JSON value and checks every field.
    pub fn from_value(value: Value) -> Result<Command, ErrorBody> {
        let Some(object) = value.as_object() else {
            return Err(bad_command("a command must be a JSON object"));
        };
        match object.get("type") {
            None => return Err(bad_command("command has no \"type\" field")),
            Some(Value::String(t)) if !COMMAND_TYPES.contains(&t.as_str()) => {
                return Err(bad_command(format!(
                    "unknown command type {t:?} (expected join, leave, send, typing, history, refresh or ack)"
                )))
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(bad_command("\"type\" must be a string")),
        }
        let command: Command =
            serde_json::from_value(value).map_err(|e| bad_command(e.to_string()))?;
        command.validate()?;
        Ok(command)
    }

    fn validate(&self) -> Result<(), ErrorBody> {
        if let Some(room) = self.room() {
            validate_room(room)?;
        }
        if let Command::History { before, limit, .. } = self {
            if *before == Some(0) {
                return Err(bad_command("before must be a message id (1 or more)"));
            }
            if limit.is_some_and(|n| !(1..=MAX_PAGE).contains(&n)) {
                return Err(bad_command(format!("limit must be 1-{MAX_PAGE}")));
            }
        }
        if let Command::Send {
            text, client_id, ..
        } = self
        {
            let chars = text.chars().count();
            if chars == 0 || chars > MAX_TEXT_LEN {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidText,
                    format!("text must be 1-{MAX_TEXT_LEN} characters, got {chars}"),
                ));
            }
            let id_chars = client_id.chars().count();
            if id_chars == 0
                || id_chars > MAX_CLIENT_ID_LEN
                || client_id.chars().any(char::is_control)
            {
                return Err(bad_command(format!(
                    "client_id must be 1-{MAX_CLIENT_ID_LEN} characters with no control characters"
                )));
            }
        }
        Ok(())
    }
}

fn bad_command(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadCommand, message)
}

/// The commands of one frame or body, each validated, with the `client_id` each carried.
#[derive(Debug)]
pub struct ParsedCommands {
    /// Each command, or why it was refused.
    pub commands: Vec<Result<Command, ErrorBody>>,
    /// The `client_id` each command carried, if it was a well-formed one (1-64 characters, no
    /// control characters), whatever else was wrong with the command: an `error` event for a
    /// refused `send` names it, so the client knows which send failed.
    pub client_ids: Vec<Option<String>>,
}

/// Parses a frame or body holding one command object or an array of them. The outer error
/// (malformed JSON, empty or oversized batch) rejects the whole input; each inner result is
/// one command's validation.
pub fn parse_commands(input: &[u8]) -> Result<ParsedCommands, ErrorBody> {
    let value: Value =
        serde_json::from_slice(input).map_err(|e| bad_command(format!("malformed JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(bad_command("empty command batch"));
            }
            if items.len() > MAX_COMMANDS_PER_REQUEST {
                return Err(bad_command(format!(
                    "a batch holds at most {MAX_COMMANDS_PER_REQUEST} commands, got {}",
                    items.len()
                )));
            }
            items
        }
        other => vec![other],
    };
    let client_ids = items.iter().map(claimed_client_id).collect();
    Ok(ParsedCommands {
        commands: items.into_iter().map(Command::from_value).collect(),
        client_ids,
    })
}

/// The `client_id` a command object carries, if it is a well-formed one.
fn claimed_client_id(item: &Value) -> Option<String> {
    let id = item.get("client_id")?.as_str()?;
    let chars = id.chars().count();
    let well_formed = (1..=MAX_CLIENT_ID_LEN).contains(&chars) && !id.chars().any(char::is_control);
    well_formed.then(|| id.to_owned())
}

/// Checks a room name: 1-64 of `A-Za-z0-9_.-`.
pub fn validate_room(room: &str) -> Result<(), ErrorBody> {
    let ok = !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::InvalidRoom,
            format!("room names are 1-{MAX_ROOM_LEN} of A-Za-z0-9_.- (got {room:?})"),
        ))
    }
}

/// Checks a user name: 1-32 characters, none of them control characters.
pub fn validate_name(name: &str) -> Result<(), ErrorBody> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidName,
            format!("names are 1-{MAX_NAME_LEN} characters with no control characters"),
        ));
    }
    Ok(())
}

/// A chat message as stored in a room's history and carried by `message` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Room it was sent to.
    pub room: String,
    /// Strictly increasing message id (server-wide, so also within each room).
    pub id: u64,
    /// Sender's name.
    pub from: String,
    /// The text, as sent.
    pub text: String,
    /// Server clock, integer microseconds since the Unix epoch.
    pub ts: u64,
    /// The sender's `client_id`.
    pub client_id: String,
}

/// An event, before it is given a seq. Serialized once per broadcast.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A chat message.
    Message(&'a Message),
    /// A room's members, sent to a session right after the room's `history` (on join and
    /// after a `reset`), and to every member when a large room becomes small again.
    Presence {
        /// The room.
        room: &'a str,
        /// Members online.
        count: usize,
        /// Their names: everyone in join order when `complete`, else a sample in no order.
        online: Vec<&'a str>,
        /// Whether `online` names everyone (rooms up to the presence list limit).
        complete: bool,
    },
    /// Who joined and left a room since the previous `presence_diff` (or `presence`): one
    /// event per room per presence interval, the same for every member.
    PresenceDiff {
        /// The room.
        room: &'a str,
        /// Members online after the change.
        count: usize,
        /// Names that joined, in order (apply before `left`).
        joined: Vec<&'a str>,
        /// Names that left, in order.
        left: Vec<&'a str>,
        /// Whether `joined` and `left` name every change; in a large room they are a sample.
        complete: bool,
    },
    /// Who typed in a room during the last presence interval (a bounded list).
    Typing {
        /// The room.
        room: &'a str,
        /// Names of the typers, at most a few.
        users: Vec<&'a str>,
    },
    /// The last messages of a room, sent to a session when it joins or after a reset.
    History {
        /// The room.
        room: &'a str,
        /// Oldest first.
        messages: Vec<&'a Message>,
    },
    /// A page of a room's older messages, answering a `history` command: the client adds
    /// them before what it has (unlike `history`, which replaces its view).
    HistoryPage {
        /// The room.
        room: &'a str,
        /// The command's `before` (`None`: the page ends with the newest message).
        before: Option<u64>,
        /// Oldest first.
        messages: Vec<&'a Message>,
        /// Whether the room has messages older than the first of this page.
        more: bool,
    },
    /// A command sent over the WebSocket failed.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable message.
        message: &'a str,
        /// For a failed `send`, its `client_id`, so the client knows which send to retry.
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        /// For `rate_limited`: milliseconds after which a retry can succeed.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// The resume point was lost; the client must replace its view (fresh histories follow).
    Reset {
        /// Why.
        reason: &'a str,
    },
}

impl Event<'_> {
    /// The `type` field, also SSE's `event:` line.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Message(_) => "message",
            Event::Presence { .. } => "presence",
            Event::PresenceDiff { .. } => "presence_diff",
            Event::Typing { .. } => "typing",
            Event::History { .. } => "history",
            Event::HistoryPage { .. } => "history_page",
            Event::Error { .. } => "error",
            Event::Reset { .. } => "reset",
        }
    }

    /// Serializes the event once. The result is shared by every recipient.
    pub fn encode(&self) -> EncodedEvent {
        let json =
            escape_line_separators(serde_json::to_vec(self).expect("events serialize infallibly"));
        // `{"type":...}` -> `"type":...}`: the per-session `{"seq":N,` goes in front.
        debug_assert!(json.starts_with(b"{\"type\":"));
        let mut body = Bytes::from(json);
        let _ = body.split_to(1);
        EncodedEvent(Arc::new(Encoded {
            type_name: self.type_name(),
            body,
            created: std::time::Instant::now(),
        }))
    }
}

/// Writes U+2028, U+2029 and U+0085 as `\u` escapes (JSON allows them raw, but clients that
/// split lines on them, Python's `str.splitlines` for one, would cut an SSE event in two).
/// They can only occur inside JSON strings, where the escape means the same character.
fn escape_line_separators(json: Vec<u8>) -> Vec<u8> {
    const SEPARATORS: [(&[u8], &[u8]); 3] = [
        (b"\xe2\x80\xa8", b"\\u2028"),
        (b"\xe2\x80\xa9", b"\\u2029"),
        (b"\xc2\x85", b"\\u0085"),
    ];
    if !json.iter().any(|&b| b == 0xe2 || b == 0xc2) {
        return json;
    }
    let mut out = Vec::with_capacity(json.len() + 16);
    let mut rest = &json[..];
    'bytes: while let Some((&first, tail)) = rest.split_first() {
        for (raw, escaped) in SEPARATORS {
            if let Some(after) = rest.strip_prefix(raw) {
                out.extend_from_slice(escaped);
                rest = after;
                continue 'bytes;
            }
        }
        out.push(first);
        rest = tail;
    }
    out
}

/// An event serialized once, without its seq: the JSON object with its opening brace cut off.
/// Cloning it is a reference count, and a replay buffer holds one pointer per event, so an
/// event a room sends to ten thousand members costs each of them eight bytes.
#[derive(Debug, Clone)]
pub struct EncodedEvent(Arc<Encoded>);

/// What an [`EncodedEvent`] shares.
#[derive(Debug)]
pub struct Encoded {
    /// The event's `type`.
    pub type_name: &'static str,
    /// `"type":...}`.
    pub body: Bytes,
    /// When it was encoded: the start of the delivery latency in `/metrics`.
    pub created: std::time::Instant,
}

impl std::ops::Deref for EncodedEvent {
    type Target = Encoded;

    fn deref(&self) -> &Encoded {
        &self.0
    }
}

/// Two encodings are equal when they carry the same event, whenever they were made.
impl PartialEq for EncodedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.type_name == other.type_name && self.body == other.body
    }
}

impl Eq for EncodedEvent {}

impl EncodedEvent {
    /// Whether both are this one encoding (not merely the same bytes).
    pub fn same_as(&self, other: &EncodedEvent) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Writes the complete JSON object for one recipient: `{"seq":N,` + the shared body.
    pub fn write_json(&self, seq: u64, out: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"{\"seq\":");
        out.extend_from_slice(digits.format(seq).as_bytes());
        out.push(b',');
        out.extend_from_slice(&self.body);
    }

    /// The same event sent again later (a cached `history` or `presence`): shares the bytes,
    /// with a creation time of now, so delivery latency is measured from this send.
    pub fn reissue(&self) -> EncodedEvent {
        EncodedEvent(Arc::new(Encoded {
            type_name: self.type_name,
            body: self.body.clone(),
            created: std::time::Instant::now(),
        }))
    }

    /// An event encoded on another node (a snapshot's): `body` as [`Encoded::body`] holds it,
    /// `"type":"NAME",...}`. `None` unless it starts with an event type this server knows.
    pub fn from_body(body: Bytes) -> Option<EncodedEvent> {
        const TYPES: [&str; 8] = [
            "message",
            "presence",
            "presence_diff",
            "typing",
            "history",
            "history_page",
            "error",
            "reset",
        ];
        let rest = body.strip_prefix(b"\"type\":\"")?;
        let type_name = TYPES.into_iter().find(|name| {
            rest.strip_prefix(name.as_bytes())
                .is_some_and(|after| after.first() == Some(&b'"'))
        })?;
        Some(EncodedEvent(Arc::new(Encoded {
            type_name,
            body,
            created: std::time::Instant::now(),
        })))
    }

    /// The complete JSON object for one recipient, as a string.
    pub fn to_json(&self, seq: u64) -> String {
        let mut out = Vec::with_capacity(self.body.len() + 24);
        self.write_json(seq, &mut out);
        String::from_utf8(out).expect("JSON from serde_json is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_body_reads_back_with_its_type_and_anything_else_is_refused() {
        let typing = Event::Typing {
            room: "lobby",
            users: vec!["ann"],
        };
        let diff = Event::PresenceDiff {
            room: "lobby",
            count: 1,
            joined: vec!["ann"],
            left: vec![],
            complete: true,
        };
        for event in [typing, diff] {
            let encoded = event.encode();
            let back = EncodedEvent::from_body(encoded.body.clone()).expect("a known type");
            assert_eq!(back, encoded);
            assert_eq!(back.type_name, event.type_name());
        }
        for body in ["\"type\":\"presences\"}", "\"type\":\"nope\"}", "{}", ""] {
            assert!(
                EncodedEvent::from_body(Bytes::from(body)).is_none(),
                "{body}"
            );
        }
    }

    #[test]
    fn encode_splices_seq_in_front() {
        let event = Event::Typing {
            room: "lobby",
            users: vec!["ann"],
        };
        let json = event.encode().to_json(42);
        assert_eq!(
            json,
            r#"{"seq":42,"type":"typing","room":"lobby","users":["ann"]}"#
        );
    }

    #[test]
    fn line_separators_are_escaped_in_event_json() {
        let message = Message {
            room: "r".into(),
            id: 1,
            from: "ann".into(),
            text: "a\u{2028}b\u{2029}c\u{85}d é ✓".into(),
            ts: 0,
            client_id: "c".into(),
        };
        let json = Event::Message(&message).encode().to_json(1);
        assert!(json.contains(r"a\u2028b\u2029c\u0085d é ✓"), "{json}");
        assert!(!json.contains('\u{2028}') && !json.contains('\u{85}'));
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["text"], message.text.as_str());
    }

    #[test]
    fn a_refused_command_keeps_its_well_formed_client_id() {
        let parsed = parse_commands(
            br#"[{"type":"send","room":"bad room","text":"hi","client_id":"c1"},
                 {"type":"send","room":"r","text":"","client_id":"c2"},
                 {"type":"send","room":"r","text":"hi","client_id":7},
                 {"type":"join","room":"r"}]"#,
        )
        .unwrap();
        assert_eq!(
            parsed.client_ids,
            [Some("c1".to_owned()), Some("c2".to_owned()), None, None]
        );
        assert_eq!(
            parsed.commands[0].as_ref().unwrap_err().code,
            ErrorCode::InvalidRoom
        );
        assert_eq!(
            parsed.commands[1].as_ref().unwrap_err().code,
            ErrorCode::InvalidText
        );
    }

    #[test]
    fn parse_rejects_bad_input_with_bad_command() {
        for input in [&b"{"[..], b"[]", b"3", b"{\"room\":\"a\"}", b"{\"type\":7}"] {
            let result = parse_commands(input).map(|mut p| p.commands.remove(0));
            let err = match result {
                Err(e) | Ok(Err(e)) => e,
                Ok(Ok(c)) => panic!("accepted {c:?}"),
            };
            assert_eq!(err.code, ErrorCode::BadCommand, "{input:?}");
        }
    }

    #[test]
    fn validates_fields() {
        let one = |s: &str| parse_commands(s.as_bytes()).unwrap().commands.remove(0);
        assert_eq!(
            one(r#"{"type":"join","room":"bad room"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRoom
        );
        assert_eq!(
            one(r#"{"type":"send","room":"a","text":"","client_id":"c"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidText
        );
        assert_eq!(
            one(r#"{"type":"send","room":"a","text":"hi"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadCommand
        );
        assert!(one(r#"{"type":"send","room":"a.b-c_1","text":"hi","client_id":"c"}"#).is_ok());
        assert!(validate_name("ann").is_ok());
        assert!(validate_name("a\u{7}").is_err());
        assert!(validate_name(&"x".repeat(33)).is_err());
    }
}
