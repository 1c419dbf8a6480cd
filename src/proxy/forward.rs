//! What the upstream receives: the normalised target, the client's address
//! as far as it can be believed, exactly the credentials tollgate verified
//! or fetched, the route's forwarded claims and the request id. Nothing a
//! client sent can pass for something tollgate vouches for.

use super::{respond, Ctx};
use crate::config::{ClientIpHeader, ServerSettings};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use std::net::IpAddr;

/// Headers only a trusted proxy may set; from anyone else they are dropped.
/// Beyond the three tollgate knows, the ones web frameworks and CDNs read as
/// the client's address, or as the host, port or prefix the client used.
const PROXY_HEADERS: [&str; 11] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
];

/// Headers that may name the client: only the one `server.client_ip_header`
/// names is believed; from a trusted proxy the others are dropped too.
const CLIENT_HEADERS: [&str; 7] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
];

/// Headers that make some backends serve another path than the request
/// line's (IIS URL Rewrite, Symfony, Laravel, Zend) or act as another method
/// (Rails, Express's method-override, Spring's HiddenHttpMethodFilter
/// relatives, Google APIs) — not the ones tollgate checked against the
/// route's path and methods. Dropped from everyone.
const PATH_OVERRIDES: [&str; 5] = [
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers tollgate sets itself: a look-alike with `_` for `-` (which CGI
/// and several frameworks merge with the real one) is dropped.
const OWN_HEADERS: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-request-id"];

/// `name` is one of `list`, or reads as one once `_` is taken for `-`.
fn is_one_of(name: &str, list: &[&str]) -> bool {
    if !name.contains('_') {
        return list.contains(&name);
    }
    list.iter().any(|l| {
        l.len() == name.len()
            && name
                .bytes()
                .zip(l.bytes())
                .all(|(a, b)| (if a == b'_' { b'-' } else { a }) == b)
    })
}

/// The client address as `X-Forwarded-For` carries it. IPv4, nearly every
/// caller, is written without the formatting machinery.
pub fn client_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            let mut buf = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(buf.format(octet));
            }
            out
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

pub use super::client_ip::{client_address, trusted};

/// The client-address headers the upstream receives. From an untrusted
/// peer: `X-Forwarded-For` is the peer, `Forwarded`, `X-Real-IP` and
/// `X-Forwarded-Host` are removed. From a trusted proxy: the header named by
/// `server.client_ip_header` goes on (`X-Forwarded-For` appended to with the
/// peer); the other two are not believed, so they are not passed on as if
/// they were — `X-Forwarded-For` then says what tollgate believes (the
/// client, then the peer), and the other is removed.
fn forwarded_for(
    req: &mut RequestHeader,
    peer: Option<IpAddr>,
    server: &ServerSettings,
) -> Result<()> {
    let Some(peer) = peer.map(|p| p.to_canonical()) else {
        req.remove_header("x-forwarded-for");
        return Ok(());
    };
    let ip = client_ip(peer);
    let named = server.client_ip_header;
    let believed = trusted(peer, &server.trusted_proxies);
    // One pass over the names: removing costs more than looking.
    let present: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            is_one_of(k, &PATH_OVERRIDES)
                || (!believed && is_one_of(k, &PROXY_HEADERS))
                || (believed && k != named.header_name() && is_one_of(k, &CLIENT_HEADERS))
                || (k.contains('_') && is_one_of(k, &OWN_HEADERS))
        })
        .cloned()
        .collect();
    for name in present {
        req.remove_header(&name);
    }
    if !believed {
        req.insert_header("x-forwarded-for", ip)?;
        return Ok(());
    }
    if named != ClientIpHeader::XForwardedFor {
        let client = client_address(peer, req, &server.trusted_proxies, named);
        let value = if client == peer {
            ip
        } else {
            format!("{}, {ip}", client_ip(client))
        };
        req.insert_header("x-forwarded-for", value)?;
        return Ok(());
    }
    let chain: Vec<&str> = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let value = if chain.is_empty() {
        ip
    } else {
        format!("{}, {ip}", chain.join(", "))
    };
    req.insert_header("x-forwarded-for", value)?;
    Ok(())
}

