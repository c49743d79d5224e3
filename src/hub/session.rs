//! One client's session: its seq counter and replay buffer, the transport attached to it, its
//! rate limiter and its memory of recent `client_id`s.
//!
//! The replay buffer is also the outbox: an attached transport reads events after its cursor
//! straight from it, so an event is stored once per session whatever the transport. A
//! write-through transport ([`DirectSink`], the WebSocket) is instead handed each event as it
//! is pushed, under the session lock, and keeps only what its socket refused. Either way, a
//! stream that falls more than its outbox [`Budget`] behind (events, or bytes) is closed with
//! `slow_consumer` while the events it missed are still in the buffer, so the client resumes
//! without a gap. The buffer itself is bounded in events and in bytes. Nothing here knows
//! about HTTP or rooms.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::metrics::Metrics;

use super::HubConfig;
use crate::protocol::{CloseReason, EncodedEvent, ErrorBody, TransportKind};

/// What one event costs a replay buffer or an outbox: its body and the entry holding it.
pub(crate) fn event_cost(event: &EncodedEvent) -> u64 {
    event.body.len() as u64 + 64
}

/// How much one write may take: at most `events` events and, past the first, `bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimit {
    /// Events at most.
    pub events: usize,
    /// Bytes at most (event bodies plus a small per-event cost); the first event is always
    /// taken, however large.
    pub bytes: u64,
}

impl BatchLimit {
    /// At most `events` events, whatever their bytes.
    pub const fn events(events: usize) -> BatchLimit {
        BatchLimit {
            events,
            bytes: u64::MAX,
        }
    }

    /// No limit.
    pub const ALL: BatchLimit = BatchLimit {
        events: usize::MAX,
        bytes: u64::MAX,
    };
}

/// The last events of a session, numbered by seq: at most `capacity` events and, past the
/// newest one, `byte_budget` bytes. Bodies shared with other sessions count in full, so the
/// budget bounds what one session can hold whatever its client does.
#[derive(Debug)]
pub(crate) struct ReplayBuffer {
    /// Seq of `events[0]`; when empty, the seq the next event will get.
    first_seq: u64,
    /// Each event with the byte count pushed up to and including it.
    events: VecDeque<(EncodedEvent, u64)>,
    capacity: usize,
    byte_budget: u64,
    /// Bytes of the events kept.
    bytes: u64,
    /// Bytes of every event ever pushed.
    pushed: u64,
}

/// The events a resume point asks for are no longer (or never were) in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// `after` is older than the oldest event kept.
    TooOld,
    /// `after` is newer than the newest event produced.
    Unknown,
}

impl ReplayBuffer {
    /// An empty buffer keeping at most `capacity` events and `byte_budget` bytes (always at
    /// least the newest event); the first event gets seq 1.
    pub fn new(capacity: usize, byte_budget: u64) -> Self {
        ReplayBuffer {
            first_seq: 1,
            events: VecDeque::new(),
            capacity: capacity.max(1),
            byte_budget,
            bytes: 0,
            pushed: 0,
        }
    }

