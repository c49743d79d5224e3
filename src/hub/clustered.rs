//! The hub of a cluster node (`--redis`): the same sessions, rooms and events as on one node,
//! with every decision taken by the sequencer in Redis and applied by the node's replica of
//! the log (docs/cluster.md). The server calls the methods here; on a single node (no
//! [`Link`]) each is the hub's own method.
//!
//! - **Commands** go to the sequencer; a command's reply waits until this node has applied
//!   the entry it appended, so a client reads its writes on the node it asked.
//! - **Attaches** take the session's attach lease (one transport at a time across nodes; a
//!   second poll gets `poll_in_progress` wherever the first is held), then apply the log up to
//!   the newest entry, so a client that moves from another node finds its seqs here. A task
//!   renews this node's leases; a detach gives one up.
//! - **Timers**: the sequencer's expiry sweep and the ticker's `flush` entries replace the
//!   hub's own, so every node ends the same sessions and flushes the same rooms at the same
//!   point of the log.
//! - **Redis unreachable**: what needs it answers `backend_unavailable`; attached transports
//!   stay open and catch up when the replica does.
//! - **Redis lost the cluster's state**: the nodes elect the one that applied the most,
//!   which writes the state back and starts a new log with a `reseed` entry; every node then
//!   takes its snapshot and resets every session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::{lock, refusal, Attachment, CommandResult, Hub, Identity, Session};
use crate::cluster::log::LogId;
use crate::cluster::node::{Health, Replica};
use crate::cluster::sequencer::{
    Attach, Decision, Offer, Renewal, Sequencer, Start, Unavailable, ATTACH_LEASE,
};
use crate::protocol::{validate_name, CloseReason, Command, ErrorBody, ErrorCode, TransportKind};

/// How long a reply waits for this node's replica to apply the entry it depends on.
pub const CATCH_UP: Duration = Duration::from_secs(5);
/// How far behind the log's newest entry a node's replica may be and the node still be
/// ready (`GET /readyz`).
pub const READY_LAG: Duration = Duration::from_secs(1);
/// How long a starting node waits for the snapshot it asked a running node for.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(10);
/// How long a starting node waits for the running nodes to restore a state Redis lost.
pub const RESTORE_WAIT: Duration = Duration::from_secs(60);

/// What ties a hub to its cluster.
#[derive(Debug)]
pub(crate) struct Link {
    sequencer: Sequencer,
    /// This node's id (`--node-id`): it names the node's attachments, `NODE:ID`.
    node: Arc<str>,
    replica: OnceLock<Replica>,
    /// This node's attachments that hold their session's lease: attachment id to session and
    /// kind.
    leases: Mutex<HashMap<u64, (String, TransportKind)>>,
    /// Set while Redis has lost the cluster's state and this node takes part in restoring
    /// it ([`Hub::restore_state`]).
    restoring: AtomicBool,
}

/// Gives up an attachment's lease when it ends (held by the [`Attachment`]).
#[derive(Debug)]
pub(crate) struct Detach {
    link: Arc<Link>,
    session: String,
    id: u64,
}

impl Detach {
    /// Gives the lease up in a task of its own (the attachment was dropped).
    pub(crate) fn spawn(self) {
        lock(&self.link.leases).remove(&self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.run());
        }
    }

    /// Stops renewing the lease and leaves it to the session's next poll (or to lapse).
    fn forget(self) {
        lock(&self.link.leases).remove(&self.id);
    }

    async fn run(self) {
        lock(&self.link.leases).remove(&self.id);
        let name = super::attachment_name(&self.link.node, self.id);
        if let Err(error) = self.link.sequencer.detach(&self.session, &name).await {
            // The lease lapses by itself within ATTACH_LEASE.
            tracing::warn!(session = %self.session, %error, "giving up an attach lease failed");
        }
    }
}

/// A one-line message for a Redis that cannot be reached (or lost the cluster's state).
fn unreachable(error: Unavailable) -> String {
    match error.lost_state() {
        true => error.0,
        false => format!("Redis cannot be reached: {}", error.0),
    }
}

