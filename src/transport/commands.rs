//! `POST /v1/sessions/{id}/commands`: one command object or an array, for the one-way
//! transports (the WebSocket may use it too).
//!
//! Commands are applied in order and the reply lists a result per command:
//! `{"results":[...]}`. If any failed, the status is the first failure's and the body also
//! carries that failure as `"error"`, so a single command reads like any other HTTP error.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use crate::config::Config;
use crate::error::status;
use crate::hub::{CommandResult, Hub};
use crate::metrics::NO_TRANSPORT;
use crate::protocol::{parse_commands, ErrorBody, ErrorCode};

use super::{json_response, set_error_headers, Body};

#[derive(Serialize)]
struct Reply<'a> {
    results: &'a [CommandResult],
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorBody>,
}

/// Reads a request body of at most `limit` bytes, arriving within `timeout`. A body that
/// stalls gets 408 `request_timeout`, and hyper closes the connection (its body was not read
/// to the end).
pub async fn read_body(
    request: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<bytes::Bytes, ErrorBody> {
    let too_large = || {
        ErrorBody::new(
            ErrorCode::TooLarge,
            format!("the body is larger than {limit} bytes"),
        )
    };
    if request.body().size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let collect = Limited::new(request.into_body(), limit).collect();
    let Ok(collected) = tokio::time::timeout(timeout, collect).await else {
        return Err(ErrorBody::new(
            ErrorCode::RequestTimeout,
            format!("the body did not arrive within {} ms", timeout.as_millis()),
        ));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("could not read the body: {e}"),
        )),
    }
}

/// Applies the commands in a request body.
pub async fn post(
    hub: &Hub,
    config: &Config,
    session_id: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ErrorBody> {
    let session = hub.find_session(session_id).await?;
    let body = read_body(request, config.max_message_bytes, config.body_timeout).await?;
    let parsed = parse_commands(&body)?;
    let results = hub.execute(&session, parsed.commands).await;
    let transport = session
        .last_transport()
        .map_or(NO_TRANSPORT, |t| t.as_str());
    for error in results.iter().filter_map(|r| r.error.as_ref()) {
        hub.metrics().error(transport, error.code);
    }
    let error = results.iter().find_map(|r| r.error.as_ref());
    let code = error.map_or(StatusCode::OK, |e| status(e.code));
    let mut response = json_response(
        code,
        &Reply {
            results: &results,
            error,
        },
    );
    if let Some(error) = error {
        set_error_headers(&mut response, error.code, error.retry_after_ms);
    }
    Ok(response)
}