    /// Seq of the oldest event kept; when none is, the seq the next event will get.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Seq of the newest event, 0 before the first.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64 - 1
    }

    /// Appends an event and returns its seq, dropping the oldest ones past the budgets.
    #[cfg(test)]
    pub fn push(&mut self, event: EncodedEvent) -> u64 {
        self.push_keeping(event, self.last_seq() + 1)
    }

    /// Appends an event like [`ReplayBuffer::push`], but the byte budget drops no event from
    /// seq `keep_from` on: a `reset` and the histories after it stay together, whatever their
    /// size, until later events push them out.
    pub fn push_keeping(&mut self, event: EncodedEvent, keep_from: u64) -> u64 {
        // Room first, so a full buffer never holds `capacity + 1` events: the deque would
        // double its allocation for that one moment and keep it for good.
        while self.events.len() >= self.capacity {
            self.pop_oldest();
        }
        let cost = event_cost(&event);
        self.pushed += cost;
        self.bytes += cost;
        self.events.push_back((event, self.pushed));
        while self.bytes > self.byte_budget && self.first_seq < keep_from {
            self.pop_oldest();
        }
        self.last_seq()
    }

    fn pop_oldest(&mut self) {
        if let Some((oldest, _)) = self.events.pop_front() {
            self.bytes -= event_cost(&oldest);
            self.first_seq += 1;
        }
    }

    /// Forgets the events up to seq `seq` (the client has processed them), giving back most
    /// of the memory they held once few events are left.
    pub fn trim_through(&mut self, seq: u64) {
        let through = seq.min(self.last_seq());
        while self.first_seq <= through {
            self.pop_oldest();
        }
        // Only when the deque is mostly empty, so a steady acker never reallocates.
        if self.events.capacity() > 64 && self.events.len() * 4 < self.events.capacity() {
            self.events.shrink_to(self.events.len() * 2);
        }
    }

    /// Seq of the oldest event kept (of the next one when empty), and the events, oldest
    /// first: what a snapshot keeps.
    pub fn image(&self) -> (u64, impl Iterator<Item = &EncodedEvent>) {
        (self.first_seq, self.events.iter().map(|(event, _)| event))
    }

    /// Holds `events` from seq `first_seq` (at least 1) on instead of what it held, whatever
    /// the budgets: a snapshot's buffer, which its node kept within the same ones.
    pub fn restore(&mut self, first_seq: u64, events: impl IntoIterator<Item = EncodedEvent>) {
        self.first_seq = first_seq.max(1);
        self.events.clear();
        self.bytes = 0;
        self.pushed = 0;
        for event in events {
            let cost = event_cost(&event);
            self.pushed += cost;
            self.bytes += cost;
            self.events.push_back((event, self.pushed));
        }
    }

    /// Checks that every event after `after` is still here.
    pub fn check_resume(&self, after: u64) -> Result<(), Gap> {
        if after > self.last_seq() {
            Err(Gap::Unknown)
        } else if after + 1 < self.first_seq {
            Err(Gap::TooOld)
        } else {
            Ok(())
        }
    }

    /// Bytes of the events with seq > `after` (`u64::MAX` if some are gone).
    pub fn bytes_after(&self, after: u64) -> u64 {
        match self.check_resume(after) {
            Err(Gap::TooOld) => u64::MAX,
            Err(Gap::Unknown) => 0,
            Ok(()) if after + 1 == self.first_seq => self.bytes,
            Ok(()) => {
                let (_, through_after) = &self.events[(after - self.first_seq) as usize];
                self.pushed - through_after
            }
        }
    }

    /// Events with seq > `after`, oldest first, as many as `limit` allows.
    pub fn after(&self, after: u64, limit: BatchLimit) -> Result<Vec<(u64, EncodedEvent)>, Gap> {
        self.check_resume(after)?;
        let start = (after + 1 - self.first_seq) as usize;
        let mut bytes = 0;
        let mut batch = Vec::new();
        for (i, (event, _)) in self.events.iter().skip(start).enumerate() {
            bytes += event_cost(event);
            if i == limit.events || (i > 0 && bytes > limit.bytes) {
                break;
            }
            batch.push((after + 1 + i as u64, event.clone()));
        }
        Ok(batch)
    }
}

/// A token bucket: `burst` commands at once, `per_sec` sustained.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket. The burst is at least one token, or nothing would ever pass.
    pub fn new(per_sec: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        TokenBucket {
            tokens: burst,
            burst,
            per_sec,
            refilled: Instant::now(),
        }
    }

    /// Whether the bucket has refilled to its burst.
    pub fn is_full(&self) -> bool {
        let elapsed = Instant::now().duration_since(self.refilled).as_secs_f64();
        self.tokens + elapsed * self.per_sec >= self.burst
    }

    /// How long until a token is there (zero if one is).
    pub fn retry_after(&self) -> std::time::Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        // A day at most: a rate configured absurdly low must not overflow the duration.
        std::time::Duration::try_from_secs_f64(missing / self.per_sec)
            .unwrap_or(std::time::Duration::MAX)
            .min(std::time::Duration::from_secs(86_400))
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The outcome of a send waiting for its write, once known.
pub(crate) type Outcome = watch::Receiver<Option<Result<(), ErrorBody>>>;

/// What a session remembers of one of its sends.
#[derive(Debug, Clone)]
pub(crate) enum Sent {
    /// Broadcast: the echo to send again to a retry.
    Echo(EncodedEvent),
    /// Waiting for its write (`--history-durability full`); a retry waits for the same
    /// outcome instead of sending the message twice.
    Pending(Outcome),
    /// Broadcast, and the client acknowledged a seq at or past its echo (then): it has the
    /// echo, so a retry is answered without it (and the echo's bytes are not kept). Forgotten
    /// [`ACKNOWLEDGED_KEPT`] later.
    Acknowledged(Instant),
}

/// How long a send whose echo the client acknowledged is still recognised as a retry. A
/// client never retries a send whose echo it processed; this only catches a copy of the
/// command delayed on its way, which takes seconds at most (a request times out after 10).
pub(crate) const ACKNOWLEDGED_KEPT: std::time::Duration = std::time::Duration::from_secs(60);

