//! Fan-out on every core: the threads that push sequenced events into sessions.
//!
//! The hub decides the order of everything under its chat lock, which it holds only to
//! validate a command, update rooms and hand the resulting events to [`Fanout`]: never across
//! the pushes themselves, which for a write-through WebSocket are socket writes. Sessions are
//! split into shards, one per fan-out thread. Each thread has its own bounded queue and
//! receives, in the hub's order, every room broadcast (it pushes to the members of its shard)
//! and the events addressed to single sessions of its shard. So a broadcast to a large room is
//! written by every thread at once, each session still gets its events in the hub's order, and
//! a command in another room waits for the chat lock only as long as it takes to queue the
//! broadcast.
//!
//! A full queue makes the hub wait (it never drops or reorders): a burst larger than the
//! queues slows commands down rather than growing memory. Nothing that runs on a fan-out thread
//! takes the chat lock, and nothing queues while holding a session lock, so the wait always
//! ends.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use crate::protocol::EncodedEvent;

use super::session::Session;

/// Entries each fan-out thread may have waiting.
const QUEUE: usize = 4096;

/// One room's members, split by shard; each shard is shared until the room changes.
pub(crate) type Shards = Arc<[Arc<Vec<Arc<Session>>>]>;

/// What a fan-out thread does.
#[derive(Debug)]
enum Job {
    /// Push an event to the members of this thread's shard.
    Room(Shards, EncodedEvent),
    /// Push events to one session, together: the replay buffer's byte budget keeps all of
    /// them (a `reset` with its histories, a `history` with its `presence`).
    One(Arc<Session>, Vec<EncodedEvent>),
    /// Answer once every earlier job is done.
    Barrier(SyncSender<()>),
}

/// The fan-out threads, one per shard.
#[derive(Debug)]
pub(crate) struct Fanout {
    queues: Vec<SyncSender<Arc<Job>>>,
}

impl Fanout {
    /// Starts `threads` fan-out threads (at least one). They stop when the `Fanout` is
    /// dropped.
    pub fn new(threads: usize) -> Self {
        let queues = (0..threads.max(1))
            .map(|shard| {
                let (queue, jobs) = sync_channel(QUEUE);
                std::thread::Builder::new()
                    .name(format!("switchyard-fanout-{shard}"))
                    .spawn(move || run(shard, jobs))
                    .expect("can start a fan-out thread");
                queue
            })
            .collect();
        Fanout { queues }
    }

    /// Number of shards (and threads).
    pub fn shards(&self) -> usize {
        self.queues.len()
    }

    /// Queues a broadcast to a room's members: to the threads whose shard holds some (waking
    /// a thread costs a context switch, about as much as a few hundred pushes; a room of two
    /// on a 16-core server wakes two threads, not 16).
    pub fn room(&self, members: Shards, event: EncodedEvent) {
        let job = Arc::new(Job::Room(members.clone(), event));
        for (shard, queue) in self.queues.iter().enumerate() {
            if members.get(shard).is_none_or(|shard| shard.is_empty()) {
                continue;
            }
            // A thread ends only when the Fanout is dropped, so the send cannot fail.
            let _ = queue.send(job.clone());
        }
    }

    /// Queues events for one session.
    pub fn one(&self, session: &Arc<Session>, events: Vec<EncodedEvent>) {
        let job = Arc::new(Job::One(session.clone(), events));
        let _ = self.queues[session.shard % self.queues.len()].send(job);
    }

    /// Waits until every job queued before this call is done.
    pub fn settle(&self) {
        let (done, wait) = sync_channel(self.queues.len());
        for queue in &self.queues {
            let _ = queue.send(Arc::new(Job::Barrier(done.clone())));
        }
        for _ in &self.queues {
            let _ = wait.recv();
        }
    }
}

/// A fan-out thread: runs its queue's jobs in order until the hub is gone. A job that
/// panics (a bug) is logged and skipped: the thread, and its shard, live on.
fn run(shard: usize, jobs: Receiver<Arc<Job>>) {
    for job in jobs {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(shard, &job)));
        if done.is_err() {
            tracing::error!(shard, "a fan-out job panicked; its events may be missing");
        }
    }
}

fn run_one(shard: usize, job: &Job) {
    {
        match job {
            Job::Room(members, event) => {
                if let Some(members) = members.get(shard) {
                    for member in members.iter() {
                        member.push(event.clone());
                    }
                }
            }
            Job::One(session, events) => {
                session.push_together(events);
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}
