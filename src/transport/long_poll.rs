//! Long polling: `GET /v1/sessions/{id}/poll?after=N&wait=MS` is held until an event after N
//! exists or MS pass. One poll per session at a time: a second gets 409 `poll_in_progress`.
//! A poll the hub closes (superseded, shutdown, expired) answers `{"events":[],"closed":NAME}`.

use std::time::Duration;

use hyper::Response;

use crate::hub::{Delivery, Hub};
use crate::metrics::Http;
use crate::protocol::{ErrorBody, TransportKind};

use super::{answer_poll, Body, WRITE_BATCH};

/// Holds a long poll until events, the wait, or a close.
pub async fn poll(
    hub: &Hub,
    session_id: &str,
    after: u64,
    wait: Duration,
    http: Http,
) -> Result<Response<Body>, ErrorBody> {
    let mut attachment = hub
        .attach_transport(session_id, TransportKind::LongPolling, after)
        .await?;
    hub.metrics()
        .attached_over(TransportKind::LongPolling, http);
    let delivery = tokio::select! {
        delivery = attachment.next(WRITE_BATCH) => delivery,
        _ = tokio::time::sleep(wait) => Delivery::Events(Vec::new()),
    };
    let handed_events = matches!(&delivery, Delivery::Events(events) if !events.is_empty());
    let answer = answer_poll(&attachment, delivery, http);
    hub.release(attachment, handed_events).await;
    Ok(answer)
}
