//! What a request head says about where it is going, checked before any
//! route logic: the host it names, and whether it asks for a protocol
//! upgrade.

use crate::error::Refusal;
use pingora::http::authority::raw_target_authority;
use pingora::http::RequestHeader;

/// The host a request is for, as routes match it: the authority of an
/// absolute-form target (`GET http://host/path`) or of an HTTP/2 request,
/// else the `Host` header; without port and without one trailing dot,
/// compared case-insensitively. An HTTP/1.1 request without `Host` is
/// refused (RFC 9112 §3.2), as is one whose authority and `Host` disagree.
pub fn host(req: &RequestHeader) -> Result<Option<&str>, Refusal> {
    let header = match req.headers.get(http::header::HOST) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Refusal::BadRequest("the Host header is not valid".into()))?,
        ),
        None => None,
    };
    let authority = match req.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => match raw_target_authority(req.raw_path()).authority() {
            Some(bytes) => Some(std::str::from_utf8(bytes).map_err(|_| {
                Refusal::BadRequest("the request target's authority is not valid".into())
            })?),
            None => None,
        },
    };
    if header.is_none() && req.version == http::Version::HTTP_11 {
        return Err(Refusal::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        ));
    }
    match (authority.map(normalize_host), header.map(normalize_host)) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => Err(Refusal::BadRequest(
            "the Host header differs from the request target's authority".into(),
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, h) => Ok(h),
    }
}

/// `Example.COM:8080.` -> `Example.COM` (case is left to the comparison):
/// the port and one trailing dot go; `[v6]:port` -> `v6`.
pub fn normalize_host(host: &str) -> &str {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        match host.rsplit_once(':') {
            // A colon inside an unbracketed name is a port separator only
            // when what follows is a port.
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    bare.strip_suffix('.').unwrap_or(bare)
}

/// What a request asks to switch to (`Upgrade`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    None,
    WebSocket,
    /// Anything else (h2c, unknown protocols): never tunnelled.
    Other,
}

pub fn upgrade(req: &RequestHeader) -> Upgrade {
    match req.headers.get(http::header::UPGRADE) {
        None => Upgrade::None,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"websocket") => Upgrade::WebSocket,
        Some(_) => Upgrade::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw_target: &str, host: Option<&str>, v11: bool) -> RequestHeader {
        let mut r = RequestHeader::build("GET", raw_target.as_bytes(), None).unwrap();
        if !v11 {
            r.set_version(http::Version::HTTP_10);
        }
        if let Some(h) = host {
            r.insert_header(http::header::HOST, h).unwrap();
        }
        r
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host("intranet.local."), "intranet.local");
        assert_eq!(normalize_host("Intranet.Local:8080"), "Intranet.Local");
        assert_eq!(normalize_host("intranet.local.:80"), "intranet.local");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("[::1]"), "::1");
        assert_eq!(normalize_host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(normalize_host("a.."), "a.");
    }

    #[test]
    fn the_authority_of_an_absolute_target_wins() {
        let r = req("http://intranet.local/public/x", None, false);
        assert_eq!(host(&r).unwrap(), Some("intranet.local"));
        let r = req(
            "http://intranet.local./public/x",
            Some("intranet.local."),
            true,
        );
        assert_eq!(host(&r).unwrap(), Some("intranet.local"));
        let r = req("/public/x", Some("INTRANET.local.:8080"), true);
        assert_eq!(host(&r).unwrap(), Some("INTRANET.local"));
    }

    #[test]
    fn http11_without_host_is_refused_but_http10_is_not() {
        assert!(matches!(
            host(&req("/x", None, true)),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            host(&req("http://a/x", None, true)),
            Err(Refusal::BadRequest(_))
        ));
        assert_eq!(host(&req("/x", None, false)).unwrap(), None);
    }

    #[test]
    fn an_authority_and_a_host_that_disagree_are_refused() {
        let r = req("http://intranet.local/x", Some("public.example"), true);
        assert!(matches!(host(&r), Err(Refusal::BadRequest(_))));
    }
}
