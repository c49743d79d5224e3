//! The cluster's sequencer: every command decided by one Lua script in Redis, exactly as the
//! hub decides it on one node, and recorded as one entry of the log (docs/cluster.md,
//! section 1). A cluster node's hub calls it (`hub/clustered.rs`).
//!
//! **What a script decides.** The checks and the state the hub keeps for them: whether the
//! session exists, its command rate (a token bucket), the rooms it is in (in join order, at
//! most `max_rooms_per_session`), the rooms its identity lets it join, its retry table (the
//! last `dedup_window` sends by `client_id`), each room's message rate, and message ids. A
//! `send` takes its id with `INCR` and adds the message to the room's history (the sorted set
//! the Redis history store reads, trimmed to `--history-keep` messages
//! ([`Sequencer::keeping`]) and expiring `history_max_age` after its newest message) in the
//! same script that appends its entry, so history and log never disagree. The time is
//! Redis's (`TIME`), so every node gives a message the same `ts`.
//!
//! **What stays on the node.** What only one node's memory decides (`server_full`,
//! `shutting_down`), verifying tokens (a `refresh` hands the script a verified identity), and
//! everything about transports.
//!
//! **Entries.** A command that changes what some session sees appends exactly one entry
//! ([`Record`]); a refused one appends none, and its reply carries the error (a node pushes
//! the `error` event of a command that came on a stream as an entry of its own).
//!
//! **A session's life** is decided here too (`lifecycle.lua`): one transport at a time, each
//! holding an attach lease (`ATTACH_LEASE`) that its node renews, a second poll refused while
//! one is held, and a deadline per session: the earlier of its token's expiry and its TTL
//! after it was last attached (its last detach, or its lease's lapse if its node died). Any
//! node may sweep the due sessions; each ends once, with an `end` entry. So a dead node's
//! sessions leave their rooms within a lease, a TTL and one sweep period.
//!
//! **Keys**, all under `switchyard:c:` but for the room's history and the message ids (the
//! history store's `switchyard:room:NAME` and `switchyard:ids`): `session:ID` (a hash: name,
//! user, rules, token expiry, when it falls idle), `session:ID:rooms` (a list),
//! `session:ID:bucket`, `session:ID:sent` (`client_id` to the message's JSON),
//! `session:ID:sent:order` (a list), `session:ID:attach` (the lease: node, attachment, the
//! transport's kind), `deadlines` (a sorted set), `room:NAME:bucket`, `intact` (the mark
//! every script but membership's needs: when it is gone, Redis lost the cluster's state,
//! and `reseed.lua` restores it, with `reseed:offers`, `reseed:since` and `reseed:elected`),
//! `nodes`, `ticker` and `snapshot:RANDOM`. The scripts name some
//! keys they did not declare (a sweep ends sessions it finds), so the sequencer needs one
//! Redis, not a Redis Cluster.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use serde::Deserialize;

use super::log::{LogId, LAST, LOG};
use crate::hub::refusal;
use crate::hub::{CommandResult, HubConfig, Identity};
use crate::protocol::{Command, ErrorBody, Message, TransportKind, DEFAULT_PAGE};
use crate::store::redis::{room_key, IDS};

/// Where the sequencer's own keys live.
const PREFIX: &str = "switchyard:c:";
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one script may take to answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait a `rate_limited` refusal names, as on one node.
const MAX_WAIT: Duration = Duration::from_secs(86_400);
/// A bucket's expiry at most, in ms: past it a bucket is as good as refilled.
const MAX_BUCKET_MS: u64 = 1_000_000_000_000;

/// Decides one command (its keys and arguments are listed at the top of the script).
const DECIDE: &str = concat!(include_str!("prelude.lua"), include_str!("decide.lua"));
/// Creates sessions, attaches transports, ends sessions that fall due (the same).
const LIFECYCLE: &str = concat!(include_str!("prelude.lua"), include_str!("lifecycle.lua"));

/// How long a transport's attach lease lasts unless its node renews it: the longest a dead
/// node's session stays attached.
pub const ATTACH_LEASE: Duration = Duration::from_secs(6);
/// Sessions one sweep ends at most.
const EXPIRE_BATCH: usize = 1000;

