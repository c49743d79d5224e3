//! The session core: sessions, rooms and the commands that change them.
//!
//! [`Hub`] is a cheap handle (an `Arc` inside) shared by every transport. It owns every piece
//! of chat state; transports only attach to a session, read its events (or, write-through,
//! are handed them as they are pushed) and hand it commands. It knows nothing of HTTP, sockets
//! or framing.
//!
//! Locking: one chat mutex orders all room changes and broadcasts, so every member sees a
//! room's events in the same order; each session has its own mutex for its replay buffer.
//! The order is always chat, then the session registry, then a session. No lock is held
//! across an `.await`.

mod room;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

pub use room::Room;
pub use session::{
    Attachment, Delivery, DirectSink, Gap, OutboxFull, ReplayBuffer, SentMessages, Session,
    TokenBucket,
};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{
    validate_name, CloseReason, Command, ErrorBody, ErrorCode, Event, Message, PresenceAction,
    TransportKind,
};
use session::{AttachedSlot, SessionState};

/// Reason carried by the `reset` event when the resume point is older than the replay buffer.
pub const RESET_REPLAY_WINDOW: &str = "replay_window_exceeded";

/// Handle to the session core. Clone it freely.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    metrics: Metrics,
    chat: Mutex<Chat>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_attachment: AtomicU64,
    shutting_down: AtomicBool,
}

#[derive(Debug, Default)]
struct Chat {
    rooms: HashMap<String, Room>,
    /// Message ids are server-wide, so they keep increasing in a room that was dropped and
    /// created again.
    last_message_id: u64,
    tick: u64,
}

/// A session as `GET /v1/sessions/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionInfo {
    /// Session id.
    pub session: String,
    /// User name.
    pub name: String,
    /// Seq of the newest event (0 before the first).
    pub last_seq: u64,
    /// The transport attached now, if any.
    pub attached: Option<&'static str>,
    /// Rooms joined, in join order.
    pub rooms: Vec<String>,
}

