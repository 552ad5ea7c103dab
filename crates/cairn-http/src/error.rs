//! The JSON error body every service returns.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Error kinds on the wire; each maps to one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    /// A valid token without the scope the call needs.
    Forbidden,
    NotFound,
    Conflict,
    /// A request body over the route's limit.
    TooLarge,
    /// The service cannot take the request now (its request-body budget stays in use); retry
    /// later.
    Unavailable,
    /// The store is full.
    InsufficientStorage,
    /// Stored data failed its checks.
    Corrupt,
    Internal,
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict => StatusCode::CONFLICT,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            Self::Corrupt => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Internal | Self::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// `{"error": {"kind", "message"}}`
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// An error as a service reports it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, m)
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }

    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        (status, axum::Json(ErrorBody { error: self })).into_response()
    }
}

/// An error and its sources on one line (`outer: inner: innermost`), for API messages and
/// job logs: each level once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