/// The session's most recent sends, by `client_id`, so a retry is answered with the original
/// instead of a second broadcast.
#[derive(Debug, Default)]
pub struct SentMessages {
    by_client_id: HashMap<Arc<str>, (u64, Sent)>,
    order: VecDeque<Arc<str>>,
    /// Echoes not yet pushed to the session, to learn their seq when they are.
    unnumbered: Vec<(EncodedEvent, Arc<str>)>,
    /// Echoes pushed, by seq (rising), until an `ack` covers them.
    numbered: VecDeque<(u64, Arc<str>)>,
}

impl SentMessages {
    /// The message id and echo (or pending outcome) of an earlier send with this `client_id`.
    pub(crate) fn get(&self, client_id: &str) -> Option<&(u64, Sent)> {
        self.by_client_id.get(client_id)
    }

    /// Remembers a send, forgetting the oldest past `capacity`. Insert an echo before it is
    /// pushed to the session, so that [`SentMessages::numbered`] learns its seq.
    pub(crate) fn insert(&mut self, client_id: &str, id: u64, sent: Sent, capacity: usize) {
        let key: Arc<str> = Arc::from(client_id);
        if let Sent::Echo(echo) = &sent {
            self.unnumbered.push((echo.clone(), key.clone()));
        }
        if self.by_client_id.insert(key.clone(), (id, sent)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.forget(&old);
            }
        }
    }

    /// Forgets a send whose write failed, so a retry sends it anew.
    pub(crate) fn remove(&mut self, client_id: &str) {
        if self.by_client_id.contains_key(client_id) {
            self.order.retain(|k| &**k != client_id);
            self.forget(client_id);
        }
    }

    fn forget(&mut self, client_id: &str) {
        self.by_client_id.remove(client_id);
        self.unnumbered.retain(|(_, k)| &**k != client_id);
        self.numbered.retain(|(_, k)| &**k != client_id);
    }

    /// An event was pushed to the session at `seq`: if it is the echo of one of its sends,
    /// remember where, for [`SentMessages::acknowledged`].
    fn numbered(&mut self, event: &EncodedEvent, seq: u64) {
        if self.unnumbered.is_empty() || event.type_name != "message" {
            return;
        }
        if let Some(at) = self
            .unnumbered
            .iter()
            .position(|(echo, _)| echo.same_as(event))
        {
            let (_, key) = self.unnumbered.swap_remove(at);
            self.numbered.push_back((seq, key));
        }
    }

    /// The client has processed every event up to `seq`: the echoes among them need not be
    /// kept for a retry, and the sends acknowledged long ago are forgotten.
    fn acknowledged(&mut self, seq: u64) {
        let now = Instant::now();
        while self.numbered.front().is_some_and(|(at, _)| *at <= seq) {
            let Some((_, key)) = self.numbered.pop_front() else {
                break;
            };
            if let Some((_, sent @ Sent::Echo(_))) = self.by_client_id.get_mut(&key) {
                *sent = Sent::Acknowledged(now);
            }
        }
        // Oldest first; a send not acknowledged yet keeps the ones after it, within the count.
        while let Some(oldest) = self.order.front() {
            match self.by_client_id.get(oldest) {
                Some((_, Sent::Acknowledged(at)))
                    if now.duration_since(*at) > ACKNOWLEDGED_KEPT =>
                {
                    let oldest = oldest.clone();
                    self.order.pop_front();
                    self.forget(&oldest);
                }
                _ => break,
            }
        }
    }
}

/// A transport that takes each event as it is pushed (write-through fan-out) instead of
/// being woken to fetch it from the replay buffer. `deliver` is called under the session's
/// lock, in seq order, so it must not block: it writes what the socket takes now and queues
/// the rest for the transport's own task.
pub trait DirectSink: Send + Sync + std::fmt::Debug {
    /// Writes or queues one event. `backlog` marks the events owed at attach time, which do
    /// not count against the outbox. `Err(OutboxFull)` when more than the outbox capacity of
    /// live events is queued: the hub then closes the transport with `slow_consumer`.
    fn deliver(&self, seq: u64, event: &EncodedEvent, backlog: bool) -> Result<(), OutboxFull>;
}

/// A [`DirectSink`] holds more undelivered events than the outbox capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxFull;

/// Run by the hub when it closes a transport, under the session lock: lets a transport whose
/// task may be blocked (an SSE stream inside hyper's writer) bound how long it lingers.
pub(crate) struct CloseHook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for CloseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CloseHook")
    }
}

