//! The client's address behind trusted proxies: one header, the one the
//! operator names (`server.client_ip_header`), walked from the right.
//!
//! Every hop appends what it saw, so only the right end of the header was
//! written by proxies tollgate trusts; everything left of the first entry
//! that is not a trusted proxy was written by the client (nginx's
//! `real_ip_recursive`, Envoy's `xff_num_trusted_hops`). The walk therefore
//! never looks further left than that entry, and never at another header:
//! nothing a client behind a trusted proxy can send moves the result.

use crate::config::{Cidr, ClientIpHeader};
use pingora::http::RequestHeader;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub fn trusted(peer: IpAddr, proxies: &[Cidr]) -> bool {
    proxies.iter().any(|c| c.contains(peer))
}

/// The client's address as limits key it: the peer's, unless the peer is a
/// trusted proxy. Then the entries of `header` are walked from the right:
/// trusted proxies are skipped, the first other address is the client; an
/// entry that does not parse ends the walk, and the last trusted hop (the
/// last address skipped, or the peer) is the client.
pub fn client_address(
    peer: IpAddr,
    req: &RequestHeader,
    proxies: &[Cidr],
    header: ClientIpHeader,
) -> IpAddr {
    // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6
    // (`::ffff:a.b.c.d`): they are IPv4 clients, not one IPv6 /64.
    let peer = peer.to_canonical();
    if !trusted(peer, proxies) {
        return peer;
    }
    let mut last_trusted = peer;
    let lines: Vec<&[u8]> = req
        .headers
        .get_all(header.header_name())
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    for line in lines.into_iter().rev() {
        // Empty list elements are not entries (RFC 9110 §5.6.1).
        for entry in line
            .rsplit(|&b| b == b',')
            .filter(|e| !e.trim_ascii().is_empty())
        {
            let parsed = std::str::from_utf8(entry).ok().and_then(|e| match header {
                ClientIpHeader::Forwarded => forwarded_for(e),
                ClientIpHeader::XForwardedFor | ClientIpHeader::XRealIp => address(e),
            });
            match parsed {
                None => return last_trusted,
                Some(ip) if trusted(ip, proxies) => last_trusted = ip,
                Some(ip) => return ip,
            }
        }
    }
    last_trusted
}

