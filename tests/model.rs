//! The hub against a reference model (issue 12, part 3).
//!
//! proptest drives one hub with random interleavings of what clients do: sessions created
//! and ended, joins, leaves, sends and retried sends, typing, scrollback, transports of all
//! four kinds attached from arbitrary resume points (superseding each other, a second poll
//! refused), reads of a few events at a time (a transport that is not read falls behind and
//! is closed `slow_consumer`), abrupt detaches and idle expiry. WebSockets are write-through,
//! into a sink that stands for the socket; the other kinds pull from the replay buffer.
//!
//! A small model knows the protocol: who is in which room, each room's kept messages, and the
//! events about messages each session is owed in order (`message`, `history`,
//! `history_page`, `reset`). After every step:
//!
//! - every command's result is the model's (ok, the message id, `duplicate`, or the error
//!   code);
//! - each client's seqs are gapless (a `reset` is the one allowed jump), and an event
//!   delivered again (a resume from an earlier point) is byte for byte the one delivered
//!   before;
//! - the message events a client consumed are, in order, a prefix of what the model owes it:
//!   every message of its rooms arrives once, in room order, with the history the model
//!   predicts, or the session got a `reset` followed by fresh histories;
//! - a client that has read everything sees each of its rooms' presence as the model's
//!   membership, and the hub's rooms for it are the model's.
//!
//! At the end every live session resumes, reads everything, and must have consumed exactly
//! what it was owed. Failing cases shrink to a short list of steps; the ones found are kept
//! as tests below. `PROPTEST_CASES` sets the number of cases (default 256).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;
use switchyard::hub::{
    Attachment, BatchLimit, Budget, Delivery, DirectSink, Hub, HubConfig, OutboxFull, Session,
};
use switchyard::protocol::{CloseReason, Command, EncodedEvent, ErrorCode, TransportKind};

const SESSIONS: usize = 4;
const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
/// Messages kept per room (in the room and in the memory store).
const HISTORY_LEN: usize = 4;
/// Rooms the hub keeps: fewer than the names, so empty rooms are dropped and reloaded, and a
/// join can find the server full.
const MAX_ROOMS: usize = 2;
/// Events per session kept for resume: small, so resumes from old points get a `reset`.
const REPLAY: usize = 12;
/// Live events a transport may fall behind by before it is closed `slow_consumer`.
const OUTBOX: u64 = 4;

fn config() -> HubConfig {
    HubConfig {
        session_ttl: Duration::ZERO,
        replay_window: REPLAY,
        outbox: Budget {
            events: OUTBOX,
            bytes: u64::MAX,
        },
        history_len: HISTORY_LEN,
        presence_interval: Duration::ZERO,
        fanout_threads: 2,
        max_rooms: MAX_ROOMS,
        dedup_window: 1000,
        ..HubConfig::default().with_rate_limit(1e9)
    }
}

// ---------------------------------------------------------------------------------------
// Steps

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WebSocket,
    Sse,
    LongPoll,
    ShortPoll,
}

impl Kind {
    fn transport(self) -> TransportKind {
        match self {
            Kind::WebSocket => TransportKind::WebSocket,
            Kind::Sse => TransportKind::Sse,
            Kind::LongPoll => TransportKind::LongPolling,
            Kind::ShortPoll => TransportKind::ShortPolling,
        }
    }

    fn is_poll(self) -> bool {
        matches!(self, Kind::LongPoll | Kind::ShortPoll)
    }
}

/// Where a transport resumes from.
#[derive(Debug, Clone, Copy)]
enum Resume {
    /// The last seq the client consumed.
    Last,
    /// That many seqs earlier (events delivered again).
    Back(u8),
    /// From the start.
    Zero,
    /// Past the session's last seq: refused `invalid_after`.
    Ahead(u8),
}

#[derive(Clone)]
enum Step {
    Join(usize, usize),
    Leave(usize, usize),
    Send(usize, usize),
    /// The session's last accepted send again, with the same `client_id`.
    Retry(usize),
    Typing(usize, usize),
    /// A page of a room's messages before the id at this index of its kept messages
    /// (`None`: the newest), at most `limit`.
    Scrollback(usize, usize, Option<u8>, u8),
    Attach(usize, Kind, Resume),
    /// The attached transport takes up to this many events.
    Read(usize, u8),
    /// The client acknowledges a seq (the `ack` command).
    Ack(usize, Resume),
    /// The transport goes away without a word.
    Detach(usize),
    /// `DELETE` of the session.
    End(usize),
    /// Idle expiry (the TTL is zero: a session with no transport ends), when one session
    /// is idle.
    Expire,
    /// A new session in an ended session's place.
    Create(usize),
}

