//! The WebSocket's write side: write-through fan-out.
//!
//! [`SocketWriter`] owns the socket's write half and is the session's [`DirectSink`]: the
//! hub hands it each event as it pushes it, and the frame (the per-session header with
//! `{"seq":N,` and the shared event body, in one vectored write) goes straight to the socket
//! from the pushing thread. No task is woken per delivery. Only when the socket is full is
//! the rest queued; the connection's task then writes the queue when the socket turns
//! writable, coalescing the frames that queued up into vectored writes. Control frames (pings,
//! pongs, close) take the same path, so frames never interleave.
//!
//! More frames queued than the outbox budget (live events and control frames; the backlog owed
//! at attach time does not count) makes `deliver` fail, and the hub closes the transport with
//! `slow_consumer`: the queue, like every per-session queue, is bounded. A pong not yet begun
//! is replaced by the next, so a client that floods pings without reading queues one pong, not
//! thousands. A
//! queue that makes no progress (no byte written) for two heartbeats is judged slow too, by
//! the connection's task; a queue that shrinks steadily is not, however long it stays
//! non-empty. An event counts as delivered in the metrics when its last byte is written.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::connection::{send_progress, SendProgress};
use crate::hub::{Budget, DirectSink, OutboxFull};
use crate::metrics::{Http, Metrics};
use crate::protocol::{EncodedEvent, TransportKind};

/// Frames gathered into one vectored write when the queue is flushed.
const MAX_SLICES: usize = 64;

/// A frame, or what is left of it, waiting for the socket.
#[derive(Debug)]
struct Queued {
    /// Frame header (plus, for events, the per-session `{"seq":N,`).
    head: Bytes,
    /// The shared event body, or empty.
    body: Bytes,
    /// Bytes of `head` then `body` already written.
    written: usize,
    /// Counts against the outbox (a live event, not backlog or control).
    live: bool,
    /// For an event: when it was created, to count its delivery once written.
    created: Option<std::time::Instant>,
}

impl Queued {
    /// The unwritten parts, as slices for a vectored write.
    fn remaining(&self) -> [&[u8]; 2] {
        if self.written < self.head.len() {
            [&self.head[self.written..], &self.body]
        } else {
            [&self.body[self.written - self.head.len()..], &[]]
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether it counts against the outbox: a live event or a control frame.
    fn counts(&self) -> bool {
        self.live || self.created.is_none()
    }
}

#[derive(Debug, Default)]
struct WriterState {
    queue: VecDeque<Queued>,
    /// Frames queued that count against the outbox (live events and control frames, not the
    /// backlog owed at attach time), and their bytes.
    counted: u64,
    counted_bytes: u64,
    /// Control frames took the queue over the budget: the connection's task closes the socket.
    overflowed: bool,
    /// While something is queued: when the socket last took a byte (or the queue formed). A
    /// queue that waits two heartbeats means the client stopped reading.
    waiting_since: Option<Instant>,
    /// When the socket last took bytes of a queue that had formed: the kernel's buffer was
    /// full, so the client is reading. Its pongs may be stuck behind that backlog, so this
    /// counts as hearing from it.
    progressed: Option<Instant>,
    /// The socket failed; nothing more is written.
    failed: bool,
    /// What the kernel said at the last [`SocketWriter::check_progress`].
    last_probe: Option<SendProgress>,
}

/// The write half of one WebSocket, shared by the hub (events) and the connection's task.
#[derive(Debug)]
pub struct SocketWriter {
    socket: OwnedWriteHalf,
    state: Mutex<WriterState>,
    /// Wakes the connection's task when something was queued or the socket failed.
    queued: Notify,
    outbox: Budget,
    metrics: Metrics,
}

/// Why [`SocketWriter::flush_queued`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The socket failed.
    Failed,
    /// Control frames queued past the budget: the client sends and does not read.
    Overflowed,
}

/// Whether a whole frame in `bytes` is a pong.
fn is_pong(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x0f == 0x0a)
}