/// A client header whose name reads as `header` once `_` is taken for `-`
/// (`X_Api_Key` for `X-Api-Key`): some upstream frameworks merge the two.
fn lookalikes(req: &RequestHeader, header: &http::HeaderName) -> Vec<http::HeaderName> {
    let target = header.as_str().as_bytes();
    req.headers
        .keys()
        .filter(|name| {
            let n = name.as_str().as_bytes();
            n.len() == target.len()
                && n.contains(&b'_')
                && n.iter()
                    .zip(target)
                    .all(|(a, b)| (if *a == b'_' { b'-' } else { *a }) == *b)
        })
        .cloned()
        .collect()
}

/// Rewrites the upstream request head; see the module docs.
pub fn upstream_request(
    req: &mut RequestHeader,
    ctx: &Ctx,
    peer: Option<IpAddr>,
    tls: bool,
) -> Result<()> {
    // Most paths are already normal: then the client's URI goes as it is.
    // Otherwise the normalised path replaces it, keeping an HTTP/2 request's
    // scheme and authority.
    if req.uri.path_and_query().map(|pq| pq.as_str()) != Some(ctx.target.as_str()) {
        let internal =
            |e: http::Error| Error::because(ErrorType::InternalError, "normalised path", e);
        let mut parts = req.uri.clone().into_parts();
        parts.path_and_query = Some(
            ctx.target
                .parse()
                .map_err(|e: http::uri::InvalidUri| internal(e.into()))?,
        );
        let uri = http::Uri::from_parts(parts).map_err(|e| internal(e.into()))?;
        req.set_uri(uri);
    }
    let Some((state, route)) = ctx.route() else {
        return Ok(());
    };
    forwarded_for(req, peer, &state.config.server)?;
    req.insert_header(
        "x-forwarded-proto",
        http::HeaderValue::from_static(if tls { "https" } else { "http" }),
    )?;
    if let Some(token) = &ctx.upstream_token {
        // The upstream sees tollgate's credentials, never the client's.
        req.insert_header(http::header::AUTHORIZATION, token.as_str())?;
    } else if let Some(verified) = &ctx.verified_authorization {
        // Exactly the credentials that were verified: a second, unverified
        // Authorization header never rides along.
        if req
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .nth(1)
            .is_some()
        {
            req.insert_header(http::header::AUTHORIZATION, verified.clone())?;
        }
    }
    for (claim, header) in &route.forward_claims {
        // The client's own copy (and look-alikes) never reach the upstream.
        req.remove_header(header);
        for alike in lookalikes(req, header) {
            req.remove_header(&alike);
        }
        if let Some(value) = ctx.identity.as_ref().and_then(|id| id.forwarded(claim)) {
            req.insert_header(header.clone(), value)?;
        }
    }
    single_content_length(req)?;
    req.insert_header(respond::REQUEST_ID, ctx.request_id.as_str())?;
    if let Some(trace) = &ctx.trace {
        // tollgate's call is the upstream's parent, whatever the client sent.
        use crate::trace::context::{TRACEPARENT, TRACESTATE};
        req.insert_header(TRACEPARENT, trace.upstream_traceparent())?;
        match &trace.tracestate {
            Some(state) => req.insert_header(TRACESTATE, state.as_str())?,
            None if req.headers.contains_key(TRACESTATE) => {
                req.remove_header(&TRACESTATE);
            }
            None => {}
        }
    }
    Ok(())
}

