//! The writer thread the persistent stores share. The hub queues appends, id reservations and
//! reads on a bounded queue and never waits on it: a full queue is [`StoreError::Busy`]. The
//! thread takes whatever is queued (up to [`MAX_BATCH`]), hands every append and reservation
//! of it to its [`Backend`] as one write, and only then runs the appends' callbacks and
//! answers the reservations and reads, in queue order: a read sees every write queued before
//! it, and a reserved id is stored before the hub hands it out.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::hub::history::{ready, HistoryStore, Page, Reply, StoreError, Then};
use crate::metrics::HistoryMetrics;
use crate::protocol::Message;

/// Operations the queue holds: enough for a long burst while a write waits for the disk or
/// the network.
const QUEUE: usize = 65_536;
/// Operations taken into one write at most.
const MAX_BATCH: usize = 4096;

/// Where a queued store keeps its messages. Called only from the store's writer thread.
pub(crate) trait Backend: Send + 'static {
    /// Stores `appends` (in id order per room, each room trimmed to its bounds) and raises
    /// the id reservation to `reserve`, all or nothing.
    fn write(&mut self, appends: &[&Arc<Message>], reserve: Option<u64>) -> Result<(), StoreError>;

    /// Up to `limit` of a room's messages older than `before`, none past the age bound.
    fn page(&mut self, room: &str, before: Option<u64>, limit: usize) -> Result<Page, StoreError>;

    /// Records that no id above `last_used` was handed out, and lets go of the backend.
    fn close(&mut self, last_used: u64);

    /// Housekeeping (sweeping old messages, keeping a lease), run every
    /// [`Backend::tick_every`] whether or not there is work. `Err` if the backend failed.
    fn tick(&mut self) -> Result<(), StoreError>;

    /// How often [`Backend::tick`] runs.
    fn tick_every(&self) -> Duration;
}

/// A store served by a writer thread over a [`Backend`]. Dropping it stops the writer once
/// the queue is written.
#[derive(Debug)]
pub struct QueuedStore {
    queue: SyncSender<Op>,
    last_id: u64,
    reserved: Arc<AtomicU64>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Why the writer's last operation failed; `None` once one succeeds.
    failing: Arc<Mutex<Option<String>>>,
    /// Held (flock) for the store's life, by a store in a directory.
    _lock: Option<File>,
}

enum Op {
    Append(Arc<Message>, Option<Then>),
    Reserve(u64, oneshot::Sender<Result<u64, StoreError>>),
    Recent(
        String,
        usize,
        oneshot::Sender<Result<Vec<Arc<Message>>, StoreError>>,
    ),
    Page(
        String,
        Option<u64>,
        usize,
        oneshot::Sender<Result<Page, StoreError>>,
    ),
    Close(u64, mpsc::Sender<()>),
}

impl QueuedStore {
    /// Starts the writer thread `name` over `backend`, whose stored ids go up to `last_id`.
    /// `lock` is held until the store is dropped.
    pub(crate) fn start<B: Backend>(
        backend: B,
        last_id: u64,
        metrics: HistoryMetrics,
        name: &str,
        lock: Option<File>,
    ) -> Result<Self, String> {
        let reserved = Arc::new(AtomicU64::new(last_id));
        let failing = Arc::new(Mutex::new(None));
        let (queue, ops) = mpsc::sync_channel(QUEUE);
        let writer = Writer {
            backend,
            reserved: reserved.clone(),
            metrics,
            failing: failing.clone(),
        };
        let writer = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer.run(ops))
            .map_err(|e| format!("cannot start the history writer: {e}"))?;
        Ok(QueuedStore {
            queue,
            last_id,
            reserved,
            writer: Mutex::new(Some(writer)),
            failing,
            _lock: lock,
        })
    }

    /// Queues an operation without waiting.
    fn queue(&self, op: Op) -> Result<(), StoreError> {
        self.queue.try_send(op).map_err(|e| match e {
            TrySendError::Full(_) => StoreError::Busy,
            TrySendError::Disconnected(_) => closed(),
        })
    }

    /// Queues a read; its answer comes on the returned channel.
    fn read<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        match self.queue(op(tx)) {
            Ok(()) => rx,
            Err(error) => ready(Err(error)),
        }
    }
}

fn closed() -> StoreError {
    StoreError::Failed("the history store is closed".into())
}

/// The writer thread's state.
struct Writer<B> {
    backend: B,
    reserved: Arc<AtomicU64>,
    metrics: HistoryMetrics,
    failing: Arc<Mutex<Option<String>>>,
}

