//! The few pieces of gRPC-over-HTTP/2 the data path needs: status codes, trailers-only answers, the
//! `grpc-timeout` header, and the relay's wait rule (the same as `plan_wait` in controlplane/relay/server.py).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Limited};
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Dagster's own limit on one gRPC message (dagster._grpc: 100 MB), plus the 5-byte message prefix.
pub const MAX_MESSAGE_BYTES: usize = 100 * 1024 * 1024 + 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

pub fn empty_body() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// A trailers-only gRPC answer: HTTP 200, one HEADERS frame carrying the status, no body.
pub fn status_response(code: Code, message: &str) -> Response<Body> {
    let mut response = Response::new(empty_body());
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code as u32));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    response
}

/// gRPC's grpc-message encoding: printable ASCII except '%' as is, every other byte as %XX.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A request's one message, read whole (up to MAX_MESSAGE_BYTES); the answer to send instead if it cannot be.
/// Whole, because a request then leaves in one write, and can be sent again on another road.
pub async fn read_message(body: Incoming, who: &str, path: &str) -> Result<Bytes, Response<Body>> {
    match Limited::new(body, MAX_MESSAGE_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(status_response(
            Code::ResourceExhausted, &format!("{who}: {path}: request larger than {MAX_MESSAGE_BYTES} bytes"))),
        Err(err) => Err(status_response(Code::Internal, &format!("{who}: reading {path}: {err}"))),
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n). None if absent or malformed.
pub fn parse_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// The header value for a wait, in milliseconds (8 digits hold more than a day).
pub fn format_timeout(wait: Duration) -> HeaderValue {
    let millis = wait.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{millis}m")).expect("digits and a unit")
}

/// The relay's waits (seconds in the control command; see `plan_wait` in controlplane/relay/server.py).
#[derive(Clone, Copy, Debug)]
pub struct Waits {
    pub default_wait: Duration,
    pub max_wait: Duration,
    pub no_deadline_above: Duration,
}

impl Default for Waits {
    fn default() -> Self {
        Waits {
            default_wait: Duration::from_secs(60),
            max_wait: Duration::from_secs(600),
            no_deadline_above: Duration::from_secs(86_400),
        }
    }
}

/// (how long to wait for the agent, whether the caller's own deadline bounds that wait).
pub fn plan_wait(time_remaining: Option<Duration>, waits: &Waits) -> (Duration, bool) {
    match time_remaining {
        None => (waits.default_wait.min(waits.max_wait), false),
        Some(t) if t > waits.no_deadline_above => (waits.default_wait.min(waits.max_wait), false),
        Some(t) if t <= waits.max_wait => (t, true),
        Some(_) => (waits.max_wait, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        map
    }

    #[test]
    fn timeouts_parse_in_every_unit_and_refuse_garbage() {
        assert_eq!(parse_timeout(&headers("59999m")), Some(Duration::from_millis(59_999)));
        assert_eq!(parse_timeout(&headers("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(&headers("3M")), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout(&headers("7S")), Some(Duration::from_secs(7)));
        assert_eq!(parse_timeout(&headers("15u")), Some(Duration::from_micros(15)));
        assert_eq!(parse_timeout(&headers("99999999n")), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_timeout(&headers(bad)), None, "{bad:?}");
        }
        assert_eq!(parse_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn the_wait_follows_the_python_relay() {
        let w = Waits::default();
        assert_eq!(plan_wait(None, &w), (Duration::from_secs(60), false));
        assert_eq!(plan_wait(Some(Duration::from_secs(30)), &w), (Duration::from_secs(30), true));
        assert_eq!(plan_wait(Some(Duration::from_secs(3600)), &w), (Duration::from_secs(600), false));
        assert_eq!(plan_wait(Some(Duration::from_secs(99_999 * 3600)), &w), (Duration::from_secs(60), false));
    }

    #[test]
    fn a_status_answer_is_trailers_only_and_its_message_is_percent_encoded() {
        let response = status_response(Code::Unavailable, "no agent: 100% gone\n");
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(response.headers()["grpc-message"], "no agent: 100%25 gone%0A");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(format_timeout(Duration::from_secs(60)), "60000m");
    }
}
