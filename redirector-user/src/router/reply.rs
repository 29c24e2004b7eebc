//! The router's own answers, for requests no upstream answered: the one place that maps why
//! ([`Cause`], from the error's type) to what the client sees.
//!
//! Plain HTTP clients get a 502 or 504 with a text body. gRPC clients get what a gRPC server
//! would send (a "Trailers-Only" response: HTTP 200, `grpc-status`, `grpc-message`): a bare
//! 502 is reported by gRPC libraries as an unknown transport failure, or misread as a message.
//! Both carry [`ERROR_HEADER`], naming the cause for logs and tests.
use std::error::Error;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::upstream::UpstreamError;
use crate::metrics::outcome;

/// Header on responses the router itself produces, naming why.
pub const ERROR_HEADER: &str = "x-redirector-error";

/// gRPC's escaping of `grpc-message`: percent-encode everything outside printable ASCII, and
/// `%` itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// Why the router answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The request's fork could not be reached (and its route does not fall back).
    ForkUnreachable,
    /// The original destination could not be reached.
    UpstreamUnreachable,
    /// No response headers within the request timeout.
    UpstreamTimeout,
    /// The upstream connection failed while the request was in flight.
    UpstreamFailed,
}

/// gRPC status codes the router answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcCode {
    DeadlineExceeded = 4,
    Unavailable = 14,
}

impl Cause {
    /// The cause of `error` for a request that was going to a fork (`to_fork`) or to its
    /// original destination.
    pub fn of(error: &UpstreamError, to_fork: bool) -> Cause {
        match error {
            UpstreamError::Unreachable { .. } if to_fork => Cause::ForkUnreachable,
            UpstreamError::Unreachable { .. } => Cause::UpstreamUnreachable,
            UpstreamError::Timeout { .. } => Cause::UpstreamTimeout,
            UpstreamError::Request { .. } => Cause::UpstreamFailed,
        }
    }

    /// The request's `outcome` label.
    pub fn outcome(self) -> &'static str {
        match self {
            Cause::ForkUnreachable => outcome::FORK_ERROR,
            Cause::UpstreamUnreachable | Cause::UpstreamTimeout | Cause::UpstreamFailed => {
                outcome::UPSTREAM_ERROR
            }
        }
    }

    /// The value of [`ERROR_HEADER`].
    pub fn label(self) -> &'static str {
        match self {
            Cause::ForkUnreachable => "fork-unreachable",
            Cause::UpstreamUnreachable => "upstream-unreachable",
            Cause::UpstreamTimeout => "upstream-timeout",
            Cause::UpstreamFailed => "upstream-error",
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            Cause::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Cause::ForkUnreachable | Cause::UpstreamUnreachable | Cause::UpstreamFailed => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// As gRPC's HTTP mapping has it for 502 and 504, except that a timeout is the deadline
    /// it is (a client may retry UNAVAILABLE at once, not an exceeded deadline).
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Cause::UpstreamTimeout => GrpcCode::DeadlineExceeded,
            Cause::ForkUnreachable | Cause::UpstreamUnreachable | Cause::UpstreamFailed => {
                GrpcCode::Unavailable
            }
        }
    }
}

/// A gRPC request: `content-type: application/grpc` or `application/grpc+<codec>` (not
/// gRPC-Web, which has its own framing).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// The router's answer for `cause`; `error` (with its causes) becomes the message.
pub fn answer(cause: Cause, grpc: bool, error: &dyn Error) -> Response<Full<Bytes>> {
    let message = format!("redirector: {}: {}", cause.label(), chain(error));
    let mut response = if grpc {
        let mut response = Response::new(Full::new(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(cause.grpc_code() as u16));
        let escaped = utf8_percent_encode(&message, GRPC_MESSAGE).to_string();
        if let Ok(value) = HeaderValue::from_str(&escaped) {
            headers.insert("grpc-message", value);
        }
        response
    } else {
        let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
        *response.status_mut() = cause.http_status();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    response
        .headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(cause.label()));
    response
}

/// `error` and its causes, each once, joined by ": ".
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::{io, net::SocketAddr, sync::Arc, time::Duration};

    use http_body_util::BodyExt;

    use super::*;
    use crate::router::upstream::DialError;

    fn addr() -> SocketAddr {
        "10.0.0.7:8080".parse().expect("address")
    }

    fn refused() -> UpstreamError {
        UpstreamError::Unreachable {
            addr: addr(),
            source: Arc::new(DialError::Connect(io::Error::from(
                io::ErrorKind::ConnectionRefused,
            ))),
        }
    }

    fn timeout() -> UpstreamError {
        UpstreamError::Timeout {
            addr: addr(),
            after: Duration::from_secs(2),
        }
    }

    fn grpc_headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).expect("header value"),
        );
        headers
    }

    #[test]
    fn causes_follow_the_error_type() {
        assert_eq!(Cause::of(&refused(), true), Cause::ForkUnreachable);
        assert_eq!(Cause::of(&refused(), false), Cause::UpstreamUnreachable);
        assert_eq!(Cause::of(&timeout(), true), Cause::UpstreamTimeout);
        assert_eq!(
            Cause::UpstreamTimeout.http_status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            Cause::ForkUnreachable.http_status(),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn grpc_requests_get_grpc_statuses() {
        let down = answer(Cause::of(&refused(), true), true, &refused());
        assert_eq!(down.status(), StatusCode::OK);
        assert_eq!(down.headers()["grpc-status"], "14");
        assert_eq!(down.headers()["content-type"], "application/grpc");
        assert_eq!(down.headers()[ERROR_HEADER], "fork-unreachable");
        let message = down.headers()["grpc-message"].to_str().expect("ascii");
        assert!(
            message.starts_with(
                "redirector: fork-unreachable: cannot reach 10.0.0.7:8080: connect failed: "
            ),
            "{message}"
        );
        // Trailers-Only: everything is in the headers, the body is empty.
        assert!(http_body::Body::is_end_stream(down.body()));

        let slow = answer(Cause::of(&timeout(), false), true, &timeout());
        assert_eq!(slow.status(), StatusCode::OK);
        assert_eq!(slow.headers()["grpc-status"], "4");
        assert_eq!(slow.headers()[ERROR_HEADER], "upstream-timeout");
    }

    #[tokio::test]
    async fn plain_requests_get_http_statuses_with_the_cause_once() {
        let response = answer(Cause::UpstreamUnreachable, false, &refused());
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(response.headers().get("grpc-status").is_none());
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(
            text.matches("refused").count(),
            1,
            "each cause is printed once: {text}"
        );
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        let error = io::Error::other("50% lost\nin ünicode");
        let response = answer(Cause::UpstreamFailed, true, &error);
        assert_eq!(
            response.headers()["grpc-message"],
            "redirector: upstream-error: 50%25 lost%0Ain %C3%BCnicode"
        );
    }

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc(&grpc_headers("application/grpc")));
        assert!(is_grpc(&grpc_headers("application/grpc+proto")));
        assert!(!is_grpc(&grpc_headers("application/grpc-web")));
        assert!(!is_grpc(&grpc_headers("application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