/// What a log entry written by the sequencer says (its body, field `e`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Record {
    /// A session was created: every node keeps it from here on.
    Create {
        /// The session.
        #[serde(rename = "s")]
        session: String,
        /// Its user's name.
        name: String,
        /// Its user, with a token.
        user: Option<String>,
        /// The rooms its token allows, if limited.
        rules: Option<Vec<String>>,
        /// When its token expires (ms since the Unix epoch).
        expires: Option<u64>,
    },
    /// A message accepted into its room: its members get it.
    Send {
        /// The sender.
        #[serde(rename = "s")]
        session: String,
        /// The message, as its room's history holds it.
        #[serde(rename = "m")]
        message: Message,
    },
    /// A send retried with a `client_id` already sent: the sender gets the original again.
    Retry {
        /// The sender.
        #[serde(rename = "s")]
        session: String,
        /// The original message.
        #[serde(rename = "m")]
        message: Message,
    },
    /// A session joins a room (or, already in it, asks for a fresh view).
    Join {
        /// Who joins.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// When, on Redis's clock (µs): the joiner's `history` covers messages younger than
        /// the room's max age at this time.
        ts: u64,
        /// The newest message id handed out before it: a replica that reads the room's
        /// history from Redis takes nothing newer.
        last: u64,
    },
    /// A session leaves a room.
    Leave {
        /// Who leaves.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// When (µs on Redis's clock).
        ts: u64,
    },
    /// A member is typing.
    Typing {
        /// Who types.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// When (µs on Redis's clock).
        ts: u64,
    },
    /// The rooms whose presence interval has passed at `ts` (µs on Redis's clock) tell their
    /// members of the presence and typing changes pending.
    Flush {
        /// When.
        ts: u64,
    },
    /// A page of a room's history, for the session that asked.
    Page {
        /// Who asked.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// The `before` it asked with.
        before: Option<u64>,
        /// Whether older messages are left.
        more: bool,
        /// The messages, oldest first.
        #[serde(rename = "m")]
        messages: Vec<Message>,
    },
    /// A session ended: it left these rooms, and its transport closes.
    End {
        /// The session.
        #[serde(rename = "s")]
        session: String,
        /// Why it ended.
        why: Ending,
        /// The rooms it was in.
        rooms: Vec<String>,
        /// When (µs on Redis's clock).
        ts: u64,
    },
    /// A transport attached while another held the session: the node holding that one closes
    /// it (`superseded`).
    Attach {
        /// The session.
        #[serde(rename = "s")]
        session: String,
        /// The node of the new transport.
        node: String,
        /// The new transport's attachment.
        attachment: String,
        /// The attachment it supersedes.
        superseded: String,
    },
    /// A starting node asks `node` for a snapshot of what it holds at this entry
    /// ([`Sequencer::request_snapshot`]): `node` writes it to `key`, and the starting node
    /// applies the log after this entry.
    Snapshot {
        /// The node asked.
        node: String,
        /// Where it writes the snapshot.
        key: String,
    },
    /// The first entry of a new log, after Redis lost the cluster's state: `node` wrote back
    /// what the scripts decide by from what it held, and a snapshot of it at `key`. Every
    /// node takes that snapshot, and every session gets a `reset` (docs/cluster.md, section
    /// 5).
    Reseed {
        /// The node that restored the state.
        node: String,
        /// Where its snapshot is.
        key: String,
        /// When (µs on Redis's clock): the resets' histories are as of then.
        ts: u64,
    },
    /// A command that came on a stream was refused: its session gets an `error` event.
    Error {
        /// The session.
        #[serde(rename = "s")]
        session: String,
        /// The refusal.
        #[serde(flatten)]
        error: ErrorBody,
        /// The `client_id` of the refused `send`.
        client_id: Option<String>,
    },
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// `DELETE`.
    Deleted,
    /// No transport for its TTL (or its node stopped renewing the lease).
    Idle,
    /// Its identity token expired without a `refresh`.
    TokenExpired,
}

impl Record {
    /// Reads an entry's body.
    pub fn parse(body: &str) -> Result<Record, String> {
        serde_json::from_str(body).map_err(|e| format!("a log entry that is not one ({e}): {body}"))
    }
}

/// How a node starts ([`Sequencer::start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The log holds its first entry: the node reads it all.
    Whole,
    /// The log's start was trimmed and no other node was running: the previous run's sessions
    /// ended and a new log starts.
    Reset,
    /// Other nodes run (these, the most recent beat first): the node asks one of them for a
    /// snapshot ([`Sequencer::request_snapshot`]).
    Join(Vec<String>),
    /// Other nodes run, but Redis lost the cluster's state and they are restoring it: ask
    /// again in a moment.
    Wait,
}

/// Where the election of the node that restores a cluster's lost state stands
/// ([`Sequencer::offer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// The state is back (or a new cluster started): nothing to restore.
    Restored,
    /// Waiting for the running nodes to offer.
    Wait,
    /// This node restores it.
    Elected(String),
}

/// What a node writes back to a Redis that lost the cluster's state
/// ([`Sequencer::reseed`]): its sessions and rooms, as the scripts keep them.
#[derive(Debug, Default)]
pub struct Seed {
    /// The newest message id handed out.
    pub last_message_id: u64,
    /// Each session: its id, its user's name, its identity and its rooms in join order.
    pub sessions: Vec<(String, String, Option<Identity>, Vec<String>)>,
    /// Each room and its history, oldest first.
    pub rooms: Vec<(String, Vec<Message>)>,
}