/// The hub's record of the transport attached to a session. It counts in
/// `sessions_attached` from the attach until it is dropped, so the gauge moves when the hub
/// decides, not when the transport's task finally notices.
#[derive(Debug)]
pub(crate) struct AttachedSlot {
    pub(crate) id: u64,
    pub(crate) kind: TransportKind,
    /// Seq up to which events were handed to the transport (written through, or taken by a
    /// stream for its current write).
    pub(crate) acked: u64,
    pub(crate) close: watch::Sender<Option<CloseReason>>,
    /// Set for a write-through transport: events go to it as they are pushed.
    pub(crate) direct: Option<Arc<dyn DirectSink>>,
    pub(crate) on_close: Option<CloseHook>,
    pub(crate) metrics: Metrics,
}

impl AttachedSlot {
    pub(crate) fn new(
        id: u64,
        kind: TransportKind,
        acked: u64,
        close: watch::Sender<Option<CloseReason>>,
        metrics: Metrics,
    ) -> Self {
        metrics.transport(kind).attached.inc();
        AttachedSlot {
            id,
            kind,
            acked,
            close,
            direct: None,
            on_close: None,
            metrics,
        }
    }
}

impl Drop for AttachedSlot {
    fn drop(&mut self) {
        self.metrics.transport(self.kind).attached.dec();
    }
}

/// Mutable state of a session, behind its mutex. Never held across an `.await`.
#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) replay: ReplayBuffer,
    pub(crate) attached: Option<AttachedSlot>,
    /// The kind of the transport attached last, to label the session's commands in metrics.
    pub(crate) last_transport: Option<TransportKind>,
    /// Rooms joined, in join order.
    pub(crate) rooms: Vec<String>,
    /// When the last transport detached (or the session was created).
    pub(crate) last_seen: Instant,
    pub(crate) limiter: TokenBucket,
    /// The verified identity, when the server authenticates (its expiry moves on `refresh`).
    pub(crate) identity: Option<super::Identity>,
    pub(crate) sent: SentMessages,
    /// Set once the session is expired or deleted; it takes no more events or transports.
    pub(crate) ended: bool,
    /// The seqs of a `reset` and its histories not yet handed to a transport: the byte budget
    /// drops none of them until then, or a client would be sent a new reset on every resume.
    pub(crate) protected: Option<(u64, u64)>,
}

/// A session. Shared (`Arc`) between the hub's registry, the rooms it is in and its transport.
#[derive(Debug)]
pub struct Session {
    /// 128-bit random id, hex.
    pub id: String,
    /// User name, validated at creation (shared with the presence lists it appears in).
    pub name: Arc<str>,
    /// The authenticated user (a token's `sub`), when the server authenticates: the sessions
    /// of one user count once in a room's presence.
    pub user: Option<Arc<str>>,
    /// Which fan-out thread pushes this session's events.
    pub(crate) shard: usize,
    pub(crate) state: Mutex<SessionState>,
    /// Wakes the attached transport after a push. A `Notify` rather than a `watch`: the
    /// transport reads the seq from the replay buffer anyway, and `watch::send_replace` wakes
    /// through eight `Notify` shards (eight lock round-trips per push, 6 % of the server's
    /// time at 1000 WebSocket subscribers); `notify_waiters` takes one.
    pub(crate) wakeup: Arc<Notify>,
    pub(crate) outbox: Budget,
}

/// How far an attached stream may fall behind before it is closed `slow_consumer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Events not yet handed to the transport.
    pub events: u64,
    /// Their bytes; a single event over it alone is let through.
    pub bytes: u64,
}

impl Budget {
    /// Whether `events` events of `bytes` bytes are over this budget.
    pub fn exceeded_by(&self, events: u64, bytes: u64) -> bool {
        events > self.events || (events > 1 && bytes > self.bytes)
    }
}

impl Session {
    pub(crate) fn new(
        id: String,
        name: Arc<str>,
        identity: Option<super::Identity>,
        config: &HubConfig,
        shard: usize,
    ) -> Self {
        Session {
            id,
            name,
            user: identity.as_ref().map(|i| i.user.clone()),
            shard,
            state: Mutex::new(SessionState {
                replay: ReplayBuffer::new(config.replay_window, config.replay_bytes as u64),
                attached: None,
                last_transport: None,
                rooms: Vec::new(),
                last_seen: Instant::now(),
                limiter: TokenBucket::new(config.rate_limit_per_sec, config.rate_limit_burst),
                identity,
                sent: SentMessages::default(),
                ended: false,
                protected: None,
            }),
            wakeup: Arc::new(Notify::new()),
            outbox: config.outbox,
        }
    }

