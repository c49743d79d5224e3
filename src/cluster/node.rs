//! A cluster node's copy of the log: a [`Replica`] runs the log [`Reader`] and hands each
//! record, in order, to the hub ([`Hub::replicate`]), and says how far it has applied, so a
//! command's reply can wait until its own entry is applied (a client then reads its writes
//! on the node it asked). A cluster node runs one (`Hub::clustered`).
//!
//! **Redis lost its data** (the next entry starts a new log): the nodes restored it, and the
//! new log starts with their `reseed`, which the hub applies as any record (every session
//! is reset). A new log that starts otherwise was started by a node that started alone: the
//! sessions went with the data, so every session of the node ends (its transport closed
//! `expired`; its client starts a new session, as after a single server's restart). Either
//! way the replica goes on with the new log.
//!
//! **Entries trimmed before the node read them** (it lagged more than the log keeps): it takes
//! a running node's snapshot into the hub it has ([`Hub::rejoin`]; its sessions keep their
//! transports, which get what they lacked) and goes on after the snapshot's entry.
//!
//! **Any other gap stops it.** If no running node sends it a snapshot then, an entry is not a
//! record, or a room's history cannot be read, the replica stops applying and says so
//! ([`Health::Stopped`]): serving on past a gap would give clients a silent one.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::log::{Entry, LogId, Read, Reader};
use super::sequencer::Record;
use crate::hub::Hub;

/// Reports the reader may have queued before the replica takes them.
const QUEUE: usize = 64;

/// How the replica is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Applying the log as it comes.
    Applying,
    /// Redis cannot be reached; the reader keeps trying, and the replica goes on where it
    /// was when it is back.
    Unreachable(String),
    /// It stopped at a gap or at an entry that is not a record: what it holds can no longer
    /// be trusted.
    Stopped(String),
}

/// The log, applied to a hub as it comes. Stops when dropped.
#[derive(Debug)]
pub struct Replica {
    applied: watch::Receiver<LogId>,
    /// The first entry of the log it applies, if it went on with a new one (Redis lost its
    /// data): an entry before it, of the log before, is never applied.
    log_start: watch::Receiver<LogId>,
    health: watch::Receiver<Health>,
    task: tokio::task::JoinHandle<()>,
    _reader: Reader,
}

impl Replica {
    /// Starts applying the log after `after` to `hub`, as node `node`. Call it within a
    /// tokio runtime.
    pub fn start(
        client: redis::Client,
        hub: Hub,
        node: &str,
        after: LogId,
    ) -> std::io::Result<Replica> {
        let (reports, mut incoming) = mpsc::channel(QUEUE);
        let reader = Reader::spawn(client, after, reports)?;
        let (applied_tx, applied) = watch::channel(after);
        let (health_tx, health) = watch::channel(Health::Applying);
        let (log_start_tx, log_start) = watch::channel(LogId::ZERO);
        let node: Arc<str> = Arc::from(node);
        let task = tokio::spawn(async move {
            // After a rejoin: the entries up to here are in the snapshot it took.
            let mut skip_to = LogId::ZERO;
            // Set when Redis came back without the last entries applied here (the last one
            // applied): until the new log that the nodes' restoring starts, nothing is
            // applied (what Redis holds, and anything decided on it, is behind this node).
            let mut went_back: Option<LogId> = None;
            while let Some(read) = incoming.recv().await {
                let outcome = match read {
                    Read::WentBack { after } => {
                        went_back.get_or_insert_with(|| hub.log_went_back(after));
                        Ok(())
                    }
                    // An entry chained to an older copy of the log than this node read (one
                    // decided on what Redis came back with, before the reader noticed).
                    Read::Lost { after, prev, .. }
                        if went_back.is_none() && prev != LogId::ZERO && prev < after =>
                    {
                        went_back = Some(hub.log_went_back(after));
                        Ok(())
                    }
                    Read::Unreachable(cause) => {
                        health_tx.send_replace(Health::Unreachable(cause));
                        Ok(())
                    }
                    // While Redis is behind this node, nothing of its older copy of the log,
                    // nor anything decided on it, is applied: only a new log (the nodes'
                    // `reseed`, or a cluster started anew since) is.
                    Read::Entries(_) if went_back.is_some() => Ok(()),
                    Read::Lost { found, prev, .. }
                        if went_back.is_some_and(|at| {
                            prev != LogId::ZERO || (found.id <= at && !reseeds(&found))
                        }) =>
                    {
                        Ok(())
                    }
                    Read::Entries(mut entries) => {
                        health_tx.send_if_modified(|h| replace(h, Health::Applying));
                        entries.retain(|entry| entry.id > skip_to);
                        apply(&hub, &node, entries, &applied_tx).await
                    }
                    Read::Lost { after, found, prev } if prev == LogId::ZERO => {
                        // Redis lost its data. The nodes restored it, and the new log starts
                        // with their `reseed`, which every session outlives with a `reset`;
                        // or it started without them (a node started alone meanwhile): the
                        // sessions went with the data, and as after a single server's
                        // restart every session ends and its client starts a new one.
                        went_back = None;
                        if !reseeds(&found) {
                            let ended = hub.forget_all();
                            hub.metrics().cluster().sessions_lost.inc_by(ended as u64);
                            tracing::error!(%after, ended, "Redis lost the log: every session ended");
                        }
                        health_tx.send_if_modified(|h| replace(h, Health::Applying));
                        log_start_tx.send_replace(found.id);
                        apply(&hub, &node, vec![found], &applied_tx).await
                    }
                    Read::Lost { after, found, .. } => {
                        // Trimmed before this node read them: it lagged more than the log
                        // keeps. It takes a running node's snapshot instead, and goes on
                        // after it.
                        tracing::error!(%after, found = %found.id, "entries were trimmed from the log before this node read them; rejoining with a snapshot");
                        match hub.rejoin().await {
                            Ok(at) => {
                                skip_to = at;
                                applied_tx.send_replace(at);
                                let entries =
                                    vec![found].into_iter().filter(|e| e.id > at).collect();
                                apply(&hub, &node, entries, &applied_tx).await
                            }
                            Err(cause) => Err(format!(
                                "entries after {after} were trimmed from the log before this \
                                 node read them (the next one found is {}): the node lagged \
                                 more than the log keeps, and could not rejoin: {cause}",
                                found.id
                            )),
                        }
                    }
                };
                if let Err(cause) = outcome {
                    tracing::error!(%cause, "the replica stopped");
                    health_tx.send_replace(Health::Stopped(cause));
                    return;
                }
            }
        });
        Ok(Replica {
            applied,
            log_start,
            health,
            task,
            _reader: reader,
        })
    }

