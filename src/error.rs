//! The one mapping from an error to an HTTP response: the status for each stable code and the
//! JSON body `{"error":{"code","message"}}`.
//!
//! Internals never reach the client: an unexpected fault is logged and answered `internal`.

use hyper::StatusCode;

use crate::protocol::{ErrorBody, ErrorCode};

/// The HTTP status for each error code.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadCommand
        | ErrorCode::InvalidRoom
        | ErrorCode::InvalidName
        | ErrorCode::InvalidText
        | ErrorCode::NotInRoom
        | ErrorCode::TooManyRooms
        | ErrorCode::InvalidAfter
        | ErrorCode::InvalidAck
        | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::UnknownSession | ErrorCode::NotFound | ErrorCode::TransportDisabled => {
            StatusCode::NOT_FOUND
        }
        ErrorCode::PollInProgress => StatusCode::CONFLICT,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::ForbiddenOrigin | ErrorCode::ForbiddenHost | ErrorCode::Forbidden => {
            StatusCode::FORBIDDEN
        }
        ErrorCode::TokenMissing
        | ErrorCode::TokenMalformed
        | ErrorCode::TokenBadSignature
        | ErrorCode::TokenUnsigned
        | ErrorCode::TokenWrongAlgorithm
        | ErrorCode::TokenExpired
        | ErrorCode::TokenNotYetValid => StatusCode::UNAUTHORIZED,
        ErrorCode::ServerFull
        | ErrorCode::ShuttingDown
        | ErrorCode::HistoryUnavailable
        | ErrorCode::BackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON body of an HTTP error.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct HttpError {
    /// The error.
    pub error: ErrorBody,
}