    /// Locks the state. A panic elsewhere must not take every session down, so poisoning is
    /// ignored: the state is updated in small steps that leave it consistent.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How far an attached stream of this session may fall behind.
    pub fn outbox_budget(&self) -> Budget {
        self.outbox
    }

    /// The kind of the transport attached last, if any ever was.
    pub fn last_transport(&self) -> Option<TransportKind> {
        self.lock().last_transport
    }

    /// Appends an event and wakes the attached transport. Closes a stream that has fallen
    /// too far behind. Returns the event's seq, or `None` if the session has ended.
    pub(crate) fn push(&self, event: EncodedEvent) -> Option<u64> {
        self.push_together(std::slice::from_ref(&event))
    }

    /// Appends events that belong together (a `reset` and its histories, a `history` and its
    /// `presence`): the replay buffer's byte budget drops none of them for one another.
    /// Returns the first one's seq, or `None` if the session has ended.
    pub(crate) fn push_together(&self, events: &[EncodedEvent]) -> Option<u64> {
        let (first, written_through) = {
            let mut state = self.lock();
            if state.ended {
                return None;
            }
            let first = state.replay.last_seq() + 1;
            for event in events {
                state.push_keeping(event.clone(), self.outbox, first);
            }
            let direct = state.attached.as_ref().is_some_and(|s| s.direct.is_some());
            (first, direct)
        };
        // A write-through transport already has the events: nobody waits to be woken.
        if !written_through {
            self.wake();
        }
        Some(first)
    }

    /// Wakes the attached transport after events were pushed under the lock.
    pub(crate) fn wake(&self) {
        self.wakeup.notify_waiters();
    }
}

impl SessionState {
    /// Appends an event (the caller wakes the transport once the lock is released), keeping
    /// every event from seq `keep_from` on within the byte budget (see
    /// [`ReplayBuffer::push_keeping`]). Closes a stream that has fallen more than its outbox
    /// budget behind.
    pub(crate) fn push_keeping(
        &mut self,
        event: EncodedEvent,
        outbox: Budget,
        keep_from: u64,
    ) -> u64 {
        let seq = self.replay.last_seq() + 1;
        let too_far = match self.attached.as_mut() {
            Some(slot) => match &slot.direct {
                Some(direct) => {
                    let delivered = direct.deliver(seq, &event, false);
                    slot.acked = seq;
                    delivered.is_err()
                }
                None => {
                    !slot.kind.is_poll() && {
                        let bytes = self.replay.bytes_after(slot.acked);
                        outbox
                            .exceeded_by(seq - slot.acked, bytes.saturating_add(event_cost(&event)))
                    }
                }
            },
            None => false,
        };
        let keep_from = match self.protected {
            Some((from, _)) => keep_from.min(from),
            None => keep_from,
        };
        self.sent.numbered(&event, seq);
        self.replay.push_keeping(event, keep_from);
        if too_far {
            self.close_attached(CloseReason::SlowConsumer);
        }
        seq
    }

    /// The client has processed every event up to `seq` (an `ack`, or a resume point): the
    /// replay buffer forgets them, and the echoes among them. Events not yet handed to the
    /// attached transport are kept whatever the client claims, so its stream never breaks.
    /// `Err`: the session never produced `seq`.
    pub(crate) fn acknowledge(&mut self, seq: u64) -> Result<(), u64> {
        let last = self.replay.last_seq();
        if seq > last {
            return Err(last);
        }
        let through = match &self.attached {
            Some(slot) => seq.min(slot.acked),
            None => seq,
        };
        self.replay.trim_through(through);
        self.sent.acknowledged(through);
        Ok(())
    }

    /// A transport took every event up to `seq`: a protected reset it covers may now age out.
    pub(crate) fn hand_over(&mut self, seq: u64) {
        if self.protected.is_some_and(|(_, to)| seq >= to) {
            self.protected = None;
        }
    }

    /// Closes the attached transport, if any, telling it why; the session counts as
    /// unattached from now on.
    pub(crate) fn close_attached(&mut self, reason: CloseReason) {
        if let Some(mut slot) = self.attached.take() {
            slot.close.send_replace(Some(reason));
            slot.metrics.closed(slot.kind, reason);
            if let Some(CloseHook(hook)) = slot.on_close.take() {
                hook();
            }
            self.last_seen = Instant::now();
        }
    }
}

/// What an attached transport gets next.
#[derive(Debug)]
pub enum Delivery {
    /// Events to write, `(seq, event)`, oldest first.
    Events(Vec<(u64, EncodedEvent)>),
    /// The hub closed this transport.
    Closed(CloseReason),
}