/// Pingora accepts a `Content-Length` list of one value repeated (`5, 5`,
/// or the header twice) and refuses a list that disagrees (RFC 9110 §8.6);
/// the upstream gets the one value, so a backend that reads such lists its
/// own way cannot frame the body differently.
fn single_content_length(req: &mut RequestHeader) -> Result<()> {
    let all = req.headers.get_all(http::header::CONTENT_LENGTH);
    let mut values = all.iter();
    let first = values.next();
    let listed = values.next().is_some() || first.is_some_and(|v| v.as_bytes().contains(&b','));
    if !listed {
        return Ok(());
    }
    let one = first
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned());
    if let Some(one) = one {
        req.insert_header(http::header::CONTENT_LENGTH, one)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_matches_the_standard_formatting() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.3.45",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().expect("test address");
            assert_eq!(client_ip(ip), ip.to_string());
        }
    }

    fn head(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn server(header: &str) -> ServerSettings {
        let text = format!(
            "server: {{ trusted_proxies: [10.0.0.0/8], client_ip_header: {header} }}\n\
             upstreams: {{ b: {{ peers: [\"127.0.0.1:1\"] }} }}\n\
             routes: [{{ name: a, path_prefix: /, upstream: b, auth: none }}]\n"
        );
        crate::config::from_str_with_env(&text, Vec::new())
            .unwrap()
            .server
    }

    #[test]
    fn only_the_named_header_is_believed_and_passed_on() {
        let sent = [
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=5.6.7.8"),
            ("x-real-ip", "9.9.9.9"),
            ("x-forwarded-host", "h.example"),
        ];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let after = |header: &str, peer: &str| {
            let mut r = head(&sent);
            forwarded_for(&mut r, ip(peer), &server(header)).unwrap();
            let get = |n: &str| r.headers.get(n).map(|v| v.to_str().unwrap().to_string());
            (
                get("x-forwarded-for"),
                get("forwarded"),
                get("x-real-ip"),
                get("x-forwarded-host"),
            )
        };
        let s = |v: &str| Some(v.to_string());
        // An untrusted peer names only itself.
        assert_eq!(
            after("x-forwarded-for", "192.0.2.7"),
            (s("192.0.2.7"), None, None, None)
        );
        assert_eq!(
            after("forwarded", "192.0.2.7"),
            (s("192.0.2.7"), None, None, None)
        );
        // A trusted proxy: the named header goes on, the others do not.
        assert_eq!(
            after("x-forwarded-for", "10.1.2.3"),
            (s("1.2.3.4, 10.1.2.3"), None, None, s("h.example"))
        );
        assert_eq!(
            after("forwarded", "10.1.2.3"),
            (
                s("5.6.7.8, 10.1.2.3"),
                s("for=5.6.7.8"),
                None,
                s("h.example")
            )
        );
        assert_eq!(
            after("x-real-ip", "10.1.2.3"),
            (s("9.9.9.9, 10.1.2.3"), None, s("9.9.9.9"), s("h.example"))
        );
    }

    #[test]
    fn address_and_path_override_headers_do_not_pass_from_a_client() {
        let sent = [
            ("true-client-ip", "1.1.1.1"),
            ("x-client-ip", "1.1.1.2"),
            ("cf-connecting-ip", "1.1.1.3"),
            ("x-forwarded-port", "8443"),
            ("x-forwarded-prefix", "/admin"),
            ("x-original-url", "/admin/x"),
            ("x_rewrite_url", "/admin/y"),
            ("x-http-method-override", "DELETE"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x-real_ip", "6.6.6.7"),
            ("x-other", "kept"),
        ];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // From an untrusted peer nothing of it passes but the unrelated one.
        let mut r = head(&sent);
        forwarded_for(&mut r, ip("192.0.2.7"), &server("x-forwarded-for")).unwrap();
        let names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"x-other") && names.contains(&"x-forwarded-for"));
        // From a trusted proxy the port and prefix pass; other client
        // addresses and path overrides do not.
        let mut r = head(&sent);
        forwarded_for(&mut r, ip("10.1.2.3"), &server("x-forwarded-for")).unwrap();
        let mut names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "x-forwarded-for",
                "x-forwarded-port",
                "x-forwarded-prefix",
                "x-other"
            ]
        );
    }

    #[test]
    fn underscore_lookalikes_of_forwarded_headers_are_found() {
        let r = head(&[
            ("x_api_key", "forged"),
            ("x-api_key", "forged"),
            ("x-other", "ok"),
        ]);
        let found = lookalikes(&r, &http::HeaderName::from_static("x-api-key"));
        assert_eq!(found.len(), 2, "{found:?}");
    }
}
