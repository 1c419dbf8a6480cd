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
    fn normal_form_is_a_fixed_point() {
        for p in ["/a/./b//c/../d/", "/%2e/x", "/x/%2F/y", "/~%7e"] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p:?}");
        }
    }
}