impl<B: Backend> Writer<B> {
    /// Records how the backend's last operation went, for [`HistoryStore::ready`].
    fn note<T>(&self, result: &Result<T, StoreError>) {
        let now = result.as_ref().err().map(ToString::to_string);
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    fn run(mut self, ops: Receiver<Op>) {
        let every = self.backend.tick_every();
        let mut last_tick = Instant::now();
        loop {
            let wait = every.saturating_sub(last_tick.elapsed());
            let first = match ops.recv_timeout(wait) {
                Ok(op) => Some(op),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if let Some(first) = first {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match ops.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                if !self.apply(batch) {
                    return;
                }
            }
            if last_tick.elapsed() >= every {
                let ticked = self.backend.tick();
                self.note(&ticked);
                last_tick = Instant::now();
            }
        }
    }

    /// Writes a batch at once, then answers it in order. `false` once closed.
    fn apply(&mut self, batch: Vec<Op>) -> bool {
        let appends: Vec<&Arc<Message>> = batch
            .iter()
            .filter_map(|op| match op {
                Op::Append(message, _) => Some(message),
                _ => None,
            })
            .collect();
        let reserve = batch
            .iter()
            .filter_map(|op| match op {
                Op::Reserve(up_to, _) => Some(*up_to),
                _ => None,
            })
            .max()
            .filter(|up_to| *up_to > self.reserved.load(Ordering::Acquire));
        let written = appends.len() as u64;
        let newest = appends.iter().map(|m| m.id).max();
        let result = if written > 0 || reserve.is_some() {
            let result = self.backend.write(&appends, reserve);
            self.note(&result);
            result
        } else {
            Ok(())
        };
        drop(appends);
        match &result {
            Ok(()) => {
                if written > 0 {
                    self.metrics.written.inc_by(written);
                    if let Some(id) = newest {
                        self.metrics.written_id.set(id as i64);
                    }
                }
                if written > 0 || reserve.is_some() {
                    self.metrics.batches.inc();
                }
                if let Some(up_to) = reserve {
                    self.reserved.fetch_max(up_to, Ordering::AcqRel);
                }
            }
            Err(error) => {
                tracing::error!(%error, messages = written, "history write failed");
                self.metrics.write_failures.inc_by(written);
            }
        }
        let mut open = true;
        for op in batch {
            if !open {
                answer_closed(op);
                continue;
            }
            match op {
                Op::Append(_, Some(then)) => then(result.clone()),
                Op::Append(_, None) => {}
                Op::Reserve(_, reply) => {
                    let _ = reply.send(match &result {
                        Ok(()) => Ok(self.reserved.load(Ordering::Acquire)),
                        Err(error) => Err(error.clone()),
                    });
                }
                Op::Recent(room, limit, reply) => {
                    let page = self.backend.page(&room, None, limit);
                    self.note(&page);
                    let _ = reply.send(page.map(|page| page.messages));
                }
                Op::Page(room, before, limit, reply) => {
                    let page = self.backend.page(&room, before, limit);
                    self.note(&page);
                    let _ = reply.send(page);
                }
                Op::Close(last_used, done) => {
                    self.backend.close(last_used);
                    let _ = done.send(());
                    open = false;
                }
            }
        }
        open
    }
}

/// Answers an operation that came after `Close`.
fn answer_closed(op: Op) {
    match op {
        Op::Append(_, Some(then)) => then(Err(closed())),
        Op::Append(_, None) => {}
        Op::Reserve(_, reply) => drop(reply.send(Err(closed()))),
        Op::Recent(_, _, reply) => drop(reply.send(Err(closed()))),
        Op::Page(_, _, _, reply) => drop(reply.send(Err(closed()))),
        Op::Close(_, done) => drop(done.send(())),
    }
}

impl HistoryStore for QueuedStore {
    fn last_id(&self) -> u64 {
        self.last_id
    }

    fn reserved_ids(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    fn reserve_ids(&self, up_to: u64) -> Reply<u64> {
        if up_to <= self.reserved_ids() {
            return ready(Ok(self.reserved_ids()));
        }
        self.read(|reply| Op::Reserve(up_to, reply))
    }

    fn append(&self, message: Arc<Message>, then: Option<Then>) -> Result<(), StoreError> {
        self.queue(Op::Append(message, then))
    }

    fn recent(&self, room: &str, limit: usize) -> Reply<Vec<Arc<Message>>> {
        self.read(|reply| Op::Recent(room.to_owned(), limit, reply))
    }

    fn page(&self, room: &str, before: Option<u64>, limit: usize) -> Reply<Page> {
        self.read(|reply| Op::Page(room.to_owned(), before, limit, reply))
    }

    fn forget(&self, _room: &str) {}

    fn ready(&self) -> Result<(), String> {
        match &*self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(cause) => Err(cause.clone()),
        }
    }

    fn close(&self, last_used: u64) {
        let (done, wait) = mpsc::channel();
        // Waits for room in the queue: everything before it is written first.
        if self.queue.send(Op::Close(last_used, done)).is_ok() {
            let _ = wait.recv();
        }
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}
