//! What a browser could do to a node it can reach: a web page the operator has open may
//! send requests to a node on loopback or the LAN. Two defences, applied to every route
//! the node serves:
//!
//! - **DNS rebinding:** a page on `evil.example` whose name is re-pointed at 127.0.0.1 talks
//!   to the node as a same-origin page, but its requests carry `Host: evil.example`. So the
//!   `Host` must be an IP address, `localhost`, or a name the operator allowed.
//! - **Cross-site requests (CSRF):** a page may POST to any address, but its browser names
//!   the page in `Origin`. A request with an `Origin` must come from the node's own origin
//!   (the same host and port as it was sent to); one without comes from a program, not a
//!   page. And a body the node reads must say `Content-Type: application/json`, which a
//!   page can only send after a CORS preflight that the node never answers.

use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Which `Host` names the node answers besides IP addresses and `localhost`.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    pub allowed_hosts: Vec<String>,
}

/// Why a request was refused: the status and a message an operator can act on.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

fn refuse(status: StatusCode, message: String) -> Result<(), Refusal> {
    Err(Refusal { status, message })
}

/// The host part of a `Host` header or an origin's authority, lower-cased, without the port.
fn host_of(authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.contains(':') => host.to_string(),
        _ => authority,
    }
}

/// Checks one request's headers (method, Host, Origin, Content-Type).
pub fn check(policy: &HostPolicy, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
    let text = |name| headers.get(name).map(|v| v.to_str().map(str::to_string));
    let host = match text(header::HOST) {
        Some(Ok(h)) => h,
        Some(Err(_)) => return refuse(StatusCode::BAD_REQUEST, "the Host header is not text".into()),
        None => return refuse(StatusCode::BAD_REQUEST, "a request needs a Host header".into()),
    };
    let name = host_of(&host);
    let allowed = name == "localhost"
        || name.parse::<std::net::IpAddr>().is_ok()
        || policy.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&name));
    if !allowed {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this node does not answer for host {name:?} (use its IP address, or add the name to [http] allowed_hosts)"
            ),
        );
    }
    match text(header::ORIGIN) {
        None => {}
        Some(Ok(origin)) => {
            let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
            if !authority.eq_ignore_ascii_case(host.trim()) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "a request from the web page at {origin} is refused: only the node's own pages may call it"
                    ),
                );
            }
        }
        Some(Err(_)) => return refuse(StatusCode::FORBIDDEN, "the Origin header is not text".into()),
    }
    if *method == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent as Content-Type: application/json".into(),
            );
        }
    }
    Ok(())
}

/// The middleware: refuses what `check` refuses, in the API's error shape.
pub async fn guard(policy: Arc<HostPolicy>, req: Request, next: Next) -> Response {
    match check(&policy, req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => crate::http::api_error(r.status, "invalid_request_error", r.message, None).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_must_be_addresses_localhost_or_allowed_names() {
        let p = HostPolicy { allowed_hosts: vec!["gw-1.lan".into()] };
        let get = |host: &str| check(&p, &Method::GET, &headers(&[("host", host)]));
        for ok in
            ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080", "10.0.0.5", "gw-1.lan:8080", "GW-1.LAN"]
        {
            assert!(get(ok).is_ok(), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example"] {
            assert_eq!(get(bad).unwrap_err().status, StatusCode::MISDIRECTED_REQUEST, "{bad}");
        }
        assert_eq!(check(&p, &Method::GET, &HeaderMap::new()).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn only_the_nodes_own_pages_may_call_it_and_bodies_are_json() {
        let p = HostPolicy::default();
        let host = ("host", "127.0.0.1:8080");
        let json = ("content-type", "application/json; charset=utf-8");
        assert!(check(&p, &Method::POST, &headers(&[host, json])).is_ok(), "a program: no Origin");
        assert!(check(&p, &Method::POST, &headers(&[host, json, ("origin", "http://127.0.0.1:8080")])).is_ok());
        for origin in ["http://evil.example", "http://127.0.0.1:9999", "null"] {
            let r = check(&p, &Method::POST, &headers(&[host, json, ("origin", origin)]));
            assert_eq!(r.unwrap_err().status, StatusCode::FORBIDDEN, "{origin}");
        }
        for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/jsonx"] {
            let r = check(&p, &Method::POST, &headers(&[host, ("content-type", ct)]));
            assert_eq!(r.unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        }
        assert_eq!(check(&p, &Method::POST, &headers(&[host])).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(check(&p, &Method::GET, &headers(&[host])).is_ok(), "a GET has no body to type");
    }
}