/// The outcome of one command, as listed in an HTTP `/commands` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandResult {
    /// Whether the command was applied.
    pub ok: bool,
    /// For `send`: the message id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// For `send`: whether this `client_id` was already sent (the original was echoed again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    /// Why the command failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl CommandResult {
    fn done() -> Self {
        CommandResult {
            ok: true,
            id: None,
            duplicate: None,
            error: None,
        }
    }

    fn sent(id: u64, duplicate: bool) -> Self {
        CommandResult {
            id: Some(id),
            duplicate: Some(duplicate),
            ..CommandResult::done()
        }
    }

    fn failed(error: ErrorBody) -> Self {
        CommandResult {
            ok: false,
            error: Some(error),
            ..CommandResult::done()
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // State is changed in small consistent steps; a panic in one request must not wedge all.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn unknown_session(id: &str) -> ErrorBody {
    let shown: String = id.chars().take(40).collect();
    ErrorBody::new(
        ErrorCode::UnknownSession,
        format!("no session {shown:?} (it may have expired)"),
    )
}

impl Hub {
    /// A hub with no sessions. Call [`Hub::spawn_reaper`] to expire idle sessions.
    pub fn new(config: Config) -> Self {
        Hub {
            inner: Arc::new(Inner {
                config,
                metrics: Metrics::new(),
                chat: Mutex::new(Chat::default()),
                sessions: Mutex::new(HashMap::new()),
                next_attachment: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// The settings this hub was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The server's metrics: the hub counts attachments, closes and commands; transports
    /// count what they write.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    /// Creates a session for a user name.
    pub fn create_session(&self, name: &str) -> Result<Arc<Session>, ErrorBody> {
        self.refuse_if_shutting_down()?;
        validate_name(name)?;
        let mut sessions = lock(&self.inner.sessions);
        if sessions.len() >= self.inner.config.max_sessions {
            return Err(ErrorBody::new(
                ErrorCode::ServerFull,
                "the server holds its maximum number of sessions; try again later",
            ));
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let session = Arc::new(Session::new(
            id.clone(),
            name.to_owned(),
            &self.inner.config,
        ));
        sessions.insert(id, session.clone());
        tracing::debug!(session = %session.id, name, "session created");
        Ok(session)
    }

    /// Looks a session up by id.
    pub fn session(&self, id: &str) -> Result<Arc<Session>, ErrorBody> {
        lock(&self.inner.sessions)
            .get(id)
            .cloned()
            .ok_or_else(|| unknown_session(id))
    }

    fn refuse_if_shutting_down(&self) -> Result<(), ErrorBody> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            Err(ErrorBody::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ))
        } else {
            Ok(())
        }
    }

    /// Attaches a transport to a session, to receive every event with seq > `after`.
    ///
    /// The transport attached before is closed with `superseded`, except that a poll while
    /// another poll is held is refused with `poll_in_progress`. If `after` is older than the
    /// replay buffer, the session gets a `reset` and a fresh `history` per room, and the new
    /// transport starts from the reset.
    pub fn attach(
        &self,
        session_id: &str,
        kind: TransportKind,
        after: u64,
    ) -> Result<Attachment, ErrorBody> {
        self.refuse_if_shutting_down()?;
        let session = self.session(session_id)?;
        let gap = session.lock().replay.check_resume(after);
        // A reset needs the rooms' histories: take the chat lock first, as everywhere.
        let chat = (gap == Err(Gap::TooOld)).then(|| lock(&self.inner.chat));
        let mut state = session.lock();
        if state.ended {
            return Err(unknown_session(session_id));
        }
        if kind.is_poll() && state.attached.as_ref().is_some_and(|s| s.kind.is_poll()) {
            return Err(ErrorBody::new(
                ErrorCode::PollInProgress,
                "another poll of this session is in progress; one poll at a time",
            ));
        }
        let gap = state.replay.check_resume(after);
        if gap == Err(Gap::Unknown) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidAfter,
                format!(
                    "after={after} but this session's last event is {}",
                    state.replay.last_seq()
                ),
            ));
        }
        if gap == Err(Gap::TooOld) && chat.is_none() {
            // The buffer moved on between the two checks: try again with the chat lock.
            drop(state);
            return self.attach(session_id, kind, after);
        }
        // Closed before a reset is pushed, so the reset and its history go to the new
        // transport only, never to the one it supersedes.
        state.close_attached(CloseReason::Superseded);
        let cursor = match &chat {
            Some(chat) if gap.is_err() => self.push_reset(chat, &session, &mut state),
            _ => after,
        };
        drop(chat);
        let id = self.inner.next_attachment.fetch_add(1, Ordering::Relaxed);
        let (close_tx, close_rx) = watch::channel(None);
        state.attached = Some(AttachedSlot::new(
            id,
            kind,
            state.replay.last_seq().max(cursor),
            close_tx,
            self.inner.metrics.clone(),
        ));
        state.last_transport = Some(kind);
        drop(state);
        session.wake();
        tracing::debug!(session = %session.id, transport = %kind, after, "attached");
        Ok(Attachment::new(
            session,
            id,
            kind,
            cursor,
            close_rx,
            self.inner.metrics.clone(),
        ))
    }

    /// Pushes `reset` and a `history` per joined room; returns the seq just before the reset.
    fn push_reset(&self, chat: &Chat, session: &Session, state: &mut SessionState) -> u64 {
        let reset = Event::Reset {
            reason: RESET_REPLAY_WINDOW,
        }
        .encode();
        let reset_seq = state.push(reset, session.outbox_capacity);
        for name in state.rooms.clone() {
            if let Some(room) = chat.rooms.get(&name) {
                state.push(room.history_event(&name), session.outbox_capacity);
            }
        }
        reset_seq - 1
    }

    /// Applies commands in order, each counting toward the session's rate limit.
    pub fn execute(
        &self,
        session: &Arc<Session>,
        commands: Vec<Result<Command, ErrorBody>>,
    ) -> Vec<CommandResult> {
        let last_transport = session.lock().last_transport;
        self.inner.metrics.commands(last_transport, commands.len());
        commands
            .into_iter()
            .map(|command| {
                self.admit(session)
                    .and(command)
                    .and_then(|command| self.apply(session, command))
                    .unwrap_or_else(CommandResult::failed)
            })
            .collect()
    }

    /// Checks the session is live and takes a rate-limit token.
    fn admit(&self, session: &Session) -> Result<(), ErrorBody> {
        let mut state = session.lock();
        if state.ended {
            return Err(unknown_session(&session.id));
        }
        if !state.limiter.try_take() {
            let config = &self.inner.config;
            return Err(ErrorBody::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} commands/s (burst {}); slow down and retry",
                    config.rate_limit_per_sec, config.rate_limit_burst
                ),
            ));
        }
        Ok(())
    }

    fn apply(&self, session: &Arc<Session>, command: Command) -> Result<CommandResult, ErrorBody> {
        let config = &self.inner.config;
        let mut chat = lock(&self.inner.chat);
        // Checked again under the chat lock: `end` takes it too, so a session that ended
        // after `admit` is never put back into a room.
        let (ended, joined) = {
            let state = session.lock();
            (state.ended, state.rooms.iter().any(|r| r == command.room()))
        };
        if ended {
            return Err(unknown_session(&session.id));
        }
        chat.tick += 1;
        let tick = chat.tick;
        let room_name = command.room().to_owned();
        if !joined && !matches!(command, Command::Join { .. }) {
            return Err(ErrorBody::new(
                ErrorCode::NotInRoom,
                format!("not in room {room_name:?}; join it first"),
            ));
        }
        match command {
            Command::Join { room } if joined => {
                let history = chat.rooms.get(&room).map(|r| r.history_event(&room));
                if let Some(history) = history {
                    session.push(history);
                }
            }
            Command::Join { room } => {
                if session.lock().rooms.len() >= config.max_rooms_per_session {
                    return Err(ErrorBody::new(
                        ErrorCode::TooManyRooms,
                        format!(
                            "a session may be in at most {} rooms",
                            config.max_rooms_per_session
                        ),
                    ));
                }
                if !chat.rooms.contains_key(&room) {
                    chat.make_room_for_one_more(config.max_rooms)?;
                }
                let entry = chat.rooms.entry(room.clone()).or_default();
                entry.last_used = tick;
                entry.add(session.clone());
                session.lock().rooms.push(room.clone());
                session.push(entry.history_event(&room));
                let presence = entry.presence_event(&room, &session.name, PresenceAction::Joined);
                entry.broadcast(&presence, None);
            }
            Command::Leave { room } => {
                chat.leave(session, &room, true);
            }
            Command::Send {
                room,
                text,
                client_id,
            } => {
                let earlier = session.lock().sent.get(&client_id).cloned();
                if let Some((id, echo)) = earlier {
                    session.push(echo);
                    return Ok(CommandResult::sent(id, true));
                }
                chat.last_message_id += 1;
                let id = chat.last_message_id;
                let message = Arc::new(Message {
                    room: room.clone(),
                    id,
                    from: session.name.clone(),
                    text,
                    ts: now_micros(),
                    client_id,
                });
                let event = Event::Message(&message).encode();
                let entry = chat.rooms.get_mut(&room).expect("a joined room exists");
                entry.last_used = tick;
                entry.broadcast(&event, None);
                entry.record(message.clone(), config.history_len);
                session
                    .lock()
                    .sent
                    .insert(&message.client_id, id, event, config.dedup_window);
                return Ok(CommandResult::sent(id, false));
            }
            Command::Typing { room } => {
                let event = Event::Typing {
                    room: &room,
                    user: &session.name,
                }
                .encode();
                if let Some(entry) = chat.rooms.get(&room) {
                    entry.broadcast(&event, Some(&session.id));
                }
            }
        }
        Ok(CommandResult::done())
    }

    /// Sends an `error` event to one session (for commands that arrived on its WebSocket);
    /// `client_id` names the failed `send`, if it was one.
    pub fn push_error(&self, session: &Session, error: &ErrorBody, client_id: Option<&str>) {
        self.inner
            .metrics
            .error(TransportKind::WebSocket.as_str(), error.code);
        session.push(
            Event::Error {
                code: error.code,
                message: &error.message,
                client_id,
            }
            .encode(),
        );
    }

    /// Describes a session: its seq, attached transport and rooms.
    pub fn describe(&self, session_id: &str) -> Result<SessionInfo, ErrorBody> {
        let session = self.session(session_id)?;
        let state = session.lock();
        Ok(SessionInfo {
            session: session.id.clone(),
            name: session.name.clone(),
            last_seq: state.replay.last_seq(),
            attached: state.attached.as_ref().map(|slot| slot.kind.as_str()),
            rooms: state.rooms.clone(),
        })
    }

    /// Closes the transport attached to a session, telling it `reason`; the session lives on
    /// and its client resumes from its last seq. Returns whether a transport was attached.
    pub fn disconnect(&self, session_id: &str, reason: CloseReason) -> Result<bool, ErrorBody> {
        let session = self.session(session_id)?;
        let mut state = session.lock();
        let attached = state.attached.is_some();
        state.close_attached(reason);
        Ok(attached)
    }

    /// Ends a session now (`DELETE`): it leaves its rooms and its transport closes `expired`.
    pub fn end_session(&self, session_id: &str) -> Result<(), ErrorBody> {
        let session = self.session(session_id)?;
        self.end(&session, false);
        Ok(())
    }

    /// Ends a session. With `only_if_idle`, only if it is still unattached past its TTL.
    fn end(&self, session: &Arc<Session>, only_if_idle: bool) {
        let mut chat = lock(&self.inner.chat);
        let rooms = {
            let mut state = session.lock();
            let idle = state.attached.is_none()
                && state.last_seen.elapsed() >= self.inner.config.session_ttl;
            if state.ended || (only_if_idle && !idle) {
                return;
            }
            state.ended = true;
            state.close_attached(CloseReason::Expired);
            state.rooms.clone()
        };
        for room in rooms {
            chat.leave(session, &room, false);
        }
        lock(&self.inner.sessions).remove(&session.id);
        tracing::debug!(session = %session.id, only_if_idle, "session ended");
    }

    /// Ends every session that has had no transport for its TTL; returns how many.
    pub fn expire_idle(&self) -> usize {
        let ttl = self.inner.config.session_ttl;
        let idle: Vec<Arc<Session>> = lock(&self.inner.sessions)
            .values()
            .filter(|s| {
                let state = s.lock();
                state.attached.is_none() && state.last_seen.elapsed() >= ttl
            })
            .cloned()
            .collect();
        for session in &idle {
            self.end(session, true);
        }
        idle.len()
    }

    /// Expires idle sessions in the background until [`Hub::shutdown`].
    pub fn spawn_reaper(&self) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        let period = (hub.inner.config.session_ttl / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !hub.inner.shutting_down.load(Ordering::Acquire) {
                tick.tick().await;
                let expired = hub.expire_idle();
                if expired > 0 {
                    tracing::info!(expired, "expired idle sessions");
                }
            }
        })
    }

    /// Refuses new sessions and transports and closes every attached transport with
    /// `shutdown`.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let sessions: Vec<Arc<Session>> = lock(&self.inner.sessions).values().cloned().collect();
        for session in sessions {
            session.lock().close_attached(CloseReason::Shutdown);
        }
    }
}

