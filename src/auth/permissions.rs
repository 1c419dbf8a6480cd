//! A token's `allowed_routes`, compiled once per token into a matcher.
//!
//! Entries are exact paths (`/api/v1/users`) or prefix patterns ending in
//! `/*` (`/api/*` allows `/api` and everything under `/api/`). Patterns are
//! normalised like request paths, and matched against the normalised request
//! path, so `..`, `%2e%2e`, `//` and friends resolve before the comparison.
//! Matching is case-sensitive and an exact entry matches only itself (no
//! trailing-slash variant).

use crate::path;

/// Why an `allowed_routes` entry is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("allowed route {entry:?}: {why}")]
    NotAPath { entry: String, why: String },
    #[error("allowed route {0:?}: '*' is only allowed as a final '/*'")]
    Star(String),
}

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
    pub fn compile<S: AsRef<str>>(entries: &[S]) -> Result<Self, PatternError> {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_ref();
            if entry == "*" || entry == "/*" {
                patterns.push(Pattern::Everything);
                continue;
            }
            if let Some(base) = entry.strip_suffix("/*") {
                let not_a_path = |e: path::PathError| PatternError::NotAPath {
                    entry: entry.to_string(),
                    why: e.to_string(),
                };
                let normal = path::normalize(&format!("{base}/")).map_err(not_a_path)?;
                patterns.push(Pattern::Prefix(normal));
            } else {
                if entry.contains('*') {
                    return Err(PatternError::Star(entry.to_string()));
                }
                let normal = path::normalize(entry).map_err(|e| PatternError::NotAPath {
                    entry: entry.to_string(),
                    why: e.to_string(),
                })?;
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