fn no_snapshot(silent: &[String]) -> String {
    format!(
        "no running node sent this node a snapshot within {} s (asked: {})",
        SNAPSHOT_WAIT.as_secs(),
        silent.join(", ")
    )
}

fn unavailable(error: Unavailable) -> ErrorBody {
    ErrorBody::new(ErrorCode::BackendUnavailable, unreachable(error))
}

impl Link {
    fn replica(&self) -> &Replica {
        self.replica
            .get()
            .expect("a linked hub's replica starts with it")
    }

    /// Waits (at most [`CATCH_UP`]) until this node has applied entry `id`.
    async fn caught_up(&self, id: LogId) -> Result<(), ErrorBody> {
        match tokio::time::timeout(CATCH_UP, self.replica().caught_up(id)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cause)) => Err(ErrorBody::new(
                ErrorCode::BackendUnavailable,
                format!("this node's copy of the log stopped: {cause}"),
            )),
            Err(_) => Err(ErrorBody::new(
                ErrorCode::BackendUnavailable,
                format!(
                    "this node has not applied the log up to {id} within {} s",
                    CATCH_UP.as_secs()
                ),
            )),
        }
    }

    /// Waits until this node has applied everything the log holds now.
    async fn caught_up_to_tip(&self) -> Result<(), ErrorBody> {
        let tip = self.sequencer.tip().await.map_err(unavailable)?;
        self.caught_up(tip).await
    }
}

impl Hub {
    /// A cluster node's hub: decisions by `sequencer`, and the log read from `client` and
    /// applied by this hub, as node `node`. Where it starts reading is [`Hub::join_cluster`]'s
    /// to say. `Err` is a one-line message.
    pub async fn clustered(
        config: super::HubConfig,
        store: Arc<dyn super::HistoryStore>,
        metrics: crate::metrics::Metrics,
        sequencer: Sequencer,
        client: redis::Client,
        node: &str,
    ) -> Result<Hub, String> {
        let link = Arc::new(Link {
            sequencer,
            node: Arc::from(node),
            replica: OnceLock::new(),
            leases: Mutex::new(HashMap::new()),
            restoring: AtomicBool::new(false),
        });
        let hub = Hub::build(config, store, metrics, Some(link.clone()));
        let after = hub.join_cluster(&link).await?;
        let replica = Replica::start(client, hub.clone(), node, after)
            .map_err(|e| format!("cannot start the log reader: {e}"))?;
        link.replica
            .set(replica)
            .expect("the replica is set once, here");
        Ok(hub)
    }