/// A transport's hold on a session, returned by `Hub::attach`. Dropping it detaches.
#[derive(Debug)]
pub struct Attachment {
    session: Arc<Session>,
    id: u64,
    kind: TransportKind,
    /// Seq of the last event handed out.
    cursor: u64,
    wakeup: Arc<Notify>,
    close: watch::Receiver<Option<CloseReason>>,
    /// For the transport to count what it writes.
    metrics: Metrics,
    /// On a cluster node: gives up the session's attach lease when the attachment ends.
    pub(super) detach: Option<super::clustered::Detach>,
}

impl Attachment {
    pub(crate) fn new(
        session: Arc<Session>,
        id: u64,
        kind: TransportKind,
        cursor: u64,
        close: watch::Receiver<Option<CloseReason>>,
        metrics: Metrics,
    ) -> Self {
        let wakeup = session.wakeup.clone();
        Attachment {
            session,
            id,
            kind,
            cursor,
            wakeup,
            close,
            metrics,
            detach: None,
        }
    }

    /// The kind of transport attached.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// The server's metrics, for the transport to count what it writes.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The session this transport serves.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Seq of the last event handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// A receiver that turns `Some(reason)` when the hub closes this transport; lets a
    /// transport notice the close while it is blocked writing.
    pub fn close_signal(&self) -> watch::Receiver<Option<CloseReason>> {
        self.close.clone()
    }

