//! Errors in each protocol's own shape.
//!
//! Handlers produce one [`ApiError`] (status, kind, message, param); the
//! protocol wrapper that the route returns decides the body: OpenAI's
//! `{"error":{...}}` or Anthropic's `{"type":"error","error":{...}}`.
//! Client mistakes are 4xx and not logged as failures; internal errors are
//! logged once, here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::chat::template::TemplateError;
use crate::engine::EngineError;

/// What went wrong, independent of protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    NotFound,
    PayloadTooLarge,
    /// The client took too long to send its request.
    RequestTimeout,
    /// The queue is full: try again shortly.
    Overloaded,
    /// The server is shutting down.
    Unavailable,
    Internal,
}

/// The API a route speaks. Errors raised outside a handler (auth, limits,
/// overload, panics, unknown routes) take the shape of the protocol the
/// path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAI,
    Anthropic,
}

impl Protocol {
    /// Anthropic for `/v1/messages` and below; OpenAI for everything else.
    pub fn for_path(path: &str) -> Protocol {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Protocol::Anthropic
        } else {
            Protocol::OpenAI
        }
    }

    /// The error as a whole response in this protocol's shape.
    pub fn error_response(self, err: ApiError) -> Response {
        match self {
            Protocol::OpenAI => OpenAIError(err).into_response(),
            Protocol::Anthropic => AnthropicError(err).into_response(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The offending request field (OpenAI's `param`).
    pub param: Option<String>,
    /// A machine-readable code (OpenAI's `code`), e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::invalid(message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Internal,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn of_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Authentication, message).with_code("invalid_api_key")
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::PayloadTooLarge, message)
    }

    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::RequestTimeout, message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Overloaded, message).with_code("rate_limit_exceeded")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Unavailable, message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Parse a JSON body, naming the offending field on failure.
    pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "the request body is empty; expected a JSON object",
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::invalid(format!("the request body is not valid JSON: {inner}"))
            } else if path == "." {
                ApiError::invalid(format!("invalid request: {inner}"))
            } else {
                ApiError::invalid_param(&path, format!("invalid request: {path}: {inner}"))
            }
        })
    }

    fn status(&self, overloaded: StatusCode) -> StatusCode {
        match self.kind {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Overloaded => overloaded,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn log_if_internal(&self) {
        if self.kind == ErrorKind::Internal {
            tracing::error!(cause = %self.message, "internal error");
        }
    }

    /// OpenAI's error object (the value of `"error"`).
    pub fn openai_body(&self) -> serde_json::Value {
        // OpenAI answers a bad key with `invalid_request_error` and code
        // `invalid_api_key`.
        let kind = match self.kind {
            ErrorKind::InvalidRequest
            | ErrorKind::Authentication
            | ErrorKind::NotFound
            | ErrorKind::PayloadTooLarge
            | ErrorKind::RequestTimeout => "invalid_request_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::Unavailable | ErrorKind::Internal => "server_error",
        };
        json!({ "message": self.message, "type": kind, "param": self.param, "code": self.code })
    }

    /// Anthropic's whole error body.
    pub fn anthropic_body(&self) -> serde_json::Value {
        let kind = match self.kind {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::RequestTimeout => "invalid_request_error",
            ErrorKind::Overloaded | ErrorKind::Unavailable => "overloaded_error",
            ErrorKind::Internal => "api_error",
        };
        json!({ "type": "error", "error": { "type": kind, "message": self.message } })
    }
}

impl From<TemplateError> for ApiError {
    /// A template that raises rejects the conversation's shape (roles out of
    /// order, say): the client's to fix.
    fn from(err: TemplateError) -> Self {
        match err {
            TemplateError::Render(msg) => ApiError::invalid(format!(
                "the model's chat template rejected the messages: {msg}"
            )),
            TemplateError::Syntax(msg) => {
                ApiError::internal(format!("the chat template does not compile: {msg}"))
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::PromptTooLong { .. } => {
                ApiError::invalid(err.to_string()).with_code("context_length_exceeded")
            }
            EngineError::EngineLost(_) => ApiError::unavailable(err.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// An error returned from an OpenAI route.
#[derive(Debug)]
pub struct OpenAIError(pub ApiError);

/// `?` works on every error a handler meets, whatever its protocol.
macro_rules! protocol_from {
    ($wrapper:ident) => {
        impl From<ApiError> for $wrapper {
            fn from(err: ApiError) -> Self {
                $wrapper(err)
            }
        }
        impl From<EngineError> for $wrapper {
            fn from(err: EngineError) -> Self {
                $wrapper(err.into())
            }
        }
        impl From<TemplateError> for $wrapper {
            fn from(err: TemplateError) -> Self {
                $wrapper(err.into())
            }
        }
    };
}

protocol_from!(OpenAIError);

impl IntoResponse for OpenAIError {
    fn into_response(self) -> Response {
        self.0.log_if_internal();
        let status = self.0.status(StatusCode::TOO_MANY_REQUESTS);
        (status, Json(json!({ "error": self.0.openai_body() }))).into_response()
    }
}

/// An error returned from an Anthropic route.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

protocol_from!(AnthropicError);

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        self.0.log_if_internal();
        // 529 is Anthropic's own "overloaded" status.
        let overloaded = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        // A shutting-down server is "overloaded" to Anthropic's clients too:
        // the SDKs retry 529, as they retry OpenAI's 503.
        let status = if self.0.kind == ErrorKind::Unavailable {
            overloaded
        } else {
            self.0.status(overloaded)
        };
        (status, Json(self.0.anthropic_body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Req {
        messages: Vec<String>,
        temperature: Option<f32>,
    }

    #[test]
    fn names_the_mistyped_field() {
        let err =
            ApiError::parse_json::<Req>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert_eq!(err.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn malformed_json_and_empty_body_are_invalid_requests() {
        for body in [&b"{\"messages\": ["[..], b"", b"  "] {
            let err = ApiError::parse_json::<Req>(body).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidRequest);
        }
        let missing = ApiError::parse_json::<Req>(b"{}").unwrap_err();
        assert!(missing.message.contains("messages"), "{}", missing.message);
    }

    #[test]
    fn service_errors_take_each_protocols_status() {
        use axum::response::IntoResponse;
        let cases = [
            (ApiError::unauthorized("no key"), 401, 401),
            (ApiError::payload_too_large("big"), 413, 413),
            (ApiError::request_timeout("slow"), 408, 408),
            (ApiError::overloaded("full"), 429, 529),
            (ApiError::unavailable("stopping"), 503, 529),
        ];
        for (err, openai, anthropic) in cases {
            assert_eq!(
                OpenAIError(err.clone()).into_response().status().as_u16(),
                openai,
                "{err:?}"
            );
            assert_eq!(
                AnthropicError(err).into_response().status().as_u16(),
                anthropic
            );
        }
        assert_eq!(
            ApiError::unauthorized("x").openai_body()["code"],
            "invalid_api_key"
        );
        assert_eq!(
            ApiError::unauthorized("x").anthropic_body()["error"]["type"],
            "authentication_error"
        );
        assert_eq!(
            ApiError::overloaded("x").anthropic_body()["error"]["type"],
            "overloaded_error"
        );
        assert_eq!(Protocol::for_path("/v1/messages"), Protocol::Anthropic);
        assert_eq!(
            Protocol::for_path("/v1/messages/count_tokens"),
            Protocol::Anthropic
        );
        assert_eq!(Protocol::for_path("/v1/messagesX"), Protocol::OpenAI);
        assert_eq!(Protocol::for_path("/v1/chat/completions"), Protocol::OpenAI);
    }

    #[test]
    fn shapes() {
        let e = ApiError::invalid_param("max_tokens", "too big");
        assert_eq!(e.openai_body()["type"], "invalid_request_error");
        assert_eq!(e.openai_body()["param"], "max_tokens");
        assert_eq!(e.anthropic_body()["type"], "error");
        assert_eq!(e.anthropic_body()["error"]["type"], "invalid_request_error");
    }
}
