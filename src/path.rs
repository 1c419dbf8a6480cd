//! Request path normalisation, done once per request. The result is both what
//! routes and permissions are matched against and what is sent upstream, so the
//! upstream can never see a path that the checks did not.
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded;
//!   every other escape is kept, with upper-case hex (`%2f` -> `%2F`), so an
//!   encoded slash stays one segment and never becomes a separator;
//! - `.` and `..` segments are resolved; a `..` that would climb above `/` is
//!   refused (400) rather than silently clamped;
//! - runs of `/` collapse into one;
//! - control characters, bare `%` and non-ASCII bytes are refused.
//!
//! Case and trailing slashes are preserved: both are significant to upstreams.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    BadCharacter,
    AboveRoot,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with '/'",
            PathError::BadEscape => "the path has an invalid percent-escape",
            PathError::BadCharacter => "the path has a character that is not allowed",
            PathError::AboveRoot => "the path climbs above '/'",
        })
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises the path part of a request target (no query string).
pub fn normalize(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: most paths need no change at all.
    if !needs_work(bytes) {
        return Ok(raw.to_string());
    }
    // Pass 1: decode unreserved escapes, canonicalise the others.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&h), Some(&l)) => (h, l),
                _ => return Err(PathError::BadEscape),
            };
            let value = match (hex_value(hi), hex_value(lo)) {
                (Some(h), Some(l)) => h * 16 + l,
                _ => return Err(PathError::BadEscape),
            };
            if is_unreserved(value) {
                decoded.push(value as char);
            } else {
                decoded.push('%');
                decoded.push(hi.to_ascii_uppercase() as char);
                decoded.push(lo.to_ascii_uppercase() as char);
            }
            i += 3;
        } else {
            if b <= 0x20 || b >= 0x7f {
                return Err(PathError::BadCharacter);
            }
            decoded.push(b as char);
            i += 1;
        }
    }
    // Pass 2: resolve segments.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || trailing {
        result.push('/');
    }
    Ok(result)
}

/// Why `path_policy: strict` refuses a path: forms that RFC 3986 leaves
/// alone or resolves one way and common backends read another way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// `.` or `..`, also percent-encoded (`%2e%2e`).
    DotSegment,
    /// A path parameter on a dot segment: `..;`, `.;x`, `%2e%2e;`
    /// (Tomcat, Jetty and Spring resolve `..;` as `..`).
    DotParameter,
    /// `\` raw or as `%5C` (read as `/` by IIS and several Java and Node stacks).
    Backslash,
    /// `%2F` (decoded to a separator by some backends before they route).
    EncodedSlash,
    /// The path names another route when read the way those backends read it.
    ReadsAsAnotherRoute,
    /// An encoded control character (`%00`, `%09`, `%7F`): C backends end
    /// the path at `%00`, others trim whitespace, so `..%00` or `..%09`
    /// can act as `..`.
    ControlCharacter,
    /// Escapes that do not decode to UTF-8, such as the overlong `%C0%AE`
    /// (a `.` to decoders that do not check).
    NotUtf8,
    /// A character that Unicode compatibility normalisation (NFKC) turns
    /// into `.`, `/` or `\`, such as the fullwidth `%EF%BC%8E` (`．`).
    LookalikeSeparator,
}

impl BadPath {
    pub fn message(self) -> &'static str {
        match self {
            BadPath::DotSegment => "the path has a '.' or '..' segment",
            BadPath::DotParameter => "the path has a parameter on a dot segment (such as '..;')",
            BadPath::Backslash => "the path has a backslash",
            BadPath::EncodedSlash => "the path has an encoded slash (%2F)",
            BadPath::ReadsAsAnotherRoute => {
                "the path reads as another route once '..;', '\\' or escapes are resolved"
            }
            BadPath::ControlCharacter => "the path has an encoded control character",
            BadPath::NotUtf8 => "the path has escapes that are not UTF-8 (such as '%C0%AE')",
            BadPath::LookalikeSeparator => {
                "the path has a character that reads as '.', '/' or '\\' once Unicode is normalised"
            }
        }
    }
}

