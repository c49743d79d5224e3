//! The session core: sessions, rooms and the commands that change them.
//!
//! [`Hub`] is a cheap handle (an `Arc` inside) shared by every transport. It owns every piece
//! of chat state; transports only attach to a session, read its events (or, write-through,
//! are handed them as they are pushed) and hand it commands. It knows nothing of HTTP, sockets
//! or framing.
//!
//! On a cluster node (`--redis`, `clustered.rs`) the same hub applies the cluster's log: the
//! sequencer in Redis decides each command and every node's replica applies its entry
//! (`replica.rs`), so the methods the server calls there (`open_session`, `attach_transport`,
//! `execute`, ...) go through Redis first and then on as here.
//!
//! Locking: one chat mutex orders every command: it validates it, updates the rooms and
//! hands the resulting events to the fan-out threads (`fanout.rs`), which push them into the
//! sessions, on every core, in that order. So every member sees a room's events in the same
//! order, and the chat lock is never held across the pushes (socket writes, for WebSockets).
//! Each session has its own mutex for its replay buffer. The order is always chat, then the
//! session registry, then a session; nothing queues for the fan-out while holding a session
//! lock, and no lock is held across an `.await`.

mod clustered;
mod config;
mod entry;
mod fanout;
pub mod history;
mod identity;
pub(crate) mod refusal;
mod replica;
mod room;
mod session;
mod snapshot;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use history::{now_micros, StoreError};
pub use history::{Durability, HistoryStore, MemoryStore};
pub use identity::{Identity, TokenVerifier};
pub use replica::attachment_name;
use room::Room;
pub use session::{Attachment, BatchLimit, Budget, Delivery, Session};
pub use session::{DirectSink, OutboxFull};
pub(crate) use session::{Gap, TokenBucket};
use session::{Outcome, Sent};
pub use snapshot::Capture;

use crate::metrics::Metrics;
use crate::protocol::{
    validate_name, CloseReason, Command, ErrorBody, ErrorCode, Event, Message, TransportKind,
    DEFAULT_PAGE,
};
pub use clustered::{CATCH_UP, READY_LAG, SNAPSHOT_WAIT};
pub use config::HubConfig;
use entry::Entry;
use fanout::Fanout;
use refusal::unknown_session;
use session::AttachedSlot;

/// Reason carried by the `reset` event when the resume point is older than the replay buffer.
pub const RESET_REPLAY_WINDOW: &str = "replay_window_exceeded";
/// Reason carried by the `reset` every session of a cluster gets after Redis lost the
/// cluster's state: entries of the log may have gone with it (docs/cluster.md, section 5).
pub const RESET_STATE_LOST: &str = "state_lost";

/// Message ids reserved from the history store at a time; the next block is asked for when
/// half of this one is used.
pub const ID_BLOCK: u64 = 10_000;

/// Handle to the session core. Clone it freely.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: HubConfig,
    metrics: Metrics,
    chat: Mutex<Chat>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_attachment: AtomicU64,
    /// Hands out fan-out shards to new sessions, round robin.
    next_shard: AtomicUsize,
    shutting_down: AtomicBool,
    /// Where room history is kept.
    store: Arc<dyn HistoryStore>,
    /// With [`Durability::Full`]: written messages, in write order, to the thread that
    /// broadcasts them. Not bounded by itself, but each entry is a send whose command is
    /// still waiting for it, and a connection has one batch of commands in flight at most.
    written: Option<mpsc::Sender<Written>>,
    /// A cluster node's link to the sequencer and its replica of the log; `None` on one node.
    cluster: Option<Arc<clustered::Link>>,
}

/// A message whose write to the store is done (or failed), for the thread that broadcasts it.
struct Written {
    session: Arc<Session>,
    message: Arc<Message>,
    result: Result<(), StoreError>,
    outcome: watch::Sender<Option<Result<(), ErrorBody>>>,
}

#[derive(Debug)]
struct Chat {
    /// Pushes what is decided here into the sessions, on every core, in this order.
    fanout: Fanout,
    rooms: HashMap<String, Room>,
    /// Rooms with presence or typing changes waiting for their interval to pass.
    pending_presence: HashSet<String>,
    /// Message ids are server-wide, so they keep increasing in a room that was dropped and
    /// created again.
    last_message_id: u64,
    /// The highest id asked of the store so far (see [`ID_BLOCK`]).
    ids_asked: u64,
    /// Rooms dropped so far: a room's history read from the store before a drop may miss
    /// messages sent while it was in memory.
    room_drops: u64,
    /// Set by [`Hub::close_store`]: the last id is recorded, so nothing more may be sent.
    store_closed: bool,
    /// Where the hub's own timeline starts (presence intervals are measured on it).
    epoch: Instant,
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
    /// Seq of the oldest event kept for resume (`last_seq + 1` when none is): a resume point
    /// from `oldest_seq - 1` on gets every later event, an older one a `reset`.
    pub oldest_seq: u64,
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
    pub(crate) fn done() -> Self {
        CommandResult {
            ok: true,
            id: None,
            duplicate: None,
            error: None,
        }
    }

    pub(crate) fn sent(id: u64, duplicate: bool) -> Self {
        CommandResult {
            id: Some(id),
            duplicate: Some(duplicate),
            ..CommandResult::done()
        }
    }

    pub(crate) fn failed(error: ErrorBody) -> Self {
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

fn history_unavailable(error: &StoreError) -> ErrorBody {
    tracing::warn!(%error, "history store");
    let body = ErrorBody::new(
        ErrorCode::HistoryUnavailable,
        match error {
            StoreError::Busy => "the history store is busy; try again shortly",
            StoreError::Failed(_) => "the history store failed to write or read; try again later",
        },
    );
    match error {
        StoreError::Busy => body.retry_after(Duration::from_millis(100)),
        StoreError::Failed(_) => body,
    }
}

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `DELETE`.
    Deleted,
    /// No transport for the session TTL.
    Idle,
    /// Its identity token expired without a `refresh`.
    TokenExpired,
}

impl Ending {
    /// Whether the session should end for this reason now.
    fn holds(self, state: &session::SessionState, ttl: Duration) -> bool {
        match self {
            Ending::Deleted => true,
            Ending::Idle => state.attached.is_none() && state.last_seen.elapsed() >= ttl,
            Ending::TokenExpired => state
                .identity
                .as_ref()
                .is_some_and(|i| i.expires_at <= SystemTime::now()),
        }
    }