/// One line per step, also in proptest's `{:#?}`: a shrunk case reads as a list.
impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Join(s, r) => write!(f, "Join(s{s}, r{r})"),
            Step::Leave(s, r) => write!(f, "Leave(s{s}, r{r})"),
            Step::Send(s, r) => write!(f, "Send(s{s}, r{r})"),
            Step::Retry(s) => write!(f, "Retry(s{s})"),
            Step::Typing(s, r) => write!(f, "Typing(s{s}, r{r})"),
            Step::Scrollback(s, r, before, limit) => {
                write!(
                    f,
                    "Scrollback(s{s}, r{r}, before: {before:?}, limit: {limit})"
                )
            }
            Step::Attach(s, kind, resume) => write!(f, "Attach(s{s}, {kind:?}, {resume:?})"),
            Step::Read(s, n) => write!(f, "Read(s{s}, {n})"),
            Step::Ack(s, at) => write!(f, "Ack(s{s}, {at:?})"),
            Step::Detach(s) => write!(f, "Detach(s{s})"),
            Step::End(s) => write!(f, "End(s{s})"),
            Step::Expire => write!(f, "Expire"),
            Step::Create(s) => write!(f, "Create(s{s})"),
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    let s = 0..SESSIONS;
    let r = 0..ROOMS.len();
    let kind = prop_oneof![
        Just(Kind::WebSocket),
        Just(Kind::Sse),
        Just(Kind::LongPoll),
        Just(Kind::ShortPoll)
    ];
    let resume = prop_oneof![
        6 => Just(Resume::Last),
        2 => (1..30u8).prop_map(Resume::Back),
        1 => Just(Resume::Zero),
        1 => (1..3u8).prop_map(Resume::Ahead),
    ];
    prop_oneof![
        6 => (s.clone(), r.clone()).prop_map(|(s, r)| Step::Join(s, r)),
        2 => (s.clone(), r.clone()).prop_map(|(s, r)| Step::Leave(s, r)),
        14 => (s.clone(), r.clone()).prop_map(|(s, r)| Step::Send(s, r)),
        2 => s.clone().prop_map(Step::Retry),
        2 => (s.clone(), r.clone()).prop_map(|(s, r)| Step::Typing(s, r)),
        2 => (s.clone(), r.clone(), proptest::option::of(0..HISTORY_LEN as u8), 1..4u8)
            .prop_map(|(s, r, before, limit)| Step::Scrollback(s, r, before, limit)),
        6 => (s.clone(), kind, resume.clone()).prop_map(|(s, k, from)| Step::Attach(s, k, from)),
        2 => (s.clone(), resume).prop_map(|(s, at)| Step::Ack(s, at)),
        10 => (s.clone(), 1..8u8).prop_map(|(s, n)| Step::Read(s, n)),
        2 => s.clone().prop_map(Step::Detach),
        1 => s.clone().prop_map(Step::End),
        1 => Just(Step::Expire),
        3 => s.prop_map(Step::Create),
    ]
}

// ---------------------------------------------------------------------------------------
// The model

/// An event about messages, as the model predicts it and as the client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owed {
    Message(u64),
    History(usize, Vec<u64>),
    Page(usize, Vec<u64>, bool),
    /// A `reset`, at this seq.
    Reset(u64),
}

#[derive(Debug, Default)]
struct ModelRoom {
    /// Ids of the messages kept (the store's last `HISTORY_LEN`).
    kept: VecDeque<u64>,
    /// Members, as session slots.
    members: Vec<usize>,
    in_memory: bool,
    last_used: u64,
}

#[derive(Debug, Default)]
struct ModelSession {
    alive: bool,
    rooms: Vec<usize>,
    owed: Vec<Owed>,
    /// The last accepted send: its `client_id`, room and message id.
    last_send: Option<(String, usize, u64)>,
    /// What the model knows of that send's echo.
    echo: Option<Echo>,
}

/// The echo of a session's last send: a retry gets it again unless an acknowledgement (an
/// `ack`, or a resume point) covered its seq.
#[derive(Debug, Clone, Copy)]
struct Echo {
    /// Where it is in the session's `owed`.
    owed_at: usize,
    /// Its seq: unknown until the client reads it, or somewhere in a range the client
    /// skipped when it read a `reset`.
    seq: Option<(u64, u64)>,
    /// Whether an acknowledgement covered it: `None` when one fell inside the range.
    acked: Option<bool>,
}

