//! `switchyard bench --soak DURATION`: a changing population on one server for a long time,
//! checking that every message reaches every member exactly once, and watching the server's
//! memory and open files.
//!
//! The soak ramps up to `--soak-sessions` sessions spread over `--transports` (all four by
//! default) and over rooms of about `--soak-room-size` members, then keeps the population
//! changing for DURATION: sessions depart (leave their rooms and `DELETE`, leave and let the
//! TTL end them, or go away while still in their rooms) and new ones arrive; sessions drop
//! their transport and resume with `after=<last seq>` on the same or another kind, now and
//! then after a pause; rooms are emptied (their members move) and new rooms are created;
//! `--soak-rate` messages/s go to the live rooms; a few WebSocket sessions read slowly and
//! stall until the server closes them, then resume. Every `--soak-sample` it records the
//! server's RSS and open descriptors (with `--spawn`; from /proc).
//!
//! # Exactly once, without clocks
//!
//! Every command that touches a room (join, leave, send) goes through that room's *driver*:
//! one task per room that applies them one at a time with `POST /commands`. The driver numbers
//! the room's accepted messages 0, 1, 2, ... (K, carried in each `client_id`), and no message
//! is in flight while it issues a join or a leave, so what a member is owed is exact:
//!
//! - the messages from the driver's count when it issued the join (the join's `history` must
//!   end with the message before it: checked) up to its count when it issued the leave;
//! - each member's messages of a room must come as K, K+1, K+2, ...: a jump is a loss (until
//!   the missing one comes late: out of order), a repeat a duplicate, a message outside every
//!   membership of the session in that room an *unowed* delivery;
//! - a `reset` (the resume point was older than the replay buffer) skips what its `history`
//!   events cover: counted apart, never as loss;
//! - each session's seqs go 1, 2, 3, ... across all its transports and resumes (only a
//!   `reset` may jump).
//!
//! Like the rest of the bench it speaks only the HTTP contract and never reaches into the
//! server; nothing a server sends makes it panic.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::clients::take_sse_data;
use super::process::{self, Machine, Spawned};
use super::report::{self, Panel};
use super::wire::{Connector, Counted, Http, WireCounters};
use super::{BenchArgs, Target};
use crate::protocol::TransportKind;

/// Flags of the soak (`switchyard bench --soak DURATION ...`). The bench's own flags give
/// the target (`--spawn` or `--url`, `--server-arg`, `--pin`), the transports sessions are
/// spread over (`--transports`), `--short-poll-ms`, `--payload-bytes`, `--source-addrs` and
/// the outputs (`--json`: the samples and counts; `--svg`: RSS and open files over time;
/// `--quiet`: no line per sample).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct SoakArgs {
    /// Instead of the latency run: ramp up to --soak-sessions, then keep the population
    /// changing for this long (e.g. `10m`), checking every delivery and sampling the
    /// server's memory and open files. Off by default.
    #[arg(
        long,
        value_parser = humantime::parse_duration,
        conflicts_with_all = ["idle", "baseline", "concurrent"]
    )]
    pub soak: Option<Duration>,
    /// Sessions the soak keeps alive. Default 5000.
    #[arg(long, default_value_t = 5000, hide_default_value = true)]
    pub soak_sessions: usize,
    /// Messages per second over all rooms, each to a random room with members, sent by a
    /// random member. Default 200.
    #[arg(long, default_value_t = 200.0, hide_default_value = true)]
    pub soak_rate: f64,
    /// Members per room on average: the soak keeps sessions / this many rooms. Default 50.
    #[arg(long, default_value_t = 50, hide_default_value = true)]
    pub soak_room_size: usize,
    /// Mean life of a session after the ramp: sessions / this depart per second, and as many
    /// arrive. Default 5m.
    #[arg(
        long,
        default_value = "5m",
        value_parser = humantime::parse_duration,
        hide_default_value = true
    )]
    pub soak_session_life: Duration,
    /// Mean time between two transport drops of one session (each resumes with
    /// `after=<last seq>`, on the same kind or another). Default 60s.
    #[arg(
        long,
        default_value = "60s",
        value_parser = humantime::parse_duration,
        hide_default_value = true
    )]
    pub soak_resume_every: Duration,
    /// Mean life of a room after the ramp: then its members move to other rooms and a new
    /// room is created. Default 3m.
    #[arg(
        long,
        default_value = "3m",
        value_parser = humantime::parse_duration,
        hide_default_value = true
    )]
    pub soak_room_life: Duration,
    /// WebSocket sessions that read slowly (20 ms per frame) and, after every two heartbeat
    /// intervals of reading, stall: half of them silent for 1.5 intervals (the server may
    /// close them, heartbeat_timeout), half sending pings for 3 intervals (closed as
    /// slow_consumer once the socket buffers are full), at most 20 s either way, so the
    /// server never ends the session (30 s TTL); closed, they resume. They stay for the whole
    /// soak, in three rooms each. Default 10.
    #[arg(long, default_value_t = 10, hide_default_value = true)]
    pub soak_slow_readers: usize,
    /// How long after an event a WebSocket or SSE session acknowledges the events it
    /// processed (an `ack` frame, or `POST /commands`), and at once when 64 are waiting, as
    /// the client library does, so the server can forget them; `0s`: never (the server then
    /// keeps each session's last 1024 events). Polls acknowledge with their `after`. Default
    /// 10s.
    #[arg(
        long,
        default_value = "10s",
        value_parser = humantime::parse_duration,
        hide_default_value = true
    )]
    pub soak_ack: Duration,
    /// How often the server's RSS and open files are sampled. Default 5s.
    #[arg(
        long,
        default_value = "5s",
        value_parser = humantime::parse_duration,
        hide_default_value = true
    )]
    pub soak_sample: Duration,
}

impl Default for SoakArgs {
    /// The defaults of the flags, with the soak off.
    fn default() -> Self {
        SoakArgs {
            soak: None,
            soak_sessions: 5000,
            soak_rate: 200.0,
            soak_room_size: 50,
            soak_session_life: Duration::from_secs(300),
            soak_resume_every: Duration::from_secs(60),
            soak_room_life: Duration::from_secs(180),
            soak_slow_readers: 10,
            soak_ack: Duration::from_secs(10),
            soak_sample: Duration::from_secs(5),
        }
    }
}