    /// What the attached transport is told.
    fn reason(self) -> CloseReason {
        match self {
            Ending::Deleted | Ending::Idle => CloseReason::Expired,
            Ending::TokenExpired => CloseReason::TokenExpired,
        }
    }
}

/// What applying a command came to.
enum Applied {
    Done(Result<CommandResult, ErrorBody>),
    /// A join of a room not in memory: read its history from the store (with no lock held)
    /// and apply the command again.
    LoadRoom(Command, u64),
    /// A send found no reserved id left: wait for the store to reserve up to this one.
    NeedIds(Command, u64),
    /// A `history` command: the page on its way from the store.
    Page {
        room: String,
        before: Option<u64>,
        reply: history::Reply<history::Page>,
    },
    /// A send waiting for its write (`Durability::Full`).
    Durable {
        id: u64,
        duplicate: bool,
        outcome: Outcome,
    },
}

impl From<Result<CommandResult, ErrorBody>> for Applied {
    fn from(result: Result<CommandResult, ErrorBody>) -> Self {
        Applied::Done(result)
    }
}

/// A room's history read from the store for a join, and the room drops it was read after.
struct Loaded {
    room: String,
    drops: u64,
    messages: Vec<Arc<Message>>,
}

/// The result of a send that waits for its write.
async fn written_outcome(id: u64, duplicate: bool, mut outcome: Outcome) -> CommandResult {
    let result = match outcome.wait_for(Option::is_some).await {
        Ok(result) => result.clone().unwrap_or(Ok(())),
        Err(_) => Err(history_unavailable(&StoreError::Failed(
            "the hub closed".into(),
        ))),
    };
    match result {
        Ok(()) => CommandResult::sent(id, duplicate),
        Err(error) => CommandResult::failed(error),
    }
}

fn closed_store() -> StoreError {
    StoreError::Failed("the history store is closed".into())
}

impl Hub {
    /// A hub with no sessions, keeping history in memory. Call [`Hub::spawn_timers`] to
    /// expire idle sessions and flush coalesced presence.
    pub fn new(config: HubConfig) -> Self {
        let store = Arc::new(MemoryStore::new(config.history_len, config.history_max_age));
        Hub::with_store(config, store, Metrics::new())
    }

    /// A hub with no sessions, keeping history in `store`, counting into `metrics`.
    pub fn with_store(config: HubConfig, store: Arc<dyn HistoryStore>, metrics: Metrics) -> Self {
        Hub::build(config, store, metrics, None)
    }

    fn build(
        config: HubConfig,
        store: Arc<dyn HistoryStore>,
        metrics: Metrics,
        cluster: Option<Arc<clustered::Link>>,
    ) -> Self {
        let fanout_threads = config.fanout_threads;
        let last_id = store.last_id();
        let (written, written_rx) = match config.durability {
            Durability::Full => {
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some(rx))
            }
            Durability::Normal => (None, None),
        };
        let hub = Hub {
            inner: Arc::new(Inner {
                config,
                metrics,
                chat: Mutex::new(Chat {
                    fanout: Fanout::new(fanout_threads),
                    rooms: HashMap::new(),
                    pending_presence: HashSet::new(),
                    last_message_id: last_id,
                    ids_asked: 0,
                    room_drops: 0,
                    store_closed: false,
                    epoch: Instant::now(),
                    tick: 0,
                }),
                sessions: Mutex::new(HashMap::new()),
                next_attachment: AtomicU64::new(1),
                next_shard: AtomicUsize::new(0),
                shutting_down: AtomicBool::new(false),
                store,
                written,
                cluster,
            }),
        };
        if let Some(written) = written_rx {
            let inner = Arc::downgrade(&hub.inner);
            std::thread::Builder::new()
                .name("switchyard-written".into())
                .spawn(move || broadcast_written(inner, written))
                .expect("can start the thread that broadcasts written messages");
        }
        hub
    }

    /// The settings this hub was built with.
    pub fn config(&self) -> &HubConfig {
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
        self.create(name, None)
    }

    /// Creates a session for a verified user: it ends when the identity expires, unless
    /// refreshed, and counts once per user in room presence.
    pub fn create_session_for(&self, identity: Identity) -> Result<Arc<Session>, ErrorBody> {
        let name = identity.name.clone();
        self.create(&name, Some(identity))
    }

    fn create(&self, name: &str, identity: Option<Identity>) -> Result<Arc<Session>, ErrorBody> {
        self.refuse_if_shutting_down()?;
        validate_name(name)?;
        let mut sessions = lock(&self.inner.sessions);
        if sessions.len() >= self.inner.config.max_sessions {
            return Err(refusal::server_full());
        }
        Ok(self.insert_session(&mut sessions, new_session_id(), name, identity))
    }

