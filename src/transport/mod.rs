//! Transports: each file adapts a hub session to one way of carrying events over HTTP.
//!
//! A transport attaches to a session (`Hub::attach`), writes the events it is handed in its
//! own framing and gives commands back to the hub. It keeps no chat state of its own. This
//! module holds what they share: the response body type, JSON replies and query parsing.

pub mod commands;
pub mod long_poll;
pub mod short_poll;
pub mod sse;
pub mod websocket;
pub mod ws_echo;
pub mod ws_writer;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::error::{status, HttpError};
use crate::hub::{Attachment, BatchLimit, Delivery};
use crate::metrics::Http;
use crate::protocol::{CloseReason, EncodedEvent, ErrorBody, ErrorCode};

/// Every response body: a full buffer or a stream (SSE).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Most a transport takes for one write (an SSE chunk, a poll reply): 256 events or 256 KiB,
/// whichever comes first (a single larger event goes alone).
pub const WRITE_BATCH: BatchLimit = BatchLimit {
    events: 256,
    bytes: 256 * 1024,
};

/// A body holding these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("replies serialize infallibly");
    json_bytes_response(status, bytes)
}

/// A response of JSON already encoded.
pub fn json_bytes_response(status: StatusCode, bytes: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The response for an error: its status and `{"error":{"code","message"}}`, with
/// `Retry-After` (whole seconds, rounded up) when the error says when to retry.
pub fn error_response(error: ErrorBody) -> Response<Body> {
    let (code, retry_after_ms) = (error.code, error.retry_after_ms);
    let mut response = json_response(status(code), &HttpError { error });
    set_error_headers(&mut response, code, retry_after_ms);
    response
}

/// The headers an error answer carries besides its body: `Retry-After` when the error says
/// when to retry (whole seconds, rounded up, at least 1), and `WWW-Authenticate` on a 401
/// (RFC 9110: it names the scheme that would be accepted).
pub fn set_error_headers(
    response: &mut Response<Body>,
    code: ErrorCode,
    retry_after_ms: Option<u64>,
) {
    let headers = response.headers_mut();
    if let Some(ms) = retry_after_ms {
        headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
    }
    if status(code) == StatusCode::UNAUTHORIZED {
        headers.insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
}

/// Answers a poll with what the attachment delivered, counting it in the metrics.
pub fn answer_poll(attachment: &Attachment, delivery: Delivery, http: Http) -> Response<Body> {
    let response = match &delivery {
        Delivery::Events(events) => poll_body(events, None),
        Delivery::Closed(reason) => poll_body(&[], Some(*reason)),
    };
    if let Delivery::Events(events) = &delivery {
        let metrics = attachment.metrics();
        metrics.delivered(
            attachment.kind(),
            events.iter().map(|(_, e)| e),
            response.len(),
        );
        metrics.delivered_over(attachment.kind(), http, events.len() as u64);
    }
    json_bytes_response(StatusCode::OK, response)
}

/// A poll reply: `{"events":[...]}`, plus `"closed"` when the hub closed the poll.
pub fn poll_reply(events: &[(u64, EncodedEvent)], closed: Option<CloseReason>) -> Response<Body> {
    json_bytes_response(StatusCode::OK, poll_body(events, closed))
}

/// The JSON body of a poll reply.
pub fn poll_body(events: &[(u64, EncodedEvent)], closed: Option<CloseReason>) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(32 + events.iter().map(|(_, e)| e.body.len() + 24).sum::<usize>());
    out.extend_from_slice(b"{\"events\":[");
    for (i, (seq, event)) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        event.write_json(*seq, &mut out);
    }
    out.push(b']');
    if let Some(reason) = closed {
        out.extend_from_slice(b",\"closed\":\"");
        out.extend_from_slice(reason.as_str().as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
    out
}

/// The value of a query parameter (not percent-decoded: every parameter we read is a number).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Reads a poll's `wait` (milliseconds); absent means `default`.
pub fn wait_param(raw: Option<&str>, default: Duration) -> Result<Duration, ErrorBody> {
    match raw {
        None => Ok(default),
        Some(raw) => raw.parse::<u64>().map(Duration::from_millis).map_err(|_| {
            ErrorBody::new(
                ErrorCode::BadRequest,
                format!("wait must be a non-negative integer of milliseconds, got {raw:?}"),
            )
        }),
    }
}

/// Reads a resume point: `Last-Event-ID` wins over `after`; absent means from the start.
pub fn resume_point(last_event_id: Option<&str>, after: Option<&str>) -> Result<u64, ErrorBody> {
    match last_event_id.filter(|id| !id.is_empty()).or(after) {
        None | Some("") => Ok(0),
        Some(raw) => raw.trim().parse::<u64>().map_err(|_| {
            ErrorBody::new(
                ErrorCode::BadRequest,
                format!("after / Last-Event-ID must be a non-negative integer seq, got {raw:?}"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_resume_point() {
        let q = Some("after=5&wait=0&flag");
        assert_eq!(query_param(q, "after"), Some("5"));
        assert_eq!(query_param(q, "wait"), Some("0"));
        assert_eq!(query_param(q, "flag"), Some(""));
        assert_eq!(query_param(q, "nope"), None);
        assert_eq!(resume_point(Some("9"), Some("5")).unwrap(), 9);
        assert_eq!(resume_point(None, None).unwrap(), 0);
        assert_eq!(resume_point(Some(""), Some("5")).unwrap(), 5);
        assert_eq!(
            resume_point(None, Some("-1")).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }
}