    /// Gets what the running nodes hold, and returns the log entry after which this node
    /// applies the log: with other nodes running, a snapshot one of them takes at a
    /// `snapshot` entry (docs/cluster.md, section 3); with none, the whole log, or a new log
    /// if its start was trimmed (the previous run's sessions end). A node asked that does not
    /// answer within [`SNAPSHOT_WAIT`] (it died, or lags) is passed over; when none answers,
    /// the nodes are asked again, up to three times.
    async fn join_cluster(&self, link: &Link) -> Result<LogId, String> {
        let mut silent = Vec::new();
        let mut rounds = 0;
        let restoring_since = std::time::Instant::now();
        while rounds < 3 {
            let others = match link
                .sequencer
                .start(&link.node)
                .await
                .map_err(unreachable)?
            {
                Start::Wait if restoring_since.elapsed() < RESTORE_WAIT => {
                    tracing::info!("Redis lost the cluster's state; waiting for the running nodes to restore it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Start::Wait => {
                    return Err(format!(
                        "Redis lost the cluster's state, and the running nodes did not restore it within {} s",
                        RESTORE_WAIT.as_secs()
                    ))
                }
                Start::Whole => return Ok(LogId::ZERO),
                Start::Reset => {
                    tracing::warn!(
                        "no node was running and the log's start had been trimmed: a new \
                         cluster log starts (the sessions of the previous run are gone; room \
                         history is kept)"
                    );
                    return Ok(LogId::ZERO);
                }
                Start::Join(others) => others,
            };
            rounds += 1;
            if let Some(entry) = self.snapshot_from(link, others, &mut silent).await? {
                return Ok(entry);
            }
        }
        Err(no_snapshot(&silent))
    }

    /// Asks `others` in turn for a snapshot and restores the first that comes (each within
    /// [`SNAPSHOT_WAIT`]); returns the `snapshot` entry it was taken at, or `None` if none
    /// came (the nodes asked in vain are added to `silent`).
    async fn snapshot_from(
        &self,
        link: &Link,
        others: Vec<String>,
        silent: &mut Vec<String>,
    ) -> Result<Option<LogId>, String> {
        for other in others {
            let (entry, key) = link
                .sequencer
                .request_snapshot(&other)
                .await
                .map_err(unreachable)?;
            let wait = async {
                loop {
                    if let Some(snapshot) = link.sequencer.take_snapshot(&key).await? {
                        return Ok::<_, Unavailable>(snapshot);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            match tokio::time::timeout(SNAPSHOT_WAIT, wait).await {
                Ok(snapshot) => {
                    let snapshot = snapshot.map_err(unreachable)?;
                    let sessions = self
                        .restore(&snapshot)
                        .map_err(|e| format!("the snapshot of node {other}: {e}"))?;
                    let metrics = self.metrics().cluster();
                    metrics.snapshot_bytes.set(snapshot.len() as i64);
                    metrics.sessions_restored.inc_by(sessions as u64);
                    tracing::info!(
                        from = %other,
                        at = %entry,
                        bytes = snapshot.len(),
                        sessions,
                        "took a running node's snapshot"
                    );
                    return Ok(Some(entry));
                }
                Err(_) => {
                    tracing::warn!(node = %other, "a running node sent no snapshot in time");
                    silent.push(other);
                }
            }
        }
        Ok(None)
    }

    /// Catches up with the running nodes after this node's replica lagged past what the log
    /// keeps: takes a snapshot of one of them into the hub it has (sessions keep their
    /// transports and get the events they lacked, or a `reset` if their resume point is too
    /// old now) and returns the `snapshot` entry, after which the replica goes on.
    pub(crate) async fn rejoin(&self) -> Result<LogId, String> {
        let link = self.link().ok_or("a node of no cluster")?;
        let others = link
            .sequencer
            .others(&link.node)
            .await
            .map_err(unreachable)?;
        if others.is_empty() {
            return Err("no other node runs to send this node a snapshot".into());
        }
        let mut silent = Vec::new();
        match self.snapshot_from(link, others, &mut silent).await? {
            Some(entry) => Ok(entry),
            None => Err(no_snapshot(&silent)),
        }
    }

    /// Takes a snapshot for a starting node that asked this one (a `snapshot` entry), and
    /// writes it where the node waits for it.
    pub(super) fn serve_snapshot(&self, key: String) {
        let Some(link) = self.link().cloned() else {
            return;
        };
        // Taken here, at the entry; encoded off the replica's way.
        let capture = self.capture();
        let metrics = self.metrics().cluster().clone();
        tokio::spawn(async move {
            let Ok(snapshot) = tokio::task::spawn_blocking(|| capture.encode()).await else {
                return;
            };
            metrics.snapshots_sent.inc();
            metrics.snapshot_bytes.set(snapshot.len() as i64);
            let bytes = snapshot.len();
            match link.sequencer.put_snapshot(&key, snapshot).await {
                Ok(()) => tracing::info!(bytes, "sent a snapshot to a starting node"),
                Err(error) => tracing::warn!(%error, "a snapshot for a starting node was lost"),
            }
        });
    }

    /// Takes part in restoring the cluster's state after Redis lost it (a script answered
    /// so): offers this node, and if it is elected (it applied the most of the lost log),
    /// writes back its sessions and rooms and starts the new log with a `reseed` entry
    /// (docs/cluster.md, section 5). Runs until the state is back; one at a time.
    fn restore_state(&self, link: &Arc<Link>) {
        if link.restoring.swap(true, Ordering::AcqRel) {
            return;
        }
        let hub = self.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let position = link.replica().applied();
            tracing::error!(%position, "Redis lost the cluster's state; restoring it");
            while !hub.inner.shutting_down.load(Ordering::Acquire) {
                if let Health::Stopped(_) = link.replica().health() {
                    // What it holds cannot be trusted: it offers nothing.
                    break;
                }
                match link.sequencer.offer(&link.node, position).await {
                    Ok(Offer::Restored) => break,
                    Ok(Offer::Elected(node)) if *node == *link.node => {
                        let capture = hub.capture();
                        let seed = capture.seed();
                        let Ok(snapshot) = tokio::task::spawn_blocking(|| capture.encode()).await
                        else {
                            break;
                        };
                        let bytes = snapshot.len();
                        match link.sequencer.reseed(&link.node, &seed, snapshot).await {
                            Ok(Some(entry)) => {
                                let sessions = seed.sessions.len();
                                tracing::warn!(%entry, sessions, bytes, "restored the cluster's state Redis lost");
                                break;
                            }
                            Ok(None) => {}
                            Err(error) => {
                                tracing::warn!(cause = %error.0, "restoring the cluster's state failed; trying again")
                            }
                        }
                    }
                    Ok(Offer::Wait | Offer::Elected(_)) => {}
                    Err(error) => {
                        tracing::debug!(cause = %error.0, "restoring: Redis cannot be reached")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            link.restoring.store(false, Ordering::Release);
        });
    }

    /// Redis came back with an older copy of the log than this node applied (up to `after`,
    /// which it returns): the state it holds is older too. Has nothing decided on it
    /// ([`Sequencer::forget_state`]) and restores this node's ([`Hub::restore_state`]).
    pub(crate) fn log_went_back(&self, after: LogId) -> LogId {
        tracing::error!(%after, "Redis came back without entries this node applied");
        let Some(link) = self.link().cloned() else {
            return after;
        };
        let hub = self.clone();
        tokio::spawn(async move {
            while !hub.inner.shutting_down.load(Ordering::Acquire) {
                match link.sequencer.forget_state(&link.node, after).await {
                    Ok(()) => break,
                    Err(error) => tracing::debug!(cause = %error.0, "Redis cannot be reached"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            hub.restore_state(&link);
        });
        after
    }

    /// Applies a `reseed` entry: the node that restored the cluster's state wrote a snapshot
    /// of it at `key`; every node takes it (sessions keep their transports), and every
    /// session gets a `reset` with its rooms' histories as of `at` (µs).
    pub(super) async fn reseeded(&self, key: &str, at: u64) -> Result<(), String> {
        let link = self
            .link()
            .ok_or("a reseed entry on a node of no cluster")?;
        let mut tries = 0;
        let snapshot = loop {
            let error = match link.sequencer.read_snapshot(key).await {
                Ok(Some(snapshot)) => break snapshot,
                Ok(None) => format!("the restored state's snapshot ({key}) is gone"),
                Err(error) => error.0,
            };
            tries += 1;
            if tries == 10 {
                return Err(error);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let sessions = self.restore(&snapshot)?;
        self.reset_every_session(at);
        self.metrics()
            .cluster()
            .sessions_restored
            .inc_by(sessions as u64);
        tracing::warn!(
            sessions,
            "took the restored cluster state: every session was reset"
        );
        Ok(())
    }

    fn link(&self) -> Option<&Arc<Link>> {
        self.inner.cluster.as_ref()
    }

    /// Creates a session (for a verified user with `identity`).
    pub async fn open_session(
        &self,
        name: &str,
        identity: Option<Identity>,
    ) -> Result<Arc<Session>, ErrorBody> {
        let Some(link) = self.link() else {
            return self.create(name, identity);
        };
        self.refuse_if_shutting_down()?;
        validate_name(name)?;
        if self.session_count() >= self.inner.config.max_sessions {
            return Err(refusal::server_full());
        }
        let id = super::new_session_id();
        let entry = link
            .sequencer
            .create(&id, name, identity.as_ref())
            .await
            .map_err(unavailable)?;
        link.caught_up(entry).await?;
        self.session(&id)
    }

    /// Looks a session up; on a cluster node, one this node has not heard of yet is looked
    /// for again once it has applied the whole log (it may have been created on another
    /// node a moment ago).
    pub async fn find_session(&self, id: &str) -> Result<Arc<Session>, ErrorBody> {
        match (self.session(id), self.link()) {
            (Err(_), Some(link)) => {
                link.caught_up_to_tip().await?;
                self.session(id)
            }
            (found, _) => found,
        }
    }

    /// Describes a session ([`Hub::describe`]); on a cluster node, with the transport attached
    /// on whichever node.
    pub async fn describe_session(&self, id: &str) -> Result<super::SessionInfo, ErrorBody> {
        self.find_session(id).await?;
        let mut info = self.describe(id)?;
        if let Some(link) = self.link() {
            let kind = link.sequencer.attached(id).await.map_err(unavailable)?;
            info.attached = kind.map(TransportKind::as_str);
        }
        Ok(info)
    }

    /// Attaches a transport ([`Hub::attach`]); on a cluster node, through the session's
    /// attach lease.
    pub async fn attach_transport(
        &self,
        session_id: &str,
        kind: TransportKind,
        after: u64,
    ) -> Result<Attachment, ErrorBody> {
        let Some(link) = self.link() else {
            return self.attach(session_id, kind, after);
        };
        self.refuse_if_shutting_down()?;
        let id = self.inner.next_attachment.fetch_add(1, Ordering::Relaxed);
        let name = super::attachment_name(&link.node, id);
        let mut cleared = false;
        let last = loop {
            let attach = link
                .sequencer
                .attach(session_id, &link.node, &name, kind, after);
            match attach.await.map_err(unavailable)? {
                Attach::Attached { last } => break last,
                Attach::UnknownSession => return Err(refusal::unknown_session(session_id)),
                // A poll of this node that ended, its detach still on its way: give it up.
                Attach::PollHeldBy(holder) if !cleared && self.ended_here(link, &holder) => {
                    cleared = true;
                    link.sequencer
                        .detach(session_id, &holder)
                        .await
                        .map_err(unavailable)?;
                }
                Attach::PollHeldBy(_) => return Err(refusal::poll_in_progress()),
            }
        };
        let attached = match link.caught_up(last).await {
            Ok(()) => self.attach_as(session_id, kind, after, id, false),
            Err(error) => Err(error),
        };
        let detach = Detach {
            link: link.clone(),
            session: session_id.to_owned(),
            id,
        };
        match attached {
            Ok(mut attachment) => {
                lock(&link.leases).insert(id, (session_id.to_owned(), kind));
                attachment.detach = Some(detach);
                Ok(attachment)
            }
            Err(error) => {
                detach.run().await;
                Err(error)
            }
        }
    }

    /// Whether attachment `name` was this node's and has ended.
    fn ended_here(&self, link: &Link, name: &str) -> bool {
        let Some((node, id)) = name.rsplit_once(':') else {
            return false;
        };
        let Ok(id) = id.parse() else {
            return false;
        };
        node == &*link.node && !lock(&link.leases).contains_key(&id)
    }

    /// Ends a poll's attachment before its reply is sent. On a cluster node it gives up its
    /// lease first (the client may poll another node as soon as it has the reply), unless the
    /// reply `handed_events`: the client's next poll then resumes past this one's point, and
    /// the sequencer lets it take the lease wherever it lands, so the lease is left to it (or
    /// to lapse), which saves a script per poll.
    pub async fn release(&self, mut attachment: Attachment, handed_events: bool) {
        let detach = attachment.detach.take();
        drop(attachment);
        match detach {
            Some(detach) if handed_events => detach.forget(),
            Some(detach) => detach.run().await,
            None => {}
        }
    }

    /// Applies the commands of a cluster node's session in order, each decided by the
    /// sequencer; each reply waits until this node applied its entry.
    pub(super) async fn execute_clustered(
        &self,
        link: &Link,
        session: &Arc<Session>,
        commands: Vec<Result<Command, ErrorBody>>,
    ) -> Vec<CommandResult> {
        let mut results = Vec::with_capacity(commands.len());
        for command in commands {
            if let Ok(Command::Ack { seq }) = command {
                results.push(self.acknowledge(session, seq));
                continue;
            }
            let decided = match self.refuse_if_shutting_down().and(command) {
                Err(error) => Err(error),
                Ok(Command::Refresh { token }) => {
                    self.refresh_clustered(link, session, &token).await
                }
                Ok(command) => match self.room_for(&command) {
                    Ok(()) => link
                        .sequencer
                        .execute(&session.id, &command)
                        .await
                        .map_err(unavailable),
                    Err(error) => Err(error),
                },
            };
            let result = match decided {
                Err(error) => CommandResult::failed(error),
                Ok(Decision { result, entry }) => match entry {
                    Some(entry) => match link.caught_up(entry).await {
                        Ok(()) => result,
                        Err(error) => CommandResult::failed(error),
                    },
                    None => result,
                },
            };
            results.push(result);
        }
        results
    }

    /// For a `join`: whether this node has room for the room (`max_rooms`; every node
    /// holds every room, and drops the same empty ones when it applies the join).
    fn room_for(&self, command: &Command) -> Result<(), ErrorBody> {
        match command {
            Command::Join { room } => {
                lock(&self.inner.chat).room_for(room, self.inner.config.max_rooms)
            }
            _ => Ok(()),
        }
    }

    /// A `refresh` on a cluster node: the token verified here, the change decided by the
    /// sequencer, and this node's copy of the identity updated.
    async fn refresh_clustered(
        &self,
        link: &Link,
        session: &Session,
        token: &str,
    ) -> Result<Decision, ErrorBody> {
        let fresh = self.verify_refresh(token)?;
        let decision = link
            .sequencer
            .refresh(&session.id, &fresh)
            .await
            .map_err(unavailable)?;
        if decision.result.ok {
            if let Some(identity) = &mut session.lock().identity {
                identity.expires_at = fresh.expires_at;
                identity.rooms = fresh.rooms;
            }
        }
        Ok(decision)
    }

    /// Sends an `error` event to a session, for a command that came on its stream
    /// ([`Hub::push_error`]); on a cluster node, as an entry of the log.
    pub async fn report_error(
        &self,
        session: &Arc<Session>,
        error: &ErrorBody,
        client_id: Option<&str>,
    ) {
        let Some(link) = self.link() else {
            return self.push_error(session, error, client_id);
        };
        if let Err(cause) = link
            .sequencer
            .push_error(&session.id, error, client_id)
            .await
        {
            tracing::warn!(session = %session.id, code = error.code.as_str(), cause = %cause.0, "an error event could not be sent: Redis cannot be reached");
        }
    }

    /// Ends a session now (`DELETE`, [`Hub::end_session`]).
    pub async fn close_session(&self, session_id: &str) -> Result<(), ErrorBody> {
        let Some(link) = self.link() else {
            return self.end_session(session_id);
        };
        let Decision { result, entry } =
            link.sequencer.end(session_id).await.map_err(unavailable)?;
        if let Some(error) = result.error {
            return Err(error);
        }
        if let Some(entry) = entry {
            link.caught_up(entry).await?;
        }
        Ok(())
    }

    /// Whether the node can serve everything it offers (`GET /readyz`): its history store
    /// answers and, on a cluster node, its replica is applying the log and applies what the
    /// log holds now within [`READY_LAG`].
    pub async fn readiness(&self) -> Result<(), ErrorBody> {
        self.ready()?;
        let Some(link) = self.link() else {
            return Ok(());
        };
        let not_ready = |why: String| Err(ErrorBody::new(ErrorCode::BackendUnavailable, why));
        if link.restoring.load(Ordering::Acquire) {
            return not_ready("Redis lost the cluster's state; the nodes are restoring it".into());
        }
        match link.replica().health() {
            Health::Applying => {}
            Health::Unreachable(cause) => {
                return not_ready(format!("Redis cannot be reached: {cause}"))
            }
            Health::Stopped(cause) => {
                return not_ready(format!("this node's copy of the log stopped: {cause}"))
            }
        }
        let tip = link.sequencer.tip().await.map_err(unavailable)?;
        match tokio::time::timeout(READY_LAG, link.replica().caught_up(tip)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cause)) => not_ready(format!("this node's copy of the log stopped: {cause}")),
            Err(_) => not_ready(format!(
                "this node's copy of the log lags its newest entry by more than {} ms",
                READY_LAG.as_millis()
            )),
        }
    }

    /// A cluster node's timers, instead of the hub's own: the expiry sweep, the ticker's
    /// flushes while presence changes are pending, and the renewal of this node's leases.
    pub(super) fn spawn_cluster_timers(&self, link: Arc<Link>) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        let config = &self.inner.config;
        let sweep_period =
            (config.session_ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let flush_period = (config.presence_interval / 4).max(Duration::from_millis(5));
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(sweep_period);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut flush = tokio::time::interval(flush_period);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut renew = tokio::time::interval(ATTACH_LEASE / 3);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !hub.inner.shutting_down.load(Ordering::Acquire) {
                tokio::select! {
                    _ = sweep.tick() => match link.sequencer.expire().await {
                        Ok(ended) if !ended.is_empty() => tracing::info!(ended = ended.len(), "ended sessions (idle past their TTL or their token expired)"),
                        Ok(_) => {}
                        Err(error) if error.lost_state() => hub.restore_state(&link),
                        Err(error) => tracing::debug!(cause = %error.0, "expiry sweep: Redis cannot be reached"),
                    },
                    _ = flush.tick() => {
                        let pending = !lock(&hub.inner.chat).pending_presence.is_empty();
                        if pending {
                            if let Err(error) = link.sequencer.tick(&link.node).await {
                                tracing::debug!(cause = %error.0, "presence tick: Redis cannot be reached");
                            }
                        }
                    }
                    _ = renew.tick() => {
                        // This node runs (a node starting checks none does before it resets a
                        // cluster whose log was trimmed).
                        if let Err(error) = link.sequencer.beat(&link.node).await {
                            tracing::debug!(cause = %error.0, "beat: Redis cannot be reached");
                        }
                        hub.renew_leases(&link).await;
                    }
                }
            }
        })
    }

    /// Renews the lease of every transport attached here; one whose lease is gone (superseded
    /// by an entry this node has not applied yet, or lapsed while Redis was away) is closed,
    /// and its client resumes.
    async fn renew_leases(&self, link: &Link) {
        let leases: Vec<(u64, (String, TransportKind))> = lock(&link.leases)
            .iter()
            .map(|(id, lease)| (*id, lease.clone()))
            .collect();
        for (id, (session_id, kind)) in leases {
            let name = super::attachment_name(&link.node, id);
            if !lock(&link.leases).contains_key(&id) {
                continue;
            }
            let sequencer = &link.sequencer;
            let mut renewed = sequencer
                .renew(&session_id, &link.node, &name, kind, false)
                .await;
            if renewed == Ok(Renewal::Lapsed) && lock(&link.leases).contains_key(&id) {
                // Still attached here, and nobody took the lease meanwhile: it is ours again.
                renewed = sequencer
                    .renew(&session_id, &link.node, &name, kind, true)
                    .await;
            }
            match renewed {
                Ok(Renewal::Renewed | Renewal::Lapsed) => {}
                Ok(Renewal::Lost) => {
                    lock(&link.leases).remove(&id);
                    if let Ok(session) = self.session(&session_id) {
                        let mut state = session.lock();
                        if state.attached.as_ref().is_some_and(|slot| slot.id == id) {
                            state.close_attached(CloseReason::Superseded);
                        }
                    }
                }
                // Tried again at the next renewal; the lease outlives two missed ones.
                Err(_) => return,
            }
        }
    }

    /// Tells the cluster this node stopped (at a clean stop), so a node starting next need
    /// not wait for its beat to lapse.
    pub async fn leave_cluster(&self) {
        if let Some(link) = self.link() {
            if let Err(error) = link.sequencer.leave(&link.node).await {
                tracing::warn!(cause = %error.0, "could not tell the cluster this node stopped");
            }
        }
    }

    /// Stops applying the log (at shutdown).
    pub(super) fn unlink(&self) {
        if let Some(link) = self.link() {
            if let Some(replica) = link.replica.get() {
                replica.stop();
            }
        }
    }
}
