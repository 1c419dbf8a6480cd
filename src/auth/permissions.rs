//! A token's `allowed_routes`, compiled once per token into a matcher.
//!
//! Entries are exact paths (`/api/v1/users`) or prefix patterns ending in
//! `/*` (`/api/*` allows `/api` and everything under `/api/`). Patterns are
//! normalised like request paths, and matched against the normalised request
//! path, so `..`, `%2e%2e`, `//` and friends resolve before the comparison.
//! Matching is case-sensitive and an exact entry matches only itself (no
//! trailing-slash variant).

use crate::path;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// Stored with its trailing slash: `/api/`.
    Prefix(String),
    Everything,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatcher {
    patterns: Vec<Pattern>,
}

impl RouteMatcher {
    /// Allows no path at all.
    pub fn nothing() -> Self {
        RouteMatcher {
            patterns: Vec::new(),
        }
    }

    /// Compiles `allowed_routes`; a pattern that is not a valid path makes the
    /// whole token invalid rather than silently narrowing or widening it.
    pub fn compile<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_ref();
            if entry == "*" || entry == "/*" {
                patterns.push(Pattern::Everything);
                continue;
            }
            if let Some(base) = entry.strip_suffix("/*") {
                let normal = path::normalize(&format!("{base}/"))
                    .map_err(|e| format!("allowed route {entry:?}: {e}"))?;
                patterns.push(Pattern::Prefix(normal));
            } else {
                if entry.contains('*') {
                    return Err(format!(
                        "allowed route {entry:?}: '*' is only allowed as a final '/*'"
                    ));
                }
                let normal =
                    path::normalize(entry).map_err(|e| format!("allowed route {entry:?}: {e}"))?;
                patterns.push(Pattern::Exact(normal));
            }
        }
        Ok(RouteMatcher { patterns })
    }

    /// `path` must already be normalised (it is the path that is forwarded).
    pub fn allows(&self, path: &str) -> bool {
        self.patterns.iter().any(|p| match p {
            Pattern::Everything => true,
            Pattern::Exact(e) => path == e,
            Pattern::Prefix(prefix) => {
                path.starts_with(prefix.as_str()) || path == &prefix[..prefix.len() - 1]
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(entries: &[&str]) -> RouteMatcher {
        RouteMatcher::compile(entries).unwrap()
    }

    #[test]
    fn exact_and_prefix_entries() {
        let r = m(&["/api/v1/*", "/status"]);
        assert!(r.allows("/api/v1/users"));
        assert!(r.allows("/api/v1/"));
        assert!(r.allows("/api/v1"));
        assert!(r.allows("/status"));
        assert!(!r.allows("/status/"));
        assert!(!r.allows("/statusx"));
        assert!(!r.allows("/api/v1x"));
        assert!(!r.allows("/api/v2/users"));
        assert!(!r.allows("/API/v1/users"));
        assert!(!r.allows("/"));
    }

    #[test]
    fn patterns_are_normalised_too() {
        let r = m(&["/a/./b//*", "/%61bc"]);
        assert!(r.allows("/a/b/c"));
        assert!(r.allows("/abc"));
    }

    #[test]
    fn tricks_on_the_request_side_fail_once_normalised() {
        let r = m(&["/public/*"]);
        for trick in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/.%2e/admin",
            "//admin",
            "/public/..%2fadmin",
        ] {
            let allowed = crate::path::normalize(trick).is_ok_and(|p| r.allows(&p));
            // The encoded slash stays inside one segment under /public/, which
            // the upstream also receives encoded: no escape either way.
            if trick == "/public/..%2fadmin" {
                assert!(allowed);
                assert_eq!(crate::path::normalize(trick).unwrap(), "/public/..%2Fadmin");
            } else {
                assert!(!allowed, "{trick} got through");
            }
        }
    }

    #[test]
    fn everything_and_bad_entries() {
        assert!(m(&["/*"]).allows("/anything/at/all"));
        assert!(m(&["*"]).allows("/"));
        assert!(RouteMatcher::compile(&["/a*"]).is_err());
        assert!(RouteMatcher::compile(&["/a/*/b"]).is_err());
        assert!(RouteMatcher::compile(&["relative"]).is_err());
        assert!(RouteMatcher::compile(&["/../x"]).is_err());
        assert!(!m(&[]).allows("/"));
    }
}