    /// Stops applying the log (the node is stopping).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// The last entry applied.
    pub fn applied(&self) -> LogId {
        *self.applied.borrow()
    }

    /// How the replica is doing.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Waits until entry `id` is applied; `Err` with the cause if the replica stopped first,
    /// or went on with a new log that starts after `id` (Redis lost its data, and the entry
    /// with it: the new log's ids pass it, but it will never be applied). The caller bounds
    /// the wait.
    pub async fn caught_up(&self, id: LogId) -> Result<(), String> {
        let mut applied = self.applied.clone();
        let mut health = self.health.clone();
        let mut log_start = self.log_start.clone();
        loop {
            if id < *log_start.borrow_and_update() {
                return Err(format!("Redis lost entry {id} with its data"));
            }
            if *applied.borrow_and_update() >= id {
                return Ok(());
            }
            if let Health::Stopped(cause) = &*health.borrow_and_update() {
                return Err(cause.clone());
            }
            tokio::select! {
                changed = applied.changed() => changed.map_err(|_| "the replica ended".to_owned())?,
                changed = health.changed() => changed.map_err(|_| "the replica ended".to_owned())?,
                changed = log_start.changed() => changed.map_err(|_| "the replica ended".to_owned())?,
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Applies entries in order, moving `applied` past each.
async fn apply(
    hub: &Hub,
    node: &str,
    entries: Vec<Entry>,
    applied: &watch::Sender<LogId>,
) -> Result<(), String> {
    for entry in entries {
        let body = std::str::from_utf8(&entry.body)
            .map_err(|_| format!("log entry {} is not UTF-8", entry.id))?;
        let record = Record::parse(body)?;
        hub.replicate(record, node).await?;
        applied.send_replace(entry.id);
        let metrics = hub.metrics().cluster();
        metrics.entries_applied.inc();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let lag = now_ms.saturating_sub(entry.id.ms);
        metrics.replica_lag_ms.set(lag.min(i64::MAX as u64) as i64);
    }
    Ok(())
}

/// Whether `entry` is a `reseed`: the first entry of a log the nodes restored.
fn reseeds(entry: &Entry) -> bool {
    let record = std::str::from_utf8(&entry.body).map(Record::parse);
    matches!(record, Ok(Ok(Record::Reseed { .. })))
}

/// Sets `health` to `new`; whether it changed.
fn replace(health: &mut Health, new: Health) -> bool {
    let changed = *health != new;
    *health = new;
    changed
}
