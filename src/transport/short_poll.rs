//! Short polling: `GET /v1/sessions/{id}/poll?after=N&wait=0` answers at once with the events
//! after N (possibly none). It attaches for the length of the request, so it supersedes an
//! open stream, and counts as activity for the session's TTL.

use hyper::Response;

use crate::hub::{Delivery, Hub};
use crate::protocol::{ErrorBody, TransportKind};

use super::{poll_reply, Body, MAX_BATCH};

/// Answers a short poll.
pub fn poll(hub: &Hub, session_id: &str, after: u64) -> Result<Response<Body>, ErrorBody> {
    let mut attachment = hub.attach(session_id, TransportKind::ShortPolling, after)?;
    Ok(match attachment.ready(MAX_BATCH) {
        Delivery::Events(events) => poll_reply(&events, None),
        Delivery::Closed(reason) => poll_reply(&[], Some(reason)),
    })
}