impl Echo {
    /// The client acknowledged every event up to `seq`.
    fn acknowledge(&mut self, seq: u64) {
        match self.seq {
            Some((_, last)) if last <= seq => self.acked = Some(true),
            Some((first, _)) if first <= seq && self.acked == Some(false) => self.acked = None,
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
struct Model {
    rooms: Vec<ModelRoom>,
    sessions: Vec<ModelSession>,
    next_id: u64,
    clock: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            rooms: (0..ROOMS.len()).map(|_| ModelRoom::default()).collect(),
            sessions: (0..SESSIONS)
                .map(|_| ModelSession {
                    alive: true,
                    ..ModelSession::default()
                })
                .collect(),
            next_id: 1,
            clock: 0,
        }
    }

    fn history(&self, r: usize) -> Owed {
        Owed::History(r, self.rooms[r].kept.iter().copied().collect())
    }

    /// The error a command of session `s` about room `r` gets before anything else, if any.
    fn refusal(&self, s: usize, r: usize, join: bool) -> Option<ErrorCode> {
        if !self.sessions[s].alive {
            Some(ErrorCode::UnknownSession)
        } else if !join && !self.sessions[s].rooms.contains(&r) {
            Some(ErrorCode::NotInRoom)
        } else {
            None
        }
    }

    fn leave_all(&mut self, s: usize) {
        for r in std::mem::take(&mut self.sessions[s].rooms) {
            self.rooms[r].members.retain(|m| *m != s);
            self.clock += 1;
            self.rooms[r].last_used = self.clock;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// The WebSocket's socket: frames written through by the hub, read by the client.
#[derive(Debug, Default)]
struct Socket {
    frames: Mutex<VecDeque<(u64, EncodedEvent, bool)>>,
}

impl DirectSink for Socket {
    fn deliver(&self, seq: u64, event: &EncodedEvent, backlog: bool) -> Result<(), OutboxFull> {
        let mut frames = self.frames.lock().unwrap();
        frames.push_back((seq, event.clone(), !backlog));
        let live = frames.iter().filter(|f| f.2).count() as u64;
        if live > OUTBOX {
            Err(OutboxFull)
        } else {
            Ok(())
        }
    }
}

struct Transport {
    kind: Kind,
    attachment: Attachment,
    socket: Option<Arc<Socket>>,
}

impl Transport {
    fn closed(&self) -> Option<CloseReason> {
        *self.attachment.close_signal().borrow()
    }
}

struct Client {
    session: Arc<Session>,
    /// The last seq consumed.
    cursor: u64,
    /// Every event consumed, as JSON, by seq.
    seen: HashMap<u64, String>,
    transport: Option<Transport>,
    /// What it read about messages, in order.
    got: Vec<Owed>,
    /// Its view of each room's presence.
    presence: HashMap<String, BTreeSet<String>>,
    /// Events about messages it skipped when it read a `reset`.
    skipped: usize,
}

impl Client {
    fn new(session: Arc<Session>) -> Self {
        Client {
            session,
            cursor: 0,
            seen: HashMap::new(),
            transport: None,
            got: Vec::new(),
            presence: HashMap::new(),
            skipped: 0,
        }
    }
}

fn name(s: usize) -> String {
    format!("user{s}")
}

fn room_index(name: &str) -> usize {
    ROOMS
        .iter()
        .position(|r| *r == name)
        .unwrap_or_else(|| panic!("an event names an unknown room {name:?}"))
}

fn ids(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .expect("messages is an array")
        .iter()
        .map(|m| m["id"].as_u64().expect("a message has an id"))
        .collect()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a list of names")
        .iter()
        .map(|n| n.as_str().expect("a name").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The run

struct Run {
    hub: Hub,
    model: Model,
    clients: Vec<Client>,
    /// The steps so far, for failure messages.
    trace: Vec<String>,
}

type Checked = Result<(), TestCaseError>;

macro_rules! check {
    ($run:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!(
                "{}\nafter steps:\n  {}",
                format!($($fmt)+),
                $run.trace.join("\n  ")
            )));
        }
    };
}

impl Run {
    fn new() -> Self {
        let hub = Hub::new(config());
        let clients = (0..SESSIONS)
            .map(|s| Client::new(hub.create_session(&name(s)).expect("session created")))
            .collect();
        Run {
            hub,
            model: Model::new(),
            clients,
            trace: Vec::new(),
        }
    }

    async fn command(&mut self, s: usize, command: Command) -> switchyard::hub::CommandResult {
        let session = self.clients[s].session.clone();
        let mut results = self.hub.execute(&session, vec![Ok(command)]).await;
        results.pop().expect("one result per command")
    }

    fn expect_code(
        &self,
        what: &str,
        result: &switchyard::hub::CommandResult,
        code: Option<ErrorCode>,
    ) -> Checked {
        let got = result.error.as_ref().map(|e| e.code);
        check!(
            self,
            got == code && result.ok == code.is_none(),
            "{what}: expected {code:?}, got {result:?}"
        );
        Ok(())
    }

    async fn apply(&mut self, step: &Step) -> Checked {
        self.trace.push(format!("{step:?}"));
        match *step {
            Step::Join(s, r) => self.join(s, r).await?,
            Step::Leave(s, r) => {
                let result = self
                    .command(
                        s,
                        Command::Leave {
                            room: ROOMS[r].into(),
                        },
                    )
                    .await;
                let refusal = self.model.refusal(s, r, false);
                self.expect_code("leave", &result, refusal)?;
                if refusal.is_none() {
                    let model = &mut self.model;
                    model.sessions[s].rooms.retain(|x| *x != r);
                    model.rooms[r].members.retain(|m| *m != s);
                    model.clock += 1;
                    model.rooms[r].last_used = model.clock;
                }
            }
            Step::Send(s, r) => {
                let client_id = format!("c{}", self.trace.len());
                let result = self
                    .command(
                        s,
                        Command::Send {
                            room: ROOMS[r].into(),
                            text: format!("text {}", self.trace.len()),
                            client_id: client_id.clone(),
                        },
                    )
                    .await;
                let refusal = self.model.refusal(s, r, false);
                self.expect_code("send", &result, refusal)?;
                if refusal.is_none() {
                    let model = &mut self.model;
                    let id = model.next_id;
                    model.next_id += 1;
                    check!(
                        self,
                        result.id == Some(id) && result.duplicate == Some(false),
                        "send: expected id {id}, not a duplicate; got {result:?}"
                    );
                    let model = &mut self.model;
                    let room = &mut model.rooms[r];
                    room.kept.push_back(id);
                    if room.kept.len() > HISTORY_LEN {
                        room.kept.pop_front();
                    }
                    model.clock += 1;
                    room.last_used = model.clock;
                    for m in room.members.clone() {
                        if m == s {
                            model.sessions[s].echo = Some(Echo {
                                owed_at: model.sessions[s].owed.len(),
                                seq: None,
                                acked: Some(false),
                            });
                        }
                        model.sessions[m].owed.push(Owed::Message(id));
                    }
                    model.sessions[s].last_send = Some((client_id, r, id));
                }
            }
            Step::Retry(s) => {
                let Some((client_id, r, id)) = self.model.sessions[s].last_send.clone() else {
                    return Ok(());
                };
                let before = self.last_seq(s);
                let result = self
                    .command(
                        s,
                        Command::Send {
                            room: ROOMS[r].into(),
                            text: "retried".into(),
                            client_id,
                        },
                    )
                    .await;
                let refusal = self.model.refusal(s, r, false);
                self.expect_code("retried send", &result, refusal)?;
                if refusal.is_none() {
                    check!(
                        self,
                        result.id == Some(id) && result.duplicate == Some(true),
                        "retried send: expected the original id {id} as a duplicate; got {result:?}"
                    );
                    // The original is echoed to the sender again, and to no one else, unless it
                    // acknowledged the echo. When an acknowledgement fell where the model does
                    // not know the echo's seq (it skipped it), the hub's answer decides.
                    let echoed = match self.model.sessions[s].echo.and_then(|e| e.acked) {
                        Some(acked) => !acked,
                        None => {
                            self.hub.settle();
                            self.last_seq(s) > before
                        }
                    };
                    if echoed {
                        self.model.sessions[s].owed.push(Owed::Message(id));
                    }
                }
            }
            Step::Typing(s, r) => {
                let result = self
                    .command(
                        s,
                        Command::Typing {
                            room: ROOMS[r].into(),
                        },
                    )
                    .await;
                self.expect_code("typing", &result, self.model.refusal(s, r, false))?;
            }
            Step::Scrollback(s, r, before, limit) => {
                let kept: Vec<u64> = self.model.rooms[r].kept.iter().copied().collect();
                let before = before.map(|i| kept.get(i as usize).copied().unwrap_or(1));
                let result = self
                    .command(
                        s,
                        Command::History {
                            room: ROOMS[r].into(),
                            before,
                            limit: Some(limit as usize),
                        },
                    )
                    .await;
                let refusal = self.model.refusal(s, r, false);
                self.expect_code("history", &result, refusal)?;
                if refusal.is_none() {
                    let older: Vec<u64> = kept
                        .into_iter()
                        .filter(|id| before.is_none_or(|b| *id < b))
                        .collect();
                    let skip = older.len().saturating_sub(limit as usize);
                    let page = Owed::Page(r, older[skip..].to_vec(), skip > 0);
                    self.model.sessions[s].owed.push(page);
                }
            }
            Step::Attach(s, kind, resume) => self.attach(s, kind, resume)?,
            Step::Ack(s, at) => self.ack(s, at).await?,
            Step::Read(s, n) => self.read(s, n as usize)?,
            Step::Detach(s) => {
                self.clients[s].transport = None;
            }
            Step::End(s) => {
                let id = self.clients[s].session.id.clone();
                let ended = self.hub.end_session(&id);
                let alive = self.model.sessions[s].alive;
                check!(
                    self,
                    ended.is_ok() == alive,
                    "end: alive {alive}, got {ended:?}"
                );
                if alive {
                    self.end_in_model(s)?;
                }
            }
            Step::Expire => {
                let idle: Vec<usize> = (0..SESSIONS)
                    .filter(|&s| {
                        self.model.sessions[s].alive
                            && self.clients[s]
                                .transport
                                .as_ref()
                                .is_none_or(|t| t.closed().is_some())
                    })
                    .collect();
                if idle.len() > 1 {
                    // The hub ends idle sessions in no set order, and the order they leave
                    // their rooms decides which empty room is dropped first: one at a time.
                    return Ok(());
                }
                let ended = self.hub.expire_idle();
                check!(
                    self,
                    ended == idle.len(),
                    "expiry ended {ended} sessions; the idle ones are {idle:?}"
                );
                for s in idle {
                    self.end_in_model(s)?;
                }
            }
            Step::Create(s) => {
                if !self.model.sessions[s].alive {
                    let session = self.hub.create_session(&name(s)).expect("session created");
                    self.clients[s] = Client::new(session);
                    self.model.sessions[s] = ModelSession {
                        alive: true,
                        ..ModelSession::default()
                    };
                }
            }
        }
        self.hub.settle();
        self.hub.flush_presence();
        self.hub.settle();
        self.check_state()
    }

    fn end_in_model(&mut self, s: usize) -> Checked {
        self.model.sessions[s].alive = false;
        self.model.leave_all(s);
        if let Some(transport) = self.clients[s].transport.take() {
            let closed = transport.closed();
            check!(
                self,
                closed.is_some(),
                "an ended session's transport must be closed; it is not"
            );
        }
        Ok(())
    }

    async fn join(&mut self, s: usize, r: usize) -> Checked {
        let result = self
            .command(
                s,
                Command::Join {
                    room: ROOMS[r].into(),
                },
            )
            .await;
        let model = &mut self.model;
        let refusal = model.refusal(s, r, true);
        let joined = model.sessions[s].rooms.contains(&r);
        let mut expected = refusal;
        if refusal.is_none() && !joined && !model.rooms[r].in_memory {
            let in_memory = model.rooms.iter().filter(|room| room.in_memory).count();
            if in_memory >= MAX_ROOMS {
                // The least recently used empty room is dropped, its history forgotten.
                let oldest_empty = (0..ROOMS.len())
                    .filter(|&x| model.rooms[x].in_memory && model.rooms[x].members.is_empty())
                    .min_by_key(|&x| model.rooms[x].last_used);
                match oldest_empty {
                    Some(x) => {
                        model.rooms[x].in_memory = false;
                        model.rooms[x].kept.clear();
                    }
                    None => expected = Some(ErrorCode::ServerFull),
                }
            }
        }
        self.expect_code("join", &result, expected)?;
        if expected.is_some() {
            return Ok(());
        }
        let history = self.model.history(r);
        let model = &mut self.model;
        model.sessions[s].owed.push(history);
        if !joined {
            model.rooms[r].in_memory = true;
            model.rooms[r].members.push(s);
            model.sessions[s].rooms.push(r);
            model.clock += 1;
            model.rooms[r].last_used = model.clock;
        }
        Ok(())
    }

    /// Session `s` acknowledged every event up to `seq`.
    fn acknowledged(&mut self, s: usize, seq: u64) {
        if let Some(echo) = self.model.sessions[s].echo.as_mut() {
            echo.acknowledge(seq);
        }
    }

    /// The `ack` command: of a seq the client read (the resume points' `Back`, `Last` and
    /// `Zero`), or past the session's last one (`Ahead`: refused `invalid_ack`).
    async fn ack(&mut self, s: usize, at: Resume) -> Checked {
        let seq = self.seq_at(s, at);
        let result = self.command(s, Command::Ack { seq }).await;
        let expected = if !self.model.sessions[s].alive {
            Some(ErrorCode::UnknownSession)
        } else if matches!(at, Resume::Ahead(_)) {
            Some(ErrorCode::InvalidAck)
        } else {
            None
        };
        self.expect_code("ack", &result, expected)?;
        if expected.is_none() {
            self.acknowledged(s, seq);
        }
        Ok(())
    }

    /// The hub's last seq for session `s`.
    fn last_seq(&self, s: usize) -> u64 {
        self.hub
            .describe(&self.clients[s].session.id)
            .map(|info| info.last_seq)
            .unwrap_or(0)
    }

    /// The seq a resume point (or an `ack`) of session `s` names.
    fn seq_at(&self, s: usize, at: Resume) -> u64 {
        let cursor = self.clients[s].cursor;
        match at {
            Resume::Last => cursor,
            Resume::Back(k) => cursor.saturating_sub(k as u64),
            Resume::Zero => 0,
            Resume::Ahead(k) => self.last_seq(s) + k as u64,
        }
    }

    fn attach(&mut self, s: usize, kind: Kind, resume: Resume) -> Checked {
        let last_seq = self.last_seq(s);
        let after = self.seq_at(s, resume);
        // A transport the hub closed is gone.
        if self.clients[s]
            .transport
            .as_ref()
            .is_some_and(|t| t.closed().is_some())
        {
            self.clients[s].transport = None;
        }
        let held_poll = self.clients[s]
            .transport
            .as_ref()
            .is_some_and(|t| t.kind.is_poll());
        let expected = if !self.model.sessions[s].alive {
            Some(ErrorCode::UnknownSession)
        } else if kind.is_poll() && held_poll {
            Some(ErrorCode::PollInProgress)
        } else if after > last_seq {
            Some(ErrorCode::InvalidAfter)
        } else {
            None
        };
        let id = self.clients[s].session.id.clone();
        let attached = self.hub.attach(&id, kind.transport(), after);
        match (attached, expected) {
            (Err(error), Some(code)) => {
                check!(
                    self,
                    error.code == code,
                    "attach: expected {code:?}, got {error:?}"
                );
                Ok(())
            }
            (Err(error), None) => {
                check!(self, false, "attach: expected success, got {error:?}");
                Ok(())
            }
            (Ok(_), Some(code)) => {
                check!(self, false, "attach: expected {code:?}, got success");
                Ok(())
            }
            (Ok(mut attachment), None) => {
                if let Some(old) = self.clients[s].transport.take() {
                    let closed = old.closed();
                    check!(
                        self,
                        closed == Some(CloseReason::Superseded),
                        "the transport a new one replaced must be closed superseded, got {closed:?}"
                    );
                }
                if attachment.cursor() == after {
                    self.acknowledged(s, after);
                } else {
                    // Too old a resume point: the session gets a reset, then every room's
                    // history. A client reading from there skips what came before; one that
                    // resumes from a point still kept reads it all, the reset included.
                    let model = &mut self.model;
                    model.sessions[s]
                        .owed
                        .push(Owed::Reset(attachment.cursor() + 1));
                    for r in model.sessions[s].rooms.clone() {
                        let history = model.history(r);
                        model.sessions[s].owed.push(history);
                    }
                }
                let socket = (kind == Kind::WebSocket).then(|| Arc::new(Socket::default()));
                if let Some(socket) = &socket {
                    let written = attachment.write_through(socket.clone());
                    check!(self, written, "write-through refused on a fresh attachment");
                }
                self.clients[s].transport = Some(Transport {
                    kind,
                    attachment,
                    socket,
                });
                Ok(())
            }
        }
    }

    fn read(&mut self, s: usize, n: usize) -> Checked {
        let Some(transport) = self.clients[s].transport.as_mut() else {
            return Ok(());
        };
        let kind = transport.kind;
        let events: Vec<(u64, EncodedEvent)> = match &transport.socket {
            Some(socket) => {
                if transport.closed().is_some() {
                    // The server dropped what the socket had not begun to send.
                    self.clients[s].transport = None;
                    return Ok(());
                }
                let mut frames = socket.frames.lock().unwrap();
                let n = n.min(frames.len());
                frames.drain(..n).map(|(seq, e, _)| (seq, e)).collect()
            }
            None => match transport.attachment.ready(BatchLimit::events(n)) {
                Delivery::Events(events) => events,
                Delivery::Closed(reason) => {
                    check!(
                        self,
                        matches!(
                            reason,
                            CloseReason::SlowConsumer
                                | CloseReason::Superseded
                                | CloseReason::Expired
                        ),
                        "a transport closed for {reason:?}"
                    );
                    self.clients[s].transport = None;
                    return Ok(());
                }
            },
        };
        // A poll's reply ends the request.
        if kind == Kind::ShortPoll || (kind == Kind::LongPoll && !events.is_empty()) {
            self.clients[s].transport = None;
        }
        for (seq, event) in events {
            self.consume(s, seq, &event)?;
        }
        Ok(())
    }

    fn consume(&mut self, s: usize, seq: u64, event: &EncodedEvent) -> Checked {
        let json = event.to_json(seq);
        let client = &self.clients[s];
        if seq <= client.cursor {
            let before = client.seen.get(&seq);
            check!(
                self,
                before.is_none_or(|b| *b == json),
                "seq {seq} delivered again differs: first {before:?}, now {json}"
            );
            return Ok(());
        }
        let value: Value = serde_json::from_str(&json).expect("an event is JSON");
        let kind = value["type"]
            .as_str()
            .expect("an event has a type")
            .to_string();
        check!(
            self,
            seq == client.cursor + 1 || kind == "reset",
            "session {s}: seq {seq} follows {} (a gap), event {json}",
            client.cursor
        );
        let jumped = seq > client.cursor + 1;
        if jumped {
            self.skip_to_reset(s, seq)?;
        }
        let client = &mut self.clients[s];
        client.cursor = seq;
        client.seen.insert(seq, json.clone());
        let room = value["room"].as_str().unwrap_or_default().to_string();
        let owed = match kind.as_str() {
            "message" => Some(Owed::Message(value["id"].as_u64().expect("an id"))),
            "history" => Some(Owed::History(room_index(&room), ids(&value["messages"]))),
            "history_page" => Some(Owed::Page(
                room_index(&room),
                ids(&value["messages"]),
                value["more"].as_bool().expect("more"),
            )),
            "reset" => {
                client.presence.clear();
                Some(Owed::Reset(seq))
            }
            "presence" => {
                let online = names(&value["online"]).into_iter().collect();
                client.presence.insert(room, online);
                None
            }
            "presence_diff" => {
                let view = client.presence.entry(room).or_default();
                view.extend(names(&value["joined"]));
                for gone in names(&value["left"]) {
                    view.remove(&gone);
                }
                None
            }
            "typing" => None,
            other => {
                check!(self, false, "session {s}: unexpected event {other}: {json}");
                None
            }
        };
        if let Some(owed) = owed {
            let client = &mut self.clients[s];
            client.got.push(owed.clone());
            let at = client.got.len() - 1;
            if let Some(echo) = self.model.sessions[s].echo.as_mut() {
                if echo.owed_at == at {
                    echo.seq = Some((seq, seq));
                }
            }
            let expected = self.model.sessions[s].owed.get(at);
            check!(
                self,
                expected == Some(&owed),
                "session {s}: event {at} about messages is {owed:?}; the model owes {expected:?}\n  \
                 owed: {:?}\n  got:  {:?}",
                self.model.sessions[s].owed,
                self.clients[s].got
            );
        }
        Ok(())
    }

    /// A client read a `reset` past its cursor: what the session was owed between what the
    /// client read and the reset is skipped (and counted).
    fn skip_to_reset(&mut self, s: usize, seq: u64) -> Checked {
        let owed = &self.model.sessions[s].owed;
        let from = self.clients[s].got.len();
        let at = owed.iter().position(|o| *o == Owed::Reset(seq));
        check!(
            self,
            at.is_some_and(|at| at >= from),
            "session {s}: a reset at seq {seq} the model does not owe after what it read:\n  \
             owed: {owed:?}\n  got:  {:?}",
            self.clients[s].got
        );
        let skipped = owed[from..at.unwrap_or(from)].to_vec();
        let cursor = self.clients[s].cursor;
        if let Some(echo) = self.model.sessions[s].echo.as_mut() {
            if (from..from + skipped.len()).contains(&echo.owed_at) {
                echo.seq = Some((cursor + 1, seq - 1));
            }
        }
        self.clients[s].skipped += skipped.len();
        self.clients[s].got.extend(skipped);
        Ok(())
    }

    /// What must hold between steps.
    fn check_state(&self) -> Checked {
        for s in 0..SESSIONS {
            let model = &self.model.sessions[s];
            if !model.alive {
                continue;
            }
            let info = self
                .hub
                .describe(&self.clients[s].session.id)
                .map_err(|e| TestCaseError::fail(format!("session {s} is gone: {e:?}")))?;
            let rooms: Vec<String> = model.rooms.iter().map(|r| ROOMS[*r].to_string()).collect();
            check!(
                self,
                info.rooms == rooms,
                "session {s}: the hub has it in {:?}, the model in {rooms:?}",
                info.rooms
            );
            // A client that read everything sees its rooms' members.
            if info.last_seq == self.clients[s].cursor {
                for &r in &model.rooms {
                    let members: BTreeSet<String> = self.model.rooms[r]
                        .members
                        .iter()
                        .map(|m| name(*m))
                        .collect();
                    let view = self.clients[s].presence.get(ROOMS[r]);
                    check!(
                        self,
                        view == Some(&members),
                        "session {s} sees {:?} in {}, the members are {members:?}",
                        view,
                        ROOMS[r]
                    );
                }
            }
        }
        Ok(())
    }

    /// Every live session resumes and reads everything: it must have read all it was owed.
    fn drain(&mut self) -> Checked {
        self.trace
            .push("(every session resumes and reads everything)".into());
        for s in 0..SESSIONS {
            if !self.model.sessions[s].alive {
                continue;
            }
            self.clients[s].transport = None;
            self.attach(s, Kind::Sse, Resume::Last)?;
            for _ in 0..100 {
                self.read(s, 64)?;
                if self.clients[s].cursor == self.last_seq(s) {
                    break;
                }
                if self.clients[s].transport.is_none() {
                    self.attach(s, Kind::Sse, Resume::Last)?;
                }
            }
            let (got, owed) = (&self.clients[s].got, &self.model.sessions[s].owed);
            check!(
                self,
                got == owed,
                "session {s} read everything:\n  got:  {got:?}\n  owed: {owed:?}"
            );
        }
        self.check_state()
    }
}

fn run_steps(steps: &[Step]) -> Checked {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut run = Run::new();
        for step in steps {
            run.apply(step).await?;
        }
        run.drain()
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        max_shrink_iters: 4096,
        // A failure's seed is kept in tests/model.proptest-regressions and replayed first.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_hub_behaves_as_the_model(steps in proptest::collection::vec(step(), 1..120)) {
        run_steps(&steps)?;
    }
}

// Cases proptest found, kept as tests. Both were the model's mistakes, not the hub's; they
// stay because they pin down behaviour the protocol promises.

/// A resume from a point too old queues a `reset` (and fresh histories) in the session; a
/// client that then resumes from its real, still kept, position reads everything in order,
/// the reset included, and loses nothing.
#[test]
fn a_reset_a_later_resume_reaches_in_order_loses_nothing() {
    use Step::*;
    run_steps(&[
        Join(0, 1),
        Join(0, 0),
        Attach(0, Kind::WebSocket, Resume::Last),
        Read(0, 6),
        Join(1, 1),
        Send(0, 0),
        Join(2, 0),
        Leave(1, 1),
        Send(0, 0),
        Join(0, 0),
        Leave(0, 0),
        Attach(0, Kind::WebSocket, Resume::Back(6)),
    ])
    .unwrap();
}

/// Idle sessions ending together leave their rooms in no set order, which decides which
/// empty room is dropped first when the room limit is reached, so the model expires them one
/// at a time (a case once failed when two expired together). Here the one idle session
/// expires, its room is dropped for a new one, a join finds every kept room in use
/// (`server_full`), and a room dropped comes back without its history.
#[test]
fn an_idle_session_expires_and_empty_rooms_are_dropped_least_recently_used_first() {
    use Step::*;
    run_steps(&[
        Join(0, 0),
        Send(0, 0),
        Join(1, 1),
        Send(1, 1),
        Attach(1, Kind::Sse, Resume::Last),
        Attach(2, Kind::WebSocket, Resume::Last),
        Attach(3, Kind::LongPoll, Resume::Last),
        Expire,
        Join(2, 2),
        Join(3, 0),
        Leave(2, 2),
        Join(3, 0),
        Read(1, 5),
        Read(2, 5),
        Read(3, 5),
    ])
    .unwrap();
}