impl SocketWriter {
    /// A writer for a socket's write half.
    pub fn new(socket: OwnedWriteHalf, outbox: Budget, metrics: Metrics) -> Self {
        SocketWriter {
            socket,
            state: Mutex::new(WriterState::default()),
            queued: Notify::new(),
            outbox,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a frame now if nothing is queued and the socket takes it; queues the rest.
    /// Returns whether the live frames queued are over the outbox budget.
    fn write_frame(
        &self,
        head: &[u8],
        body: &Bytes,
        live: bool,
        created: Option<std::time::Instant>,
    ) -> bool {
        let mut state = self.lock();
        if state.failed {
            return false;
        }
        let mut written = 0;
        if state.queue.is_empty() {
            let total = head.len() + body.len();
            match self
                .socket
                .try_write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            {
                Ok(n) if n == total => {
                    if let Some(created) = created {
                        self.count_delivered(created, total);
                    }
                    return false;
                }
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    state.failed = true;
                    self.queued.notify_one();
                    return false;
                }
            }
            state.waiting_since = Some(Instant::now());
            self.queued.notify_one();
        }
        let frame = Queued {
            head: Bytes::copy_from_slice(head),
            body: body.clone(),
            written,
            live,
            created,
        };
        if frame.counts() {
            state.counted += 1;
            state.counted_bytes += frame.len() as u64;
        }
        state.queue.push_back(frame);
        self.outbox.exceeded_by(state.counted, state.counted_bytes)
    }

    /// Counts one event whose frame of `bytes` bytes was just written (always over HTTP/1.1:
    /// a written-through socket has its own TCP connection).
    fn count_delivered(&self, created: std::time::Instant, bytes: usize) {
        let metrics = &self.metrics;
        metrics.delivered_one(TransportKind::WebSocket, created, bytes);
        metrics.delivered_over(TransportKind::WebSocket, Http::H1, 1);
    }

    /// Writes raw bytes holding whole frames (tungstenite's pongs and close replies, our
    /// pings and close frame).
    pub fn write_control(&self, frame: &[u8]) {
        {
            let mut state = self.lock();
            if is_pong(frame) {
                // A pong answers the latest ping: replace one that has not begun.
                if let Some(waiting) = state
                    .queue
                    .iter_mut()
                    .skip(1)
                    .find(|f| f.created.is_none() && !f.live && is_pong(&f.head))
                {
                    let before = waiting.len() as u64;
                    waiting.head = Bytes::copy_from_slice(frame);
                    let after = waiting.len() as u64;
                    state.counted_bytes = state.counted_bytes - before + after;
                    return;
                }
            }
        }
        if self.write_frame(frame, &Bytes::new(), false, None) {
            self.lock().overflowed = true;
            self.queued.notify_one();
        }
    }

    /// Sends a whole message in one frame: `text` or binary, any length. Like a control
    /// frame it counts against the outbox (the echo example's replies).
    pub fn write_message(&self, text: bool, payload: &Bytes) {
        let mut head = Head::new();
        frame_header(if text { 0x81 } else { 0x82 }, payload.len(), &mut head);
        if self.write_frame(head.as_slice(), payload, false, None) {
            self.lock().overflowed = true;
            self.queued.notify_one();
        }
    }

    /// Sends a ping with an empty payload.
    pub fn ping(&self) {
        self.write_control(&[0x89, 0x00]);
    }

    /// Sends the `heartbeat` text frame (no seq), which a page can see where it cannot see
    /// pings.
    pub fn heartbeat(&self) {
        const FRAME: &[u8] = b"\x81\x14{\"type\":\"heartbeat\"}";
        self.write_control(FRAME);
    }

    /// Sends a close frame with a code and reason.
    pub fn close(&self, code: u16, reason: &str) {
        let reason = &reason.as_bytes()[..reason.len().min(123)];
        let mut frame = vec![0x88, (reason.len() + 2) as u8];
        frame.extend_from_slice(&code.to_be_bytes());
        frame.extend_from_slice(reason);
        self.write_control(&frame);
    }

    /// How long the queue has waited for the socket to take a byte, if anything is queued.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.lock().waiting_since.map(|since| since.elapsed())
    }