/// One round of percent-decoding of a segment; an escape that is not one
/// stays as written (`normalize` refuses it).
fn decode_once(segment: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < segment.len() {
        let b = segment[i];
        let value = (b == b'%')
            .then(|| Some(hex_value(*segment.get(i + 1)?)? * 16 + hex_value(*segment.get(i + 2)?)?))
            .flatten();
        match value {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
}

/// What `path_policy: strict` refuses in a raw path (no query), judging each
/// segment after one round of percent-decoding: the first form found.
pub fn strict_violation(raw: &str) -> Option<BadPath> {
    let bytes = raw.as_bytes();
    // Fast path: without these bytes no segment can be refused.
    if !bytes.iter().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return None;
    }
    let mut buffer = Vec::new();
    for segment in bytes.split(|&b| b == b'/') {
        // Only a segment with an escape needs decoding (and a buffer).
        let decoded = if segment.contains(&b'%') {
            decode_once(segment, &mut buffer);
            buffer.as_slice()
        } else {
            segment
        };
        if decoded.contains(&b'/') {
            return Some(BadPath::EncodedSlash);
        }
        if decoded.contains(&b'\\') {
            return Some(BadPath::Backslash);
        }
        if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Some(BadPath::ControlCharacter);
        }
        if !decoded.is_ascii() {
            match std::str::from_utf8(decoded) {
                Err(_) => return Some(BadPath::NotUtf8),
                Ok(text) if text.chars().any(reads_as_separator) => {
                    return Some(BadPath::LookalikeSeparator)
                }
                Ok(_) => {}
            }
        }
        let (base, parameter) = match decoded.iter().position(|&b| b == b';') {
            Some(at) => (&decoded[..at], true),
            None => (decoded, false),
        };
        // Backends that trim trailing spaces from a segment read `.. ` as `..`.
        let base = base
            .iter()
            .rposition(|&b| b != b' ')
            .map_or(&base[..0], |last| &base[..=last]);
        if base == b"." || base == b".." {
            return Some(if parameter {
                BadPath::DotParameter
            } else {
                BadPath::DotSegment
            });
        }
    }
    None
}

/// `bytes` with what some decoders read as `.`, `/` or `\\` written as
/// those: overlong UTF-8 forms (`C0 AE`, `C0 AF`, `C1 9C`) and characters
/// NFKC folds into them.
fn fold_lookalikes(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.is_ascii() {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let (taken, with): (usize, &[u8]) = match rest {
            [0xC0, 0xAE, ..] => (2, b"."),
            [0xC0, 0xAF, ..] => (2, b"/"),
            [0xC1, 0x9C, ..] => (2, b"\\"),
            [0xE2, 0x80, 0xA4, ..] | [0xEF, 0xB9, 0x92, ..] | [0xEF, 0xBC, 0x8E, ..] => (3, b"."),
            [0xE2, 0x80, 0xA5, ..] => (3, b".."),
            [0xE2, 0x80, 0xA6, ..] => (3, b"..."),
            [0xEF, 0xBC, 0x8F, ..] => (3, b"/"),
            [0xEF, 0xB9, 0xA8, ..] | [0xEF, 0xBC, 0xBC, ..] => (3, b"\\"),
            [b, ..] => (1, std::slice::from_ref(b)),
            [] => break,
        };
        out.extend_from_slice(with);
        i += taken;
    }
    std::borrow::Cow::Owned(out)
}

