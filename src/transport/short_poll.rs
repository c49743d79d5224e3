//! Short polling: `GET /v1/sessions/{id}/poll?after=N&wait=0` answers at once with the events
//! after N (possibly none). It attaches for the length of the request, so it supersedes an
//! open stream, and counts as activity for the session's TTL.

use hyper::Response;

use crate::hub::{Delivery, Hub};
use crate::metrics::Http;
use crate::protocol::{ErrorBody, TransportKind};

use super::{answer_poll, Body, WRITE_BATCH};

/// Answers a short poll.
pub async fn poll(
    hub: &Hub,
    session_id: &str,
    after: u64,
    http: Http,
) -> Result<Response<Body>, ErrorBody> {
    let mut attachment = hub
        .attach_transport(session_id, TransportKind::ShortPolling, after)
        .await?;
    hub.metrics()
        .attached_over(TransportKind::ShortPolling, http);
    let delivery = attachment.ready(WRITE_BATCH);
    let handed_events = matches!(&delivery, Delivery::Events(events) if !events.is_empty());
    let answer = answer_poll(&attachment, delivery, http);
    hub.release(attachment, handed_events).await;
    Ok(answer)
}