/// Share of sessions that join a second room.
const SECOND_ROOM_SHARE: f64 = 0.2;
/// Rooms each slow reader joins, so its stream fills the socket buffers sooner.
const SLOW_READER_ROOMS: usize = 3;
/// A slow reader reads for this many heartbeat intervals between stalls.
const SLOW_READING_HEARTBEATS: u32 = 2;
/// A slow reader that sends pings stalls for this many heartbeat intervals; a silent one
/// for half as many, since it may have been silent for up to an interval already (its last
/// pong) and the server closes it after two (`heartbeat_timeout`).
const SLOW_STALL_HEARTBEATS: u32 = 3;
/// The longest stall: the server may close a stalled reader at any point of its stall, and
/// ends its session one TTL (30 s by default) later; the reader must be back before.
const SLOW_STALL_MAX: Duration = Duration::from_secs(20);
/// A slow reader's pause after each frame.
const SLOW_FRAME_PAUSE: Duration = Duration::from_millis(20);
/// A slow reader's receive buffer: small, so a stall stops the server's writes soon.
const SLOW_RECEIVE_BUFFER: u32 = 4096;
/// Sessions arriving at once.
const ARRIVALS_AT_ONCE: usize = 32;
/// Transports connecting at once.
const CONNECTING_AT_ONCE: usize = 64;
/// Longest wait for any one request's answer (a long poll: its wait on top).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The `wait` of a long poll, in ms.
const LONG_POLL_WAIT_MS: u64 = 20_000;
/// A long poll sent this long ago is held by the server (on loopback): abandoning it then
/// cannot race the next attachment.
const HELD: Duration = Duration::from_millis(250);
/// How long a departing member, or every member at the end, may take to read what it is
/// owed.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new session may take to attach its first transport.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the end of the soak waits for departures, arrivals and room moves under way.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// Tries of one command whose answer did not arrive.
const COMMAND_TRIES: u32 = 5;
/// An HTTP connection idle this long is not reused: the server may be closing it.
const STALE_CONNECTION: Duration = Duration::from_secs(15);
/// Commands queued per room driver; a send that finds the queue full is counted, not queued.
const DRIVER_QUEUE: usize = 1024;
/// Skipped messages remembered per membership, to tell a late one (out of order) from a
/// duplicate; past this, a skipped message stays counted as lost.
const GAPS_KEPT: usize = 10_000;
/// Largest SSE event the soak reads.
const MAX_SSE_EVENT: usize = 8 << 20;
/// Notes (first errors) kept for the report.
const NOTES_KEPT: usize = 30;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// The soak's counters, shared by all its tasks.
        #[derive(Debug, Default)]
        struct Totals {
            $($(#[$doc])* $name: AtomicU64,)*
        }

        /// A reading of the soak's counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
        pub struct Counts {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Totals {
            fn read(&self) -> Counts {
                Counts { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Messages delivered to a member for the first time.
    delivered,
    /// Messages a member was owed and never got (a message skipped and never delivered,
    /// or not delivered by the time the member left or the soak ended).
    lost,
    /// Messages delivered to a member again.
    duplicated,
    /// Messages delivered after a later message of the same room.
    out_of_order,
    /// Messages delivered for a room outside the session's memberships of it (before its
    /// join was issued or after its leave).
    unowed,
    /// Events whose seq did not follow the session's previous one by 1 (a `reset` may jump).
    seq_gaps,
    /// `reset` events.
    resets,
    /// Messages a `reset` skipped: covered by the `history` after it, never counted as lost.
    skipped_by_reset,
    /// A join's `history` that did not end with the room's last message before the join, or
    /// a `reset` whose `history` events did not fit the memberships.
    history_mismatches,
    /// `message` events in the soak's rooms that the soak did not send.
    foreign,
    /// `error` events.
    error_events,
    /// Sessions created.
    sessions_created,
    /// Sessions that could not be created or attached.
    arrival_failures,
    /// Departures that left their rooms and deleted the session.
    departures_deleted,
    /// Departures that left their rooms and let the TTL end the session.
    departures_expired,
    /// Departures that went away while still in their rooms (the TTL ends them).
    departures_abandoned,
    /// Sessions the server ended that the soak had not (404 `unknown_session`, close
    /// `expired`, or a refusal nothing can cure).
    sessions_lost,
    /// Rooms created.
    rooms_created,
    /// Rooms emptied: every member moved to another room.
    rooms_emptied,
    /// Joins applied.
    joins,
    /// Leaves applied.
    leaves,
    /// Transports the soak dropped to resume (on the same kind or another).
    resumes,
    /// Resumes on another transport kind.
    kind_switches,
    /// Resumes that waited 1-5 s before attaching again.
    pauses,
    /// Transports the server closed with `slow_consumer`.
    closes_slow_consumer,
    /// Transports the server closed with `heartbeat_timeout`.
    closes_heartbeat_timeout,
    /// Transports the server closed with another reason (`superseded`, ...).
    closes_other,
    /// Transports that ended without a close (connection dropped, silence, bad data).
    transport_drops,
    /// Attachments refused for a moment (409 `poll_in_progress`, 503, 429) and retried.
    attach_retries,
    /// Messages sent (accepted by the server).
    sent,
    /// Sends refused (and not retried).
    send_errors,
    /// Sends whose outcome stayed unknown (no answer, and the sender gone): counted as sent.
    send_unknown,
    /// Messages not sent because the room's driver was behind.
    send_backlog,
    /// Messages not sent because no room had members.
    send_skipped,
    /// Sends retried after a lost answer that the server said it had already applied (the
    /// sender then gets its echo twice, which is not a duplicate).
    retry_echoes,
    /// Joins and leaves refused or left without an answer.
    command_errors,
    /// `ack`s sent by WebSocket and SSE sessions.
    acks,
    /// Departing members that did not read what they were owed within 60 s.
    catch_up_timeouts,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fields of an event the soak reads; the rest is skipped.
#[derive(Debug, Deserialize)]
struct WireEvent<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    client_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    messages: Option<Vec<Listed<'a>>>,
}

/// A message in a `history` event.
#[derive(Debug, Deserialize)]
struct Listed<'a> {
    #[serde(default, borrow)]
    client_id: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct PollReply<'a> {
    #[serde(borrow)]
    events: Vec<WireEvent<'a>>,
    #[serde(default, borrow)]
    closed: Option<Cow<'a, str>>,
}

/// K of a message the soak sent: its `client_id` is `RUN.ROOM.K`.
fn number(run: &str, client_id: &str) -> Option<u64> {
    client_id
        .strip_prefix(run)?
        .strip_prefix('.')?
        .rsplit('.')
        .next()?
        .parse()
        .ok()
}

/// One membership of a session in a room, from its join to its leave.
#[derive(Debug, Clone)]
struct Epoch {
    /// The room's message count when the join was issued: the first message owed.
    start: u64,
    /// The room's message count when the leave was issued (or when the soak ended): the
    /// first message not owed. `None` while the session is in the room.
    end: Option<u64>,
    /// The next message expected.
    next: u64,
    /// Messages skipped over: counted as lost until one comes late (out of order).
    gaps: Vec<u64>,
    /// The session went away while in the room: what it did not read is not owed.
    abandoned: bool,
}

/// What one session was delivered, checked against what it is owed. Events come from the
/// session's transports, memberships from the room drivers.
#[derive(Debug, Default)]
struct Ledger {
    /// The seq of the last event processed: where the next transport resumes.
    last_seq: u64,
    /// Memberships by room name, oldest first.
    rooms: HashMap<String, Vec<Epoch>>,
    /// After a `reset`, until its `history` events are through: the rooms still to hear of.
    reset_pending: Option<HashSet<String>>,
    /// (room, K) of sends retried for this session: a second echo of each is expected.
    echoes: Vec<(String, u64)>,
}

impl Ledger {
    /// A join is about to be issued; the room has `start` messages.
    fn open(&mut self, room: &str, start: u64) {
        self.rooms.entry(room.to_owned()).or_default().push(Epoch {
            start,
            end: None,
            next: start,
            gaps: Vec::new(),
            abandoned: false,
        });
    }

    /// The join just opened was refused.
    fn cancel(&mut self, room: &str) {
        if let Some(epochs) = self.rooms.get_mut(room) {
            if epochs.last().is_some_and(|e| e.end.is_none()) {
                epochs.pop();
            }
        }
    }

    /// A leave is about to be issued (or the room's driver stopped); the room has `end`
    /// messages.
    fn close(&mut self, room: &str, end: u64) {
        if let Some(epoch) = self.rooms.get_mut(room).and_then(|e| e.last_mut()) {
            if epoch.end.is_none() {
                epoch.end = Some(end.max(epoch.start));
            }
        }
    }

    /// The session goes away while in its rooms.
    fn abandon(&mut self) {
        for epoch in self.rooms.values_mut().flatten() {
            if epoch.end.is_none() {
                epoch.abandoned = true;
            }
        }
    }

    /// Messages owed and not delivered yet, in memberships that have ended.
    fn owed(&self) -> u64 {
        self.rooms
            .values()
            .flatten()
            .filter(|e| !e.abandoned)
            .filter_map(|e| e.end.map(|end| end.saturating_sub(e.next)))
            .sum()
    }

    /// The session is done: whatever it is still owed is lost.
    fn settle(&mut self, totals: &Totals) {
        self.end_reset(totals);
        add(&totals.lost, self.owed());
        self.rooms.clear();
    }

    /// Processes one event of the session's stream; returns what was wrong with it, if
    /// anything was.
    fn event(&mut self, event: &WireEvent, run: &str, totals: &Totals) -> Option<String> {
        // Frames without a seq (SSE `ready`, heartbeats) are not events.
        let seq = event.seq?;
        let reset = event.kind == "reset";
        let mut problem = None;
        if seq != self.last_seq + 1 && !(reset && seq > self.last_seq) {
            bump(&totals.seq_gaps);
            problem = Some(format!("seq {seq} after {}", self.last_seq));
        }
        self.last_seq = self.last_seq.max(seq);
        let room = event.room.as_deref();
        match (event.kind.as_ref(), room) {
            ("history", Some(room)) => {
                // None: an empty history; Some(None): its last message is not the soak's.
                let last = event.messages.as_ref().and_then(|m| m.last()).map(|m| {
                    m.client_id
                        .as_deref()
                        .and_then(|client_id| number(run, client_id))
                });
                if self.reset_pending.is_some() {
                    self.reset_history(room, last, totals);
                } else {
                    self.join_history(room, last, totals);
                }
                problem
            }
            ("presence", _) => problem,
            (kind, room) => {
                self.end_reset(totals);
                match (kind, room) {
                    ("message", Some(room)) => {
                        match event.client_id.as_deref().and_then(|c| number(run, c)) {
                            Some(k) => {
                                let wrong = self.message(room, k, totals);
                                problem = problem.or(wrong.map(|w| format!("seq {seq}: {w}")));
                            }
                            None => bump(&totals.foreign),
                        }
                    }
                    ("reset", _) => {
                        bump(&totals.resets);
                        self.reset_pending = Some(self.rooms.keys().cloned().collect());
                    }
                    ("error", _) => bump(&totals.error_events),
                    _ => {}
                }
                problem
            }
        }
    }

    /// A message of the soak; returns what was wrong with it, if anything was.
    fn message(&mut self, room: &str, k: u64, totals: &Totals) -> Option<String> {
        let Some(epochs) = self.rooms.get_mut(room) else {
            bump(&totals.unowed);
            return Some(format!("message {k} of {room}, never joined"));
        };
        let Some(epoch) = epochs.iter_mut().rev().find(|e| e.start <= k) else {
            bump(&totals.unowed);
            return Some(format!("message {k} of {room}, before the join"));
        };
        let span = format!(
            "{room} (joined at {}{})",
            epoch.start,
            epoch
                .end
                .map_or(String::new(), |end| format!(", left at {end}"))
        );
        if epoch.end.is_some_and(|end| k >= end) {
            bump(&totals.unowed);
            Some(format!("message {k} of {span}, after the leave"))
        } else if k == epoch.next {
            bump(&totals.delivered);
            epoch.next += 1;
            None
        } else if k > epoch.next {
            let expected = epoch.next;
            add(&totals.lost, k - expected);
            let room_left = GAPS_KEPT.saturating_sub(epoch.gaps.len());
            epoch.gaps.extend((expected..k).take(room_left));
            epoch.next = k + 1;
            bump(&totals.delivered);
            Some(format!("message {k} of {span} when {expected} was due"))
        } else if let Some(i) = epoch.gaps.iter().position(|&g| g == k) {
            epoch.gaps.swap_remove(i);
            totals.lost.fetch_sub(1, Ordering::Relaxed);
            bump(&totals.out_of_order);
            bump(&totals.delivered);
            Some(format!(
                "message {k} of {span} late, after {}",
                epoch.next - 1
            ))
        } else if let Some(i) = self.echoes.iter().position(|(r, n)| r == room && *n == k) {
            self.echoes.swap_remove(i);
            None
        } else {
            bump(&totals.duplicated);
            Some(format!("message {k} of {span} again"))
        }
    }

    /// A join's `history`: it must end with the message before the first one owed (some
    /// membership of the room started right after it).
    fn join_history(&mut self, room: &str, last: Option<Option<u64>>, totals: &Totals) {
        let fits = self.rooms.get(room).is_some_and(|epochs| {
            epochs.iter().any(|e| match last {
                None => e.start == 0,
                Some(last) => last.is_some_and(|k| k + 1 == e.start),
            })
        });
        if !fits {
            bump(&totals.history_mismatches);
        }
    }

    /// A `history` after a `reset`: the messages up to its last are skipped, not lost.
    fn reset_history(&mut self, room: &str, last: Option<Option<u64>>, totals: &Totals) {
        if let Some(pending) = self.reset_pending.as_mut() {
            pending.remove(room);
        }
        let Some(epochs) = self.rooms.get_mut(room) else {
            bump(&totals.history_mismatches);
            return;
        };
        match last {
            None => {}
            Some(None) => bump(&totals.history_mismatches),
            Some(Some(k)) => {
                let through = k + 1;
                let Some(epoch) = epochs.iter_mut().rev().find(|e| e.start <= through) else {
                    bump(&totals.history_mismatches);
                    return;
                };
                let through = epoch.end.map_or(through, |end| through.min(end));
                if through > epoch.next {
                    add(&totals.skipped_by_reset, through - epoch.next);
                    epoch.next = through;
                }
            }
        }
    }

    /// The `history` events of a `reset` are through: rooms that had none were left before
    /// the reset, and what the session was owed there is skipped.
    fn end_reset(&mut self, totals: &Totals) {
        let Some(pending) = self.reset_pending.take() else {
            return;
        };
        for room in pending {
            for epoch in self.rooms.get_mut(&room).into_iter().flatten() {
                if epoch.abandoned {
                    continue;
                }
                match epoch.end {
                    Some(end) if epoch.next < end => {
                        add(&totals.skipped_by_reset, end - epoch.next);
                        epoch.next = end;
                    }
                    Some(_) => {}
                    // Still a member with messages read, yet no history: it was in the room.
                    None if epoch.next > epoch.start => bump(&totals.history_mismatches),
                    None => {}
                }
            }
        }
    }
}

/// A session of the soak, with what its transport task and the room drivers share.
#[derive(Debug)]
struct Member {
    id: String,
    /// `Some(pings)` for a slow reader: whether it sends pings while it stalls.
    slow: Option<bool>,
    ledger: Mutex<Ledger>,
    /// Stops its transport task.
    stop: CancellationToken,
    /// Leaving the soak: the drivers no longer join it anywhere.
    departing: AtomicBool,
    /// The rooms it is in, as the soak's controller sees them.
    rooms: Mutex<Vec<Arc<Room>>>,
    /// One controller change at a time (a room move, the departure).
    busy: tokio::sync::Mutex<()>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Member {
    fn in_room(&self, room: &Arc<Room>) -> bool {
        lock(&self.rooms).iter().any(|r| Arc::ptr_eq(r, room))
    }

    /// Stops the transport task and waits for it (at most 10 s).
    async fn stop_transport(&self) {
        self.stop.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = timeout(REQUEST_TIMEOUT, task).await;
        }
    }
}

/// A room of the soak, driven by one task.
#[derive(Debug)]
struct Room {
    name: String,
    no: u64,
    ops: mpsc::Sender<RoomOp>,
    /// Members now, as the driver counts them.
    members: AtomicUsize,
    /// Being emptied: nobody new joins it.
    closing: AtomicBool,
    born: Instant,
}

/// What a room's driver is asked to do; each is applied in turn.
#[derive(Debug)]
enum RoomOp {
    /// Send the room's next message from a random member.
    Send,
    /// Join the member; answers whether it joined.
    Join(Arc<Member>, oneshot::Sender<bool>),
    /// Leave; answers whether the member was in the room.
    Leave(Arc<Member>, oneshot::Sender<bool>),
    /// The member goes away while in the room: stop sending from it.
    Forget(Arc<Member>, oneshot::Sender<()>),
    /// The members now.
    Members(oneshot::Sender<Vec<Arc<Member>>>),
    /// End every membership at the room's count and stop.
    Finish(oneshot::Sender<()>),
}

/// What `POST /commands` answered for one command.
#[derive(Debug)]
enum Answer {
    Applied {
        duplicate: bool,
    },
    Refused {
        code: String,
        retry_after: Duration,
    },
    /// No answer: the command may or may not have been applied.
    Unknown(String),
}

#[derive(Debug, Deserialize)]
struct CommandsReply {
    #[serde(default)]
    results: Vec<CommandResult>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize)]
struct CommandResult {
    ok: bool,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// An HTTP connection and when it was last used.
type Conn = Option<(Http, Instant)>;

/// Why a transport ended.
#[derive(Debug)]
enum Outcome {
    /// The soak's own drop, to resume.
    Drop,
    /// The server closed it with this reason.
    Closed(String),
    /// It ended without a close.
    Dropped(String),
    /// Refused for now: try again after this.
    Retry(Duration),
    /// The session is over for the server, or nothing will make it attach.
    Gone(String),
}

/// Everything the soak's tasks share.
struct Soak {
    run: String,
    args: SoakArgs,
    transports: Vec<TransportKind>,
    short_poll: Duration,
    payload_bytes: usize,
    connector: Arc<Connector>,
    wire: Arc<WireCounters>,
    totals: Totals,
    population: Mutex<Vec<Arc<Member>>>,
    rooms: Mutex<Vec<Arc<Room>>>,
    next_room: AtomicU64,
    next_session: AtomicU64,
    arriving: AtomicUsize,
    connecting: Semaphore,
    /// Idle control connections (session creation and deletion).
    control: Mutex<Vec<(Http, Instant)>>,
    /// The server's heartbeat interval in ms, from session creation.
    heartbeat_ms: AtomicU64,
    /// No more arrivals, departures, room closes or messages.
    stop_churn: CancellationToken,
    /// The soak is ending: slow readers stop stalling, transports stop dropping and
    /// pausing.
    finishing: CancellationToken,
    notes: Mutex<Vec<String>>,
    /// The server was given with `--url`: delete the sessions left at the end.
    shared_server: bool,
}

impl Soak {
    fn note(&self, what: impl FnOnce() -> String) {
        let mut notes = lock(&self.notes);
        if notes.len() < NOTES_KEPT {
            notes.push(what());
        }
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed).max(100))
    }

    fn text(&self, room: u64, k: u64) -> String {
        let mut text = format!("soak {} {room} {k} ", self.run);
        while text.len() < self.payload_bytes {
            text.push('x');
        }
        text
    }

    /// One request on a pooled control connection (a fresh one if the pooled one fails).
    async fn control(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), String> {
        for _ in 0..2 {
            let pooled = {
                let mut idle = lock(&self.control);
                idle.retain(|(_, used)| used.elapsed() < STALE_CONNECTION);
                idle.pop()
            };
            let mut http = match pooled {
                Some((http, _)) => http,
                None => match timeout(REQUEST_TIMEOUT, self.connector.http(&self.wire)).await {
                    Ok(Ok(http)) => http,
                    Ok(Err(e)) => return Err(format!("connecting: {e}")),
                    Err(_) => return Err("no connection within 10 s".into()),
                },
            };
            match timeout(
                REQUEST_TIMEOUT,
                http.call(method.clone(), path, body.clone()),
            )
            .await
            {
                Ok(Ok(answer)) => {
                    let mut idle = lock(&self.control);
                    if idle.len() < 2 * ARRIVALS_AT_ONCE {
                        idle.push((http, Instant::now()));
                    }
                    return Ok(answer);
                }
                Ok(Err(e)) => self.note(|| format!("{method} {path}: {e} (retried)")),
                Err(_) => return Err(format!("{method} {path}: no answer within 10 s")),
            }
        }
        Err(format!("{method} {path}: failed twice"))
    }

    /// One command for `session` on a driver's connection.
    async fn command(&self, conn: &mut Conn, session: &str, command: &serde_json::Value) -> Answer {
        if conn
            .as_ref()
            .is_some_and(|(_, used)| used.elapsed() >= STALE_CONNECTION)
        {
            *conn = None;
        }
        if conn.is_none() {
            match timeout(REQUEST_TIMEOUT, self.connector.http(&self.wire)).await {
                Ok(Ok(http)) => *conn = Some((http, Instant::now())),
                Ok(Err(e)) => return Answer::Unknown(format!("connecting: {e}")),
                Err(_) => return Answer::Unknown("no connection within 10 s".into()),
            }
        }
        let Some((http, _)) = conn.as_mut() else {
            return Answer::Unknown("no connection".into());
        };
        let path = format!("/v1/sessions/{session}/commands");
        let answer = timeout(
            REQUEST_TIMEOUT,
            http.call(Method::POST, &path, command.to_string()),
        )
        .await;
        let (status, body) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                *conn = None;
                return Answer::Unknown(format!("POST /commands: {e}"));
            }
            Err(_) => {
                *conn = None;
                return Answer::Unknown("POST /commands: no answer within 10 s".into());
            }
        };
        if let Some((_, used)) = conn.as_mut() {
            *used = Instant::now();
        }
        let reply: CommandsReply = match serde_json::from_slice(&body) {
            Ok(reply) => reply,
            Err(e) => {
                return Answer::Unknown(format!("POST /commands answered {status}: {e}"));
            }
        };
        let refused = |error: ErrorBody| Answer::Refused {
            code: error.code,
            retry_after: Duration::from_millis(error.retry_after_ms.unwrap_or(100).min(2000)),
        };
        match (reply.results.into_iter().next(), reply.error) {
            (Some(result), _) if result.ok => Answer::Applied {
                duplicate: result.duplicate,
            },
            (
                Some(CommandResult {
                    error: Some(error), ..
                }),
                _,
            )
            | (None, Some(error)) => refused(error),
            _ => Answer::Unknown(format!("POST /commands answered {status} without a result")),
        }
    }

    /// The server's `switchyard_heap_bytes`, read from `/metrics` (`None`: not known).
    async fn server_heap(&self) -> Option<u64> {
        let (status, body) = self
            .control(Method::GET, "/metrics", String::new())
            .await
            .ok()?;
        if !status.is_success() {
            return None;
        }
        std::str::from_utf8(&body)
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("switchyard_heap_bytes "))
            .and_then(|value| value.trim().parse().ok())
            .filter(|&bytes| bytes > 0)
    }

    /// Creates a room and starts its driver.
    fn open_room(self: &Arc<Self>) -> Arc<Room> {
        let no = self.next_room.fetch_add(1, Ordering::Relaxed);
        let (ops, queue) = mpsc::channel(DRIVER_QUEUE);
        let room = Arc::new(Room {
            name: format!("soak-{}-{no}", self.run),
            no,
            ops,
            members: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            born: Instant::now(),
        });
        tokio::spawn(self.clone().drive(room.clone(), queue));
        lock(&self.rooms).push(room.clone());
        bump(&self.totals.rooms_created);
        room
    }

    /// A room's driver: applies its commands one at a time and numbers its messages.
    async fn drive(self: Arc<Self>, room: Arc<Room>, mut queue: mpsc::Receiver<RoomOp>) {
        let mut driver = Driver {
            room,
            next: 0,
            members: Vec::new(),
            conn: None,
        };
        while let Some(op) = queue.recv().await {
            match op {
                RoomOp::Send => self.send(&mut driver).await,
                RoomOp::Join(member, done) => {
                    let joined = self.apply_join(&mut driver, &member).await;
                    let _ = done.send(joined);
                }
                RoomOp::Leave(member, done) => {
                    let left = self.apply_leave(&mut driver, &member).await;
                    let _ = done.send(left);
                }
                RoomOp::Forget(member, done) => {
                    driver.remove(&member);
                    let _ = done.send(());
                }
                RoomOp::Members(done) => {
                    let _ = done.send(driver.members.clone());
                }
                RoomOp::Finish(done) => {
                    for member in &driver.members {
                        lock(&member.ledger).close(&driver.room.name, driver.next);
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    async fn send(&self, driver: &mut Driver) {
        let Some(mut sender) = driver.pick() else {
            bump(&self.totals.send_skipped);
            return;
        };
        let k = driver.next;
        let room = driver.room.name.clone();
        let command = serde_json::json!({
            "type": "send",
            "room": room,
            "text": self.text(driver.room.no, k),
            "client_id": format!("{}.{}.{k}", self.run, driver.room.no),
        });
        // Once an attempt went unanswered, retries go from the same session with the same
        // client_id, so the server applies the message once whatever happened.
        let mut uncertain = false;
        for attempt in 1..=COMMAND_TRIES {
            if uncertain {
                lock(&sender.ledger).echoes.push((room.clone(), k));
            }
            match self.command(&mut driver.conn, &sender.id, &command).await {
                Answer::Applied { duplicate } => {
                    if uncertain {
                        if duplicate {
                            bump(&self.totals.retry_echoes);
                        } else {
                            forget_echo(&sender, &room, k);
                        }
                    }
                    driver.next += 1;
                    bump(&self.totals.sent);
                    return;
                }
                Answer::Refused { code, retry_after } => {
                    if uncertain {
                        forget_echo(&sender, &room, k);
                    }
                    match code.as_str() {
                        "rate_limited" | "history_unavailable" => sleep(retry_after).await,
                        "not_in_room" | "unknown_session" if !uncertain => {
                            self.note(|| format!("send to {room} from a member: {code}"));
                            driver.remove(&sender);
                            match driver.pick() {
                                Some(other) => sender = other,
                                None => break,
                            }
                        }
                        _ if uncertain => break,
                        _ => {
                            bump(&self.totals.send_errors);
                            self.note(|| format!("send to {room} refused: {code}"));
                            return;
                        }
                    }
                }
                Answer::Unknown(why) => {
                    uncertain = true;
                    self.note(|| format!("send to {room}: {why} (retried)"));
                    sleep(Duration::from_millis(100) * attempt).await;
                }
            }
        }
        if uncertain {
            // It may have been broadcast: count it as sent, so no later message takes its K.
            bump(&self.totals.send_unknown);
            driver.next += 1;
        } else {
            bump(&self.totals.send_errors);
        }
    }

    async fn apply_join(&self, driver: &mut Driver, member: &Arc<Member>) -> bool {
        if member.departing.load(Ordering::Relaxed)
            || driver.members.iter().any(|m| Arc::ptr_eq(m, member))
        {
            return false;
        }
        let room = driver.room.name.clone();
        lock(&member.ledger).open(&room, driver.next);
        let command = serde_json::json!({"type": "join", "room": room});
        for attempt in 1..=COMMAND_TRIES {
            match self.command(&mut driver.conn, &member.id, &command).await {
                Answer::Applied { .. } => {
                    driver.members.push(member.clone());
                    driver.count();
                    bump(&self.totals.joins);
                    return true;
                }
                Answer::Refused { code, retry_after } if code == "rate_limited" => {
                    sleep(retry_after).await;
                }
                Answer::Refused { code, .. } => {
                    self.note(|| format!("join {room}: {code}"));
                    break;
                }
                // A join applied twice is harmless: it sends the history again.
                Answer::Unknown(why) => {
                    self.note(|| format!("join {room}: {why} (retried)"));
                    sleep(Duration::from_millis(100) * attempt).await;
                }
            }
        }
        lock(&member.ledger).cancel(&room);
        bump(&self.totals.command_errors);
        false
    }

    async fn apply_leave(&self, driver: &mut Driver, member: &Arc<Member>) -> bool {
        if !driver.members.iter().any(|m| Arc::ptr_eq(m, member)) {
            return false;
        }
        let room = driver.room.name.clone();
        lock(&member.ledger).close(&room, driver.next);
        driver.remove(member);
        let command = serde_json::json!({"type": "leave", "room": room});
        for attempt in 1..=COMMAND_TRIES {
            match self.command(&mut driver.conn, &member.id, &command).await {
                Answer::Applied { .. } => {
                    bump(&self.totals.leaves);
                    return true;
                }
                // A retried leave whose first try was applied.
                Answer::Refused { code, .. } if code == "not_in_room" && attempt > 1 => {
                    bump(&self.totals.leaves);
                    return true;
                }
                Answer::Refused { code, retry_after } if code == "rate_limited" => {
                    sleep(retry_after).await;
                }
                Answer::Refused { code, .. } => {
                    self.note(|| format!("leave {room}: {code}"));
                    break;
                }
                Answer::Unknown(why) => {
                    self.note(|| format!("leave {room}: {why} (retried)"));
                    sleep(Duration::from_millis(100) * attempt).await;
                }
            }
        }
        bump(&self.totals.command_errors);
        true
    }

    /// Asks `room`'s driver to join `member`; records the room on success.
    async fn join(&self, member: &Arc<Member>, room: &Arc<Room>) -> bool {
        let (done, answer) = oneshot::channel();
        if room
            .ops
            .send(RoomOp::Join(member.clone(), done))
            .await
            .is_err()
        {
            return false;
        }
        let joined = matches!(timeout(FINISH_TIMEOUT, answer).await, Ok(Ok(true)));
        if joined {
            lock(&member.rooms).push(room.clone());
        }
        joined
    }

    /// Asks `room`'s driver to make `member` leave; forgets the room either way.
    async fn leave(&self, member: &Arc<Member>, room: &Arc<Room>) {
        let (done, answer) = oneshot::channel();
        if room
            .ops
            .send(RoomOp::Leave(member.clone(), done))
            .await
            .is_ok()
        {
            let _ = timeout(FINISH_TIMEOUT, answer).await;
        }
        lock(&member.rooms).retain(|r| !Arc::ptr_eq(r, room));
    }

    /// The smallest of three random open rooms `member` is not in.
    fn pick_room(&self, member: &Member) -> Option<Arc<Room>> {
        let rooms = lock(&self.rooms);
        let mine = lock(&member.rooms);
        let candidates: Vec<&Arc<Room>> = rooms
            .iter()
            .filter(|r| !r.closing.load(Ordering::Relaxed))
            .filter(|r| !mine.iter().any(|m| Arc::ptr_eq(m, r)))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let mut rng = rand::rng();
        (0..3)
            .map(|_| candidates[rng.random_range(0..candidates.len())])
            .min_by_key(|r| r.members.load(Ordering::Relaxed))
            .cloned()
    }

    /// A random open room with members, for the next message.
    fn pick_room_to_send(&self) -> Option<Arc<Room>> {
        let rooms = lock(&self.rooms);
        if rooms.is_empty() {
            return None;
        }
        let mut rng = rand::rng();
        for _ in 0..8 {
            let room = &rooms[rng.random_range(0..rooms.len())];
            if room.members.load(Ordering::Relaxed) > 0 {
                return Some(room.clone());
            }
        }
        rooms
            .iter()
            .find(|r| r.members.load(Ordering::Relaxed) > 0)
            .cloned()
    }

    /// A random time until a session's next transport drop.
    fn next_drop(&self) -> Instant {
        let mean = self.args.soak_resume_every.as_secs_f64();
        Instant::now() + Duration::from_secs_f64(exponential(mean).min(20.0 * mean).max(0.05))
    }

    /// A new session: created, attached, joined to its rooms, then counted in.
    async fn arrive(self: Arc<Self>, slow: Option<bool>, kind: TransportKind) {
        if let Err(why) = self.clone().try_arrive(slow, kind).await {
            bump(&self.totals.arrival_failures);
            self.note(|| format!("arrival: {why}"));
        }
        self.arriving.fetch_sub(1, Ordering::Relaxed);
    }

    async fn try_arrive(
        self: Arc<Self>,
        slow: Option<bool>,
        kind: TransportKind,
    ) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Created {
            session: String,
            #[serde(default)]
            heartbeat_ms: Option<u64>,
        }
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({ "name": format!("soak{n}") }).to_string();
        let (status, reply) = self.control(Method::POST, "/v1/sessions", body).await?;
        if !status.is_success() {
            return Err(format!(
                "POST /v1/sessions answered {status}: {}",
                String::from_utf8_lossy(&reply)
            ));
        }
        let created: Created = serde_json::from_slice(&reply)
            .map_err(|e| format!("POST /v1/sessions answered {status}: {e}"))?;
        bump(&self.totals.sessions_created);
        if let Some(ms) = created.heartbeat_ms {
            self.heartbeat_ms.fetch_max(ms, Ordering::Relaxed);
        }
        let member = Arc::new(Member {
            id: created.session,
            slow,
            ledger: Mutex::new(Ledger::default()),
            stop: CancellationToken::new(),
            departing: AtomicBool::new(false),
            rooms: Mutex::new(Vec::new()),
            busy: tokio::sync::Mutex::new(()),
            task: Mutex::new(None),
        });
        let (ready, attached) = oneshot::channel();
        let task = tokio::spawn(self.clone().transport(member.clone(), kind, ready));
        *lock(&member.task) = Some(task);
        if !matches!(timeout(ATTACH_TIMEOUT, attached).await, Ok(Ok(()))) {
            member.stop_transport().await;
            let _ = self
                .control(
                    Method::DELETE,
                    &format!("/v1/sessions/{}", member.id),
                    String::new(),
                )
                .await;
            return Err(format!("{kind} did not attach within {ATTACH_TIMEOUT:?}"));
        }
        let rooms = match slow {
            Some(_) => SLOW_READER_ROOMS,
            None if rand::random::<f64>() < SECOND_ROOM_SHARE => 2,
            None => 1,
        };
        for _ in 0..rooms {
            if let Some(room) = self.pick_room(&member) {
                self.join(&member, &room).await;
            }
        }
        lock(&self.population).push(member);
        Ok(())
    }

    /// A session leaves the soak, in one of three ways: it leaves its rooms and is deleted,
    /// leaves them and lets the TTL end it, or goes away while still in them (the TTL ends
    /// it). Either way it first reads what its ended memberships owe it; then what it was
    /// owed is settled.
    async fn depart(self: Arc<Self>, member: Arc<Member>) {
        member.departing.store(true, Ordering::Relaxed);
        let _busy = member.busy.lock().await;
        let rooms = lock(&member.rooms).clone();
        let way = rand::random::<f64>();
        let leaves = way < 0.7;
        for room in &rooms {
            if leaves {
                self.leave(&member, room).await;
            } else {
                let (done, answer) = oneshot::channel();
                if room
                    .ops
                    .send(RoomOp::Forget(member.clone(), done))
                    .await
                    .is_ok()
                {
                    let _ = timeout(FINISH_TIMEOUT, answer).await;
                }
            }
        }
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let owed = lock(&member.ledger).owed();
            if owed == 0 {
                break;
            }
            if Instant::now() > deadline {
                bump(&self.totals.catch_up_timeouts);
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        member.stop_transport().await;
        if !leaves {
            lock(&member.ledger).abandon();
            bump(&self.totals.departures_abandoned);
        } else if way < 0.4 {
            let path = format!("/v1/sessions/{}", member.id);
            match self.control(Method::DELETE, &path, String::new()).await {
                Ok((status, _)) if status.is_success() => {}
                Ok((status, body)) => self.note(|| {
                    format!(
                        "DELETE session answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    )
                }),
                Err(why) => self.note(|| why),
            }
            bump(&self.totals.departures_deleted);
        } else {
            bump(&self.totals.departures_expired);
        }
        lock(&member.ledger).settle(&self.totals);
    }

    /// Empties a room: a new room is created, and each member moves to it or to another
    /// room; then the room's driver stops.
    async fn close_room(self: Arc<Self>, room: Arc<Room>) {
        room.closing.store(true, Ordering::Relaxed);
        lock(&self.rooms).retain(|r| !Arc::ptr_eq(r, &room));
        let fresh = self.open_room();
        let (done, answer) = oneshot::channel();
        let members = if room.ops.send(RoomOp::Members(done)).await.is_ok() {
            timeout(FINISH_TIMEOUT, answer)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        for member in members.unwrap_or_default() {
            if member.departing.load(Ordering::Relaxed) {
                continue;
            }
            let _busy = member.busy.lock().await;
            if member.departing.load(Ordering::Relaxed) || !member.in_room(&room) {
                continue;
            }
            self.leave(&member, &room).await;
            let destination = if rand::random::<bool>() && !member.in_room(&fresh) {
                Some(fresh.clone())
            } else {
                self.pick_room(&member)
            };
            if let Some(destination) = destination {
                self.join(&member, &destination).await;
            }
        }
        let (done, answer) = oneshot::channel();
        if room.ops.send(RoomOp::Finish(done)).await.is_ok() {
            let _ = timeout(FINISH_TIMEOUT, answer).await;
        }
        bump(&self.totals.rooms_emptied);
    }

    /// Sends `--soak-rate` messages per second, each to a random room with members.
    async fn publish(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut due = 0.0;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = self.stop_churn.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            due += self.args.soak_rate * (now - last).as_secs_f64();
            last = now;
            while due >= 1.0 {
                due -= 1.0;
                match self.pick_room_to_send() {
                    Some(room) => {
                        if room.ops.try_send(RoomOp::Send).is_err() {
                            bump(&self.totals.send_backlog);
                        }
                    }
                    None => bump(&self.totals.send_skipped),
                }
            }
        }
    }

    /// One session's transport task: attaches, reads, drops and resumes until stopped.
    async fn transport(
        self: Arc<Self>,
        member: Arc<Member>,
        mut kind: TransportKind,
        ready: oneshot::Sender<()>,
    ) {
        let mut ready = Some(ready);
        let mut next_drop = self.next_drop();
        loop {
            // Slow readers keep their transport; the others drop it at `next_drop`, until the
            // soak ends.
            let drop_at = if member.slow.is_some() || self.finishing.is_cancelled() {
                Instant::now() + Duration::from_secs(86_400 * 365)
            } else {
                next_drop
            };
            let attach = self.attach(&member, kind, drop_at, &mut ready);
            let outcome = tokio::select! {
                _ = member.stop.cancelled() => return,
                outcome = attach => outcome,
            };
            let pause = match outcome {
                Outcome::Drop => {
                    bump(&self.totals.resumes);
                    next_drop = self.next_drop();
                    if rand::random::<bool>() && self.transports.len() > 1 {
                        let others: Vec<TransportKind> = self
                            .transports
                            .iter()
                            .copied()
                            .filter(|&k| k != kind)
                            .collect();
                        kind = others[rand::rng().random_range(0..others.len())];
                        bump(&self.totals.kind_switches);
                    }
                    if rand::random::<f64>() < 0.2 {
                        bump(&self.totals.pauses);
                        Duration::from_secs_f64(1.0 + 4.0 * rand::random::<f64>())
                    } else {
                        Duration::ZERO
                    }
                }
                Outcome::Closed(reason) => match reason.as_str() {
                    "slow_consumer" => {
                        bump(&self.totals.closes_slow_consumer);
                        Duration::from_millis(50)
                    }
                    "heartbeat_timeout" => {
                        bump(&self.totals.closes_heartbeat_timeout);
                        Duration::from_millis(50)
                    }
                    "expired" | "token_expired" | "shutdown" => {
                        if !member.departing.load(Ordering::Relaxed) {
                            bump(&self.totals.sessions_lost);
                            self.note(|| format!("{kind} closed by the server: {reason}"));
                        }
                        return;
                    }
                    _ => {
                        bump(&self.totals.closes_other);
                        self.note(|| format!("{kind} closed by the server: {reason:?}"));
                        Duration::from_millis(50)
                    }
                },
                Outcome::Dropped(why) => {
                    bump(&self.totals.transport_drops);
                    if member.slow.is_none() {
                        self.note(|| format!("{kind} dropped: {why}"));
                    }
                    Duration::from_millis(100)
                }
                Outcome::Retry(pause) => {
                    bump(&self.totals.attach_retries);
                    pause
                }
                Outcome::Gone(why) => {
                    if !member.departing.load(Ordering::Relaxed) {
                        bump(&self.totals.sessions_lost);
                        self.note(|| format!("{kind}: {why}"));
                    }
                    return;
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = member.stop.cancelled() => return,
                    _ = self.finishing.cancelled() => {}
                    _ = sleep(pause) => {}
                }
            }
        }
    }

    /// Attaches `kind` and reads until it ends, or until `drop_at`, when it is dropped at
    /// the first point where that cannot race the next attachment: once the server has
    /// answered the handshake, between two polls, or while a long poll is held. (A request
    /// dropped just after it was written may reach the server after the next transport has
    /// attached, and supersede it.)
    async fn attach(
        &self,
        member: &Member,
        kind: TransportKind,
        drop_at: Instant,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Outcome {
        match kind {
            TransportKind::WebSocket => self.websocket(member, drop_at, ready).await,
            TransportKind::Sse => self.sse(member, drop_at, ready).await,
            _ => self.poll(member, kind, drop_at, ready).await,
        }
    }

    /// Processes one event's JSON; `Err` if it is not an event.
    fn handle(&self, member: &Member, kind: TransportKind, json: &[u8]) -> Result<(), String> {
        let event: WireEvent =
            serde_json::from_slice(json).map_err(|e| format!("unreadable event: {e}"))?;
        self.check(member, kind, &event);
        Ok(())
    }

    /// Hands one event to the member's ledger, noting the first problems met.
    fn check(&self, member: &Member, kind: TransportKind, event: &WireEvent) {
        let problem = lock(&member.ledger).event(event, &self.run, &self.totals);
        if let Some(problem) = problem {
            self.note(|| format!("session {} on {kind}: {problem}", member.id));
        }
    }

    /// A connection with a small receive buffer, for a slow reader.
    async fn connect_small_window(&self) -> io::Result<Counted<TcpStream>> {
        let target = self.connector.target();
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_recv_buffer_size(SLOW_RECEIVE_BUFFER)?;
        if target.is_ipv4() {
            socket.bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(Counted::new(stream, self.wire.clone()))
    }

    async fn websocket(
        &self,
        member: &Member,
        drop_at: Instant,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Outcome {
        let after = lock(&member.ledger).last_seq;
        let url = format!(
            "ws://{}/v1/sessions/{}/ws?after={after}",
            self.connector.target(),
            member.id
        );
        let handshake = async {
            let _permit = self.connecting.acquire().await;
            let stream = if member.slow.is_some() {
                self.connect_small_window().await
            } else {
                self.connector.connect(&self.wire).await
            }
            .map_err(|e| Err(format!("connecting: {e}")))?;
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(response) => Ok(refused(
                        response.status().as_u16(),
                        response.body().as_deref().unwrap_or_default(),
                    )),
                    e => Err(format!("WebSocket handshake: {e}")),
                })
        };
        let socket = match timeout(REQUEST_TIMEOUT, handshake).await {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(Ok(refusal))) => return refusal,
            Ok(Err(Err(why))) => return Outcome::Dropped(why),
            Err(_) => return Outcome::Dropped("no WebSocket handshake within 10 s".into()),
        };
        signal(ready);
        let (mut sink, mut stream) = socket.split();
        let silence = self.heartbeat() * 3;
        let mut reading_until = Instant::now() + self.heartbeat() * SLOW_READING_HEARTBEATS;
        let mut acks = Acks::new(self.args.soak_ack, after);
        loop {
            if let Some(ack) = acks.due(member) {
                if sink.send(Message::text(ack)).await.is_err() {
                    return Outcome::Dropped("WebSocket: an ack could not be sent".into());
                }
                bump(&self.totals.acks);
            }
            if let Some(pings) = member.slow {
                if Instant::now() >= reading_until && !self.finishing.is_cancelled() {
                    // Stall: read nothing, so the server sees no progress once the socket
                    // buffers are full.
                    let heartbeat = self.heartbeat();
                    let stall = match pings {
                        true => heartbeat * SLOW_STALL_HEARTBEATS,
                        false => heartbeat * SLOW_STALL_HEARTBEATS / 2,
                    };
                    let stall_end = Instant::now() + stall.min(SLOW_STALL_MAX);
                    while Instant::now() < stall_end {
                        tokio::select! {
                            _ = self.finishing.cancelled() => break,
                            _ = sleep_until(stall_end.min(Instant::now() + heartbeat / 2)) => {}
                        }
                        if pings && sink.send(Message::Ping(Bytes::new())).await.is_err() {
                            break;
                        }
                    }
                    reading_until = Instant::now() + heartbeat * SLOW_READING_HEARTBEATS;
                }
            }
            let frame = tokio::select! {
                frame = timeout(silence, stream.next()) => match frame {
                    Ok(frame) => frame,
                    Err(_) => {
                        return Outcome::Dropped("WebSocket silent for three heartbeats".into())
                    }
                },
                _ = sleep_until(drop_at) => return Outcome::Drop,
                _ = acks.wait() => continue,
            };
            match frame {
                Some(Ok(Message::Text(text))) => {
                    if let Err(why) = self.handle(member, TransportKind::WebSocket, text.as_bytes())
                    {
                        return Outcome::Dropped(why);
                    }
                    if member.slow.is_some() && !self.finishing.is_cancelled() {
                        sleep(SLOW_FRAME_PAUSE).await;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Outcome::Closed(
                        frame
                            .map(|f| f.reason.as_str().to_owned())
                            .unwrap_or_default(),
                    )
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Outcome::Dropped(format!("WebSocket: {e}")),
                None => return Outcome::Dropped("WebSocket ended without a close frame".into()),
            }
        }
    }

    async fn sse(
        &self,
        member: &Member,
        drop_at: Instant,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Outcome {
        let after = lock(&member.ledger).last_seq;
        let path = format!("/v1/sessions/{}/sse?after={after}", member.id);
        let opened = async {
            let _permit = self.connecting.acquire().await;
            let mut http = self.connector.http(&self.wire).await?;
            let response = http.send(Method::GET, &path, "").await?;
            Ok::<_, io::Error>((http, response))
        };
        let (_http, response) = match timeout(REQUEST_TIMEOUT, opened).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Outcome::Dropped(format!("SSE: {e}")),
            Err(_) => return Outcome::Dropped("SSE: no answer within 10 s".into()),
        };
        let status = response.status();
        if !status.is_success() {
            let body = match timeout(REQUEST_TIMEOUT, response.into_body().collect()).await {
                Ok(Ok(body)) => body.to_bytes(),
                _ => Bytes::new(),
            };
            return refused(status.as_u16(), &body);
        }
        signal(ready);
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::with_capacity(4096);
        let silence = self.heartbeat() * 3;
        let mut acks = Acks::new(self.args.soak_ack, after);
        loop {
            if let Some(ack) = acks.due(member) {
                // A lost ack only costs the server memory until the next one.
                let path = format!("/v1/sessions/{}/commands", member.id);
                match self.control(Method::POST, &path, ack).await {
                    Ok((status, _)) if status.is_success() => bump(&self.totals.acks),
                    Ok((status, body)) => self.note(|| {
                        format!(
                            "an SSE ack answered {status}: {}",
                            String::from_utf8_lossy(&body)
                        )
                    }),
                    Err(why) => self.note(|| format!("an SSE ack: {why}")),
                }
            }
            let frame = tokio::select! {
                frame = timeout(silence, body.frame()) => frame,
                _ = sleep_until(drop_at) => return Outcome::Drop,
                _ = acks.wait() => continue,
            };
            let frame = match frame {
                Err(_) => return Outcome::Dropped("SSE silent for three heartbeats".into()),
                Ok(None) => return Outcome::Dropped("SSE ended without a close event".into()),
                Ok(Some(Err(e))) => return Outcome::Dropped(format!("SSE: {e}")),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            let taken = take_sse_data(&mut pending, |closing, data| {
                if closing {
                    #[derive(Deserialize)]
                    struct Close {
                        reason: String,
                    }
                    return Err(match serde_json::from_slice::<Close>(data) {
                        Ok(close) => Outcome::Closed(close.reason),
                        Err(e) => Outcome::Dropped(format!("unreadable SSE close: {e}")),
                    });
                }
                self.handle(member, TransportKind::Sse, data)
                    .map(drop)
                    .map_err(Outcome::Dropped)
            });
            if let Err(outcome) = taken {
                return outcome;
            }
            if pending.len() > MAX_SSE_EVENT {
                return Outcome::Dropped("an SSE event over 8 MiB".into());
            }
        }
    }

    async fn poll(
        &self,
        member: &Member,
        kind: TransportKind,
        drop_at: Instant,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Outcome {
        let connected = async {
            let _permit = self.connecting.acquire().await;
            self.connector.http(&self.wire).await
        };
        let mut http = match timeout(REQUEST_TIMEOUT, connected).await {
            Ok(Ok(http)) => http,
            Ok(Err(e)) => return Outcome::Dropped(format!("connecting: {e}")),
            Err(_) => return Outcome::Dropped("no connection within 10 s".into()),
        };
        let short = kind == TransportKind::ShortPolling;
        let wait = if short { 0 } else { LONG_POLL_WAIT_MS };
        if !short {
            // A held poll answers only when an event comes: connected is attached enough.
            signal(ready);
        }
        let mut interval = self.short_poll.mul_f64(rand::random::<f64>());
        let mut first = true;
        loop {
            if short && !first {
                tokio::select! {
                    _ = sleep(interval) => {}
                    _ = sleep_until(drop_at) => return Outcome::Drop,
                }
                interval = self.short_poll;
            }
            if Instant::now() >= drop_at {
                return Outcome::Drop;
            }
            first = false;
            let after = lock(&member.ledger).last_seq;
            let path = format!("/v1/sessions/{}/poll?after={after}&wait={wait}", member.id);
            let limit = Duration::from_millis(wait) + REQUEST_TIMEOUT;
            let call = timeout(limit, http.call(Method::GET, &path, ""));
            // A short poll is answered at once: let it finish. A long poll may be abandoned
            // once the server surely holds it.
            let abandon_at = if short {
                Instant::now() + limit * 2
            } else {
                drop_at.max(Instant::now() + HELD)
            };
            let reply = tokio::select! {
                reply = call => reply,
                _ = sleep_until(abandon_at) => return Outcome::Drop,
            };
            let (status, body) = match reply {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => return Outcome::Dropped(format!("poll: {e}")),
                Err(_) => return Outcome::Dropped(format!("no poll reply within {limit:?}")),
            };
            if !status.is_success() {
                return refused(status.as_u16(), &body);
            }
            signal(ready);
            let reply: PollReply = match serde_json::from_slice(&body) {
                Ok(reply) => reply,
                Err(e) => return Outcome::Dropped(format!("unreadable poll reply: {e}")),
            };
            for event in &reply.events {
                self.check(member, kind, event);
            }
            if let Some(reason) = reply.closed {
                return Outcome::Closed(reason.into_owned());
            }
        }
    }
}

/// A room's driver state.
struct Driver {
    room: Arc<Room>,
    /// The room's next message number: the count of messages sent to it.
    next: u64,
    members: Vec<Arc<Member>>,
    conn: Conn,
}

impl Driver {
    fn count(&self) {
        self.room
            .members
            .store(self.members.len(), Ordering::Relaxed);
    }

    fn remove(&mut self, member: &Arc<Member>) {
        self.members.retain(|m| !Arc::ptr_eq(m, member));
        self.count();
    }

    /// A random member to send from, preferring those not departing.
    fn pick(&self) -> Option<Arc<Member>> {
        if self.members.is_empty() {
            return None;
        }
        let mut rng = rand::rng();
        for _ in 0..4 {
            let member = &self.members[rng.random_range(0..self.members.len())];
            if !member.departing.load(Ordering::Relaxed) {
                return Some(member.clone());
            }
        }
        Some(self.members[rng.random_range(0..self.members.len())].clone())
    }
}

/// Events a stream's session processed past which it acknowledges them at once.
const ACK_EVENTS: u64 = 64;

/// When a stream's session acknowledges what it processed: `every` after the first event not
/// acknowledged, or once [`ACK_EVENTS`] are waiting.
struct Acks {
    every: Option<Duration>,
    /// When the events not acknowledged yet are due: `every` after the first of them.
    next: Option<Instant>,
    /// The last seq acknowledged (the resume point, at first).
    acked: u64,
}

impl Acks {
    fn new(every: Duration, after: u64) -> Self {
        Acks {
            every: (!every.is_zero()).then_some(every),
            next: None,
            acked: after,
        }
    }

    /// The `ack` command to send now, if one is due.
    fn due(&mut self, member: &Member) -> Option<String> {
        let every = self.every?;
        let seq = lock(&member.ledger).last_seq;
        if seq <= self.acked {
            return None;
        }
        let now = Instant::now();
        let next = *self.next.get_or_insert(now + every);
        if now < next && seq - self.acked < ACK_EVENTS {
            return None;
        }
        self.next = None;
        self.acked = seq;
        Some(serde_json::json!({"type": "ack", "seq": seq}).to_string())
    }

    /// Until the next ack is due (forever when nothing waits for one).
    async fn wait(&self) {
        match self.next {
            Some(next) => sleep_until(next).await,
            None => std::future::pending().await,
        }
    }
}

fn forget_echo(member: &Member, room: &str, k: u64) {
    let mut ledger = lock(&member.ledger);
    if let Some(i) = ledger.echoes.iter().position(|(r, n)| r == room && *n == k) {
        ledger.echoes.swap_remove(i);
    }
}

fn signal(ready: &mut Option<oneshot::Sender<()>>) {
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
}

/// What to do about a refused attachment.
fn refused(status: u16, body: &[u8]) -> Outcome {
    #[derive(Deserialize)]
    struct Refusal {
        error: ErrorBody,
    }
    let code = serde_json::from_slice::<Refusal>(body)
        .map(|r| r.error.code)
        .unwrap_or_default();
    match (status, code.as_str()) {
        (409, _) => Outcome::Retry(Duration::from_millis(20 + rand::random::<u64>() % 30)),
        (503, "shutting_down") => Outcome::Gone("the server is shutting down".into()),
        (429 | 503, _) => Outcome::Retry(Duration::from_millis(500)),
        _ => Outcome::Gone(format!("attach refused: {status} {code}")),
    }
}
/// A sample of an exponential distribution with this mean.
fn exponential(mean: f64) -> f64 {
    -mean * (1.0 - rand::random::<f64>()).ln()
}

/// One reading of the server and the soak.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the soak started (the start of the ramp).
    pub t_s: f64,
    /// `ramp`, `ramp-end` (the population reached for the first time), `steady` or `end`.
    pub phase: String,
    /// Sessions in the population.
    pub sessions: usize,
    /// Rooms open.
    pub rooms: usize,
    /// The server's VmRSS (`--spawn` only).
    pub server_rss_bytes: Option<u64>,
    /// The server's `switchyard_heap_bytes` (`/metrics`): what its allocator has handed out
    /// and not had back, without the free memory RSS also counts.
    pub server_heap_bytes: Option<u64>,
    /// The server's open file descriptors (`--spawn` only).
    pub server_fds: Option<u64>,
    /// The server's CPU since the previous sample, % of one core (`--spawn` only).
    pub server_cpu_percent: Option<f64>,
    /// The soak's own VmRSS.
    pub generator_rss_bytes: Option<u64>,
    /// The soak's own open file descriptors.
    pub generator_fds: Option<u64>,
    /// Messages delivered so far.
    pub delivered: u64,
    /// Deliveries per second since the previous sample.
    pub deliveries_per_sec: f64,
    /// Lost so far (messages skipped over; a member's tail is counted when it departs).
    pub lost: u64,
    /// Duplicated so far.
    pub duplicated: u64,
    /// `reset` events so far.
    pub resets: u64,
    /// Transport drops and resumes by the soak so far.
    pub resumes: u64,
    /// Transports the server closed as slow (`slow_consumer`, `heartbeat_timeout`) so far.
    pub slow_closes: u64,
}

/// RSS and open files at the end of the first ramp, their peak and the end.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Seconds from the first session's creation to the whole population in its rooms.
    pub ramp_secs: f64,
    /// Seconds of churn after the ramp.
    pub steady_secs: f64,
    /// Server RSS at the end of the first ramp.
    pub rss_ramp_end_bytes: Option<u64>,
    /// Server heap in use at the end of the first ramp.
    pub heap_ramp_end_bytes: Option<u64>,
    /// Server heap in use at the end.
    pub heap_end_bytes: Option<u64>,
    /// Heap at the end over heap at the end of the ramp.
    pub heap_end_over_ramp: Option<f64>,
    /// Largest server RSS sampled.
    pub rss_peak_bytes: Option<u64>,
    /// Server RSS at the end of the soak (before anything is stopped).
    pub rss_end_bytes: Option<u64>,
    /// End over end of ramp.
    pub rss_end_over_ramp: Option<f64>,
    /// Whether the end is within 10 % of the end of the ramp.
    pub rss_end_within_10_percent: Option<bool>,
    /// The server's VmHWM at the end: its peak RSS, between samples too.
    pub server_vm_hwm_bytes: Option<u64>,
    /// Server open files at the end of the first ramp.
    pub fds_ramp_end: Option<u64>,
    /// Most server open files sampled.
    pub fds_peak: Option<u64>,
    /// Server open files at the end.
    pub fds_end: Option<u64>,
    /// End over end of ramp.
    pub fds_end_over_ramp: Option<f64>,
}

/// What `--soak` reports (and writes with `--json`).
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// The flags of the run.
    pub config: serde_json::Value,
    /// The machine.
    pub machine: Machine,
    /// Where the server's readings come from: `/proc` of the spawned server, or why there
    /// are none.
    pub server_readings: String,
    /// RSS and open files at the end of the ramp, peak and end.
    pub summary: Summary,
    /// Deliveries, the checks and the churn.
    pub counts: Counts,
    /// The first errors met (at most 30), for the reader.
    pub notes: Vec<String>,
    /// The samples, in time order.
    pub samples: Vec<Sample>,
}

impl SoakReport {
    /// `Err` with what went wrong if any message was lost, duplicated, delivered out of
    /// order or outside a membership, or a session's seqs had a gap.
    pub fn verdict(&self) -> Result<(), String> {
        let c = &self.counts;
        if c.lost + c.duplicated + c.out_of_order + c.unowed + c.seq_gaps == 0 {
            Ok(())
        } else {
            Err(format!(
                "the soak saw lost {}, duplicated {}, out of order {}, unowed {} deliveries and \
                 {} seq gaps (of {} deliveries)",
                c.lost, c.duplicated, c.out_of_order, c.unowed, c.seq_gaps, c.delivered
            ))
        }
    }
}

/// `switchyard bench --soak`: runs the soak, prints and writes its report, and fails if a
/// delivery went wrong.
pub async fn main(bench: BenchArgs, soak: SoakArgs) -> Result<(), String> {
    run(bench, soak).await?.verdict()
}

/// Runs the soak; prints the samples and the summary, writes `--json` and `--svg`, and
/// returns the report (whatever the checks found: see [`SoakReport::verdict`]). `Err` is a
/// message for the user: bad flags, or a soak that could not run.
pub async fn run(bench: BenchArgs, soak: SoakArgs) -> Result<SoakReport, String> {
    let duration = validate(&bench, &soak)?;
    let open_files = process::raise_open_files();
    // Each session holds one connection at a time, each room driver one, plus headroom for
    // resumes and the control connections.
    let needed = (soak.soak_sessions + soak.soak_sessions / soak.soak_room_size.max(1)) as u64 * 11
        / 10
        + 256;
    if open_files < needed {
        return Err(format!(
            "{} sessions need about {needed} open files; the limit is {open_files} \
             (raise `ulimit -n`)",
            soak.soak_sessions
        ));
    }
    let machine = Machine::read();
    if bench.pin {
        process::pin_self(1).map_err(|e| format!("--pin: cannot pin the generator: {e}"))?;
    }
    let target = Target::open(&bench, false)?;
    let config = config_json(&bench, &soak, open_files);
    let result = soak_on(&bench, &soak, duration, &target).await;
    target.close();
    let (samples, counts, notes, ramp_secs, steady_secs, vm_hwm) = result?;
    let report = SoakReport {
        config,
        machine,
        server_readings: if bench.spawn {
            "/proc of the spawned server".into()
        } else {
            "not available: the server was given with --url (its RSS and open files are \
             read only with --spawn)"
                .into()
        },
        summary: summarize(&samples, ramp_secs, steady_secs, vm_hwm),
        counts,
        notes,
        samples,
    };
    println!("\n{}", summary_text(&report, &bench, &soak));
    if let Some(path) = &bench.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("samples written to {}", path.display());
    }
    if let Some(path) = &bench.svg {
        if bench.spawn {
            chart(&report, &soak, path)?;
            println!("RSS and open files chart written to {}", path.display());
        } else {
            println!("no chart: the server's RSS and open files are read only with --spawn");
        }
    }
    Ok(report)
}

fn validate(bench: &BenchArgs, soak: &SoakArgs) -> Result<Duration, String> {
    let duration = soak.soak.ok_or("--soak DURATION is missing")?;
    if bench.spawn == bench.url.is_some() {
        return Err("give either --url http://HOST:PORT or --spawn".into());
    }
    if bench.idle.is_some() || bench.baseline || bench.concurrent {
        return Err("--soak does not combine with --idle, --baseline or --concurrent".into());
    }
    if duration.is_zero() || soak.soak_sample.is_zero() {
        return Err("--soak and --soak-sample must be positive".into());
    }
    if soak.soak_sessions == 0 || soak.soak_room_size == 0 {
        return Err("--soak-sessions and --soak-room-size must be positive".into());
    }
    if !(soak.soak_rate > 0.0 && soak.soak_rate.is_finite()) {
        return Err("--soak-rate must be positive".into());
    }
    if [
        soak.soak_session_life,
        soak.soak_resume_every,
        soak.soak_room_life,
    ]
    .iter()
    .any(Duration::is_zero)
    {
        return Err(
            "--soak-session-life, --soak-resume-every and --soak-room-life must be positive".into(),
        );
    }
    if soak.soak_slow_readers > soak.soak_sessions {
        return Err("--soak-slow-readers cannot exceed --soak-sessions".into());
    }
    if soak.soak_slow_readers > 0 && !bench.transports.contains(&TransportKind::WebSocket) {
        return Err(
            "slow readers are WebSockets: add websocket to --transports or use \
             --soak-slow-readers 0"
                .into(),
        );
    }
    if bench.transports.is_empty() {
        return Err("--transports must name at least one transport".into());
    }
    Ok(duration)
}

fn config_json(bench: &BenchArgs, soak: &SoakArgs, open_files: u64) -> serde_json::Value {
    let secs = |d: Duration| d.as_secs_f64();
    serde_json::json!({
        "target": if bench.spawn { "spawn".to_owned() } else { bench.url.clone().unwrap_or_default() },
        "server_args": bench.server_args,
        "soak_s": soak.soak.map(secs),
        "sessions": soak.soak_sessions,
        "rate": soak.soak_rate,
        "room_size": soak.soak_room_size,
        "session_life_s": secs(soak.soak_session_life),
        "resume_every_s": secs(soak.soak_resume_every),
        "room_life_s": secs(soak.soak_room_life),
        "slow_readers": soak.soak_slow_readers,
        "ack_s": secs(soak.soak_ack),
        "sample_s": secs(soak.soak_sample),
        "transports": bench.transports.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "short_poll_ms": bench.short_poll_ms,
        "payload_bytes": bench.payload_bytes,
        "pin": bench.pin,
        "open_files_limit": open_files,
    })
}

type Outcomes = (Vec<Sample>, Counts, Vec<String>, f64, f64, Option<u64>);

async fn soak_on(
    bench: &BenchArgs,
    args: &SoakArgs,
    duration: Duration,
    target: &Target,
) -> Result<Outcomes, String> {
    let run = format!("{:08x}", rand::random::<u32>());
    let soak = Arc::new(Soak {
        payload_bytes: bench.payload_bytes.max(run.len() + 32),
        run,
        args: args.clone(),
        transports: bench.transports.clone(),
        short_poll: Duration::from_millis(bench.short_poll_ms.max(1)),
        connector: Arc::new(Connector::new(&target.addrs(), bench.source_addrs)),
        wire: Arc::new(WireCounters::default()),
        totals: Totals::default(),
        population: Mutex::new(Vec::new()),
        rooms: Mutex::new(Vec::new()),
        next_room: AtomicU64::new(0),
        next_session: AtomicU64::new(0),
        arriving: AtomicUsize::new(0),
        connecting: Semaphore::new(CONNECTING_AT_ONCE),
        control: Mutex::new(Vec::new()),
        heartbeat_ms: AtomicU64::new(0),
        stop_churn: CancellationToken::new(),
        finishing: CancellationToken::new(),
        notes: Mutex::new(Vec::new()),
        shared_server: bench.url.is_some(),
    });
    let result = churn(&soak, bench, args, duration, target).await;
    if result.is_err() {
        // Stop everything this run started.
        soak.stop_churn.cancel();
        soak.finishing.cancel();
        for member in lock(&soak.population).iter() {
            member.stop.cancel();
        }
        for room in lock(&soak.rooms).iter() {
            let (done, _) = oneshot::channel();
            let _ = room.ops.try_send(RoomOp::Finish(done));
        }
    }
    result
}

async fn churn(
    soak: &Arc<Soak>,
    bench: &BenchArgs,
    args: &SoakArgs,
    duration: Duration,
    target: &Target,
) -> Result<Outcomes, String> {
    let sessions = args.soak_sessions;
    let server = target.spawned();
    eprintln!(
        "soak: ramping up to {sessions} sessions over {} in rooms of ~{}, {} msg/s, then {} of \
         churn (run {})",
        soak.transports
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(","),
        args.soak_room_size,
        args.soak_rate,
        humantime::format_duration(duration),
        soak.run
    );
    for _ in 0..sessions.div_ceil(args.soak_room_size) {
        soak.open_room();
    }
    let started = Instant::now();
    let mut sampler = Sampler::new(server, started, bench.quiet);
    let mut samples = Vec::new();
    let publisher = tokio::spawn(soak.clone().publish());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sample = started + args.soak_sample;
    let mut spawned_sessions = 0usize;
    let ramp_limit = Duration::from_secs(60) + Duration::from_millis(20) * sessions as u32;
    let mut steady_from: Option<Instant> = None;
    let (mut departures_due, mut closes_due) = (0.0, 0.0);
    let mut last_tick = Instant::now();
    loop {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        let now = Instant::now();
        let dt = (now - last_tick).as_secs_f64();
        last_tick = now;
        // Arrivals keep the population at its size.
        let alive = lock(&soak.population).len();
        while alive + soak.arriving.load(Ordering::Relaxed) < sessions
            && soak.arriving.load(Ordering::Relaxed) < ARRIVALS_AT_ONCE
        {
            soak.arriving.fetch_add(1, Ordering::Relaxed);
            let slow = (spawned_sessions < args.soak_slow_readers)
                .then_some(spawned_sessions.is_multiple_of(2));
            let kind = match slow {
                Some(_) => TransportKind::WebSocket,
                None => soak.transports[spawned_sessions % soak.transports.len()],
            };
            spawned_sessions += 1;
            tasks.spawn(soak.clone().arrive(slow, kind));
        }
        match steady_from {
            None => {
                let failures = soak.totals.arrival_failures.load(Ordering::Relaxed);
                if failures > (sessions as u64 / 20).max(10) {
                    return Err(format!(
                        "{failures} sessions could not be created or attached during the ramp; \
                         the first errors: {}",
                        lock(&soak.notes).join("; ")
                    ));
                }
                if now - started > ramp_limit {
                    return Err(format!(
                        "the ramp reached only {alive} of {sessions} sessions in {ramp_limit:?}"
                    ));
                }
                if alive >= sessions && soak.arriving.load(Ordering::Relaxed) == 0 {
                    let sample = sampler.sample(soak, "ramp-end").await;
                    samples.push(sample);
                    eprintln!(
                        "soak: {sessions} sessions in their rooms after {:.1} s; churning for {}",
                        (now - started).as_secs_f64(),
                        humantime::format_duration(duration)
                    );
                    steady_from = Some(now);
                    next_sample = now + args.soak_sample;
                    continue;
                }
            }
            Some(from) => {
                if now - from >= duration {
                    break;
                }
                departures_due += sessions as f64 * dt / args.soak_session_life.as_secs_f64();
                while departures_due >= 1.0 {
                    departures_due -= 1.0;
                    if let Some(member) = take_departing(soak) {
                        tasks.spawn(soak.clone().depart(member));
                    }
                }
                let open = lock(&soak.rooms).len();
                closes_due += open as f64 * dt / args.soak_room_life.as_secs_f64();
                while closes_due >= 1.0 {
                    closes_due -= 1.0;
                    let room = {
                        let rooms = lock(&soak.rooms);
                        let old: Vec<&Arc<Room>> = rooms
                            .iter()
                            .filter(|r| r.born.elapsed() > Duration::from_secs(2))
                            .collect();
                        (!old.is_empty())
                            .then(|| old[rand::rng().random_range(0..old.len())].clone())
                    };
                    if let Some(room) = room {
                        tasks.spawn(soak.clone().close_room(room));
                    }
                }
            }
        }
        if now >= next_sample {
            let phase = if steady_from.is_some() {
                "steady"
            } else {
                "ramp"
            };
            samples.push(sampler.sample(soak, phase).await);
            next_sample += args.soak_sample;
        }
    }
    samples.push(sampler.sample(soak, "end").await);
    let steady_secs = steady_from.map_or(0.0, |from| from.elapsed().as_secs_f64());
    let ramp_secs = steady_from.map_or(0.0, |from| (from - started).as_secs_f64());
    let vm_hwm = server.and_then(Spawned::memory).map(|(_, hwm)| hwm);
    finish(soak, tasks, publisher).await;
    let notes = lock(&soak.notes).clone();
    Ok((
        samples,
        soak.totals.read(),
        notes,
        ramp_secs,
        steady_secs,
        vm_hwm,
    ))
}

/// A random session of the population that is not a slow reader, taken out of it.
fn take_departing(soak: &Soak) -> Option<Arc<Member>> {
    let mut population = lock(&soak.population);
    if population.is_empty() {
        return None;
    }
    let mut rng = rand::rng();
    for _ in 0..16 {
        let i = rng.random_range(0..population.len());
        if population[i].slow.is_none() {
            return Some(population.swap_remove(i));
        }
    }
    None
}

/// The end: stops the churn and the messages, ends every membership at its room's count,
/// waits for every member to read what it is owed, then settles.
async fn finish(soak: &Arc<Soak>, mut tasks: JoinSet<()>, publisher: tokio::task::JoinHandle<()>) {
    let started = Instant::now();
    eprintln!("soak: ending: no more churn or messages; every member reads what it is owed");
    soak.stop_churn.cancel();
    soak.finishing.cancel();
    let drained = timeout(FINISH_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        soak.note(|| "departures, arrivals or room moves still running after 120 s".into());
        tasks.abort_all();
    }
    let _ = timeout(REQUEST_TIMEOUT, publisher).await;
    let rooms = lock(&soak.rooms).clone();
    for room in rooms {
        let (done, answer) = oneshot::channel();
        if room.ops.send(RoomOp::Finish(done)).await.is_ok()
            && timeout(FINISH_TIMEOUT, answer).await.is_err()
        {
            soak.note(|| format!("room {} did not finish within 120 s", room.name));
        }
    }
    let population = lock(&soak.population).clone();
    let deadline = Instant::now() + CATCH_UP_TIMEOUT + soak.short_poll;
    loop {
        let owed: u64 = population.iter().map(|m| lock(&m.ledger).owed()).sum();
        if owed == 0 {
            break;
        }
        if Instant::now() > deadline {
            soak.note(|| format!("{owed} messages still owed 60 s after the last was sent"));
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "soak: caught up {:.1} s after the end; stopping the transports",
        started.elapsed().as_secs_f64()
    );
    for member in &population {
        member.stop.cancel();
    }
    for member in &population {
        member.stop_transport().await;
        lock(&member.ledger).settle(&soak.totals);
    }
    // Leave a shared server as found (a spawned one is stopped anyway).
    if soak.shared_server {
        let mut deletes = JoinSet::new();
        for (i, member) in population.iter().enumerate() {
            let (soak, id) = (soak.clone(), member.id.clone());
            deletes.spawn(async move {
                let _ = soak
                    .control(Method::DELETE, &format!("/v1/sessions/{id}"), String::new())
                    .await;
            });
            if i % ARRIVALS_AT_ONCE == ARRIVALS_AT_ONCE - 1 {
                while deletes.join_next().await.is_some() {}
            }
        }
        while deletes.join_next().await.is_some() {}
    }
}

/// Takes the samples.
struct Sampler<'a> {
    server: Option<&'a Spawned>,
    started: Instant,
    quiet: bool,
    previous: Option<(Instant, Option<Duration>, u64)>,
}

impl<'a> Sampler<'a> {
    fn new(server: Option<&'a Spawned>, started: Instant, quiet: bool) -> Self {
        Sampler {
            server,
            started,
            quiet,
            previous: None,
        }
    }

    async fn sample(&mut self, soak: &Soak, phase: &str) -> Sample {
        let heap = soak.server_heap().await;
        let now = Instant::now();
        let counts = soak.totals.read();
        let cpu = self.server.and_then(Spawned::cpu_time);
        let (cpu_percent, per_sec) = match self.previous {
            Some((at, before, delivered)) => {
                let secs = (now - at).as_secs_f64().max(1e-3);
                (
                    cpu.zip(before)
                        .map(|(c, b)| 100.0 * c.saturating_sub(b).as_secs_f64() / secs),
                    counts.delivered.saturating_sub(delivered) as f64 / secs,
                )
            }
            None => (None, 0.0),
        };
        self.previous = Some((now, cpu, counts.delivered));
        let sample = Sample {
            t_s: (now - self.started).as_secs_f64(),
            phase: phase.to_owned(),
            sessions: lock(&soak.population).len(),
            rooms: lock(&soak.rooms).len(),
            server_rss_bytes: self.server.and_then(Spawned::memory).map(|(rss, _)| rss),
            server_heap_bytes: heap,
            server_fds: self.server.and_then(Spawned::open_fds),
            server_cpu_percent: cpu_percent,
            generator_rss_bytes: process::memory("self").map(|(rss, _)| rss),
            generator_fds: process::open_fds("self"),
            delivered: counts.delivered,
            deliveries_per_sec: per_sec,
            lost: counts.lost,
            duplicated: counts.duplicated,
            resets: counts.resets,
            resumes: counts.resumes,
            slow_closes: counts.closes_slow_consumer + counts.closes_heartbeat_timeout,
        };
        if !self.quiet {
            eprintln!("{}", sample_line(&sample));
        }
        sample
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn sample_line(s: &Sample) -> String {
    let heap = s
        .server_heap_bytes
        .map_or(String::new(), |h| format!(" (heap {:.1})", mib(h)));
    let server = match (s.server_rss_bytes, s.server_fds) {
        (Some(rss), Some(fds)) => format!(
            "server {:7.1} MiB{heap} {:>6} fds {:>4}% cpu",
            mib(rss),
            fds,
            s.server_cpu_percent
                .map_or("-".into(), |c| format!("{c:.0}"))
        ),
        _ => format!("server -{heap}"),
    };
    format!(
        "  {:>6.0}s {:<8} sessions {:>6} rooms {:>5}  {server}  delivered {:>10} ({:>6.0}/s)  \
         lost {} dup {} resets {}  resumes {} slow closes {}",
        s.t_s,
        s.phase,
        s.sessions,
        s.rooms,
        s.delivered,
        s.deliveries_per_sec,
        s.lost,
        s.duplicated,
        s.resets,
        s.resumes,
        s.slow_closes
    )
}

fn summarize(samples: &[Sample], ramp_secs: f64, steady_secs: f64, vm_hwm: Option<u64>) -> Summary {
    let at = |phase: &str| samples.iter().find(|s| s.phase == phase);
    let ratio = |end: Option<u64>, start: Option<u64>| {
        end.zip(start.filter(|&s| s > 0))
            .map(|(e, s)| e as f64 / s as f64)
    };
    let rss_ramp = at("ramp-end").and_then(|s| s.server_rss_bytes);
    let rss_end = at("end").and_then(|s| s.server_rss_bytes);
    let fds_ramp = at("ramp-end").and_then(|s| s.server_fds);
    let fds_end = at("end").and_then(|s| s.server_fds);
    let rss_ratio = ratio(rss_end, rss_ramp);
    let heap_ramp = at("ramp-end").and_then(|s| s.server_heap_bytes);
    let heap_end = at("end").and_then(|s| s.server_heap_bytes);
    Summary {
        ramp_secs,
        steady_secs,
        rss_ramp_end_bytes: rss_ramp,
        heap_ramp_end_bytes: heap_ramp,
        heap_end_bytes: heap_end,
        heap_end_over_ramp: ratio(heap_end, heap_ramp),
        rss_peak_bytes: samples.iter().filter_map(|s| s.server_rss_bytes).max(),
        rss_end_bytes: rss_end,
        rss_end_over_ramp: rss_ratio,
        rss_end_within_10_percent: rss_ratio.map(|r| (r - 1.0).abs() <= 0.10),
        server_vm_hwm_bytes: vm_hwm,
        fds_ramp_end: fds_ramp,
        fds_peak: samples.iter().filter_map(|s| s.server_fds).max(),
        fds_end,
        fds_end_over_ramp: ratio(fds_end, fds_ramp),
    }
}

fn summary_text(report: &SoakReport, bench: &BenchArgs, args: &SoakArgs) -> String {
    let s = &report.summary;
    let c = &report.counts;
    let mut out = format!(
        "soak: {} sessions over {} in rooms of ~{}, {} msg/s: ramp {:.1} s, then {:.0} s of churn\n",
        args.soak_sessions,
        bench
            .transports
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(","),
        args.soak_room_size,
        args.soak_rate,
        s.ramp_secs,
        s.steady_secs
    );
    match (s.rss_ramp_end_bytes, s.rss_peak_bytes, s.rss_end_bytes) {
        (Some(ramp), Some(peak), Some(end)) => {
            out += &format!(
                "server RSS:  end of ramp {:.1} MiB, peak {:.1} MiB (VmHWM {}), end {:.1} MiB: \
                 end/ramp {:.3} ({})\n",
                mib(ramp),
                mib(peak),
                s.server_vm_hwm_bytes
                    .map_or("-".into(), |b| format!("{:.1} MiB", mib(b))),
                mib(end),
                s.rss_end_over_ramp.unwrap_or(f64::NAN),
                if s.rss_end_within_10_percent == Some(true) {
                    "within 10 %"
                } else {
                    "NOT within 10 %"
                }
            );
            out += &format!(
                "server fds:  end of ramp {}, peak {}, end {}: end/ramp {:.3}\n",
                s.fds_ramp_end.unwrap_or(0),
                s.fds_peak.unwrap_or(0),
                s.fds_end.unwrap_or(0),
                s.fds_end_over_ramp.unwrap_or(f64::NAN)
            );
        }
        _ => out += &format!("server RSS and open files: {}\n", report.server_readings),
    }
    if let (Some(ramp), Some(end)) = (s.heap_ramp_end_bytes, s.heap_end_bytes) {
        out += &format!(
            "server heap in use (switchyard_heap_bytes): end of ramp {:.1} MiB, end {:.1} MiB: \
             end/ramp {:.3}\n",
            mib(ramp),
            mib(end),
            s.heap_end_over_ramp.unwrap_or(f64::NAN)
        );
    }
    out += &format!(
        "deliveries {}: lost {}, duplicated {}, out of order {}, unowed {}, seq gaps {}; \
         resets {} ({} messages skipped by them); history mismatches {}, error events {}, \
         foreign {}\n",
        c.delivered,
        c.lost,
        c.duplicated,
        c.out_of_order,
        c.unowed,
        c.seq_gaps,
        c.resets,
        c.skipped_by_reset,
        c.history_mismatches,
        c.error_events,
        c.foreign
    );
    out += &format!(
        "sessions: {} created ({} failed), departed {} (deleted {}, left then expired {}, \
         abandoned in rooms {}), lost by the server {}; rooms: {} created, {} emptied; joins {}, \
         leaves {}, command errors {}\n",
        c.sessions_created,
        c.arrival_failures,
        c.departures_deleted + c.departures_expired + c.departures_abandoned,
        c.departures_deleted,
        c.departures_expired,
        c.departures_abandoned,
        c.sessions_lost,
        c.rooms_created,
        c.rooms_emptied,
        c.joins,
        c.leaves,
        c.command_errors
    );
    out += &format!(
        "transports: {} resumes ({} on another kind, {} after a pause); closed by the server: \
         slow_consumer {}, heartbeat_timeout {}, other {}; dropped {}; attach retries {}\n",
        c.resumes,
        c.kind_switches,
        c.pauses,
        c.closes_slow_consumer,
        c.closes_heartbeat_timeout,
        c.closes_other,
        c.transport_drops,
        c.attach_retries
    );
    out += &format!(
        "messages: {} sent, {} refused, {} outcome unknown, {} not queued (driver behind), {} \
         with no room to go to, {} retried and echoed twice; catch-up timeouts {}; acks {}",
        c.sent,
        c.send_errors,
        c.send_unknown,
        c.send_backlog,
        c.send_skipped,
        c.retry_echoes,
        c.catch_up_timeouts,
        c.acks
    );
    if !report.notes.is_empty() {
        out += "\nfirst errors:";
        for note in &report.notes {
            out += &format!("\n  - {note}");
        }
    }
    if let Err(verdict) = report.verdict() {
        out += &format!("\n\n!!! NOT A HEALTHY RUN: {verdict}");
    }
    out
}

/// Server RSS and open files over time, the end of the ramp marked.
fn chart(report: &SoakReport, args: &SoakArgs, path: &std::path::Path) -> Result<(), String> {
    let points = |value: fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .samples
            .iter()
            .filter_map(|s| Some((s.t_s, value(s)?)))
            .collect()
    };
    let ramp_end = report.summary.ramp_secs;
    let rss = points(|s| s.server_rss_bytes.map(mib));
    let heap = points(|s| s.server_heap_bytes.map(mib));
    let fds = points(|s| s.server_fds.map(|f| f as f64));
    let sessions = points(|s| Some(s.sessions as f64));
    let marker = || vec![("end of the ramp".to_owned(), ramp_end)];
    let panels = [
        Panel {
            y_desc: "server memory, MiB",
            curves: vec![("RSS".into(), rss), ("heap in use".into(), heap)],
            markers: marker(),
        },
        Panel {
            y_desc: "count",
            curves: vec![
                ("server open files".into(), fds),
                ("sessions".into(), sessions),
            ],
            markers: marker(),
        },
    ];
    let title = format!(
        "switchyard soak: {} sessions, {} msg/s, rooms of ~{}",
        args.soak_sessions, args.soak_rate, args.soak_room_size
    );
    report::timeline_svg(&panels, "seconds since the start of the ramp", &title, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, room: &str, k: u64) -> String {
        format!(
            r#"{{"seq":{seq},"type":"message","room":"{room}","id":{},"client_id":"run.0.{k}"}}"#,
            k + 100
        )
    }

    fn history(seq: u64, room: &str, ks: &[u64]) -> String {
        let messages: Vec<String> = ks
            .iter()
            .map(|k| format!(r#"{{"room":"{room}","id":{k},"client_id":"run.0.{k}"}}"#))
            .collect();
        format!(
            r#"{{"seq":{seq},"type":"history","room":"{room}","messages":[{}]}}"#,
            messages.join(",")
        )
    }

    fn feed(ledger: &mut Ledger, totals: &Totals, events: &[String]) {
        for json in events {
            let event: WireEvent = serde_json::from_str(json).expect("a test event");
            let _ = ledger.event(&event, "run", totals);
        }
    }

    #[test]
    fn defaults_match_the_flags() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            _bench: BenchArgs,
            #[command(flatten)]
            soak: SoakArgs,
        }
        let parsed = <Cli as clap::Parser>::parse_from(["soak"]);
        assert_eq!(parsed.soak, SoakArgs::default());
    }

    #[test]
    fn in_order_deliveries_from_the_join_to_the_leave_are_clean() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 3);
        feed(
            &mut ledger,
            &totals,
            &[
                history(1, "a", &[1, 2]),
                message(2, "a", 3),
                message(3, "a", 4),
            ],
        );
        ledger.close("a", 6);
        assert_eq!(ledger.owed(), 1);
        feed(&mut ledger, &totals, &[message(4, "a", 5)]);
        assert_eq!(ledger.owed(), 0);
        ledger.settle(&totals);
        let counts = totals.read();
        assert_eq!(counts.delivered, 3);
        assert_eq!(
            counts,
            Counts {
                delivered: 3,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn a_skipped_message_is_lost_until_it_comes_late_and_a_repeat_is_a_duplicate() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 0);
        feed(
            &mut ledger,
            &totals,
            &[history(1, "a", &[]), message(2, "a", 0), message(3, "a", 2)],
        );
        assert_eq!(totals.read().lost, 1);
        feed(
            &mut ledger,
            &totals,
            &[message(4, "a", 1), message(5, "a", 1)],
        );
        let counts = totals.read();
        assert_eq!(
            (counts.lost, counts.out_of_order, counts.duplicated),
            (0, 1, 1)
        );
        assert_eq!(counts.delivered, 3);
        // Never delivered: 3 is owed at the leave, and lost at the end.
        ledger.close("a", 4);
        ledger.settle(&totals);
        assert_eq!(totals.read().lost, 1);
    }

    #[test]
    fn messages_outside_a_membership_are_unowed_and_a_bad_history_is_a_mismatch() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 5);
        // The history should end with 4.
        feed(&mut ledger, &totals, &[history(1, "a", &[2, 3])]);
        feed(&mut ledger, &totals, &[message(2, "a", 4)]);
        ledger.close("a", 5);
        feed(
            &mut ledger,
            &totals,
            &[message(3, "a", 5), message(4, "b", 0)],
        );
        let counts = totals.read();
        assert_eq!((counts.unowed, counts.history_mismatches), (3, 1));
    }

    #[test]
    fn seqs_must_follow_each_other_except_at_a_reset() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 0);
        feed(
            &mut ledger,
            &totals,
            &[
                history(1, "a", &[]),
                message(2, "a", 0),
                r#"{"seq":40,"type":"reset","reason":"replay_window_exceeded"}"#.into(),
                history(41, "a", &[0, 1, 2, 3]),
                r#"{"seq":42,"type":"presence","room":"a"}"#.into(),
                message(43, "a", 4),
                message(45, "a", 5),
                r#"{"type":"heartbeat"}"#.into(),
            ],
        );
        let counts = totals.read();
        assert_eq!((counts.seq_gaps, counts.resets), (1, 1));
        assert_eq!((counts.skipped_by_reset, counts.lost), (3, 0));
        assert_eq!(ledger.last_seq, 45);
    }

    #[test]
    fn a_reset_skips_the_rest_of_a_membership_that_ended_before_it() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 0);
        ledger.open("b", 0);
        feed(
            &mut ledger,
            &totals,
            &[
                history(1, "a", &[]),
                history(2, "b", &[]),
                message(3, "a", 0),
            ],
        );
        ledger.close("a", 4);
        feed(
            &mut ledger,
            &totals,
            &[
                r#"{"seq":10,"type":"reset","reason":"replay_window_exceeded"}"#.into(),
                history(11, "b", &[]),
                r#"{"seq":12,"type":"typing","room":"b","users":[]}"#.into(),
            ],
        );
        assert_eq!(ledger.owed(), 0);
        ledger.settle(&totals);
        let counts = totals.read();
        assert_eq!((counts.skipped_by_reset, counts.lost), (3, 0));
    }

    #[test]
    fn an_abandoned_membership_owes_nothing_and_a_retried_send_may_echo_twice() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 0);
        ledger.echoes.push(("a".into(), 1));
        feed(
            &mut ledger,
            &totals,
            &[
                history(1, "a", &[]),
                message(2, "a", 0),
                message(3, "a", 1),
                message(4, "a", 1),
            ],
        );
        ledger.abandon();
        ledger.settle(&totals);
        let counts = totals.read();
        assert_eq!(
            (counts.delivered, counts.duplicated, counts.lost),
            (2, 0, 0)
        );
    }

    #[test]
    fn messages_of_other_runs_are_foreign() {
        let (mut ledger, totals) = (Ledger::default(), Totals::default());
        ledger.open("a", 0);
        let other = r#"{"seq":1,"type":"message","room":"a","id":1,"client_id":"other.0.0"}"#;
        feed(&mut ledger, &totals, &[other.into()]);
        assert_eq!(totals.read().foreign, 1);
        assert_eq!(number("run", "run.12.345"), Some(345));
        assert_eq!(number("run", "runner.1.2"), None);
    }
}