/// Characters whose compatibility decomposition (NFKC) is `.`, `..`,
/// `...`, `/` or `\\`.
fn reads_as_separator(c: char) -> bool {
    matches!(
        c,
        '\u{2024}' // one dot leader
            | '\u{2025}' // two dot leader
            | '\u{2026}' // horizontal ellipsis
            | '\u{FE52}' // small full stop
            | '\u{FE68}' // small reverse solidus
            | '\u{FF0E}' // fullwidth full stop
            | '\u{FF0F}' // fullwidth solidus
            | '\u{FF3C}' // fullwidth reverse solidus
    )
}

/// Whether a lenient backend could read `raw` differently from `normalize`:
/// only paths with parameters, backslashes or escapes can.
pub fn may_read_differently(raw: &str) -> bool {
    raw.bytes().any(|b| matches!(b, b';' | b'%' | b'\\'))
}

/// `raw` as the most lenient common backends read it: every escape decoded
/// once, `\` taken for `/`, the parameters of every segment dropped, then
/// dots resolved; in normal form, so it compares with route paths. Routes
/// and permissions must agree on this reading too, or a backend could be
/// led outside what was checked.
pub fn lenient_reading(raw: &str) -> Result<String, PathError> {
    let mut decoded = Vec::with_capacity(raw.len());
    decode_once(raw.as_bytes(), &mut decoded);
    let decoded = fold_lookalikes(&decoded);
    let mut text = String::with_capacity(decoded.len() + 8);
    for (i, segment) in decoded.split(|&b| b == b'/' || b == b'\\').enumerate() {
        if i > 0 {
            text.push('/');
        }
        let end = segment
            .iter()
            .position(|&b| b == b';')
            .unwrap_or(segment.len());
        let mut segment = &segment[..end];
        // Backends that trim whitespace, or stop at a NUL, read `..%20`,
        // `.%09.` or `..%00` as `..`.
        let dots: Vec<u8> = segment.iter().copied().filter(|&b| b > 0x20).collect();
        if dots == b"." || dots == b".." {
            segment = if dots.len() == 1 { b"." } else { b".." };
        }
        for &b in segment {
            // What `normalize` takes as written stays so (a route path
            // compares with it); what it refuses, and `%`, are escaped.
            if (0x21..0x7f).contains(&b) && b != b'%' {
                text.push(b as char);
            } else {
                text.push('%');
                text.push(char::from(HEX[usize::from(b >> 4)]));
                text.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
    normalize(&text)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn needs_work(bytes: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' || b <= 0x20 || b >= 0x7f {
            return true;
        }
        if b == b'/' && prev == b'/' {
            return true;
        }
        if b == b'.' && prev == b'/' {
            // "/." starts a dot segment only if the segment is "." or "..".
            let rest = &bytes[i..];
            let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
            if &rest[..seg_end] == b"." || &rest[..seg_end] == b".." {
                return true;
            }
        }
        prev = b;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> String {
        normalize(input).unwrap_or_else(|e| panic!("{input:?}: {e}"))
    }

    #[test]
    fn leaves_clean_paths_alone() {
        for p in [
            "/",
            "/api/v1/users",
            "/api/v1/users/",
            "/a.b/c..d/.e",
            "/CaSe",
        ] {
            assert_eq!(ok(p), p);
        }
    }

    #[test]
    fn resolves_dots_and_slashes() {
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/../b"), "/b");
        assert_eq!(ok("/a//b///c"), "/a/b/c");
        assert_eq!(ok("//a"), "/a");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/api/v1/../../admin"), "/admin");
    }

    #[test]
    fn decodes_only_unreserved_escapes() {
        assert_eq!(ok("/%61pi/%7Euser"), "/api/~user");
        assert_eq!(ok("/api/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/api/%2E%2E/admin"), "/admin");
        assert_eq!(ok("/api/.%2e/admin"), "/admin");
        // An encoded slash is data, not a separator, and gets canonical hex.
        assert_eq!(ok("/api%2f..%2fadmin"), "/api%2F..%2Fadmin");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a%00b"), "/a%00b");
    }

    #[test]
    fn refuses_escapes_above_root_and_junk() {
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/%2e%2e/etc/passwd"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a\tb"), Err(PathError::BadCharacter));
        assert_eq!(normalize("/é"), Err(PathError::BadCharacter));
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn strict_refuses_dots_parameters_backslashes_and_encoded_slashes() {
        use BadPath::*;
        for (path, why) in [
            ("/a/./b", DotSegment),
            ("/a/../b", DotSegment),
            ("/a/%2e%2E/b", DotSegment),
            ("/a/.%2e", DotSegment),
            ("/a/.", DotSegment),
            ("/public/..;/admin", DotParameter),
            ("/public/%2e%2e;/admin", DotParameter),
            ("/public/.;x/admin", DotParameter),
            ("/public/..%3b/admin", DotParameter),
            ("/public/..;jsessionid=1/admin", DotParameter),
            ("/public/..%5Cadmin", Backslash),
            ("/public/..%5cadmin", Backslash),
            ("/public\\admin", Backslash),
            ("/public/a%2fb", EncodedSlash),
            ("/public%2F..%2Fadmin", EncodedSlash),
            ("/public/..%00/admin", ControlCharacter),
            ("/public/..%09/admin", ControlCharacter),
            ("/public/a%7Fb", ControlCharacter),
            ("/public/%c0%ae%c0%ae/admin", NotUtf8),
            ("/public/%e0%80%ae/admin", NotUtf8),
            ("/public/%ef%bc%8e%ef%bc%8e/admin", LookalikeSeparator),
            ("/public/..%ef%bc%8fadmin", LookalikeSeparator),
            ("/public/%e2%80%a5/admin", LookalikeSeparator),
            ("/public/..%20/admin", DotSegment),
            ("/public/.%20%20;x/admin", DotParameter),
        ] {
            assert_eq!(strict_violation(path), Some(why), "{path}");
        }
        for path in [
            "/",
            "/a.b/c..d/.e/...",
            "/a;x/b;y=1",
            "/a/%252e%252e/b",
            "/a/%41%20b",
            "/a/..x/x..",
            "/a/;../b",
            "/a/%C3%A9t%C3%A9",
            "/a/%20../b",
        ] {
            assert_eq!(strict_violation(path), None, "{path}");
        }
    }

    #[test]
    fn the_lenient_reading_resolves_what_backends_resolve() {
        let read = |p: &str| lenient_reading(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!(read("/public/..;/admin"), "/admin");
        assert_eq!(read("/public/%2e%2e;/admin"), "/admin");
        assert_eq!(read("/public/..%5Cadmin"), "/admin");
        assert_eq!(read("/public/a%2Fb"), "/public/a/b");
        assert_eq!(read("/public;jsessionid=1/x"), "/public/x");
        assert_eq!(read("/a%20b/%3A"), "/a%20b/:");
        assert_eq!(read("/a/%25/b"), "/a/%25/b");
        assert_eq!(lenient_reading("/a/..;/..;/b"), Err(PathError::AboveRoot));
        // Trimmed, cut at a NUL, folded (NFKC) or overlong: still `..`.
        for form in [
            "/files/..%20/admin/x",
            "/files/..%09/admin/x",
            "/files/..%00/admin/x",
            "/files/..%0d%0a/admin/x",
            "/files/.%20./admin/x",
            "/files/%ef%bc%8e%ef%bc%8e/admin/x",
            "/files/%e2%80%a5/admin/x",
            "/files/%c0%ae%c0%ae/admin/x",
            "/files/..%c0%afadmin/x",
            "/files/..%ef%bc%8fadmin/x",
            "/files/..%ef%bc%bcadmin/x",
        ] {
            assert_eq!(read(form), "/admin/x", "{form}");
        }
        assert_eq!(read("/caf%C3%A9/x"), "/caf%C3%A9/x");
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        for p in ["/a/./b//c/../d/", "/%2e/x", "/x/%2F/y", "/~%7e"] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p:?}");
        }
    }
}
