//! Server-Sent Events: `GET /v1/sessions/{id}/sse?after=N` streams `text/event-stream`.
//!
//! Each event is `id: <seq>`, `event: <type>`, `data: <json>`. `Last-Event-ID` wins over
//! `after`. Every stream starts with a `ready` event, sent at once, and a `heartbeat` event
//! keeps it alive after `heartbeat` without an event (the timer restarts with every event).
//! Neither has an `id:` line or a seq: they tell the client that bytes get through (a proxy
//! that buffers or compresses the stream holds them back, and the client falls back), and
//! they are visible to a page, where comments are not. When the hub closes the stream it ends
//! with `event: close` / `data: {"reason": NAME}` and no `id:` line, so that a browser's
//! automatic reconnect does not move its resume point.
//!
//! A stream owns its connection (`connection: close`), so the connection's deadlines are the
//! stream's: a write that waits two heartbeats for the client closes the stream
//! `slow_consumer`, and once the hub closes the stream the connection is gone within the close
//! timeout, even if hyper is stuck writing to a client that stopped reading.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::Response;

use crate::connection::ConnectionWatch;
use crate::hub::{Attachment, Delivery};
use crate::metrics::Http;
use crate::protocol::{CloseReason, EncodedEvent};

use super::{Body, WRITE_BATCH};

/// Sent first: tells EventSource how long to wait before reconnecting by itself, and shows the
/// client an event at once, before any seq (see the module docs).
fn preamble(heartbeat: Duration) -> Bytes {
    Bytes::from(format!(
        "retry: 1000\nevent: ready\ndata: {{\"type\":\"ready\",\"heartbeat_ms\":{}}}\n\n",
        heartbeat.as_millis()
    ))
}

/// Sent after a heartbeat interval without an event.
const HEARTBEAT: &[u8] = b"event: heartbeat\ndata: {\"type\":\"heartbeat\"}\n\n";

/// Appends one event in SSE framing.
pub fn write_event(seq: u64, event: &EncodedEvent, out: &mut Vec<u8>) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b"\nevent: ");
    out.extend_from_slice(event.type_name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    event.write_json(seq, out);
    out.extend_from_slice(b"\n\n");
}

/// The final frame of a stream the hub closed.
pub fn close_frame(reason: CloseReason) -> Bytes {
    Bytes::from(format!(
        "event: close\ndata: {{\"reason\":\"{}\"}}\n\n",
        reason.as_str()
    ))
}

/// An attached stream and its connection's deadlines. Dropped with the response body, which
/// hyper does when the connection ends: if a write deadline ended it, the client stopped
/// reading, and the hub hears so.
struct Stream {
    attachment: Attachment,
    watch: Option<Arc<ConnectionWatch>>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.watch.as_ref().is_some_and(|w| w.timed_out()) {
            self.attachment.close(CloseReason::SlowConsumer);
        }
    }
}

/// The streaming response for an attached session. `watch` is the connection's, when served
/// by [`crate::server`].
pub fn stream(
    attachment: Attachment,
    heartbeat: Duration,
    close_timeout: Duration,
    watch: Option<Arc<ConnectionWatch>>,
    http: Http,
) -> Response<Body> {
    enum Step {
        Deliver(Delivery),
        KeepAlive,
    }
    if let Some(watch) = &watch {
        watch.set_write_timeout(heartbeat * 2);
        let watch = watch.clone();
        attachment.on_close(move || watch.end_within(close_timeout));
    }
    let mut stream = Stream { attachment, watch };
    let frames = async_stream::stream! {
        yield Ok(Frame::data(preamble(heartbeat)));
        loop {
            let attachment = &mut stream.attachment;
            let step = tokio::select! {
                delivery = attachment.next(WRITE_BATCH) => Step::Deliver(delivery),
                _ = tokio::time::sleep(heartbeat) => Step::KeepAlive,
            };
            match step {
                Step::Deliver(Delivery::Events(events)) => {
                    let mut out = Vec::with_capacity(events.iter().map(|(_, e)| e.body.len() + 64).sum());
                    for (seq, event) in &events {
                        write_event(*seq, event, &mut out);
                    }
                    let bytes = out.len();
                    yield Ok(Frame::data(Bytes::from(out)));
                    // Resumed when hyper asks for the next frame: this one is in its writer.
                    let attachment = &stream.attachment;
                    attachment.metrics().delivered(attachment.kind(), events.iter().map(|(_, e)| e), bytes);
                    attachment.metrics().delivered_over(attachment.kind(), http, events.len() as u64);
                }
                Step::Deliver(Delivery::Closed(reason)) => {
                    yield Ok(Frame::data(close_frame(reason)));
                    break;
                }
                Step::KeepAlive => yield Ok(Frame::data(Bytes::from_static(HEARTBEAT))),
            }
        }
    };
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    // no-transform: a proxy that honours it does not compress the stream (which would hold
    // events back in the compressor's buffer).
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // HTTP/1.1: the connection is not reused after the stream (HTTP/2 has no such header:
    // the stream ends, the connection stays).
    if http == Http::H1 {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