    /// Adds a session to the registry (held locked by the caller), with no check: `create`
    /// checked, or the cluster's sequencer decided (a node keeps every session it is told of).
    fn insert_session(
        &self,
        sessions: &mut HashMap<String, Arc<Session>>,
        id: String,
        name: &str,
        identity: Option<Identity>,
    ) -> Arc<Session> {
        let shard = self.inner.next_shard.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(
            id.clone(),
            Arc::from(name),
            identity,
            &self.inner.config,
            shard,
        ));
        sessions.insert(id, session.clone());
        tracing::debug!(session = %session.id, name, "session created");
        session
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
        let id = self.inner.next_attachment.fetch_add(1, Ordering::Relaxed);
        self.attach_as(session_id, kind, after, id, true)
    }

    /// [`Hub::attach`] as attachment `id`; `one_poll`: refuse a poll while a poll is attached
    /// (a cluster node's sequencer decided that already).
    fn attach_as(
        &self,
        session_id: &str,
        kind: TransportKind,
        after: u64,
        id: u64,
        one_poll: bool,
    ) -> Result<Attachment, ErrorBody> {
        let session = self.session(session_id)?;
        let mut gap = session.lock().replay.check_resume(after);
        if gap == Err(Gap::Unknown) {
            // A seq decided but still on its way through the fan-out is not unknown.
            self.settle();
            gap = session.lock().replay.check_resume(after);
        }
        // A reset needs the rooms' histories: take the chat lock first, as everywhere, and let
        // the fan-out push what it holds, so the reset can go straight into the session and
        // still follow everything decided before it.
        let mut chat = (gap == Err(Gap::TooOld)).then(|| {
            let chat = lock(&self.inner.chat);
            chat.fanout.settle();
            chat
        });
        let mut state = session.lock();
        if state.ended {
            return Err(unknown_session(session_id));
        }
        if one_poll && kind.is_poll() && state.attached.as_ref().is_some_and(|s| s.kind.is_poll()) {
            return Err(refusal::poll_in_progress());
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
            return self.attach_as(session_id, kind, after, id, one_poll);
        }
        // Closed before a reset is queued, so the reset and its history go to the new
        // transport only, never to the one it supersedes.
        state.close_attached(CloseReason::Superseded);
        // A resume point too old: the new transport starts at a `reset` and each room's
        // history, kept together whatever the byte budget.
        let cursor = match &mut chat {
            Some(chat) if gap.is_err() => {
                let reset_seq = state.replay.last_seq() + 1;
                let max_age = self.inner.config.history_max_age;
                push_reset(
                    chat,
                    &mut state,
                    &session,
                    RESET_REPLAY_WINDOW,
                    max_age,
                    now_micros(),
                );
                reset_seq - 1
            }
            // The resume point acknowledges every event up to it (it was checked above).
            _ => {
                let _ = state.acknowledge(after);
                after
            }
        };
        drop(chat);
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

    /// Applies commands in order, each counting toward the session's rate limit. Returns once
    /// each is applied; with [`Durability::Full`], once each `send` is written (or failed).
    pub async fn execute(
        &self,
        session: &Arc<Session>,
        commands: Vec<Result<Command, ErrorBody>>,
    ) -> Vec<CommandResult> {
        let last_transport = session.lock().last_transport;
        self.inner.metrics.commands(last_transport, commands.len());
        if let Some(link) = &self.inner.cluster {
            return self.execute_clustered(link, session, commands).await;
        }
        let mut results = Vec::with_capacity(commands.len());
        // Sends waiting for their writes, awaited together so a batch shares one write.
        let mut written = Vec::new();
        for command in commands {
            let result = match command {
                // Takes no rate-limit token.
                Ok(Command::Ack { seq }) => self.acknowledge(session, seq),
                command => match self.admit(session).and(command) {
                    Err(error) => CommandResult::failed(error),
                    Ok(command) => match self.run(session, command).await {
                        Ok(result) => result,
                        Err((id, duplicate, outcome)) => {
                            written.push((results.len(), written_outcome(id, duplicate, outcome)));
                            CommandResult::done()
                        }
                    },
                },
            };
            results.push(result);
        }
        for (at, outcome) in written {
            results[at] = outcome.await;
        }
        results
    }

    /// Applies one command, reading from the store with no lock held when it must. `Err`: a
    /// send waiting for its write.
    async fn run(
        &self,
        session: &Arc<Session>,
        mut command: Command,
    ) -> Result<CommandResult, (u64, bool, Outcome)> {
        if let Command::Refresh { token } = &command {
            return Ok(self
                .refresh(session, token)
                .unwrap_or_else(CommandResult::failed));
        }
        let store = &self.inner.store;
        let mut loaded = None;
        loop {
            command = match self.apply(session, command, &mut loaded) {
                Applied::Done(result) => return Ok(result.unwrap_or_else(CommandResult::failed)),
                Applied::Durable {
                    id,
                    duplicate,
                    outcome,
                } => return Err((id, duplicate, outcome)),
                Applied::LoadRoom(command, drops) => {
                    let room = command.room().unwrap_or_default().to_owned();
                    let reply = store.recent(&room, self.inner.config.history_len);
                    match reply.await.unwrap_or_else(|_| Err(closed_store())) {
                        Ok(messages) => {
                            loaded = Some(Loaded {
                                room,
                                drops,
                                messages,
                            })
                        }
                        Err(error) => {
                            return Ok(CommandResult::failed(history_unavailable(&error)))
                        }
                    }
                    command
                }
                Applied::NeedIds(command, up_to) => {
                    let reply = store.reserve_ids(up_to);
                    if let Err(error) = reply.await.unwrap_or_else(|_| Err(closed_store())) {
                        return Ok(CommandResult::failed(history_unavailable(&error)));
                    }
                    command
                }
                Applied::Page {
                    room,
                    before,
                    reply,
                } => {
                    return Ok(match reply.await.unwrap_or_else(|_| Err(closed_store())) {
                        Ok(page) => {
                            let page = Entry::Page {
                                session: session.clone(),
                                room,
                                before,
                                page,
                            };
                            lock(&self.inner.chat).commit(page, &self.inner.config);
                            CommandResult::done()
                        }
                        Err(error) => CommandResult::failed(history_unavailable(&error)),
                    });
                }
            };
        }
    }

    /// An `ack`: the session forgets the events up to `seq`. Local to this node, even in a
    /// cluster (the others keep theirs within their budgets).
    pub(crate) fn acknowledge(&self, session: &Session, seq: u64) -> CommandResult {
        let mut state = session.lock();
        if state.ended {
            return CommandResult::failed(unknown_session(&session.id));
        }
        match state.acknowledge(seq) {
            Ok(()) => CommandResult::done(),
            Err(last) => CommandResult::failed(ErrorBody::new(
                ErrorCode::InvalidAck,
                format!("ack of seq {seq} but this session's last event is {last}"),
            )),
        }
    }

    /// Checks the session is live and takes a rate-limit token (an `ack` takes none).
    fn admit(&self, session: &Session) -> Result<(), ErrorBody> {
        let mut state = session.lock();
        if state.ended {
            return Err(unknown_session(&session.id));
        }
        if !state.limiter.try_take() {
            let wait = state.limiter.retry_after();
            return Err(refusal::session_rate_limited(&self.inner.config, wait));
        }
        Ok(())
    }

    fn apply(
        &self,
        session: &Arc<Session>,
        command: Command,
        loaded: &mut Option<Loaded>,
    ) -> Applied {
        let config = &self.inner.config;
        let store = &self.inner.store;
        let mut chat = lock(&self.inner.chat);
        // Checked again under the chat lock: `end` takes it too, so a session that ended
        // after `admit` is never put back into a room.
        let room_name = command.room().unwrap_or_default().to_owned();
        let (ended, joined) = {
            let state = session.lock();
            (state.ended, state.rooms.contains(&room_name))
        };
        if ended {
            return Err(unknown_session(&session.id)).into();
        }
        if chat.store_closed {
            // A command still arriving after shutdown's grace period.
            return Err(ErrorBody::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ))
            .into();
        }
        if !joined && !matches!(command, Command::Join { .. }) {
            return Err(refusal::not_in_room(&room_name)).into();
        }
        let chat = &mut *chat;
        match command {
            // A fresh view of the room, as on a reset.
            Command::Join { room } if joined => chat.commit(
                Entry::Join {
                    session: session.clone(),
                    room,
                    ts: now_micros(),
                },
                config,
            ),
            Command::Join { room } => {
                let allowed = session
                    .lock()
                    .identity
                    .as_ref()
                    .is_none_or(|i| i.may_join(&room));
                if !allowed {
                    return Err(refusal::room_forbidden(&room)).into();
                }
                if session.lock().rooms.len() >= config.max_rooms_per_session {
                    return Err(refusal::too_many_rooms(config)).into();
                }
                if !chat.rooms.contains_key(&room) {
                    // The room's history comes from the store, read with no lock held; it is
                    // current unless a room was dropped since (its last messages may be newer).
                    let history = match loaded.take() {
                        Some(l) if l.room == room && l.drops == chat.room_drops => l.messages,
                        _ => return Applied::LoadRoom(Command::Join { room }, chat.room_drops),
                    };
                    if let Err(error) = chat.make_room_for_one_more(config.max_rooms, &**store) {
                        return Err(error).into();
                    }
                    let room_entry =
                        Room::new(chat.fanout.shards(), config.room_rate_limit, history);
                    chat.rooms.insert(room.clone(), room_entry);
                }
                let join = Entry::Join {
                    session: session.clone(),
                    room,
                    ts: now_micros(),
                };
                chat.commit(join, config);
            }
            Command::Leave { room } => {
                let leave = Entry::Leave {
                    session: session.clone(),
                    room,
                };
                chat.commit(leave, config);
            }
            Command::History {
                room,
                before,
                limit,
            } => {
                let limit = limit.unwrap_or(DEFAULT_PAGE);
                let reply = store.page(&room, before, limit);
                return Applied::Page {
                    room,
                    before,
                    reply,
                };
            }
            Command::Send {
                room,
                text,
                client_id,
            } => {
                let earlier = session.lock().sent.get(&client_id).cloned();
                match earlier {
                    Some((id, Sent::Echo(echo))) => {
                        let retry = Entry::Retry {
                            sender: session.clone(),
                            echo,
                        };
                        chat.commit(retry, config);
                        return Ok(CommandResult::sent(id, true)).into();
                    }
                    Some((id, Sent::Pending(outcome))) => {
                        return Applied::Durable {
                            id,
                            duplicate: true,
                            outcome,
                        }
                    }
                    // The client acknowledged the echo: it has it already.
                    Some((id, Sent::Acknowledged(_))) => {
                        return Ok(CommandResult::sent(id, true)).into()
                    }
                    None => {}
                }
                let id = chat.last_message_id + 1;
                let reserved = store.reserved_ids();
                if id > reserved {
                    chat.ids_asked = id.saturating_add(ID_BLOCK);
                    let command = Command::Send {
                        room,
                        text,
                        client_id,
                    };
                    return Applied::NeedIds(command, chat.ids_asked);
                }
                if reserved - id < ID_BLOCK / 2 && chat.ids_asked <= reserved {
                    // Ask for the next block early, so sends never wait for it.
                    chat.ids_asked = reserved.saturating_add(ID_BLOCK);
                    drop(store.reserve_ids(chat.ids_asked));
                }
                let entry = chat.rooms.get_mut(&room).expect("a joined room exists");
                if let Err(wait) = entry.admit_message() {
                    return Err(refusal::room_rate_limited(&room, config, wait)).into();
                }
                let message = Arc::new(Message {
                    room: room.clone(),
                    id,
                    from: session.name.to_string(),
                    text,
                    ts: now_micros(),
                    client_id,
                });
                let Some(written) = &self.inner.written else {
                    if let Err(error) = store.append(message.clone(), None) {
                        return Err(history_unavailable(&error)).into();
                    }
                    chat.last_message_id = id;
                    let send = Entry::Send {
                        sender: Some(session.clone()),
                        message,
                    };
                    chat.commit(send, config);
                    return Ok(CommandResult::sent(id, false)).into();
                };
                // Durability::Full: broadcast once written, by `broadcast_written`.
                let (outcome_tx, outcome) = watch::channel(None);
                let then = {
                    let written = written.clone();
                    let session = session.clone();
                    let message = message.clone();
                    Box::new(move |result| {
                        let _ = written.send(Written {
                            session,
                            message,
                            result,
                            outcome: outcome_tx,
                        });
                    })
                };
                if let Err(error) = store.append(message.clone(), Some(then)) {
                    return Err(history_unavailable(&error)).into();
                }
                chat.last_message_id = id;
                session.lock().sent.insert(
                    &message.client_id,
                    id,
                    Sent::Pending(outcome.clone()),
                    config.dedup_window,
                );
                return Applied::Durable {
                    id,
                    duplicate: false,
                    outcome,
                };
            }
            Command::Typing { room } => {
                let typing = Entry::Typing {
                    name: session.name.clone(),
                    room,
                };
                chat.commit(typing, config);
            }
            // Handled by `run`, with no lock held.
            Command::Refresh { .. } => {}
            // Handled by `execute`, without the locks or a rate-limit token.
            Command::Ack { .. } => {}
        }
        Ok(CommandResult::done()).into()
    }

    /// Sends an `error` event to one session (for commands that came on a stream, which has
    /// no reply of its own); `client_id` names the failed `send`, if it was one.
    pub fn push_error(&self, session: &Arc<Session>, error: &ErrorBody, client_id: Option<&str>) {
        let error = Entry::Error {
            session: session.clone(),
            error: error.clone(),
            client_id: client_id.map(str::to_owned),
        };
        // In the hub's order, after the events of the commands before it.
        lock(&self.inner.chat).commit(error, &self.inner.config);
    }

    /// Describes a session: its seq, attached transport and rooms.
    pub fn describe(&self, session_id: &str) -> Result<SessionInfo, ErrorBody> {
        let session = self.session(session_id)?;
        let state = session.lock();
        Ok(SessionInfo {
            session: session.id.clone(),
            name: session.name.to_string(),
            last_seq: state.replay.last_seq(),
            oldest_seq: state.replay.first_seq(),
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
        self.end(&session, Ending::Deleted);
        Ok(())
    }

    /// Ends a session, if `why` still holds under the locks.
    fn end(&self, session: &Arc<Session>, why: Ending) {
        let mut chat = lock(&self.inner.chat);
        let rooms = {
            let mut state = session.lock();
            if state.ended || !why.holds(&state, self.inner.config.session_ttl) {
                return;
            }
            state.ended = true;
            state.close_attached(why.reason());
            state.rooms.clone()
        };
        for room in rooms {
            let leave = Entry::Leave {
                session: session.clone(),
                room,
            };
            chat.commit(leave, &self.inner.config);
        }
        lock(&self.inner.sessions).remove(&session.id);
        tracing::debug!(session = %session.id, ?why, "session ended");
    }

    /// Ends every session that has had no transport for its TTL, or whose identity token
    /// expired; returns how many.
    pub fn expire_idle(&self) -> usize {
        let ttl = self.inner.config.session_ttl;
        let due: Vec<(Arc<Session>, Ending)> = lock(&self.inner.sessions)
            .values()
            .filter_map(|s| {
                let state = s.lock();
                [Ending::TokenExpired, Ending::Idle]
                    .into_iter()
                    .find(|why| why.holds(&state, ttl))
                    .map(|why| (s.clone(), why))
            })
            .collect();
        for (session, why) in &due {
            self.end(session, *why);
        }
        due.len()
    }

    /// Extends a session with a new token for the same user (`refresh`).
    fn refresh(&self, session: &Session, token: &str) -> Result<CommandResult, ErrorBody> {
        // Verified with no lock held: a signature check can take a while.
        let fresh = self.verify_refresh(token)?;
        let mut state = session.lock();
        let Some(identity) = &mut state.identity else {
            return Err(refusal::refresh_without_token());
        };
        if identity.user != fresh.user {
            return Err(refusal::refresh_for_another_user());
        }
        identity.expires_at = fresh.expires_at;
        identity.rooms = fresh.rooms;
        Ok(CommandResult::done())
    }

    /// The identity in a `refresh`'s token.
    fn verify_refresh(&self, token: &str) -> Result<Identity, ErrorBody> {
        let Some(verifier) = &self.inner.config.tokens else {
            return Err(ErrorBody::new(
                ErrorCode::BadCommand,
                "this server does not authenticate users; there is nothing to refresh",
            ));
        };
        verifier.verify(token)
    }

    /// Waits until every event decided so far is in its sessions' replay buffers (events reach
    /// them through the fan-out threads, a moment after the command that made them returns).
    pub fn settle(&self) {
        lock(&self.inner.chat).fanout.settle();
    }

    /// Sends the presence and typing changes of every room whose presence interval has
    /// passed since its last flush; returns how many rooms were flushed.
    pub fn flush_presence(&self) -> usize {
        let config = &self.inner.config;
        let mut chat = lock(&self.inner.chat);
        let now = chat.clock();
        let rooms = chat.due_rooms(now, config);
        let flushed = rooms.len();
        chat.apply(Entry::Flush { rooms, at: now }, config);
        flushed
    }

    /// Runs the hub's timers until [`Hub::shutdown`]: expires idle sessions and flushes
    /// coalesced presence.
    pub fn spawn_timers(&self) -> tokio::task::JoinHandle<()> {
        if let Some(link) = &self.inner.cluster {
            return self.spawn_cluster_timers(link.clone());
        }
        let hub = self.clone();
        let config = &hub.inner.config;
        let reap_period =
            (config.session_ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        // A change waits at most a quarter interval past its due time.
        let flush_period = (config.presence_interval / 4).max(Duration::from_millis(5));
        tokio::spawn(async move {
            let mut reap = tokio::time::interval(reap_period);
            reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut flush = tokio::time::interval(flush_period);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !hub.inner.shutting_down.load(Ordering::Acquire) {
                tokio::select! {
                    _ = reap.tick() => {
                        let expired = hub.expire_idle();
                        if expired > 0 {
                            tracing::info!(expired, "ended sessions (idle past their TTL or their token expired)");
                        }
                    }
                    _ = flush.tick() => {
                        hub.flush_presence();
                    }
                }
            }
        })
    }

    /// Writes what the history store holds and closes it, recording the last message id so
    /// the next start continues right after it. Call it last, once no command can arrive.
    pub fn close_store(&self) {
        if self.inner.cluster.is_some() {
            // The sequencer writes a cluster's history; the node stops applying the log.
            self.unlink();
            return;
        }
        let mut chat = lock(&self.inner.chat);
        chat.fanout.settle();
        // From here every command is refused, so no id above this one is handed out.
        chat.store_closed = true;
        let last_used = chat.last_message_id;
        drop(chat);
        self.inner.store.close(last_used);
    }

    /// Whether the hub can serve everything it offers (`GET /readyz`): `Err`
    /// `history_unavailable` while its history store's backend cannot be reached.
    pub fn ready(&self) -> Result<(), ErrorBody> {
        self.inner.store.ready().map_err(|cause| {
            ErrorBody::new(
                ErrorCode::HistoryUnavailable,
                format!("the history store cannot be reached: {cause}"),
            )
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

/// A new session's id: 128 random bits.
fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Sends a room's pending presence and typing changes to its members.
fn flush_room(fanout: &Fanout, room: &mut Room, name: &str, list_limit: usize, now: u64) {
    for event in room.flush(name, list_limit) {
        fanout.room(room.members(), event);
    }
    room.last_flush = Some(now);
}

/// With [`Durability::Full`]: broadcasts each message once its write is done, in write order
/// (so a room's messages keep their order), or fails its `send`. Runs until the hub is gone.
fn broadcast_written(hub: Weak<Inner>, written: mpsc::Receiver<Written>) {
    while let Ok(done) = written.recv() {
        let Some(inner) = hub.upgrade() else {
            return;
        };
        let result = match done.result {
            Ok(()) => {
                let send = Entry::Send {
                    sender: Some(done.session),
                    message: done.message,
                };
                lock(&inner.chat).commit(send, &inner.config);
                Ok(())
            }
            Err(error) => {
                done.session.lock().sent.remove(&done.message.client_id);
                Err(history_unavailable(&error))
            }
        };
        done.outcome.send_replace(Some(result));
    }
}

/// Pushes a `reset` for `reason` into `session` (its `state`), then each of its rooms'
/// history (as of `now`, µs) and presence, kept together until a transport takes them (a
/// write-through transport takes them at once).
fn push_reset(
    chat: &mut Chat,
    state: &mut session::SessionState,
    session: &Session,
    reason: &'static str,
    max_age: Duration,
    now: u64,
) {
    let reset_seq = state.replay.last_seq() + 1;
    let reset = Event::Reset { reason }.encode();
    state.push_keeping(reset, session.outbox, reset_seq);
    for name in state.rooms.clone() {
        if let Some(room) = chat.rooms.get_mut(&name) {
            let history = room.history_event(&name, max_age, now);
            state.push_keeping(history, session.outbox, reset_seq);
            let presence = room.snapshot_event(&name);
            state.push_keeping(presence, session.outbox, reset_seq);
        }
    }
    // A write-through transport has them already; for any other, they wait together.
    let written = state
        .attached
        .as_ref()
        .is_some_and(|slot| slot.direct.is_some());
    if !written {
        state.protected = Some((reset_seq, state.replay.last_seq()));
    }
}

impl Chat {
    /// Whether a join of `room` would find room for it: the room is held, or fewer than
    /// `max_rooms` are, or an empty one can be dropped (a cluster node asks before it hands a
    /// join to the sequencer; its replica drops the empty room when it applies the join).
    fn room_for(&self, room: &str, max_rooms: usize) -> Result<(), ErrorBody> {
        if self.rooms.len() < max_rooms
            || self.rooms.contains_key(room)
            || self.rooms.values().any(Room::is_empty)
        {
            Ok(())
        } else {
            Err(rooms_full(max_rooms))
        }
    }

    /// Drops the least recently used empty room when the server holds `max_rooms`.
    fn make_room_for_one_more(
        &mut self,
        max_rooms: usize,
        store: &dyn HistoryStore,
    ) -> Result<(), ErrorBody> {
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
                self.room_drops += 1;
                store.forget(&name);
                Ok(())
            }
            None => Err(rooms_full(max_rooms)),
        }
    }
}

/// The server holds `max_rooms` rooms, none of them empty.
fn rooms_full(max_rooms: usize) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::ServerFull,
        format!("the server holds its maximum of {max_rooms} rooms"),
    )
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
        Hub::new(HubConfig {
            outbox: Budget {
                events: 4,
                bytes: u64::MAX,
            },
            replay_window: 16,
            presence_interval: Duration::ZERO,
            ..HubConfig::default().with_rate_limit(1e6)
        })
    }

    #[tokio::test]
    async fn a_stream_that_stops_reading_is_closed_slow_consumer_and_can_resume() {
        let hub = quiet_hub();
        let reader = hub.create_session("reader").unwrap();
        let writer = hub.create_session("writer").unwrap();
        hub.execute(&reader, vec![join("r")]).await;
        hub.execute(&writer, vec![join("r")]).await;
        hub.settle();
        let mut stream = hub.attach(&reader.id, TransportKind::WebSocket, 0).unwrap();
        let Delivery::Events(first) = stream.ready(BatchLimit::events(2)) else {
            panic!("events expected")
        };
        assert_eq!(first.len(), 2);
        // The stream never asks for more: five more events put it past the outbox of 4.
        for i in 0..5 {
            hub.execute(&writer, vec![send("r", &format!("c{i}"))])
                .await;
        }
        hub.settle();
        assert!(matches!(
            stream.next(BatchLimit::events(16)).await,
            Delivery::Closed(CloseReason::SlowConsumer)
        ));
        drop(stream);
        hub.settle();
        let mut resumed = hub.attach(&reader.id, TransportKind::Sse, 2).unwrap();
        let Delivery::Events(rest) = resumed.ready(BatchLimit::events(100)) else {
            panic!("events expected")
        };
        let seqs: Vec<u64> = rest.iter().map(|(seq, _)| *seq).collect();
        let last = hub.describe(&reader.id).unwrap().last_seq;
        assert_eq!(seqs, (3..=last).collect::<Vec<u64>>(), "nothing lost");
        assert_eq!(
            rest.iter()
                .filter(|(_, e)| e.type_name == "message")
                .count(),
            5
        );
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
            poll.next(BatchLimit::events(8)).await,
            Delivery::Closed(CloseReason::Superseded)
        ));
    }

    #[tokio::test]
    async fn an_ended_session_cannot_rejoin_and_leaves_no_trace_in_rooms() {
        let hub = quiet_hub();
        let gone = hub.create_session("gone").unwrap();
        let stays = hub.create_session("stays").unwrap();
        hub.execute(&stays, vec![join("r")]).await;
        hub.execute(&gone, vec![join("r")]).await;
        hub.end_session(&gone.id).unwrap();
        let results = hub.execute(&gone, vec![join("r")]).await;
        assert_eq!(
            results[0].error.as_ref().map(|e| e.code),
            Some(ErrorCode::UnknownSession)
        );
        hub.flush_presence();
        let chat = lock(&hub.inner.chat);
        assert_eq!(chat.rooms["r"].published_names(), vec!["stays"]);
        assert_eq!(hub.session_count(), 1);
    }

    /// Every event in a session's replay buffer, as the client sees it, once the fan-out has
    /// pushed what the hub decided so far.
    fn events_of(hub: &Hub, session: &Session) -> Vec<serde_json::Value> {
        hub.settle();
        let state = session.lock();
        state
            .replay
            .after(0, BatchLimit::ALL)
            .unwrap()
            .iter()
            .map(|(seq, event)| serde_json::from_str(&event.to_json(*seq)).unwrap())
            .collect()
    }

    fn of_type<'a>(
        events: &'a [serde_json::Value],
        kind: &'a str,
    ) -> impl Iterator<Item = &'a serde_json::Value> {
        events.iter().filter(move |e| e["type"] == kind)
    }

    /// The name list a client builds from a snapshot and the diffs after it.
    fn names_seen(events: &[serde_json::Value]) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for event in events {
            let list = |key: &str| -> Vec<String> {
                event[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_owned())
                    .collect()
            };
            match event["type"].as_str() {
                Some("presence") => names = list("online"),
                Some("presence_diff") => {
                    names.extend(list("joined"));
                    for gone in list("left") {
                        let at = names.iter().position(|n| *n == gone).unwrap();
                        names.remove(at);
                    }
                }
                _ => {}
            }
        }
        names
    }

    /// `n` sessions named u0, u1, ... joined to room `r`, in order.
    async fn members(hub: &Hub, n: usize) -> Vec<Arc<Session>> {
        let sessions: Vec<_> = (0..n)
            .map(|i| hub.create_session(&format!("u{i}")).unwrap())
            .collect();
        for session in &sessions {
            hub.execute(session, vec![join("r")]).await;
        }
        sessions
    }

    fn coalescing_hub(list_limit: usize) -> Hub {
        Hub::new(HubConfig {
            presence_interval: Duration::from_millis(250),
            presence_list_limit: list_limit,
            ..HubConfig::default().with_rate_limit(1e6)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_storm_costs_each_member_one_diff_per_interval() {
        let hub = coalescing_hub(1000);
        let sessions = members(&hub, 200).await;
        // The first join, in a quiet room, was told at once; the rest wait for the interval.
        assert_eq!(
            of_type(&events_of(&hub, &sessions[0]), "presence_diff").count(),
            1
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(hub.flush_presence(), 1);
        let everyone: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
        let first = events_of(&hub, &sessions[0]);
        assert_eq!(of_type(&first, "presence_diff").count(), 2);
        assert_eq!(names_seen(&first), everyone);
        let last = events_of(&hub, &sessions[199]);
        let types: Vec<&str> = last.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["history", "presence", "presence_diff"]);
        assert_eq!(last[1]["count"], 1, "the published count, before the storm");
        assert_eq!(last[2]["count"], 200);
        assert_eq!(names_seen(&last), everyone, "the joiner's view is exact");
        // A quiet room again: the next leave is told at once.
        tokio::time::advance(Duration::from_millis(250)).await;
        hub.execute(&sessions[5], vec![Ok(Command::Leave { room: "r".into() })])
            .await;
        let first = events_of(&hub, &sessions[0]);
        let diff = of_type(&first, "presence_diff").last().unwrap();
        assert_eq!(diff["left"], serde_json::json!(["u5"]));
        assert_eq!(diff["count"], 199);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_room_tells_a_count_and_a_sample_until_it_is_small_again() {
        let hub = coalescing_hub(10);
        let sessions = members(&hub, 30).await;
        tokio::time::advance(Duration::from_millis(250)).await;
        hub.flush_presence();
        let watcher = events_of(&hub, &sessions[0]);
        let diff = of_type(&watcher, "presence_diff").last().unwrap();
        assert_eq!(diff["count"], 30);
        assert_eq!(diff["complete"], false);
        // A joiner of the large room gets the count and a sample.
        let late = hub.create_session("late").unwrap();
        hub.execute(&late, vec![join("r")]).await;
        let snapshot = of_type(&events_of(&hub, &late), "presence")
            .next()
            .unwrap()
            .clone();
        assert_eq!(snapshot["count"], 30);
        assert_eq!(snapshot["complete"], false);
        // Down to 6 members: everyone gets the full list again, in join order.
        tokio::time::advance(Duration::from_millis(250)).await;
        for session in sessions.iter().skip(5) {
            hub.execute(session, vec![Ok(Command::Leave { room: "r".into() })])
                .await;
        }
        tokio::time::advance(Duration::from_millis(250)).await;
        hub.flush_presence();
        let watcher = events_of(&hub, &sessions[0]);
        let full = of_type(&watcher, "presence").last().unwrap();
        assert_eq!(full["complete"], true);
        assert_eq!(
            full["online"],
            serde_json::json!(["u0", "u1", "u2", "u3", "u4", "late"])
        );
        assert_eq!(names_seen(&watcher).len(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn typing_is_one_event_per_room_per_interval_naming_a_few() {
        let hub = coalescing_hub(1000);
        let sessions = members(&hub, 30).await;
        tokio::time::advance(Duration::from_millis(250)).await;
        hub.flush_presence();
        tokio::time::advance(Duration::from_millis(250)).await;
        for _ in 0..5 {
            for session in &sessions {
                hub.execute(session, vec![Ok(Command::Typing { room: "r".into() })])
                    .await;
            }
        }
        tokio::time::advance(Duration::from_millis(250)).await;
        hub.flush_presence();
        let typing: Vec<_> = of_type(&events_of(&hub, &sessions[0]), "typing")
            .cloned()
            .collect();
        // The first keystroke in a quiet room at once, then one batch.
        assert_eq!(typing.len(), 2, "{typing:?}");
        assert_eq!(typing[0]["users"], serde_json::json!(["u0"]));
        assert_eq!(
            typing[1]["users"].as_array().unwrap().len(),
            room::TYPERS_NAMED
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_over_its_message_rate_refuses_sends_with_a_retry_hint() {
        let hub = Hub::new(HubConfig {
            room_rate_limit: Some((2.0, 2.0)),
            ..HubConfig::default()
        });
        let ann = hub.create_session("ann").unwrap();
        hub.execute(&ann, vec![join("r")]).await;
        let results = hub
            .execute(&ann, vec![send("r", "a"), send("r", "b"), send("r", "c")])
            .await;
        assert!(results[0].ok && results[1].ok);
        let refused = results[2].error.as_ref().unwrap();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert_eq!(refused.retry_after_ms, Some(500));
        // A retry of a send that went through is still answered from the dedupe table.
        assert_eq!(
            hub.execute(&ann, vec![send("r", "a")]).await[0].duplicate,
            Some(true)
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(hub.execute(&ann, vec![send("r", "c")]).await[0].ok);
    }

    #[tokio::test]
    async fn a_rejoin_shares_the_rooms_encoded_history_instead_of_copying_it() {
        let hub = quiet_hub();
        let writer = hub.create_session("writer").unwrap();
        hub.execute(&writer, vec![join("r")]).await;
        for i in 0..10 {
            hub.execute(&writer, vec![send("r", &format!("w{i}"))])
                .await;
        }
        let reader = hub.create_session("reader").unwrap();
        for _ in 0..3 {
            hub.execute(&reader, vec![join("r")]).await;
        }
        hub.settle();
        let state = reader.lock();
        let histories: Vec<*const u8> = state
            .replay
            .after(0, BatchLimit::ALL)
            .unwrap()
            .iter()
            .filter(|(_, e)| e.type_name == "history")
            .map(|(_, e)| e.body.as_ptr())
            .collect();
        assert_eq!(histories.len(), 3);
        assert!(
            histories.windows(2).all(|w| w[0] == w[1]),
            "one encoding, shared"
        );
    }

    #[tokio::test]
    async fn a_reset_larger_than_the_byte_budget_survives_until_a_transport_takes_it() {
        let hub = Hub::new(HubConfig {
            replay_bytes: 8 * 1024,
            presence_interval: Duration::ZERO,
            ..HubConfig::default().with_rate_limit(1e6)
        });
        let writer = hub.create_session("writer").unwrap();
        let reader = hub.create_session("reader").unwrap();
        hub.execute(&writer, vec![join("r")]).await;
        hub.execute(&reader, vec![join("r")]).await;
        let big = |i: usize| {
            Ok(Command::Send {
                room: "r".into(),
                text: "h".repeat(2000),
                client_id: format!("h{i}"),
            })
        };
        // A 20 KB history: far over the reader's 8 KiB budget.
        for i in 0..10 {
            hub.execute(&writer, vec![big(i)]).await;
        }
        hub.settle();
        let mut poll = hub
            .attach(&reader.id, TransportKind::ShortPolling, 1)
            .unwrap();
        drop(poll);
        // More messages before anyone reads the reset.
        for i in 10..14 {
            hub.execute(&writer, vec![big(i)]).await;
        }
        hub.settle();
        // A poll from just before the reset, dropped unread: it acknowledges nothing of it.
        // (One from inside the reset would acknowledge the events up to there: they may go.)
        let (from, _) = reader.lock().protected.expect("the reset is protected");
        poll = hub
            .attach(&reader.id, TransportKind::ShortPolling, from - 1)
            .unwrap();
        drop(poll);
        let state = reader.lock();
        let (from, to) = state.protected.expect("the reset is still protected");
        let kept = state.replay.after(from - 1, BatchLimit::ALL).unwrap();
        assert_eq!(kept[0].1.type_name, "reset");
        assert!(
            kept.len() as u64 > to - from,
            "the whole reset is still there"
        );
        drop(state);
        // Once a transport takes it, it may age out like anything else.
        let mut poll = hub
            .attach(&reader.id, TransportKind::ShortPolling, from - 1)
            .unwrap();
        while let Delivery::Events(events) = poll.ready(BatchLimit::events(2)) {
            if events.is_empty() {
                break;
            }
        }
        assert!(reader.lock().protected.is_none());
    }

    /// A memory store whose writes complete only when the test says so.
    struct GatedStore {
        memory: MemoryStore,
        waiting: Mutex<Vec<history::Then>>,
    }

    impl std::fmt::Debug for GatedStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("GatedStore")
        }
    }

    impl GatedStore {
        fn new() -> Arc<Self> {
            Arc::new(GatedStore {
                memory: MemoryStore::new(50, Duration::from_secs(3600)),
                waiting: Mutex::new(Vec::new()),
            })
        }

        async fn wait_for_writes(&self, count: usize) {
            tokio::time::timeout(Duration::from_secs(10), async {
                while lock(&self.waiting).len() < count {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("timeout: the send's write to be queued");
        }

        fn finish_writes(&self, result: Result<(), StoreError>) {
            for then in lock(&self.waiting).drain(..) {
                then(result.clone());
            }
        }
    }

    impl HistoryStore for GatedStore {
        fn last_id(&self) -> u64 {
            0
        }
        fn reserved_ids(&self) -> u64 {
            u64::MAX
        }
        fn reserve_ids(&self, up_to: u64) -> history::Reply<u64> {
            self.memory.reserve_ids(up_to)
        }
        fn append(
            &self,
            message: Arc<Message>,
            then: Option<history::Then>,
        ) -> Result<(), StoreError> {
            self.memory.append(message, None)?;
            lock(&self.waiting).extend(then);
            Ok(())
        }
        fn recent(&self, room: &str, limit: usize) -> history::Reply<Vec<Arc<Message>>> {
            self.memory.recent(room, limit)
        }
        fn page(
            &self,
            room: &str,
            before: Option<u64>,
            limit: usize,
        ) -> history::Reply<history::Page> {
            self.memory.page(room, before, limit)
        }
        fn forget(&self, room: &str) {
            self.memory.forget(room)
        }
        fn close(&self, _last_used: u64) {}
    }

    fn messages_seen(hub: &Hub, session: &Arc<Session>) -> Vec<u64> {
        events_of(hub, session)
            .iter()
            .filter(|e| e["type"] == "message")
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn with_full_durability_a_send_is_broadcast_only_once_written_and_a_retry_waits_for_it() {
        let store = GatedStore::new();
        let config = HubConfig {
            durability: Durability::Full,
            ..HubConfig::default().with_rate_limit(1e6)
        };
        let hub = Hub::with_store(config, store.clone(), Metrics::new());
        let reader = hub.create_session("reader").unwrap();
        let writer = hub.create_session("writer").unwrap();
        hub.execute(&reader, vec![join("r")]).await;
        hub.execute(&writer, vec![join("r")]).await;

        let sending = tokio::spawn({
            let (hub, writer) = (hub.clone(), writer.clone());
            async move { hub.execute(&writer, vec![send("r", "c1")]).await }
        });
        store.wait_for_writes(1).await;
        let retry = tokio::spawn({
            let (hub, writer) = (hub.clone(), writer.clone());
            async move { hub.execute(&writer, vec![send("r", "c1")]).await }
        });
        tokio::task::yield_now().await;
        assert!(
            messages_seen(&hub, &reader).is_empty() && messages_seen(&hub, &writer).is_empty(),
            "nobody, not even the sender, sees a message before its write is done"
        );
        assert_eq!(
            lock(&store.waiting).len(),
            1,
            "the retry is not a second write"
        );
        store.finish_writes(Ok(()));
        let first = sending.await.unwrap();
        let again = retry.await.unwrap();
        assert_eq!(
            (first[0].ok, first[0].id, first[0].duplicate),
            (true, Some(1), Some(false))
        );
        assert_eq!(
            (again[0].ok, again[0].id, again[0].duplicate),
            (true, Some(1), Some(true))
        );
        assert_eq!(messages_seen(&hub, &reader).len(), 1);

        let failing = tokio::spawn({
            let (hub, writer) = (hub.clone(), writer.clone());
            async move { hub.execute(&writer, vec![send("r", "c2")]).await }
        });
        store.wait_for_writes(1).await;
        store.finish_writes(Err(StoreError::Failed("disk full".into())));
        let failed = failing.await.unwrap();
        assert_eq!(
            failed[0].error.as_ref().map(|e| e.code),
            Some(ErrorCode::HistoryUnavailable)
        );
        assert_eq!(
            messages_seen(&hub, &reader).len(),
            1,
            "a failed write is not broadcast"
        );
        // Forgotten, so its retry is a new send.
        let resend = tokio::spawn({
            let (hub, writer) = (hub.clone(), writer.clone());
            async move { hub.execute(&writer, vec![send("r", "c2")]).await }
        });
        store.wait_for_writes(1).await;
        store.finish_writes(Ok(()));
        let resent = resend.await.unwrap();
        assert_eq!((resent[0].ok, resent[0].duplicate), (true, Some(false)));
        assert_eq!(messages_seen(&hub, &reader).len(), 2);
    }
}
