//! The bench's own clients: one subscriber per session (WebSocket, SSE, long poll, short poll,
//! or a WebSocket to the baseline), the publishers, and what each subscriber counts.
//!
//! Every published text is `RUN:K:xxx...`, where K is the message's index in the schedule:
//! message K is due at `t0 + K / rate`, and its latency is measured from that due time
//! (not from when the publisher got round to sending it), so a stalled publisher shows up as
//! latency instead of hiding it (no coordinated omission). Publishers are lanes: message K
//! goes to lane `K % lanes`, and each lane sends in order, so within a lane every subscriber
//! must see K increase; a decrease is counted as out-of-order.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::Method;
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::wire::{Connector, WireCounters};
use crate::protocol::TransportKind;

/// What a group of subscribers is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A switchyard transport.
    Transport(TransportKind),
    /// The bare tokio-tungstenite broadcast server.
    Baseline,
}

impl Subject {
    /// The name shown in reports.
    pub fn name(self) -> &'static str {
        match self {
            Subject::Transport(kind) => kind.as_str(),
            Subject::Baseline => "baseline-ws",
        }
    }
}

/// The schedule shared by every client of one run.
#[derive(Debug)]
pub struct Schedule {
    /// Random tag in every text, so a subscriber ignores anything else in the room.
    pub run_id: String,
    /// Messages per second, all lanes together.
    pub rate: f64,
    /// Messages in the schedule (warm-up included).
    pub total: u64,
    /// Messages due before the measurement window; their latency is not recorded.
    pub warmup: u64,
    /// Publisher lanes.
    pub lanes: usize,
    /// Length of each message's text.
    pub payload_bytes: usize,
    /// When message 0 is due; set once everything is attached.
    pub t0: OnceLock<Instant>,
    /// The measurement window `[start, end)`.
    pub window: OnceLock<(Instant, Instant)>,
    /// Which messages the server accepted.
    pub published: Vec<AtomicBool>,
    /// Messages the publishers failed to send (rejected, backlogged, connection lost).
    pub publish_errors: AtomicU64,
    /// The first publish error, to show.
    pub first_publish_error: Mutex<Option<String>>,
    /// Stops every client.
    pub stop: CancellationToken,
}

impl Schedule {
    /// The room this run publishes to.
    pub fn room(&self) -> String {
        format!("bench-{}", self.run_id)
    }

    /// The text of message `k`.
    pub fn text(&self, k: u64) -> String {
        let mut text = format!("{}:{k}:", self.run_id);
        while text.len() < self.payload_bytes {
            text.push('x');
        }
        text
    }

    /// The index of a text of this run.
    pub fn index_of(&self, text: &str) -> Option<u64> {
        let rest = text.strip_prefix(self.run_id.as_str())?.strip_prefix(':')?;
        let k: u64 = rest.split(':').next()?.parse().ok()?;
        (k < self.total).then_some(k)
    }

    /// When message `k` is due.
    pub fn due(&self, k: u64) -> Option<Instant> {
        let t0 = *self.t0.get()?;
        Some(t0 + Duration::from_secs_f64(k as f64 / self.rate))
    }

    /// Records a failed publish.
    pub fn publish_failed(&self, why: String) {
        self.publish_errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_publish_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    }
}

/// What the subscribers of one subject counted together.
#[derive(Debug)]
pub struct Tally {
    /// Whose subscribers these are.
    pub subject: Subject,
    /// Bytes through their sockets.
    pub wire: Arc<WireCounters>,
    /// Latency from due time to arrival, in µs, for messages due in the window.
    pub latency: Mutex<Histogram<u64>>,
    /// First deliveries of a message to a subscriber, over the whole run.
    pub delivered: AtomicU64,
    /// Deliveries that arrived inside the measurement window.
    pub in_window: AtomicU64,
    /// A message a subscriber had already received.
    pub duplicates: AtomicU64,
    /// A message older than one already received from the same lane.
    pub out_of_order: AtomicU64,
    /// A `seq` that did not follow the previous one by exactly 1.
    pub seq_gaps: AtomicU64,
    /// `error` and `reset` events, and requests that failed.
    pub errors: AtomicU64,
    /// Transports that ended before the bench stopped them.
    pub disconnects: AtomicU64,
    /// Subscribers attached and ready.
    pub ready: AtomicUsize,
    /// With `--resume`: the resumes, and latency second by second.
    pub storm: Option<Mutex<Storm>>,
}