/// What became of a lease its node renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed (or taken again).
    Renewed,
    /// It lapsed (Redis was away longer than a lease) and nobody holds it: the node may take
    /// it again if its transport is still attached.
    Lapsed,
    /// Another transport holds it, or the session ended.
    Lost,
}

/// What the sequencer decided on an attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// The attachment holds the lease. `last` is the log's newest entry (the `attach` entry
    /// itself when it superseded one): the node applies the log up to it before serving.
    Attached {
        /// The log's newest entry ([`LogId::ZERO`] for an empty log).
        last: LogId,
    },
    /// No such session.
    UnknownSession,
    /// A poll holds the lease: this attachment (`NODE:ID`).
    PollHeldBy(String),
}

/// What the sequencer decided for one command.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The command's result, as `/commands` replies it.
    pub result: CommandResult,
    /// The entry it appended, if it changed what some session sees.
    pub entry: Option<LogId>,
}

/// Redis could not be reached, or answered what no script returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cluster's Redis: {0}")]
pub struct Unavailable(pub String);

/// What a script answers once Redis has lost the cluster's state (prelude.lua's `LOST`).
const LOST_STATE: &str = "Redis lost the cluster's state; the nodes are restoring it";

impl Unavailable {
    /// Whether Redis answered that it lost the cluster's state (the nodes restore it).
    pub fn lost_state(&self) -> bool {
        self.0 == LOST_STATE
    }
}

impl From<redis::RedisError> for Unavailable {
    fn from(error: redis::RedisError) -> Self {
        match error.code() {
            Some("LOST") => Unavailable(LOST_STATE.to_owned()),
            _ => Unavailable(error.to_string()),
        }
    }
}

/// Decides commands in Redis. Cheap to clone: clones share one multiplexed connection, which
/// reconnects by itself.
#[derive(Clone)]
pub struct Sequencer {
    conn: ConnectionManager,
    /// Counts round trips.
    calls: prometheus_client::metrics::counter::Counter,
    config: HubConfig,
    /// Messages a room's history keeps in Redis (`--history-keep`).
    history_keep: usize,
    lease: Duration,
    decide: Script,
    lifecycle: Script,
    append: Script,
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer").finish_non_exhaustive()
    }
}

/// The sessions' deadlines (a sorted set: session id by ms on Redis's clock).
const DEADLINES: &str = "switchyard:c:deadlines";
/// The node that appends `flush` entries (a lease).
const TICKER: &str = "switchyard:c:ticker";
/// The cluster's mark: set when its state starts, gone if Redis lost it (every script but
/// membership's refuses to run without it).
const INTACT: &str = "switchyard:c:intact";
/// Restoring a lost state: the nodes' offers, when the first came, the node elected.
const OFFERS: &str = "switchyard:c:reseed:offers";
const OFFERS_SINCE: &str = "switchyard:c:reseed:since";
const ELECTED: &str = "switchyard:c:reseed:elected";
/// Elects the node that restores a lost state, which then writes it back.
const RESEED: &str = concat!(include_str!("prelude.lua"), include_str!("reseed.lua"));
/// The election waits this long after the first offer, so every running node can offer...
pub const OFFER_AT_LEAST: Duration = Duration::from_secs(3);
/// ...and no longer than this for a running node that has not.
pub const OFFER_AT_MOST: Duration = Duration::from_secs(10);
/// How long the elected node has to write the state back before another is elected.
const RESEED_LEASE: Duration = Duration::from_secs(30);
/// Appends a record no script decides (as log.rs's `APPEND`), unless the state is lost.
const RECORD: &str = concat!(
    include_str!("prelude.lua"),
    "if lost(KEYS[3]) then return redis.error_reply(LOST) end\n",
    "return append(KEYS[1], KEYS[2], ARGV[2], ARGV[1])\n"
);
/// The running nodes, each with its last beat.
const NODES: &str = "switchyard:c:nodes";
/// Beats, starts and leaves of nodes.
const MEMBERSHIP: &str = include_str!("membership.lua");
/// How long a node's beat counts: a node that beat more recently is running.
pub const BEAT_LIFE: Duration = Duration::from_secs(6);
/// How long a node that stopped beating (every [`BEAT_LIFE`] / 3) still counts as holding its
/// polls: a poll at the same point on another node takes the lease of a poll it held.
pub const NODE_SILENCE: Duration = Duration::from_secs(3);
/// How long a snapshot written for a starting node is kept for it.
pub const SNAPSHOT_LIFE: Duration = Duration::from_secs(60);

/// The membership script for `kind`, as node `node`.
fn membership(kind: &str, node: &str) -> redis::ScriptInvocation<'static> {
    static SCRIPT: std::sync::LazyLock<Script> =
        std::sync::LazyLock::new(|| Script::new(MEMBERSHIP));
    let mut call = SCRIPT.key(LOG);
    call.key(LAST)
        .key(NODES)
        .key(INTACT)
        .arg(kind)
        .arg(node)
        .arg(millis(BEAT_LIFE))
        .arg(PREFIX);
    call
}

