//! W3C Trace Context: `traceparent` and `tracestate`, read strictly and
//! written by hand (no formatting machinery on the request path).
//!
//! A header that does not follow the format is ignored, never answered with
//! an error: the request then starts a trace of its own.

use http::{HeaderMap, HeaderName};

/// The header names as constants: a name given as text is parsed again at
/// every lookup.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest `tracestate` passed on; a longer one is dropped whole.
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// Most list members of a `tracestate` passed on.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// What a valid `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// The incoming context when `headers` carry exactly one valid
/// `traceparent`; its `tracestate` when that is valid too.
pub fn incoming(headers: &HeaderMap) -> Option<(Parent, Option<String>)> {
    let mut all = headers.get_all(TRACEPARENT).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let parent = parse_traceparent(first.as_bytes())?;
    Some((parent, tracestate(headers)))
}

/// `version-traceid-parentid-flags`, lowercase hex. Version `00` is exactly
/// 55 characters; a later version (not `ff`) may carry more after a `-`,
/// read as far as version `00` goes.
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    match version {
        0xff => return None,
        0 if v.len() != 55 => return None,
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, b) in span_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    match two {
        [h, l] => Some(hex_digit(*h)? << 4 | hex_digit(*l)?),
        _ => None,
    }
}

/// Every `tracestate` field joined, when the whole is valid: at most 512
/// bytes and 32 members, each `key=value` as the standard writes them.
/// Anything else: `None` (the state is dropped, the trace goes on).
pub fn tracestate(headers: &HeaderMap) -> Option<String> {
    let mut members: Vec<&str> = Vec::new();
    let mut bytes = 0usize;
    for value in headers.get_all(TRACESTATE) {
        let text = value.to_str().ok()?;
        for member in text.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            if !valid_member(member) {
                return None;
            }
            bytes += member.len() + usize::from(!members.is_empty());
            members.push(member);
            if members.len() > MAX_TRACESTATE_MEMBERS || bytes > MAX_TRACESTATE_BYTES {
                return None;
            }
        }
    }
    if members.is_empty() {
        return None;
    }
    // A key appears once.
    for (i, m) in members.iter().enumerate() {
        let key = m.split('=').next().unwrap_or_default();
        if members[..i]
            .iter()
            .any(|o| o.split('=').next() == Some(key))
        {
            return None;
        }
    }
    Some(members.join(","))
}

/// `key=value`: key `[a-z0-9][a-z0-9_*/-]{0,255}` with at most one `@`
/// (tenant@system); value 1..=256 printable characters other than `,` and
/// `=`, not ending in a space.
fn valid_member(member: &str) -> bool {
    let Some((key, value)) = member.split_once('=') else {
        return false;
    };
    let key_ok = !key.is_empty()
        && key.len() <= 256
        && key.bytes().filter(|b| *b == b'@').count() <= 1
        && key.split('@').all(|part| {
            part.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'_' | b'-' | b'*' | b'/')
                })
        });
    let value_ok = !value.is_empty()
        && value.len() <= 256
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
    key_ok && value_ok
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut [u8], bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// 32 lowercase hex digits.
pub fn trace_id_hex(id: &[u8; 16]) -> String {
    let mut out = [0u8; 32];
    push_hex(&mut out, id);
    String::from_utf8_lossy(&out).into_owned()
}

/// The `traceparent` tollgate sends: version 00, `span_id` as the parent.
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> String {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    push_hex(&mut out[3..35], trace_id);
    push_hex(&mut out[36..52], span_id);
    if sampled {
        out[54] = b'1';
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_the_same() {
        let p = parse_traceparent(GOOD.as_bytes()).unwrap();
        assert!(p.sampled);
        assert_eq!(traceparent(&p.trace_id, &p.span_id, true), GOOD);
        assert_eq!(
            trace_id_hex(&p.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert_eq!(parse_traceparent(b.as_bytes()), None, "{b:?}");
        }
        // A later version may carry more fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-abc";
        assert!(parse_traceparent(later.as_bytes()).is_some());
    }

    #[test]
    fn two_traceparents_are_none() {
        let h = headers(&[("traceparent", GOOD), ("traceparent", GOOD)]);
        assert_eq!(incoming(&h), None);
    }

    #[test]
    fn tracestate_is_kept_only_when_valid_and_small() {
        let h = headers(&[
            ("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"),
            ("tracestate", "a@b=1"),
        ]);
        assert_eq!(
            tracestate(&h).as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,a@b=1")
        );
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            tracestate(&headers(&[("tracestate", &many.join(","))])),
            None
        );
        let long = format!("k={}", "v".repeat(256));
        let five = [long.replace("k=", "a="), long.replace("k=", "b="), long];
        assert_eq!(
            tracestate(&headers(&[("tracestate", &five.join(","))])),
            None
        );
        for bad in ["novalue", "UPPER=1", "k=a,k=b", "k=v=w", "a@b@c=1"] {
            assert_eq!(tracestate(&headers(&[("tracestate", bad)])), None, "{bad}");
        }
    }
}