    /// Asks the kernel how far the client got; the connection's task calls it once per
    /// heartbeat. Bytes acknowledged while a backlog waited (in the kernel or in our queue)
    /// mean the client is reading: that counts as hearing from it, and restarts the stall clock
    /// of our queue. (The kernel lets a writer add bytes only once much of its buffer is free,
    /// so a slow reader can leave the queue untouched for a long time while it reads.)
    pub fn check_progress(&self) {
        let Some(now) = send_progress(self.socket.as_ref()) else {
            return;
        };
        let mut state = self.lock();
        let backlog = !state.queue.is_empty();
        if let Some(before) = state.last_probe {
            if now.acked > before.acked && (before.queued > 0 || backlog) {
                let at = Instant::now();
                state.progressed = Some(at);
                if backlog {
                    state.waiting_since = Some(at);
                }
            }
        }
        state.last_probe = Some(now);
    }

    /// Whether the client read part of a backlog within `window` (see `progressed`).
    pub fn progressed_within(&self, window: Duration) -> bool {
        self.lock()
            .progressed
            .is_some_and(|at| at.elapsed() <= window)
    }

    /// Drops the queued frames not yet begun, keeping a frame partly written (the stream must
    /// stay well-formed): the server is closing, and the close frame goes next. What is
    /// dropped was never delivered; the client resumes from the last seq it read.
    pub fn discard_unsent(&self) {
        let mut state = self.lock();
        let keep = usize::from(state.queue.front().is_some_and(|f| f.written > 0));
        state.queue.truncate(keep);
        let counted: Vec<u64> = state
            .queue
            .iter()
            .filter(|f| f.counts())
            .map(|f| f.len() as u64)
            .collect();
        state.counted = counted.len() as u64;
        state.counted_bytes = counted.iter().sum();
        // The close frame comes next, and the close handshake waits on the queue again.
        state.overflowed = false;
        if keep == 0 {
            state.waiting_since = None;
        }
    }

    /// Writes the queue as far as the socket takes it now. `Ok(true)` when it is empty.
    fn write_queue(&self) -> io::Result<bool> {
        let mut state = self.lock();
        loop {
            if state.failed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "socket failed"));
            }
            if state.queue.is_empty() {
                state.waiting_since = None;
                return Ok(true);
            }
            let mut slices = Vec::with_capacity(MAX_SLICES);
            for frame in state.queue.iter() {
                if slices.len() + 2 > MAX_SLICES {
                    break;
                }
                for part in frame.remaining() {
                    if !part.is_empty() {
                        slices.push(IoSlice::new(part));
                    }
                }
            }
            let mut written = match self.socket.try_write_vectored(&slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    state.failed = true;
                    return Err(e);
                }
            };
            if written > 0 {
                let now = Instant::now();
                state.waiting_since = Some(now);
                state.progressed = Some(now);
            }
            while written > 0 {
                let front = state
                    .queue
                    .front_mut()
                    .expect("written bytes belong to frames");
                let left = front.len() - front.written;
                if written < left {
                    front.written += written;
                    break;
                }
                written -= left;
                let done = state.queue.pop_front().expect("front exists");
                if done.counts() {
                    state.counted -= 1;
                    state.counted_bytes -= done.len() as u64;
                }
                if let Some(created) = done.created {
                    self.count_delivered(created, done.len());
                }
            }
        }
    }

    /// Waits for something to be queued, then writes the queue until it is empty. Returns
    /// once the socket failed or control frames overflowed. Cancel-safe: the queue keeps its
    /// place.
    pub async fn flush_queued(&self) -> Stop {
        loop {
            if self.lock().overflowed {
                return Stop::Overflowed;
            }
            if self.write_until_empty().await.is_err() {
                return Stop::Failed;
            }
            self.queued.notified().await;
        }
    }

    /// Ends the write side (a FIN after the last frame written): the server closes the TCP
    /// connection first, as RFC 6455 §7.1.1 asks, while the read half stays open to take what
    /// the client was still sending.
    pub fn shutdown(&self) {
        let _ = socket2::SockRef::from(self.socket.as_ref()).shutdown(std::net::Shutdown::Write);
    }

    /// Writes what is queued, waiting for the socket until `deadline` at most.
    pub async fn drain_until(&self, deadline: Instant) {
        let _ = tokio::time::timeout_at(deadline, self.write_until_empty()).await;
    }

    /// Writes the queue, waiting for the socket whenever it is full, until it is empty.
    async fn write_until_empty(&self) -> io::Result<()> {
        while !self.write_queue()? {
            self.socket.writable().await?;
        }
        Ok(())
    }
}