    /// The transport itself decided to close (a silent or stalled client): the hub detaches
    /// it now and counts the close, as for the closes it decides itself.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.session.lock();
        if state
            .attached
            .as_ref()
            .is_some_and(|slot| slot.id == self.id)
        {
            state.close_attached(reason);
        }
    }

    /// Runs `hook` when the hub closes this transport (at once if it already has). The hook
    /// runs under the session lock: it must only signal, never block.
    pub fn on_close(&self, hook: impl FnOnce() + Send + 'static) {
        let mut state = self.session.lock();
        match state.attached.as_mut().filter(|slot| slot.id == self.id) {
            Some(slot) => slot.on_close = Some(CloseHook(Box::new(hook))),
            None => hook(),
        }
    }

    /// Turns this attachment into a write-through one: the events after the cursor go to
    /// `sink` now, under the session lock, and every later event as it is pushed, so the
    /// transport is never woken to fetch them ([`Attachment::next`] then has nothing more to
    /// hand out). Returns `false` if the hub already detached this transport.
    pub fn write_through(&mut self, sink: Arc<dyn DirectSink>) -> bool {
        let mut state = self.session.lock();
        let Some(slot) = state.attached.as_ref().filter(|slot| slot.id == self.id) else {
            return false;
        };
        debug_assert!(slot.direct.is_none());
        let backlog = match state.replay.after(self.cursor, BatchLimit::ALL) {
            Ok(backlog) => backlog,
            Err(_) => {
                state.close_attached(CloseReason::SlowConsumer);
                return false;
            }
        };
        for (seq, event) in &backlog {
            // The backlog owed at attach time never counts against the outbox.
            let _ = sink.deliver(*seq, event, true);
        }
        let last = state.replay.last_seq();
        state.hand_over(last);
        let slot = state.attached.as_mut().expect("checked above");
        slot.acked = last;
        slot.direct = Some(sink);
        self.cursor = last;
        true
    }

    /// The events after the cursor that are ready now (as many as `limit` allows), without
    /// waiting. What it hands out no longer counts against the outbox: the transport owns it,
    /// and a transport that stops writing is caught by its write deadline.
    pub fn ready(&mut self, limit: BatchLimit) -> Delivery {
        if let Some(reason) = *self.close.borrow() {
            return Delivery::Closed(reason);
        }
        let mut state = self.session.lock();
        let state = &mut *state;
        let Some(slot) = state.attached.as_mut().filter(|slot| slot.id == self.id) else {
            // Detached by the hub; the close signal is already set or about to be read.
            return Delivery::Closed(self.close.borrow().unwrap_or(CloseReason::Superseded));
        };
        match state.replay.after(self.cursor, limit) {
            Ok(events) => {
                if let Some((seq, _)) = events.last() {
                    self.cursor = *seq;
                }
                // What the transport takes now is its to write: the batch in flight never
                // counts against the outbox (a stream that stops writing is caught by its
                // write deadline instead).
                slot.acked = slot.acked.max(self.cursor);
                state.hand_over(self.cursor);
                Delivery::Events(events)
            }
            // Only reachable if outbox_capacity >= replay_window: the client must resume.
            Err(_) => {
                state.close_attached(CloseReason::SlowConsumer);
                Delivery::Closed(CloseReason::SlowConsumer)
            }
        }
    }

    /// Waits until there are events after the cursor (returning as many as `limit` allows) or
    /// the hub closes this transport. Cancel-safe: nothing is handed out unless it returns.
    pub async fn next(&mut self, limit: BatchLimit) -> Delivery {
        let wakeup = self.wakeup.clone();
        loop {
            // Register for the wake-up *before* reading the buffer, so a push racing with
            // the read still wakes `notified` below (`notify_waiters` keeps no permit).
            let notified = wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.ready(limit) {
                Delivery::Events(events) if events.is_empty() => {}
                other => return other,
            }
            tokio::select! {
                biased;
                _ = self.close.changed() => {}
                _ = notified => {}
            }
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut state = self.session.lock();
        if state
            .attached
            .as_ref()
            .is_some_and(|slot| slot.id == self.id)
        {
            state.attached = None;
            state.last_seen = Instant::now();
        }
        drop(state);
        if let Some(detach) = self.detach.take() {
            detach.spawn();
        }
        tracing::debug!(session = %self.session.id, transport = %self.kind, "detached");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Event;

    fn event(n: u64) -> EncodedEvent {
        Event::Reset {
            reason: &n.to_string(),
        }
        .encode()
    }

    #[test]
    fn a_full_replay_buffer_never_grows_its_allocation() {
        let mut buffer = ReplayBuffer::new(1024, u64::MAX);
        for n in 1..=1024 {
            buffer.push(event(n));
        }
        let allocated = buffer.events.capacity();
        for n in 1025..=5000 {
            buffer.push(event(n));
        }
        assert_eq!(buffer.events.len(), 1024);
        assert_eq!(buffer.events.capacity(), allocated);
        assert!(allocated < 2048, "{allocated} slots for 1024 events");
        assert_eq!(buffer.last_seq(), 5000);
    }

    #[test]
    fn replay_buffer_resumes_inside_window_and_reports_gaps() {
        let ten = BatchLimit {
            events: 10,
            bytes: u64::MAX,
        };
        let mut buffer = ReplayBuffer::new(3, u64::MAX);
        assert_eq!(buffer.last_seq(), 0);
        assert_eq!(buffer.after(0, ten).unwrap().len(), 0);
        for n in 1..=5 {
            assert_eq!(buffer.push(event(n)), n);
        }
        let seqs: Vec<u64> = buffer.after(2, ten).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        let one = BatchLimit { events: 1, ..ten };
        assert_eq!(buffer.after(3, one).unwrap()[0].0, 4);
        assert_eq!(buffer.after(1, ten).unwrap_err(), Gap::TooOld);
        assert_eq!(buffer.after(6, ten).unwrap_err(), Gap::Unknown);
        assert!(buffer.after(5, ten).unwrap().is_empty());
    }

    #[test]
    fn replay_buffer_keeps_to_its_byte_budget_but_always_the_newest_event() {
        let small = event(1);
        let cost = event_cost(&small);
        let mut buffer = ReplayBuffer::new(100, cost * 3);
        for n in 1..=5 {
            buffer.push(event(n));
        }
        assert_eq!(buffer.after(1, BatchLimit::ALL).unwrap_err(), Gap::TooOld);
        assert_eq!(buffer.after(2, BatchLimit::ALL).unwrap().len(), 3);
        assert_eq!(buffer.bytes_after(2), cost * 3);
        assert_eq!(buffer.bytes_after(4), cost);
        assert_eq!(buffer.bytes_after(1), u64::MAX, "events after 1 are gone");
        // One event over the whole budget is still kept, alone.
        let huge = Event::Reset {
            reason: &"x".repeat(1000),
        }
        .encode();
        assert_eq!(buffer.push(huge), 6);
        assert_eq!(buffer.after(5, BatchLimit::ALL).unwrap().len(), 1);
        assert_eq!(buffer.after(4, BatchLimit::ALL).unwrap_err(), Gap::TooOld);
        // A batch stops at its byte limit, but takes the first event whatever its size.
        let limit = BatchLimit {
            events: 10,
            bytes: 10,
        };
        assert_eq!(buffer.after(5, limit).unwrap().len(), 1);
    }

    #[test]
    fn a_reset_and_its_histories_stay_together_past_the_byte_budget() {
        let cost = event_cost(&event(1));
        let mut buffer = ReplayBuffer::new(100, cost * 2);
        buffer.push(event(1));
        let reset = buffer.push(event(2));
        for n in 3..=6 {
            buffer.push_keeping(event(n), reset);
        }
        assert_eq!(buffer.after(reset - 1, BatchLimit::ALL).unwrap().len(), 5);
        assert_eq!(buffer.after(0, BatchLimit::ALL).unwrap_err(), Gap::TooOld);
        // The next ordinary event lets the budget apply again.
        buffer.push(event(7));
        assert_eq!(buffer.after(5, BatchLimit::ALL).unwrap().len(), 2);
        assert_eq!(buffer.after(4, BatchLimit::ALL).unwrap_err(), Gap::TooOld);
    }

    #[test]
    fn an_acknowledgement_forgets_the_events_up_to_it_and_gives_memory_back() {
        let mut buffer = ReplayBuffer::new(1024, u64::MAX);
        for n in 1..=1000 {
            buffer.push(event(n));
        }
        let grown = buffer.events.capacity();
        buffer.trim_through(990);
        assert_eq!(buffer.check_resume(990), Ok(()));
        assert_eq!(buffer.check_resume(989), Err(Gap::TooOld));
        assert_eq!(buffer.after(990, BatchLimit::ALL).unwrap().len(), 10);
        let kept: u64 = (991..=1000).map(|n| event_cost(&event(n))).sum();
        assert_eq!(buffer.bytes_after(990), kept);
        assert!(
            buffer.events.capacity() < grown / 4,
            "the deque kept its memory"
        );
        // Past the last seq: everything goes, and the next event still gets the next seq.
        buffer.trim_through(5000);
        assert_eq!(buffer.check_resume(1000), Ok(()));
        assert_eq!(buffer.push(event(1001)), 1001);
    }

    fn message(id: u64) -> EncodedEvent {
        Event::Message(&crate::protocol::Message {
            room: "r".into(),
            id,
            from: "ann".into(),
            text: "hi".into(),
            ts: 1,
            client_id: format!("c{id}"),
        })
        .encode()
    }

    #[test]
    fn an_acknowledged_echo_is_no_longer_kept() {
        let mut sent = SentMessages::default();
        let echo = message(7);
        sent.insert("c7", 7, Sent::Echo(echo.clone()), 64);
        // Same bytes, another encoding: not the echo.
        sent.numbered(&message(7), 3);
        sent.numbered(&echo, 5);
        sent.acknowledged(4);
        assert!(matches!(sent.get("c7"), Some((7, Sent::Echo(_)))));
        sent.acknowledged(5);
        assert!(matches!(sent.get("c7"), Some((7, Sent::Acknowledged(_)))));
        assert!(sent.numbered.is_empty() && sent.unnumbered.is_empty());
        // A forgotten send leaves nothing behind in the seq bookkeeping.
        sent.insert("c8", 8, Sent::Echo(message(8)), 64);
        sent.insert("c9", 9, Sent::Echo(message(9)), 1);
        assert!(sent.get("c8").is_none());
        assert_eq!(sent.unnumbered.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_acknowledged_send_is_forgotten_a_minute_later() {
        let mut sent = SentMessages::default();
        for n in 1..=3 {
            let echo = message(n);
            sent.insert(&format!("c{n}"), n, Sent::Echo(echo.clone()), 64);
            sent.numbered(&echo, n);
        }
        sent.acknowledged(2);
        tokio::time::advance(ACKNOWLEDGED_KEPT).await;
        sent.acknowledged(2);
        assert!(sent.get("c1").is_some(), "kept for the whole minute");
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        sent.acknowledged(3);
        assert!(sent.get("c1").is_none() && sent.get("c2").is_none());
        assert!(matches!(sent.get("c3"), Some((3, Sent::Acknowledged(_)))));
        assert_eq!(sent.order.len(), 1);
    }

    #[test]
    fn sent_messages_forget_the_oldest() {
        let mut sent = SentMessages::default();
        for n in 0..5 {
            sent.insert(&format!("c{n}"), n, Sent::Echo(event(n)), 3);
        }
        assert!(sent.get("c1").is_none());
        assert_eq!(sent.get("c4").map(|e| e.0), Some(4));
    }

    #[test]
    fn a_bucket_always_holds_one_token_and_its_wait_never_overflows() {
        let mut slow = TokenBucket::new(0.4, 0.8);
        assert!(
            slow.try_take(),
            "a burst under one token would admit nothing"
        );
        assert!(!slow.try_take());
        let glacial = TokenBucket::new(1e-30, 1.0);
        let mut glacial = glacial;
        assert!(glacial.try_take());
        assert_eq!(
            glacial.retry_after(),
            std::time::Duration::from_secs(86_400)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_burst_then_rate() {
        let mut bucket = TokenBucket::new(20.0, 40.0);
        assert_eq!((0..50).filter(|_| bucket.try_take()).count(), 40);
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert_eq!((0..50).filter(|_| bucket.try_take()).count(), 10);
    }
}
