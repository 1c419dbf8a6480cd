//! What the upstream receives: the normalised target, the client's address
//! as far as it can be believed, exactly the credentials tollgate verified
//! or fetched, the route's forwarded claims and the request id. Nothing a
//! client sent can pass for something tollgate vouches for.

use super::{respond, Ctx};
use crate::config::Cidr;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use std::net::IpAddr;

/// Headers only a trusted proxy may set; from anyone else they are dropped.
const PROXY_HEADERS: [&str; 3] = ["forwarded", "x-real-ip", "x-forwarded-host"];

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

pub fn trusted(peer: IpAddr, proxies: &[Cidr]) -> bool {
    proxies.iter().any(|c| c.contains(peer))
}

/// The client's address as limits key it: the peer's, or — when the peer is
/// a trusted proxy — the last address of `X-Forwarded-For` (else of the
/// `for=` parameters of `Forwarded`) that is not a trusted proxy itself
/// (the one the nearest trusted hop saw).
pub fn client_address(peer: IpAddr, req: &RequestHeader, proxies: &[Cidr]) -> IpAddr {
    if !trusted(peer, proxies) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    if hops.is_empty() {
        hops = req
            .headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split([',', ';']))
            .filter_map(forwarded_for_param)
            .collect();
    }
    hops.into_iter()
        .rev()
        .find(|a| !trusted(*a, proxies))
        .unwrap_or(peer)
}

/// The address of one `for=` parameter of `Forwarded` (RFC 7239): a bare
/// IPv4 address, or quoted, IPv6 in brackets, either with a port.
fn forwarded_for_param(param: &str) -> Option<IpAddr> {
    let (name, value) = param.trim().split_once('=')?;
    if !name.trim().eq_ignore_ascii_case("for") {
        return None;
    }
    let value = value.trim().trim_matches('"');
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    value
        .parse()
        .ok()
        .or_else(|| value.rsplit_once(':')?.0.parse().ok())
}

/// `X-Forwarded-For`: appended to when the peer is a trusted proxy, else
/// replaced by the peer's address (a client cannot name someone else).
fn forwarded_for(req: &mut RequestHeader, peer: Option<IpAddr>, proxies: &[Cidr]) -> Result<()> {
    let Some(peer) = peer else {
        req.remove_header("x-forwarded-for");
        return Ok(());
    };
    let ip = client_ip(peer);
    if !trusted(peer, proxies) {
        // One pass over the names: removing costs more than looking.
        let present: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|k| PROXY_HEADERS.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in present {
            req.remove_header(&name);
        }
        req.insert_header("x-forwarded-for", ip)?;
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
    forwarded_for(req, peer, &state.config.server.trusted_proxies)?;
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
    req.insert_header(respond::REQUEST_ID, ctx.request_id.as_str())?;
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

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = [Cidr::parse("10.0.0.0/8").unwrap()];
        let mut r = head(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
        ]);
        forwarded_for(&mut r, Some("192.0.2.7".parse().unwrap()), &proxies).unwrap();
        assert_eq!(r.headers["x-forwarded-for"], "192.0.2.7");
        assert!(r.headers.get("forwarded").is_none());
        assert!(r.headers.get("x-real-ip").is_none());

        let mut r = head(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4")]);
        forwarded_for(&mut r, Some("10.1.2.3".parse().unwrap()), &proxies).unwrap();
        assert_eq!(r.headers["x-forwarded-for"], "1.2.3.4, 10.1.2.3");
        assert_eq!(r.headers["forwarded"], "for=1.2.3.4");
    }

    #[test]
    fn the_client_address_comes_from_trusted_hops_only() {
        let proxies = [Cidr::parse("10.0.0.0/8").unwrap()];
        let r = head(&[("x-forwarded-for", "6.6.6.6, 192.0.2.9, 10.0.0.2")]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_address(ip("10.0.0.1"), &r, &proxies),
            ip("192.0.2.9")
        );
        assert_eq!(
            client_address(ip("198.51.100.1"), &r, &proxies),
            ip("198.51.100.1")
        );
        let none = head(&[]);
        assert_eq!(
            client_address(ip("10.0.0.1"), &none, &proxies),
            ip("10.0.0.1")
        );
        let mut fwd = RequestHeader::build("GET", b"/", None).unwrap();
        fwd.insert_header(
            "forwarded",
            "for=203.0.113.9:4711;proto=https, for=\"[2001:db8::1]:80\", for=10.0.0.2",
        )
        .unwrap();
        assert_eq!(
            client_address(ip("10.0.0.1"), &fwd, &proxies),
            ip("2001:db8::1")
        );
        fwd.remove_header("forwarded");
        fwd.insert_header("forwarded", "for=203.0.113.9:4711, for=unknown")
            .unwrap();
        assert_eq!(
            client_address(ip("10.0.0.1"), &fwd, &proxies),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(ip("198.51.100.1"), &fwd, &proxies),
            ip("198.51.100.1")
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