/// A frame's head on the stack: the frame header and `{"seq":N,` (at most 10 + 28 bytes).
/// The frame is this head followed by the event's shared body.
pub struct Head {
    bytes: [u8; 40],
    len: usize,
}

impl Head {
    /// The head of the text frame carrying an event with this seq and body length.
    pub fn for_event(seq: u64, body_len: usize) -> Head {
        let mut digits = itoa::Buffer::new();
        let seq = digits.format(seq).as_bytes();
        let mut head = Head::new();
        frame_header(0x81, seq.len() + 8 + body_len, &mut head);
        head.extend(b"{\"seq\":");
        head.extend(seq);
        head.extend(b",");
        head
    }

    fn new() -> Self {
        Head {
            bytes: [0; 40],
            len: 0,
        }
    }

    fn extend(&mut self, data: &[u8]) {
        self.bytes[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    /// The head's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The server-to-client header of a final frame (`first`: FIN and the opcode) with a payload
/// of `len` bytes (no mask).
fn frame_header(first: u8, len: usize, out: &mut Head) {
    match len {
        0..=125 => out.extend(&[first, len as u8]),
        126..=65535 => {
            out.extend(&[first, 126]);
            out.extend(&(len as u16).to_be_bytes());
        }
        _ => {
            out.extend(&[first, 127]);
            out.extend(&(len as u64).to_be_bytes());
        }
    }
}

impl DirectSink for SocketWriter {
    fn deliver(&self, seq: u64, event: &EncodedEvent, backlog: bool) -> Result<(), OutboxFull> {
        let head = Head::for_event(seq, event.body.len());
        let full = self.write_frame(head.as_slice(), &event.body, !backlog, Some(event.created));
        if full {
            Err(OutboxFull)
        } else {
            Ok(())
        }
    }
}

/// The socket as tungstenite sees it: reads come from the read half (after any bytes hyper
/// read past the handshake); writes (pongs, close replies) go through the [`SocketWriter`].
#[derive(Debug)]
pub struct ReadSide {
    read: OwnedReadHalf,
    /// Bytes hyper had read past the upgrade request.
    leftover: Bytes,
    writer: Arc<SocketWriter>,
}

impl ReadSide {
    /// The read side of an upgraded socket.
    pub fn new(read: OwnedReadHalf, leftover: Bytes, writer: Arc<SocketWriter>) -> Self {
        // An empty view into hyper's read buffer would still keep the whole buffer alive.
        let leftover = if leftover.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&leftover)
        };
        ReadSide {
            read,
            leftover,
            writer,
        }
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.remaining());
            let chunk = self.leftover.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        frame: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite hands over whole frames; queued if the socket is full.
        self.writer.write_control(frame);
        Poll::Ready(Ok(frame.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes whatever had to be queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task sends the close frame and drops the write half.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_frame_is_its_head_then_the_shared_body() {
        let event = crate::protocol::Event::Typing {
            room: "lobby",
            users: vec!["ann"],
        }
        .encode();
        let head = Head::for_event(42, event.body.len());
        let mut frame = head.as_slice().to_vec();
        frame.extend_from_slice(&event.body);
        let json = event.to_json(42);
        assert_eq!(frame[..2], [0x81, json.len() as u8]);
        assert_eq!(&frame[2..], json.as_bytes());
    }

    #[test]
    fn frame_headers_use_the_shortest_length_form() {
        let header = |len| {
            let mut head = Head::new();
            frame_header(0x81, len, &mut head);
            head.as_slice().to_vec()
        };
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0, 126]);
        let mut binary = Head::new();
        frame_header(0x82, 3, &mut binary);
        assert_eq!(binary.as_slice(), [0x82, 3]);
        let long = header(70_000);
        assert_eq!(long[..2], [0x81, 127]);
        assert_eq!(u64::from_be_bytes(long[2..].try_into().unwrap()), 70_000);
    }
}