/// The nodes of a cluster that run (membership's `others`, for no node of its own), on a
/// synchronous connection: a single server checks that no cluster uses its database.
pub(crate) fn running_nodes(conn: &mut redis::Connection) -> redis::RedisResult<Vec<String>> {
    let mut reply: Vec<String> = membership("others", "").invoke(conn)?;
    Ok(reply.split_off(1.min(reply.len())))
}

/// A log entry's id, as a script returned it.
fn parse_entry(id: &str) -> Result<LogId, Unavailable> {
    id.parse()
        .map_err(|_| Unavailable(format!("a script returned {id:?} for an entry's id")))
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u64::MAX as u128) as u64
}

/// When an identity expires, in ms since the Unix epoch, as the scripts read it.
fn expiry_ms(identity: &Identity) -> u64 {
    let since = identity.expires_at.duration_since(std::time::UNIX_EPOCH);
    millis(since.unwrap_or_default())
}

fn session_key(session: &str, part: &str) -> String {
    format!("{PREFIX}session:{session}{part}")
}

/// The rooms an identity allows, as the scripts read them: a JSON array, '' for any.
fn rules(identity: Option<&Identity>) -> String {
    identity
        .and_then(|i| i.rooms.as_deref())
        .map(|rooms| serde_json::to_string(rooms).expect("strings serialize"))
        .unwrap_or_default()
}

/// A rate as the scripts read it: finite, above zero.
fn rate(per_sec: f64) -> String {
    format!("{:e}", per_sec.clamp(1e-12, 1e12))
}

