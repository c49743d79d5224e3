//! The hub's own settings, built by the server from its [`Config`](crate::config::Config):
//! the hub knows nothing of the layers above it.

use std::time::Duration;

use super::history::Durability;
use super::session::Budget;

/// Limits and intervals of the session core. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Sustained commands per second per session.
    pub rate_limit_per_sec: f64,
    /// Commands a session may send at once before the sustained rate applies.
    pub rate_limit_burst: f64,
    /// How long a session with no transport attached lives.
    pub session_ttl: Duration,
    /// Events kept per session for resume.
    pub replay_window: usize,
    /// Bytes kept per session for resume.
    pub replay_bytes: usize,
    /// How far an attached stream may fall behind before it is closed `slow_consumer`.
    pub outbox: Budget,
    /// Messages kept per room and sent as `history` on join.
    pub history_len: usize,
    /// Messages older than this are not sent in `history` or scrollback.
    pub history_max_age: Duration,
    /// Whether a message is broadcast before or after its write to the history store.
    pub durability: Durability,
    /// Presence and typing changes: at once in a quiet room, at most once per interval.
    pub presence_interval: Duration,
    /// Rooms up to this many members tell every name; larger ones a count and a sample.
    pub presence_list_limit: usize,
    /// A room's message rate, `(per second, burst)`; `None`: unlimited.
    pub room_rate_limit: Option<(f64, f64)>,
    /// Threads that push events into sessions.
    pub fanout_threads: usize,
    /// Rooms one session may be in at once.
    pub max_rooms_per_session: usize,
    /// Rooms kept; the least recently used empty rooms are dropped past this.
    pub max_rooms: usize,
    /// Sessions held at once.
    pub max_sessions: usize,
    /// Recent `client_id`s remembered per session to recognise retried sends.
    pub dedup_window: usize,
    /// Checks the tokens of `refresh` commands, when the server authenticates users.
    pub tokens: Option<std::sync::Arc<dyn super::TokenVerifier>>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            rate_limit_per_sec: 20.0,
            rate_limit_burst: 40.0,
            session_ttl: Duration::from_secs(30),
            replay_window: 1024,
            replay_bytes: 4 << 20,
            outbox: Budget {
                events: 768,
                bytes: 1 << 20,
            },
            history_len: 50,
            history_max_age: Duration::from_secs(30 * 24 * 3600),
            durability: Durability::Normal,
            presence_interval: Duration::from_millis(250),
            presence_list_limit: 1000,
            room_rate_limit: None,
            fanout_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_rooms_per_session: 64,
            max_rooms: 10_000,
            max_sessions: 100_000,
            dedup_window: 64,
            tokens: None,
        }
    }
}

impl HubConfig {
    /// Sets the sustained command rate; the burst is twice that.
    pub fn with_rate_limit(mut self, per_sec: f64) -> Self {
        self.rate_limit_per_sec = per_sec;
        self.rate_limit_burst = per_sec * 2.0;
        self
    }
}
