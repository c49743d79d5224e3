//! The errors a command can be refused with, made in one place for every sequencer (the
//! hub's own decisions, and the cluster's scripts in `crate::cluster::sequencer`), so a
//! refusal reads the same whichever decided it.

use std::time::Duration;

use super::HubConfig;
use crate::protocol::{ErrorBody, ErrorCode};

/// The session is not known (never was, or ended).
pub(crate) fn unknown_session(id: &str) -> ErrorBody {
    let shown: String = id.chars().take(40).collect();
    ErrorBody::new(
        ErrorCode::UnknownSession,
        format!("no session {shown:?} (it may have expired)"),
    )
}

/// A poll while another poll of the session is held.
pub(crate) fn poll_in_progress() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::PollInProgress,
        "another poll of this session is in progress; one poll at a time",
    )
}

/// A command for a room the session has not joined.
pub(crate) fn not_in_room(room: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotInRoom,
        format!("not in room {room:?}; join it first"),
    )
}

/// A join the session's identity does not allow.
pub(crate) fn room_forbidden(room: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Forbidden,
        format!("your token does not let you join room {room:?}"),
    )
}

/// A join past the rooms a session may be in.
pub(crate) fn too_many_rooms(config: &HubConfig) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::TooManyRooms,
        format!(
            "a session may be in at most {} rooms",
            config.max_rooms_per_session
        ),
    )
}

/// A command past the session's rate; a token is there after `wait`.
pub(crate) fn session_rate_limited(config: &HubConfig, wait: Duration) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::RateLimited,
        format!(
            "more than {} commands/s (burst {}); slow down and retry",
            config.rate_limit_per_sec, config.rate_limit_burst
        ),
    )
    .retry_after(wait)
}

/// A send past the room's message rate; a token is there after `wait`.
pub(crate) fn room_rate_limited(room: &str, config: &HubConfig, wait: Duration) -> ErrorBody {
    let (per_sec, burst) = config.room_rate_limit.unwrap_or_default();
    ErrorBody::new(
        ErrorCode::RateLimited,
        format!("room {room:?} takes at most {per_sec} messages/s (burst {burst}); retry later"),
    )
    .retry_after(wait)
}

/// A `refresh` of a session created without a token.
pub(crate) fn refresh_without_token() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Forbidden,
        "this session was created without a token",
    )
}

/// A `refresh` with another user's token.
pub(crate) fn refresh_for_another_user() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Forbidden,
        "a refresh token must be for the session's own user",
    )
}

/// The server holds `max_sessions` sessions.
pub(crate) fn server_full() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::ServerFull,
        "the server holds its maximum number of sessions; try again later",
    )
}