/// A port as RFC 7239 allows it: digits, or an obfuscated `_name`.
fn port(text: &str) -> bool {
    let obfuscated = text.len() > 1
        && text.starts_with('_')
        && text[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    obfuscated || text.parse::<u16>().is_ok()
}

/// One address as proxies write it: `203.0.113.8`, `203.0.113.8:4711`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`. IPv4-mapped IPv6
/// addresses come out as IPv4, so one client has one key.
pub fn address(text: &str) -> Option<IpAddr> {
    let text = text.trim_ascii();
    let ip = if let Some(rest) = text.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(port) {
            return None;
        }
        IpAddr::V6(ip.parse::<Ipv6Addr>().ok()?)
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else {
        let (ip, p) = text.rsplit_once(':')?;
        if !port(p) {
            return None;
        }
        IpAddr::V4(ip.parse::<Ipv4Addr>().ok()?)
    };
    Some(ip.to_canonical())
}

/// The address of one `Forwarded` element (RFC 7239): its `for=` parameter,
/// quoted or not. An element without one (or with `for=unknown`, or an
/// obfuscated name) does not parse.
pub fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim_ascii()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim_ascii())
    })?;
    let value = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => value,
    };
    address(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn head(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn proxies() -> Vec<Cidr> {
        vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("2001:db8:ffff::/48").unwrap(),
        ]
    }

    #[test]
    fn addresses_parse_with_ports_and_brackets() {
        for (text, want) in [
            ("203.0.113.8", "203.0.113.8"),
            (" 203.0.113.8:4711 ", "203.0.113.8"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("[2001:db8::1]:_hidden", "2001:db8::1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
        ] {
            assert_eq!(address(text), Some(ip(want)), "{text}");
        }
        for junk in [
            "",
            "unknown",
            "_hidden",
            "203.0.113.8:",
            "203.0.113.8:99999",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "2001:db8::1:4711:x",
            "203.0.113.8 junk",
            "[203.0.113.8]",
        ] {
            assert_eq!(address(junk), None, "{junk:?}");
        }
        assert_eq!(
            forwarded_for(r#" for="[2001:db8::1]:4711";proto=https"#),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            forwarded_for("proto=https;FOR=192.0.2.60"),
            Some(ip("192.0.2.60"))
        );
        assert_eq!(forwarded_for("for=unknown"), None);
        assert_eq!(forwarded_for("proto=https"), None);
        assert_eq!(forwarded_for(r#"for="192.0.2.60"#), None);
    }

    #[test]
    fn the_walk_skips_trusted_hops_and_stops_at_junk() {
        let p = proxies();
        let xff = ClientIpHeader::XForwardedFor;
        let walk =
            |peer: &str, h: &[(&str, &str)], header| client_address(ip(peer), &head(h), &p, header);
        // Untrusted peers are the client, whatever they send.
        assert_eq!(
            walk("198.51.100.1", &[("x-forwarded-for", "1.2.3.4")], xff),
            ip("198.51.100.1")
        );
        let chain = [("x-forwarded-for", "6.6.6.6, 192.0.2.9, 10.0.0.2")];
        assert_eq!(walk("10.0.0.1", &chain, xff), ip("192.0.2.9"));
        // The review's case: junk before the client's `ip:port`.
        let junk = [("x-forwarded-for", "junk, 203.0.113.8:4711")];
        assert_eq!(walk("10.0.0.1", &junk, xff), ip("203.0.113.8"));
        // Junk right of the client: the last trusted hop.
        let stop = [("x-forwarded-for", "1.2.3.4, junk, 10.0.0.2")];
        assert_eq!(walk("10.0.0.1", &stop, xff), ip("10.0.0.2"));
        // Only the named header counts.
        let both = [
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=203.0.113.9:4711"),
        ];
        assert_eq!(
            walk("10.0.0.1", &both, ClientIpHeader::Forwarded),
            ip("203.0.113.9")
        );
        assert_eq!(
            walk("10.0.0.1", &both, ClientIpHeader::XRealIp),
            ip("10.0.0.1")
        );
        // Several lines are one list, in order; empty elements are skipped.
        let lines = [
            ("forwarded", "for=6.6.6.6"),
            (
                "forwarded",
                r#"for="[2001:db8::1]:80";proto=https,, for=10.0.0.2"#,
            ),
        ];
        assert_eq!(
            walk("10.0.0.1", &lines, ClientIpHeader::Forwarded),
            ip("2001:db8::1")
        );
        // Nothing but trusted hops: the farthest of them.
        let hops = [("x-real-ip", "10.9.9.9")];
        assert_eq!(
            walk("10.0.0.1", &hops, ClientIpHeader::XRealIp),
            ip("10.9.9.9")
        );
        assert_eq!(walk("10.0.0.1", &[], xff), ip("10.0.0.1"));
    }

    /// An entry as a trusted proxy writes the address it saw.
    fn written(ip: IpAddr, style: u8, header: ClientIpHeader) -> String {
        let plain = match (ip, style % 3) {
            (IpAddr::V6(v6), 1) => format!("[{v6}]"),
            (IpAddr::V6(v6), 2) => format!("[{v6}]:4711"),
            (IpAddr::V4(v4), 2) => format!("{v4}:4711"),
            (ip, _) => ip.to_string(),
        };
        match header {
            ClientIpHeader::Forwarded if style >= 3 => format!("for=\"{plain}\";proto=https"),
            ClientIpHeader::Forwarded => format!("for=\"{plain}\""),
            _ => plain,
        }
    }

    fn untrusted_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ]
        .prop_filter("untrusted", |ip| !trusted(*ip, &proxies()))
        .prop_map(|ip| ip.to_canonical())
        .prop_filter("canonical untrusted", |ip| !trusted(*ip, &proxies()))
    }

    fn header_value() -> impl Strategy<Value = String> {
        // Visible ASCII and spaces: commas, quotes, brackets, addresses, junk.
        prop_oneof![
            "[ -~]{0,40}",
            "(for=)?\"?\\[?[0-9a-f:.]{0,20}\\]?(:[0-9]{1,5})?\"?(, ?)?",
            Just("10.0.0.7".to_string()),
            Just("for=10.0.0.7".to_string()),
        ]
    }

    proptest! {
        /// For a request from a trusted hop, nothing the client behind it
        /// sends changes the result: any prefix entries in the named header
        /// (on the proxy's line or lines of its own), any other header.
        #[test]
        fn what_the_client_sends_never_changes_the_result(
            client in untrusted_ip(),
            style in 0u8..6,
            named in 0usize..3,
            hops in proptest::collection::vec(any::<u8>(), 0..3),
            prefix in proptest::collection::vec(header_value(), 0..3),
            own_line in any::<bool>(),
            others in proptest::collection::vec((0usize..3, header_value()), 0..4),
        ) {
            let headers = [
                ClientIpHeader::XForwardedFor,
                ClientIpHeader::Forwarded,
                ClientIpHeader::XRealIp,
            ];
            let header = headers[named];
            let p = proxies();
            // The first trusted proxy appends the client; each further one
            // the trusted proxy it got the request from.
            let mut trusted_part = vec![written(client, style, header)];
            trusted_part.extend(
                hops.iter()
                    .map(|h| written(IpAddr::from([10, 1, 2, *h]), style, header)),
            );
            let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
            for (which, value) in &others {
                if *which != named {
                    req.append_header(headers[*which].header_name(), value.as_str()).unwrap();
                }
            }
            let name = header.header_name();
            if own_line {
                for value in &prefix {
                    req.append_header(name, value.as_str()).unwrap();
                }
                req.append_header(name, trusted_part.join(", ")).unwrap();
            } else {
                let mut line = prefix.clone();
                line.extend(trusted_part);
                req.append_header(name, line.join(", ")).unwrap();
            }
            let peer = IpAddr::from([10, 0, 0, 1]);
            prop_assert_eq!(client_address(peer, &req, &p, header), client);
        }
    }

    #[test]
    fn an_ipv4_mapped_peer_is_an_ipv4_client() {
        let p = [Cidr::parse("127.0.0.0/8").unwrap()];
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!(
            client_address(mapped, &req, &p, ClientIpHeader::XForwardedFor),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        // A mapped trusted proxy is trusted.
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-forwarded-for", "198.51.100.4")
            .unwrap();
        let proxy: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            client_address(proxy, &req, &p, ClientIpHeader::XForwardedFor),
            "198.51.100.4".parse::<IpAddr>().unwrap()
        );
    }
}