impl Sequencer {
    /// Connects to the Redis at `url`, deciding by the limits of `config`.
    pub async fn connect(url: &str, config: &HubConfig) -> Result<Sequencer, Unavailable> {
        let client = Client::open(url)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client, manager).await?;
        Ok(Sequencer {
            conn,
            calls: Default::default(),
            config: config.clone(),
            history_keep: config.history_len,
            lease: ATTACH_LEASE,
            decide: Script::new(DECIDE),
            lifecycle: Script::new(LIFECYCLE),
            append: Script::new(RECORD),
        })
    }

    /// The same sequencer, keeping `messages` of each room's history in Redis (by default
    /// the `history_len` its joins show), for scrollback.
    pub fn keeping(mut self, messages: usize) -> Sequencer {
        self.history_keep = messages.max(self.config.history_len);
        self
    }

    /// The same sequencer, counting its round trips to Redis into `calls`.
    pub fn counting(mut self, calls: prometheus_client::metrics::counter::Counter) -> Sequencer {
        self.calls = calls;
        self
    }

    /// The connection for one round trip, counted.
    fn conn(&self) -> ConnectionManager {
        self.calls.inc();
        self.conn.clone()
    }

    /// The same sequencer with attach leases of `lease` (tests shorten it).
    pub fn with_lease(mut self, lease: Duration) -> Sequencer {
        self.lease = lease;
        self
    }

    /// Creates session `session` for `name`, with the rooms `identity` allows, ending when
    /// idle for the TTL or when the identity expires; returns its `create` entry.
    pub async fn create(
        &self,
        session: &str,
        name: &str,
        identity: Option<&Identity>,
    ) -> Result<LogId, Unavailable> {
        let user = identity.map(|i| i.user.to_string()).unwrap_or_default();
        let expires = identity
            .map(|i| expiry_ms(i).to_string())
            .unwrap_or_default();
        let args = [name, &user, &rules(identity), &expires];
        let reply = self.lifecycle_call("create", session, &args).await?;
        match reply.as_slice() {
            [status, entry] if status == "ok" => parse_entry(entry),
            _ => Err(Unavailable(format!("the create script answered {reply:?}"))),
        }
    }

    /// Attaches transport `attachment` of `kind`, served by `node`, to `session`: it holds
    /// the session's attach lease until it detaches, supersedes it, or stops renewing it.
    /// The attachment it supersedes, if any, is told so by an `attach` entry. A poll (resuming
    /// after `after`) is refused while another poll holds the lease, unless it resumes past
    /// that one's point (that poll has ended, its reply handed the client those seqs, and its
    /// node left it the lease: [`crate::hub::Hub::release`]), or the node holding it stopped
    /// beating [`NODE_SILENCE`] ago (it died); no entry then.
    pub async fn attach(
        &self,
        session: &str,
        node: &str,
        attachment: &str,
        kind: TransportKind,
        after: u64,
    ) -> Result<Attach, Unavailable> {
        let after = match kind.is_poll() {
            true => after.to_string(),
            false => String::new(),
        };
        let silence = millis(NODE_SILENCE).to_string();
        let args = [node, attachment, kind.as_str(), &after, &silence];
        let reply = self.lifecycle_call("attach", session, &args).await?;
        match reply.as_slice() {
            [status, last] if status == "ok" && last.is_empty() => {
                Ok(Attach::Attached { last: LogId::ZERO })
            }
            [status, last] if status == "ok" => Ok(Attach::Attached {
                last: parse_entry(last)?,
            }),
            [status, code] if status == "err" && code == "unknown_session" => {
                Ok(Attach::UnknownSession)
            }
            [status, code, holder] if status == "err" && code == "poll_in_progress" => {
                Ok(Attach::PollHeldBy(holder.clone()))
            }
            _ => Err(Unavailable(format!("the attach script answered {reply:?}"))),
        }
    }

    /// Renews the attach lease of `attachment` (of `kind`, served by `node`); with `retake`,
    /// takes it again if it lapsed.
    pub async fn renew(
        &self,
        session: &str,
        node: &str,
        attachment: &str,
        kind: TransportKind,
        retake: bool,
    ) -> Result<Renewal, Unavailable> {
        let retake = if retake { "retake" } else { "" };
        let reply = self
            .lifecycle_call("renew", session, &[attachment, node, kind.as_str(), retake])
            .await?;
        Ok(match reply.as_slice() {
            [status, ..] if status == "ok" => Renewal::Renewed,
            [status, code] if status == "err" && code == "lapsed" => Renewal::Lapsed,
            _ => Renewal::Lost,
        })
    }

    /// Gives up the attach lease of `attachment`: the session falls idle a TTL from now.
    /// `false` if it did not hold it.
    pub async fn detach(&self, session: &str, attachment: &str) -> Result<bool, Unavailable> {
        let reply = self
            .lifecycle_call("detach", session, &[attachment])
            .await?;
        Ok(reply.first().is_some_and(|status| status == "ok"))
    }

    /// Ends the sessions that fell due (idle past their TTL, or their token expired), each
    /// with an `end` entry; returns their ids. Any node may sweep: each session ends once.
    pub async fn expire(&self) -> Result<Vec<String>, Unavailable> {
        self.lifecycle_call("expire", "", &[]).await
    }

    /// Appends a `flush` entry if this `node` holds the ticker (or takes it, free): every
    /// replica then flushes the rooms whose presence interval has passed. `None` if another
    /// node holds it. A node calls it every quarter presence interval while its replica has
    /// changes pending; if the ticker's node dies, another takes over within the lease.
    pub async fn tick(&self, node: &str) -> Result<Option<LogId>, Unavailable> {
        let reply = self.lifecycle_call("tick", "", &[node]).await?;
        match reply.as_slice() {
            [status, entry] if status == "ok" => Ok(Some(parse_entry(entry)?)),
            [status, _] if status == "err" => Ok(None),
            _ => Err(Unavailable(format!("the tick script answered {reply:?}"))),
        }
    }

    /// The kind of the transport holding `session`'s attach lease, on whichever node.
    pub async fn attached(&self, session: &str) -> Result<Option<TransportKind>, Unavailable> {
        let mut conn = self.conn();
        let kind: Option<String> = redis::cmd("HGET")
            .arg(session_key(session, ":attach"))
            .arg("kind")
            .query_async(&mut conn)
            .await?;
        Ok(kind.and_then(|kind| TransportKind::ALL.into_iter().find(|k| k.as_str() == kind)))
    }

    /// Says how node `node` starts, and counts it as running from now on: `Start::Join`
    /// when other nodes run (it loads a snapshot of one), else `Start::Whole` when it can
    /// read the whole log, else `Start::Reset` (the log's start was trimmed: the previous
    /// run's sessions are ended and a new log starts).
    pub async fn start(&self, node: &str) -> Result<Start, Unavailable> {
        let reply = self.membership("start", node).await?;
        match reply.as_slice() {
            [kind] if kind == "whole" => Ok(Start::Whole),
            [kind] if kind == "reset" => Ok(Start::Reset),
            [kind] if kind == "wait" => Ok(Start::Wait),
            [kind, others @ ..] if kind == "join" && !others.is_empty() => {
                Ok(Start::Join(others.to_vec()))
            }
            _ => Err(Unavailable(format!("the start script answered {reply:?}"))),
        }
    }

    /// Asks node `node`, through the log, for a snapshot at a new `snapshot` entry: returns
    /// the entry, after which the asking node applies the log, and the key the snapshot will
    /// be written to ([`Sequencer::take_snapshot`]).
    pub async fn request_snapshot(&self, node: &str) -> Result<(LogId, String), Unavailable> {
        let key = format!("{PREFIX}snapshot:{:032x}", rand::random::<u128>());
        let body = serde_json::json!({ "k": "snapshot", "node": node, "key": key });
        Ok((self.append_record(&body).await?, key))
    }

    /// Writes a snapshot asked for at `key`; it is kept for [`SNAPSHOT_LIFE`].
    pub async fn put_snapshot(&self, key: &str, snapshot: Vec<u8>) -> Result<(), Unavailable> {
        let mut conn = self.conn();
        redis::cmd("SET")
            .arg(key)
            .arg(snapshot)
            .arg("PX")
            .arg(millis(SNAPSHOT_LIFE))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Takes the snapshot written at `key`, if it is there yet.
    pub async fn take_snapshot(&self, key: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        let mut conn = self.conn();
        Ok(redis::cmd("GETDEL").arg(key).query_async(&mut conn).await?)
    }

    /// Reads the snapshot at `key` and leaves it for the other nodes (a `reseed` entry's).
    pub async fn read_snapshot(&self, key: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        let mut conn = self.conn();
        Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
    }

    /// Says Redis came back with an older copy of the log than node `node` read (its last
    /// entry read was `after`): the cluster's mark goes, so nothing is decided on the older
    /// state and the nodes restore theirs ([`Sequencer::offer`]), unless it was set since
    /// `after` (the state was restored already).
    pub async fn forget_state(&self, node: &str, after: LogId) -> Result<(), Unavailable> {
        let args = [after.ms.to_string()];
        self.reseed_call("forget", node, &args).await.map(drop)
    }

    /// Offers node `node`, which applied the lost log up to `position`, to restore the state
    /// Redis lost; says who restores it once the running nodes have offered (the one that
    /// applied the most), or that it is back.
    pub async fn offer(&self, node: &str, position: LogId) -> Result<Offer, Unavailable> {
        let args = [
            position.to_string(),
            millis(OFFER_AT_LEAST).to_string(),
            millis(OFFER_AT_MOST).to_string(),
            millis(BEAT_LIFE).to_string(),
            millis(RESEED_LEASE).to_string(),
        ];
        let reply = self.reseed_call("offer", node, &args).await?;
        match reply.as_slice() {
            [status] if status == "restored" => Ok(Offer::Restored),
            [status] if status == "wait" => Ok(Offer::Wait),
            [status, elected] if status == "elected" => Ok(Offer::Elected(elected.clone())),
            _ => Err(Unavailable(format!("the offer script answered {reply:?}"))),
        }
    }

    /// Writes `seed` back as elected node `node` (sessions idle a lease and a TTL from now),
    /// and `snapshot` (of the same hub) for the other nodes, and starts the new log with a
    /// `reseed` entry naming it; returns that entry, or `None` if this node is no longer the
    /// one elected.
    pub async fn reseed(
        &self,
        node: &str,
        seed: &Seed,
        snapshot: Vec<u8>,
    ) -> Result<Option<LogId>, Unavailable> {
        let key = format!("{PREFIX}snapshot:{:032x}", rand::random::<u128>());
        self.put_snapshot(&key, snapshot).await?;
        let sessions: Vec<serde_json::Value> = seed
            .sessions
            .iter()
            .map(|(id, name, identity, rooms)| {
                let mut session = serde_json::json!({ "id": id, "name": name, "rooms": rooms });
                if let Some(identity) = identity {
                    session["user"] = identity.user.to_string().into();
                    session["token_exp"] = expiry_ms(identity).into();
                    if identity.rooms.is_some() {
                        session["rules"] = rules(Some(identity)).into();
                    }
                }
                session
            })
            .collect();
        let rooms: Vec<serde_json::Value> = seed
            .rooms
            .iter()
            .map(|(room, messages)| {
                let messages: Vec<(u64, String)> = messages
                    .iter()
                    .map(|m| {
                        (
                            m.id,
                            serde_json::to_string(m).expect("a message serializes"),
                        )
                    })
                    .collect();
                serde_json::json!({ "key": room_key(room), "messages": messages })
            })
            .collect();
        let state = serde_json::json!({
            "ids": seed.last_message_id,
            "sessions": sessions,
            "rooms": rooms,
        });
        let idle = millis(self.lease + self.config.session_ttl);
        let args = [
            state.to_string(),
            key,
            millis(self.retention()).to_string(),
            session_key("", ""),
            idle.to_string(),
            millis(self.config.history_max_age).to_string(),
        ];
        let reply = self.reseed_call("commit", node, &args).await?;
        match reply.as_slice() {
            [status, entry] if status == "ok" => Ok(Some(parse_entry(entry)?)),
            [status] if status == "restored" => Ok(None),
            [status, _] if status == "err" => Ok(None),
            _ => Err(Unavailable(format!("the reseed script answered {reply:?}"))),
        }
    }

    async fn reseed_call(
        &self,
        kind: &str,
        node: &str,
        args: &[String],
    ) -> Result<Vec<String>, Unavailable> {
        let mut conn = self.conn();
        Ok(Script::new(RESEED)
            .key(INTACT)
            .key(OFFERS)
            .key(OFFERS_SINCE)
            .key(ELECTED)
            .key(NODES)
            .key(LOG)
            .key(LAST)
            .key(DEADLINES)
            .key(IDS)
            .arg(kind)
            .arg(node)
            .arg(args)
            .invoke_async(&mut conn)
            .await?)
    }

    /// Says node `node` is running (every [`BEAT_LIFE`] / 3).
    pub async fn beat(&self, node: &str) -> Result<(), Unavailable> {
        self.membership("beat", node).await.map(drop)
    }

    /// The nodes other than `node` that run, the most recent beat first.
    pub async fn others(&self, node: &str) -> Result<Vec<String>, Unavailable> {
        let mut reply = self.membership("others", node).await?;
        match reply.first().map(String::as_str) {
            Some("join") => Ok(reply.split_off(1)),
            _ => Err(Unavailable(format!(
                "the membership script answered {reply:?}"
            ))),
        }
    }

    /// Says node `node` stopped.
    pub async fn leave(&self, node: &str) -> Result<(), Unavailable> {
        self.membership("leave", node).await.map(drop)
    }

    async fn membership(&self, kind: &str, node: &str) -> Result<Vec<String>, Unavailable> {
        let mut conn = self.conn();
        Ok(membership(kind, node).invoke_async(&mut conn).await?)
    }

    /// The log's newest entry ([`LogId::ZERO`] if none).
    /// `Err` ([`Unavailable::lost_state`]) while Redis has lost the cluster's state.
    pub async fn tip(&self) -> Result<LogId, Unavailable> {
        let mut conn = self.conn();
        let (last, intact): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(LAST)
            .arg(INTACT)
            .query_async(&mut conn)
            .await?;
        match (last, intact) {
            (_, None) => Err(Unavailable(LOST_STATE.to_owned())),
            (Some(last), _) => parse_entry(&last),
            (None, _) => Ok(LogId::ZERO),
        }
    }

    /// Runs the lifecycle script for `kind`, with the arguments of that kind.
    async fn lifecycle_call(
        &self,
        kind: &str,
        session: &str,
        args: &[&str],
    ) -> Result<Vec<String>, Unavailable> {
        let mut conn = self.conn();
        // The script's first key is the session, or for a tick the ticker's lease.
        let first = match kind {
            "tick" => TICKER.to_owned(),
            _ => session_key(session, ""),
        };
        let mut call = self.lifecycle.key(first);
        call.key(session_key(session, ":attach"))
            .key(DEADLINES)
            .key(LOG)
            .key(LAST)
            .key(NODES)
            .key(INTACT)
            .arg(kind)
            .arg(session)
            .arg(millis(self.lease))
            .arg(millis(self.config.session_ttl))
            .arg(millis(self.retention()))
            .arg(session_key("", ""))
            .arg(EXPIRE_BATCH)
            .arg(args);
        Ok(call.invoke_async(&mut conn).await?)
    }

    /// Decides one command of `session`.
    pub async fn execute(&self, session: &str, command: &Command) -> Result<Decision, Unavailable> {
        let (kind, room, first, second) = match command {
            Command::Join { room } => ("join", room.as_str(), String::new(), String::new()),
            Command::Leave { room } => ("leave", room.as_str(), String::new(), String::new()),
            Command::Typing { room } => ("typing", room.as_str(), String::new(), String::new()),
            Command::Send {
                room,
                text,
                client_id,
            } => ("send", room.as_str(), text.clone(), client_id.clone()),
            Command::History {
                room,
                before,
                limit,
            } => (
                "history",
                room.as_str(),
                before.map(|b| b.to_string()).unwrap_or_default(),
                limit.unwrap_or(DEFAULT_PAGE).to_string(),
            ),
            Command::Refresh { .. } => {
                return Err(Unavailable(
                    "a refresh is decided by Sequencer::refresh, with the verified identity".into(),
                ))
            }
            Command::Ack { .. } => {
                return Err(Unavailable(
                    "an ack is a node's own business (Hub::acknowledge), not the cluster's".into(),
                ))
            }
        };
        self.run(kind, session, room, [first, second, String::new()])
            .await
    }

    /// Gives `session` the rooms of a verified `identity` (`refresh`); refused if the session
    /// was created without a token or for another user.
    pub async fn refresh(
        &self,
        session: &str,
        identity: &Identity,
    ) -> Result<Decision, Unavailable> {
        let user = identity.user.to_string();
        let expires = expiry_ms(identity).to_string();
        self.run(
            "refresh",
            session,
            "",
            [user, rules(Some(identity)), expires],
        )
        .await
    }

    /// Gives `session` an `error` event for a refused command that came on a stream (a
    /// `/commands` reply carries its errors instead); `client_id` names a refused `send`.
    pub async fn push_error(
        &self,
        session: &str,
        error: &ErrorBody,
        client_id: Option<&str>,
    ) -> Result<LogId, Unavailable> {
        let mut body = serde_json::json!({ "k": "error", "s": session, "client_id": client_id });
        let fields = serde_json::to_value(error).expect("an error serializes");
        if let (Some(body), serde_json::Value::Object(fields)) = (body.as_object_mut(), fields) {
            body.extend(fields);
        }
        self.append_record(&body).await
    }

    /// Appends a record no script decides.
    async fn append_record(&self, body: &serde_json::Value) -> Result<LogId, Unavailable> {
        let mut conn = self.conn();
        let id: String = self
            .append
            .key(LOG)
            .key(LAST)
            .key(INTACT)
            .arg(body.to_string())
            .arg(millis(self.retention()))
            .invoke_async(&mut conn)
            .await?;
        parse_entry(&id)
    }

    /// Ends `session` (`DELETE`): it leaves its rooms, and its state is gone.
    pub async fn end(&self, session: &str) -> Result<Decision, Unavailable> {
        self.run("end", session, "", Default::default()).await
    }

    async fn run(
        &self,
        kind: &str,
        session: &str,
        room: &str,
        [first, second, third]: [String; 3],
    ) -> Result<Decision, Unavailable> {
        let config = &self.config;
        let (room_rate, room_burst) = match config.room_rate_limit {
            Some((per_sec, burst)) => (rate(per_sec), burst.to_string()),
            None => (String::new(), String::new()),
        };
        let mut conn = self.conn();
        let reply: Vec<String> = self
            .decide
            .key(session_key(session, ""))
            .key(session_key(session, ":rooms"))
            .key(session_key(session, ":bucket"))
            .key(session_key(session, ":sent"))
            .key(session_key(session, ":sent:order"))
            .key(format!("{PREFIX}room:{room}:bucket"))
            .key(room_key(room))
            .key(IDS)
            .key(LOG)
            .key(LAST)
            .key(DEADLINES)
            .key(session_key(session, ":attach"))
            .key(INTACT)
            .arg(kind)
            .arg(session)
            .arg(room)
            .arg(first)
            .arg(second)
            .arg(rate(config.rate_limit_per_sec))
            .arg(config.rate_limit_burst)
            .arg(room_rate)
            .arg(room_burst)
            .arg(config.max_rooms_per_session)
            .arg(self.history_keep)
            .arg(millis(config.history_max_age))
            .arg(config.dedup_window)
            .arg(millis(self.retention()))
            .arg(MAX_BUCKET_MS)
            .arg(third)
            .invoke_async(&mut conn)
            .await?;
        self.decision(session, room, &reply)
            .ok_or_else(|| Unavailable(format!("a script answered {reply:?}")))
    }

    /// How long the log keeps entries: long enough for a node to rebuild a session that
    /// resumes within its TTL (docs/cluster.md, section 5).
    fn retention(&self) -> Duration {
        self.config.session_ttl + Duration::from_secs(60)
    }

    /// Reads a script's reply; `None` if it is not one.
    fn decision(&self, session: &str, room: &str, reply: &[String]) -> Option<Decision> {
        match reply {
            [status, entry, id, duplicate] if status == "ok" => {
                let id: u64 = id.parse().ok()?;
                let result = if id > 0 {
                    CommandResult::sent(id, duplicate == "1")
                } else {
                    CommandResult::done()
                };
                let entry = match entry.as_str() {
                    "" => None,
                    entry => Some(parse_entry(entry).ok()?),
                };
                Some(Decision { result, entry })
            }
            [status, code, detail, wait] if status == "err" => {
                let wait = Duration::from_micros(wait.parse().ok()?).min(MAX_WAIT);
                let error = self.refusal(code, detail, session, room, wait)?;
                Some(Decision {
                    result: CommandResult::failed(error),
                    entry: None,
                })
            }
            _ => None,
        }
    }

    /// The error a script's refusal stands for, worded as the hub words it.
    fn refusal(
        &self,
        code: &str,
        detail: &str,
        session: &str,
        room: &str,
        wait: Duration,
    ) -> Option<ErrorBody> {
        let config = &self.config;
        Some(match (code, detail) {
            ("unknown_session", _) => refusal::unknown_session(session),
            ("rate_limited", "session") => refusal::session_rate_limited(config, wait),
            ("rate_limited", "room") => refusal::room_rate_limited(room, config, wait),
            ("forbidden", "no_token") => refusal::refresh_without_token(),
            ("forbidden", "other_user") => refusal::refresh_for_another_user(),
            ("forbidden", "room") => refusal::room_forbidden(room),
            ("too_many_rooms", _) => refusal::too_many_rooms(config),
            ("not_in_room", _) => refusal::not_in_room(room),
            _ => return None,
        })
    }
}