impl Chat {
    /// Removes `session` from `room` and tells the room. `tell_leaver` also sends the
    /// `presence left` to the leaver itself (an explicit leave, as opposed to expiry).
    fn leave(&mut self, session: &Arc<Session>, room: &str, tell_leaver: bool) {
        self.tick += 1;
        let tick = self.tick;
        session.lock().rooms.retain(|r| r != room);
        let Some(entry) = self.rooms.get_mut(room) else {
            return;
        };
        if !entry.remove(session) {
            return;
        }
        entry.last_used = tick;
        let presence = entry.presence_event(room, &session.name, PresenceAction::Left);
        entry.broadcast(&presence, None);
        if tell_leaver {
            session.push(presence);
        }
    }

    /// Drops the least recently used empty room when the server holds `max_rooms`.
    fn make_room_for_one_more(&mut self, max_rooms: usize) -> Result<(), ErrorBody> {
        if self.rooms.len() < max_rooms {
            return Ok(());
        }
        let oldest_empty = self
            .rooms
            .iter()
            .filter(|(_, room)| room.is_empty())
            .min_by_key(|(_, room)| room.last_used)
            .map(|(name, _)| name.clone());
        match oldest_empty {
            Some(name) => {
                self.rooms.remove(&name);
                Ok(())
            }
            None => Err(ErrorBody::new(
                ErrorCode::ServerFull,
                format!("the server holds its maximum of {max_rooms} rooms"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(room: &str) -> Result<Command, ErrorBody> {
        Ok(Command::Join { room: room.into() })
    }

    fn send(room: &str, client_id: &str) -> Result<Command, ErrorBody> {
        Ok(Command::Send {
            room: room.into(),
            text: "hi".into(),
            client_id: client_id.into(),
        })
    }

    fn quiet_hub() -> Hub {
        Hub::new(Config {
            outbox_capacity: 4,
            replay_window: 16,
            ..Config::default().with_rate_limit(1e6)
        })
    }

    #[tokio::test]
    async fn a_stream_that_stops_reading_is_closed_slow_consumer_and_can_resume() {
        let hub = quiet_hub();
        let reader = hub.create_session("reader").unwrap();
        let writer = hub.create_session("writer").unwrap();
        hub.execute(&reader, vec![join("r")]);
        hub.execute(&writer, vec![join("r")]);
        let mut stream = hub.attach(&reader.id, TransportKind::WebSocket, 0).unwrap();
        let Delivery::Events(first) = stream.ready(2) else {
            panic!("events expected")
        };
        assert_eq!(first.len(), 2);
        // The stream never asks for more: five more events put it past the outbox of 4.
        for i in 0..5 {
            hub.execute(&writer, vec![send("r", &format!("c{i}"))]);
        }
        assert!(matches!(
            stream.next(16).await,
            Delivery::Closed(CloseReason::SlowConsumer)
        ));
        drop(stream);
        let mut resumed = hub.attach(&reader.id, TransportKind::Sse, 2).unwrap();
        let Delivery::Events(rest) = resumed.ready(100) else {
            panic!("events expected")
        };
        let seqs: Vec<u64> = rest.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (3..=8).collect::<Vec<u64>>(), "nothing lost");
    }

    #[tokio::test]
    async fn one_poll_at_a_time_and_a_stream_supersedes_a_poll() {
        let hub = quiet_hub();
        let session = hub.create_session("p").unwrap();
        let mut poll = hub
            .attach(&session.id, TransportKind::LongPolling, 0)
            .unwrap();
        let refused = hub.attach(&session.id, TransportKind::ShortPolling, 0);
        assert_eq!(refused.unwrap_err().code, ErrorCode::PollInProgress);
        let _stream = hub
            .attach(&session.id, TransportKind::WebSocket, 0)
            .unwrap();
        assert!(matches!(
            poll.next(8).await,
            Delivery::Closed(CloseReason::Superseded)
        ));
    }

    #[test]
    fn an_ended_session_cannot_rejoin_and_leaves_no_trace_in_rooms() {
        let hub = quiet_hub();
        let gone = hub.create_session("gone").unwrap();
        let stays = hub.create_session("stays").unwrap();
        hub.execute(&stays, vec![join("r")]);
        hub.execute(&gone, vec![join("r")]);
        hub.end_session(&gone.id).unwrap();
        let results = hub.execute(&gone, vec![join("r")]);
        assert_eq!(
            results[0].error.as_ref().map(|e| e.code),
            Some(ErrorCode::UnknownSession)
        );
        let chat = lock(&hub.inner.chat);
        assert_eq!(chat.rooms["r"].online(), vec!["stays"]);
        assert_eq!(hub.session_count(), 1);
    }
}
