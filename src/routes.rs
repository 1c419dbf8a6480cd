//! Route matching on the normalised path: an exact `path` beats any prefix,
//! a longer `path_prefix` beats a shorter one, a route bound to a host beats
//! one that is not, and config order breaks the remaining ties.

use crate::config::{PathMatch, RouteSettings};
use http::Method;

struct Entry {
    route: usize,
    exact: bool,
    path: String,
    host: Option<String>,
    methods: Option<Vec<Method>>,
}

pub struct RouteTable {
    entries: Vec<Entry>,
}

impl RouteTable {
    pub fn new(routes: &[RouteSettings]) -> Self {
        let mut entries: Vec<Entry> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (exact, path) = match &r.path {
                    PathMatch::Exact(p) => (true, p.clone()),
                    PathMatch::Prefix(p) => (false, p.clone()),
                };
                Entry {
                    route: i,
                    exact,
                    path,
                    host: r.host.clone(),
                    methods: r.methods.clone(),
                }
            })
            .collect();
        entries.sort_by(|a, b| {
            b.exact
                .cmp(&a.exact)
                .then(b.path.len().cmp(&a.path.len()))
                .then(b.host.is_some().cmp(&a.host.is_some()))
                .then(a.route.cmp(&b.route))
        });
        RouteTable { entries }
    }

    /// Index of the matching route in the config's route list.
    /// `host` is the request's Host without port; compared case-insensitively.
    pub fn find(&self, host: Option<&str>, method: &Method, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| {
                path_matches(e, path)
                    && e.host
                        .as_deref()
                        .is_none_or(|h| host.is_some_and(|req| req.eq_ignore_ascii_case(h)))
                    && e.methods.as_ref().is_none_or(|m| m.contains(method))
            })
            .map(|e| e.route)
    }
}

fn path_matches(e: &Entry, path: &str) -> bool {
    if e.exact {
        return path == e.path;
    }
    // A prefix `/api/` also takes `/api`, which clients commonly send for the
    // collection itself.
    path.starts_with(e.path.as_str())
        || (e.path.len() > 1 && e.path.ends_with('/') && path == &e.path[..e.path.len() - 1])
}

/// The Host header without its port, for matching.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_str_with_env;

    fn table() -> (RouteTable, Vec<String>) {
        let text = r#"
upstreams: { b: { peers: ["127.0.0.1:1"] } }
routes:
  - { name: root, path_prefix: /, upstream: b, auth: none }
  - { name: api, path_prefix: /api/, upstream: b, auth: none }
  - { name: api_v2, path_prefix: /api/v2/, upstream: b, auth: none }
  - { name: login, path: /api/login, upstream: b, auth: none, methods: [post] }
  - { name: api_host, path_prefix: /api/, host: Example.COM, upstream: b, auth: none }
"#;
        let c = from_str_with_env(text, Vec::new()).unwrap();
        let names = c.routes.iter().map(|r| r.name.clone()).collect();
        (RouteTable::new(&c.routes), names)
    }

    fn find(host: Option<&str>, method: Method, path: &str) -> String {
        let (t, names) = table();
        t.find(host, &method, path)
            .map_or("none".into(), |i| names[i].clone())
    }

    #[test]
    fn longest_prefix_wins() {
        assert_eq!(find(None, Method::GET, "/api/v2/x"), "api_v2");
        assert_eq!(find(None, Method::GET, "/api/v1/x"), "api");
        assert_eq!(find(None, Method::GET, "/api"), "api");
        assert_eq!(find(None, Method::GET, "/apix"), "root");
        assert_eq!(find(None, Method::GET, "/"), "root");
    }

    #[test]
    fn exact_path_with_methods() {
        assert_eq!(find(None, Method::POST, "/api/login"), "login");
        assert_eq!(find(None, Method::GET, "/api/login"), "api");
        assert_eq!(find(None, Method::POST, "/api/login/x"), "api");
    }

    #[test]
    fn host_routes_beat_hostless_ones() {
        assert_eq!(find(Some("example.com"), Method::GET, "/api/x"), "api_host");
        assert_eq!(find(Some("other.com"), Method::GET, "/api/x"), "api");
        assert_eq!(find(None, Method::GET, "/api/x"), "api");
    }

    #[test]
    fn no_route_is_none() {
        let text = r#"
upstreams: { b: { peers: ["127.0.0.1:1"] } }
routes: [{ name: api, path_prefix: /api/, upstream: b, auth: none }]
"#;
        let c = from_str_with_env(text, Vec::new()).unwrap();
        let t = RouteTable::new(&c.routes);
        assert_eq!(t.find(None, &Method::GET, "/other"), None);
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:8080"), "::1");
    }
}