/// What `--resume` measures: how long cut-off subscribers took to attach again, and each
/// second's latency, of the subscribers never cut off apart from those that were.
#[derive(Debug)]
pub struct Storm {
    /// From a subscriber's transport ending to its next transport attached, in µs.
    pub resume_us: Histogram<u64>,
    /// By second of arrival since message 0 was due: latency of the subscribers never cut
    /// off ...
    pub survivors: Vec<Histogram<u64>>,
    /// ... and of those cut off at least once.
    pub resumed: Vec<Histogram<u64>>,
    /// Transports ended (cut) and attached again (resumed), by second.
    pub cuts: Vec<u64>,
    /// See `cuts`.
    pub resumes: Vec<u64>,
}

impl Storm {
    fn new() -> Self {
        Storm {
            resume_us: latency_histogram(),
            survivors: Vec::new(),
            resumed: Vec::new(),
            cuts: Vec::new(),
            resumes: Vec::new(),
        }
    }

    /// The slot of second `at` in `list`, grown as needed.
    fn second<T>(list: &mut Vec<T>, at: usize, empty: impl FnMut() -> T) -> &mut T {
        if list.len() <= at {
            list.resize_with(at + 1, empty);
        }
        &mut list[at]
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Whole seconds from message 0's due time to `at` (0 before it).
fn second_of(schedule: &Schedule, at: Instant) -> usize {
    schedule
        .t0
        .get()
        .map_or(0, |t0| at.saturating_duration_since(*t0).as_secs() as usize)
}

impl Tally {
    /// The same tally, also measuring resumes (`--resume`).
    pub fn resuming(mut self) -> Self {
        self.storm = Some(Mutex::new(Storm::new()));
        self
    }

    fn storm(&self) -> Option<std::sync::MutexGuard<'_, Storm>> {
        self.storm
            .as_ref()
            .map(|storm| storm.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// An empty tally.
    pub fn new(subject: Subject) -> Self {
        Tally {
            subject,
            wire: Arc::new(WireCounters::default()),
            latency: Mutex::new(latency_histogram()),
            delivered: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            seq_gaps: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            storm: None,
        }
    }
}

/// What one subscriber received: a bit per message of the schedule.
#[derive(Debug)]
pub struct Receipts {
    seen: Vec<u64>,
    lane_last: Vec<Option<u64>>,
    last_seq: Option<u64>,
    /// Whether its transport was ever cut off (`--resume`).
    cut: bool,
    /// When its transport ended, until it attaches again.
    cut_at: Option<Instant>,
    /// Transports attached so far.
    attaches: u64,
}

impl Receipts {
    fn new(schedule: &Schedule) -> Self {
        Receipts {
            seen: vec![0; (schedule.total as usize).div_ceil(64)],
            lane_last: vec![None; schedule.lanes],
            last_seq: None,
            cut: false,
            cut_at: None,
            attaches: 0,
        }
    }

    /// Whether its transport was ever cut off.
    pub fn was_cut(&self) -> bool {
        self.cut
    }

    /// Its transport is attached: the first time, one more subscriber is ready; after a cut,
    /// it resumed.
    fn attached(&mut self, schedule: &Schedule, tally: &Tally) {
        self.attaches += 1;
        match self.cut_at.take() {
            None => {
                tally.ready.fetch_add(1, Ordering::Relaxed);
            }
            Some(cut_at) => {
                let now = Instant::now();
                if let Some(mut storm) = tally.storm() {
                    let took = now.saturating_duration_since(cut_at).as_micros() as u64;
                    storm.resume_us.saturating_record(took.max(1));
                    *Storm::second(&mut storm.resumes, second_of(schedule, now), || 0) += 1;
                }
            }
        }
    }

    /// Its transport ended before the bench stopped it.
    fn cut_off(&mut self, schedule: &Schedule, tally: &Tally) {
        tally.disconnects.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if self.cut_at.is_none() {
            self.cut_at = Some(now);
            if let Some(mut storm) = tally.storm() {
                *Storm::second(&mut storm.cuts, second_of(schedule, now), || 0) += 1;
            }
        }
        self.cut = true;
    }

    /// Messages the server accepted that this subscriber never got.
    pub fn lost(&self, schedule: &Schedule) -> u64 {
        (0..schedule.total)
            .filter(|&k| schedule.published[k as usize].load(Ordering::Relaxed))
            .filter(|&k| self.seen[(k / 64) as usize] & (1 << (k % 64)) == 0)
            .count() as u64
    }

    fn message(&mut self, k: u64, arrival: Instant, schedule: &Schedule, tally: &Tally) {
        let (word, bit) = ((k / 64) as usize, 1u64 << (k % 64));
        if self.seen[word] & bit != 0 {
            tally.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.seen[word] |= bit;
        tally.delivered.fetch_add(1, Ordering::Relaxed);
        let lane = (k % schedule.lanes as u64) as usize;
        match self.lane_last[lane] {
            Some(last) if last > k => {
                tally.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.lane_last[lane] = Some(k),
        }
        if let Some(&(start, end)) = schedule.window.get() {
            if arrival >= start && arrival < end {
                tally.in_window.fetch_add(1, Ordering::Relaxed);
            }
        }
        if k >= schedule.warmup {
            if let Some(due) = schedule.due(k) {
                let micros = arrival.saturating_duration_since(due).as_micros() as u64;
                let mut histogram = tally.latency.lock().unwrap_or_else(|e| e.into_inner());
                histogram.saturating_record(micros.max(1));
                drop(histogram);
                if let Some(mut storm) = tally.storm() {
                    let list = match self.cut {
                        true => &mut storm.resumed,
                        false => &mut storm.survivors,
                    };
                    let at = second_of(schedule, arrival);
                    Storm::second(list, at, latency_histogram).saturating_record(micros.max(1));
                }
            }
        }
    }

    fn seq(&mut self, seq: u64, tally: &Tally) {
        if let Some(last) = self.last_seq {
            if seq != last + 1 {
                tally.seq_gaps.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last_seq = Some(seq);
    }

    /// Handles one switchyard event; returns false on a `close`.
    fn event(&mut self, event: &WireEvent, arrival: Instant, schedule: &Schedule, tally: &Tally) {
        if let Some(seq) = event.seq {
            self.seq(seq, tally);
        }
        match event.kind.as_ref() {
            "message" => {
                if let Some(k) = event.text.as_deref().and_then(|t| schedule.index_of(t)) {
                    self.message(k, arrival, schedule, tally);
                }
            }
            "error" | "reset" => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// The fields of an event the bench reads; the rest is skipped.
#[derive(Debug, Deserialize)]
struct WireEvent<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct PollReply<'a> {
    #[serde(borrow)]
    events: Vec<WireEvent<'a>>,
    #[serde(default, borrow)]
    closed: Option<Cow<'a, str>>,
}

/// The `send` command carrying message `k`.
pub fn send_command(room: &str, schedule: &Schedule, k: u64) -> String {
    serde_json::json!({
        "type": "send",
        "room": room,
        "text": schedule.text(k),
        "client_id": format!("{}-{k}", schedule.run_id),
    })
    .to_string()
}

/// How one subscriber connects.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Whose subscriber it is.
    pub subject: Subject,
    /// Session id (empty for the baseline).
    pub session: String,
    /// Seq to resume after: the session's last event before the run.
    pub after: u64,
    /// The room, for WebSocket publishing.
    pub room: String,
    /// Short-poll interval.
    pub short_poll: Duration,
}

/// Everything a subscriber task shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Connections to the target.
    pub connector: Arc<Connector>,
    /// The run's schedule.
    pub schedule: Arc<Schedule>,
    /// The subject's tally.
    pub tally: Arc<Tally>,
    /// Limits how many clients connect at once.
    pub gate: Arc<Semaphore>,
}

/// Runs one subscriber until the schedule's stop; `lane` is set when this subscriber's
/// WebSocket also publishes. With `--resume`, a transport that ends is attached again, on the
/// next node, from the last seq received, after the client library's backoff
/// ([`reconnect_delay`]).
pub async fn subscribe(
    mut sub: Subscription,
    shared: Shared,
    mut lane: Option<mpsc::Receiver<u64>>,
) -> Receipts {
    let (schedule, tally) = (&shared.schedule, &shared.tally);
    let mut receipts = Receipts::new(schedule);
    let mut attempt = 0;
    loop {
        let attaches = receipts.attaches;
        let result = match sub.subject {
            Subject::Transport(TransportKind::WebSocket) | Subject::Baseline => {
                websocket(&sub, &shared, lane.take(), &mut receipts).await
            }
            Subject::Transport(TransportKind::Sse) => sse(&sub, &shared, &mut receipts).await,
            Subject::Transport(kind) => poll(&sub, &shared, kind, &mut receipts).await,
        };
        let Err(e) = result else {
            return receipts;
        };
        if schedule.stop.is_cancelled() {
            return receipts;
        }
        receipts.cut_off(schedule, tally);
        tracing::warn!(subject = sub.subject.name(), error = %e, "subscriber cut off");
        if tally.storm.is_none() {
            return receipts;
        }
        attempt = if receipts.attaches > attaches {
            0
        } else {
            attempt + 1
        };
        sub.after = receipts.last_seq.unwrap_or(sub.after);
        tokio::select! {
            _ = schedule.stop.cancelled() => return receipts,
            _ = tokio::time::sleep(reconnect_delay(attempt)) => {}
        }
    }
}

/// Keeps a publisher session attached (a session without a transport ends after its TTL) with
/// a WebSocket whose events are read and dropped, attached again from its last seq, on the
/// next node, whenever it ends, until the run stops.
pub async fn hold(
    connector: Arc<Connector>,
    wire: Arc<WireCounters>,
    schedule: Arc<Schedule>,
    session: String,
) {
    let mut after = 0;
    let mut attempt = 0;
    loop {
        let path = format!("/v1/sessions/{session}/ws?after={after}");
        if let Ok((socket, _connection)) = connector.websocket(&path, &wire).await {
            attempt = 0;
            let (_sink, mut stream) = socket.split();
            loop {
                let frame = tokio::select! {
                    _ = schedule.stop.cancelled() => return,
                    frame = stream.next() => frame,
                };
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(WireEvent { seq: Some(seq), .. }) =
                            serde_json::from_str(text.as_str())
                        {
                            after = seq;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
        tokio::select! {
            _ = schedule.stop.cancelled() => return,
            _ = tokio::time::sleep(reconnect_delay(attempt)) => {}
        }
        attempt += 1;
    }
}

/// Whether a `/commands` reply says its one command was taken (a `200` lists each command's
/// result: a refused one carries its error there).
fn command_ok(reply: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Reply {
        results: Vec<Result1>,
    }
    #[derive(Deserialize)]
    struct Result1 {
        ok: bool,
    }
    serde_json::from_slice::<Reply>(reply).is_ok_and(|r| r.results.iter().all(|c| c.ok))
}

/// The client library's reconnect delay (demo/switchyard.js): 250 ms doubling per failed
/// attempt up to 10 s, [`jitter`]ed, so the clients of a dead node do not all come back at
/// once.
pub fn reconnect_delay(attempt: u32) -> Duration {
    jitter((250u64 << attempt.min(6)).min(10_000))
}

/// The client library's `jitter`: `ms` taken at 50-100 % at random.
fn jitter(ms: u64) -> Duration {
    Duration::from_millis((ms as f64 * (0.5 + rand::random::<f64>() * 0.5)) as u64)
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn websocket(
    sub: &Subscription,
    shared: &Shared,
    mut lane: Option<mpsc::Receiver<u64>>,
    receipts: &mut Receipts,
) -> Result<(), Failure> {
    let (schedule, tally) = (&shared.schedule, &shared.tally);
    let path = match sub.subject {
        Subject::Baseline => "/".to_owned(),
        _ => format!("/v1/sessions/{}/ws?after={}", sub.session, sub.after),
    };
    let permit = shared.gate.acquire().await?;
    // Over HTTP/2 the socket is a stream of `_connection`, which must live as long.
    let (socket, _connection) = shared.connector.websocket(&path, &tally.wire).await?;
    drop(permit);
    receipts.attached(schedule, tally);
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            biased;
            _ = schedule.stop.cancelled() => return Ok(()),
            Some(k) = async { lane.as_mut()?.recv().await } => {
                let frame = match sub.subject {
                    Subject::Baseline => schedule.text(k),
                    _ => send_command(&sub.room, schedule, k),
                };
                match sink.send(Message::text(frame)).await {
                    Ok(()) => schedule.published[k as usize].store(true, Ordering::Relaxed),
                    Err(e) => schedule.publish_failed(format!("websocket send: {e}")),
                }
            }
            incoming = stream.next() => {
                let arrival = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => match sub.subject {
                        Subject::Baseline => {
                            if let Some(k) = schedule.index_of(text.as_str()) {
                                receipts.message(k, arrival, schedule, tally);
                            }
                        }
                        _ => {
                            let event: WireEvent = serde_json::from_str(text.as_str())?;
                            receipts.event(&event, arrival, schedule, tally);
                        }
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return Err(format!("closed by the server: {frame:?}").into())
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("connection closed".into()),
                }
            }
        }
    }
}

async fn sse(sub: &Subscription, shared: &Shared, receipts: &mut Receipts) -> Result<(), Failure> {
    let (schedule, tally) = (&shared.schedule, &shared.tally);
    let permit = shared.gate.acquire().await?;
    let mut http = shared.connector.http(&tally.wire).await?;
    let path = format!("/v1/sessions/{}/sse?after={}", sub.session, sub.after);
    let response = http.send(Method::GET, &path, "").await?;
    drop(permit);
    if !response.status().is_success() {
        return Err(format!("SSE answered {}", response.status()).into());
    }
    receipts.attached(schedule, tally);
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let frame = tokio::select! {
            biased;
            _ = schedule.stop.cancelled() => return Ok(()),
            frame = body.frame() => frame,
        };
        let arrival = Instant::now();
        let Some(frame) = frame else {
            return Err("SSE stream ended".into());
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        take_sse_data(&mut pending, |closing, data| -> Result<(), Failure> {
            if closing {
                return Err(format!("SSE closed: {}", String::from_utf8_lossy(data)).into());
            }
            let event: WireEvent = serde_json::from_slice(data)?;
            receipts.event(&event, arrival, schedule, tally);
            Ok(())
        })?;
    }
}

/// Takes the complete blocks out of an SSE stream's `pending` bytes and hands each `data:`
/// line to `on`, with whether its block is the `close` event; stops at the first `Err`.
pub fn take_sse_data<E>(
    pending: &mut Vec<u8>,
    mut on: impl FnMut(bool, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut start = 0;
    let mut result = Ok(());
    'blocks: while let Some(end) = find(&pending[start..], b"\n\n") {
        let block = &pending[start..start + end];
        start += end + 2;
        let mut closing = false;
        for line in block.split(|&b| b == b'\n') {
            if line == b"event: close" {
                closing = true;
            } else if let Some(data) = line.strip_prefix(b"data: ") {
                result = on(closing, data);
                if result.is_err() {
                    break 'blocks;
                }
            }
        }
    }
    pending.drain(..start);
    result
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn poll(
    sub: &Subscription,
    shared: &Shared,
    kind: TransportKind,
    receipts: &mut Receipts,
) -> Result<(), Failure> {
    let (schedule, tally) = (&shared.schedule, &shared.tally);
    let permit = shared.gate.acquire().await?;
    let mut http = shared.connector.http(&tally.wire).await?;
    drop(permit);
    let wait = match kind {
        TransportKind::ShortPolling => 0,
        _ => 25_000,
    };
    let mut cursor = sub.after;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + sub.short_poll.mul_f64(rand::random::<f64>()),
        sub.short_poll.max(Duration::from_millis(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    // A long poll may wait for events until the run starts: it counts as attached at once.
    // A resume counts once a poll is answered.
    if kind == TransportKind::LongPolling && receipts.cut_at.is_none() {
        receipts.attached(schedule, tally);
    }
    loop {
        if kind == TransportKind::ShortPolling && !first {
            tokio::select! {
                biased;
                _ = schedule.stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
        }
        let path = format!(
            "/v1/sessions/{}/poll?after={cursor}&wait={wait}",
            sub.session
        );
        let reply = tokio::select! {
            biased;
            _ = schedule.stop.cancelled() => return Ok(()),
            reply = http.call(Method::GET, &path, "") => reply?,
        };
        let arrival = Instant::now();
        let (status, body) = reply;
        if status == hyper::StatusCode::CONFLICT {
            // poll_in_progress: an earlier poll of the session is still held (on a node that
            // died, until its lease lapses); the client library asks again after 150-300 ms.
            tally.errors.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                biased;
                _ = schedule.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(jitter(300)) => continue,
            }
        }
        if !status.is_success() {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            return Err(
                format!("poll answered {status}: {}", String::from_utf8_lossy(&body)).into(),
            );
        }
        if receipts.cut_at.is_some() || (first && kind == TransportKind::ShortPolling) {
            receipts.attached(schedule, tally);
        }
        first = false;
        let reply: PollReply = serde_json::from_slice(&body)?;
        for event in &reply.events {
            receipts.event(event, arrival, schedule, tally);
            if let Some(seq) = event.seq {
                cursor = cursor.max(seq);
            }
        }
        if let Some(reason) = reply.closed {
            return Err(format!("poll closed: {reason}").into());
        }
    }
}

/// Publishes the messages of one lane with `POST /commands`, in order, one at a time. With
/// `retry` (`--resume`), a send that fails is sent again (the same `client_id`, so the server
/// answers a retry of a send it took with the original) on the next node, after the client
/// library's backoff, until it is taken or the run stops.
pub async fn publish_http(
    connector: Arc<Connector>,
    wire: Arc<WireCounters>,
    schedule: Arc<Schedule>,
    session: String,
    room: String,
    mut lane: mpsc::Receiver<u64>,
    retry: bool,
) {
    let mut http = match connector.http(&wire).await {
        Ok(http) => http,
        Err(e) => {
            schedule.publish_failed(format!("publisher connect: {e}"));
            return;
        }
    };
    let path = format!("/v1/sessions/{session}/commands");
    while let Some(k) = lane.recv().await {
        let body = send_command(&room, &schedule, k);
        let mut attempt = 0;
        loop {
            let failure = match http.call(Method::POST, &path, body.clone()).await {
                Ok((status, reply)) if status.is_success() && command_ok(&reply) => {
                    schedule.published[k as usize].store(true, Ordering::Relaxed);
                    break;
                }
                Ok((status, body)) => format!(
                    "POST /commands answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
                Err(e) => {
                    match connector.http(&wire).await {
                        Ok(fresh) => http = fresh,
                        Err(_) if !retry => return,
                        Err(_) => {}
                    }
                    format!("POST /commands: {e}")
                }
            };
            if !retry {
                schedule.publish_failed(failure);
                break;
            }
            tracing::debug!(%failure, "a publisher sends again");
            tokio::select! {
                _ = schedule.stop.cancelled() => return,
                _ = tokio::time::sleep(reconnect_delay(attempt)) => {}
            }
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(total: u64, lanes: usize) -> Schedule {
        let schedule = Schedule {
            run_id: "r1".into(),
            rate: 100.0,
            total,
            warmup: 2,
            lanes,
            payload_bytes: 20,
            t0: OnceLock::new(),
            window: OnceLock::new(),
            published: (0..total).map(|_| AtomicBool::new(true)).collect(),
            publish_errors: AtomicU64::new(0),
            first_publish_error: Mutex::new(None),
            stop: CancellationToken::new(),
        };
        let t0 = Instant::now();
        let _ = schedule.t0.set(t0);
        let _ = schedule.window.set((t0, t0 + Duration::from_secs(60)));
        schedule
    }

    #[test]
    fn texts_carry_their_index_and_payload_length() {
        let schedule = schedule(10, 1);
        let text = schedule.text(7);
        assert_eq!(text.len(), 20);
        assert_eq!(schedule.index_of(&text), Some(7));
        assert_eq!(schedule.index_of("other:7:xx"), None);
        assert_eq!(
            schedule.index_of(&schedule.text(7).replace(":7:", ":70:")),
            None
        );
    }

    #[test]
    fn receipts_count_duplicates_reordering_within_a_lane_and_loss() {
        let schedule = schedule(8, 2);
        let tally = Tally::new(Subject::Transport(TransportKind::Sse));
        let mut receipts = Receipts::new(&schedule);
        let now = Instant::now();
        // Lanes: 0 carries 0,2,4,6 and 1 carries 1,3,5,7. 3 before 2 is fine (other lanes);
        // 4 then 2 is out of order within lane 0; 5 twice is a duplicate; 6 and 7 never come.
        for k in [0, 1, 3, 4, 2, 5, 5] {
            receipts.message(k, now, &schedule, &tally);
        }
        assert_eq!(tally.delivered.load(Ordering::Relaxed), 6);
        assert_eq!(tally.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(tally.out_of_order.load(Ordering::Relaxed), 1);
        assert_eq!(receipts.lost(&schedule), 2);
        // Messages 0 and 1 are warm-up: not in the latency histogram.
        assert_eq!(tally.latency.lock().unwrap().len(), 4);
    }

    #[test]
    fn seq_gaps_are_counted() {
        let schedule = schedule(4, 1);
        let tally = Tally::new(Subject::Transport(TransportKind::WebSocket));
        let mut receipts = Receipts::new(&schedule);
        for seq in [5, 6, 8] {
            receipts.seq(seq, &tally);
        }
        assert_eq!(tally.seq_gaps.load(Ordering::Relaxed), 1);
    }
}
