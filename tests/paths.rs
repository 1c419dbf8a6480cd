//! `routes[].path_policy`: path forms that backends read differently from
//! RFC 3986 (`..;`, `\`, `%2F`, encoded dots) never carry a caller out of
//! what tollgate checked. Through the real binary, in front of a recording
//! upstream: what the client sees, and what reached the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;

const SECRET: &str = "paths-secret-0123456789abcdef";

fn config(upstream: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
log: {{ level: info, color: false }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend }}
  - {{ name: admin, path_prefix: /admin/, upstream: backend }}
  - {{ name: open, path_prefix: /open/, upstream: backend, auth: none }}
  - {{ name: doc, path: /exact/doc, upstream: backend, auth: none }}
  - {{ name: exactjwt, path: /exact/jwt, upstream: backend }}
  - {{ name: api, path_prefix: /api/, upstream: backend }}
  - {{ name: lax, path_prefix: /lax/, upstream: backend, path_policy: permissive }}
  - {{ name: files, path_prefix: /files/, upstream: backend, auth: none, path_policy: permissive }}
"#
    )
}

fn token() -> String {
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": {
        "api_key": "paths", "exp": unix_now() + 600,
        "allowed_routes": ["/public/*", "/exact/jwt", "/api/public/*", "/api/me", "/lax/public/*", "/lax/me"],
    }}))
}

struct Fixture {
    up: Recorder,
    t: Tollgate,
    token: String,
}

impl Fixture {
    fn start() -> Fixture {
        let up = Recorder::start();
        let t = Tollgate::start(&config(&up.addr()));
        Fixture {
            up,
            t,
            token: token(),
        }
    }

    /// `target` exactly as written, with the token.
    fn get(&self, target: &str) -> Response {
        self.t.request(&format!(
            "GET {target} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.token
        ))
    }

    /// The request line's target of the last request the upstream saw.
    fn forwarded(&self) -> String {
        let head = self.up.last_head();
        let line = head.lines().next().unwrap_or_default();
        line.split(' ').nth(1).unwrap_or_default().to_string()
    }

    /// Refused with 400 `bad_path`, and nothing reached the upstream.
    fn refused(&self, target: &str) {
        let hits = self.up.hits();
        let r = self.get(target);
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        r.assert_refusal(400, "bad_path");
        assert_eq!(self.up.hits(), hits, "{target} reached the upstream");
    }

    /// Answered `status`; a 200 was forwarded as `forwarded`, anything else
    /// reached nobody.
    fn answered(&self, target: &str, status: u16, forwarded: &str) {
        let hits = self.up.hits();
        let r = self.get(target);
        assert_eq!(r.status, status, "{target}: {}", r.text());
        if status == 200 {
            assert_eq!(self.up.hits(), hits + 1, "{target}");
            assert_eq!(self.forwarded(), forwarded, "{target} was forwarded as");
        } else {
            assert_eq!(self.up.hits(), hits, "{target} reached the upstream");
        }
    }
}

#[test]
fn the_escapes_of_the_review_are_refused_and_reach_nothing() {
    let f = Fixture::start();
    // A token allowed /public/* only.
    for target in [
        "/public/..;/admin",
        "/public/%2e%2e;/admin",
        "/public/..%5Cadmin",
        "/public/..%5cadmin/x",
        "/public/..;/admin/x",
        "/public/.;/..;/admin/x",
        "/public/%2E%2E%3B/admin/x",
        "/public\\..\\admin/x",
        "/public/..\\admin/x",
        "/public/..%2Fadmin/x",
        // The edge review's second round: control characters a backend may
        // cut or trim, overlong UTF-8, compatibility forms of '.' and '/'.
        "/public/..%00/admin/x",
        "/public/..%09/admin/x",
        "/public/..%20/admin/x",
        "/public/%c0%ae%c0%ae/admin/x",
        "/public/%ef%bc%8e%ef%bc%8e/admin/x",
        "/public/..%ef%bc%8fadmin/x",
    ] {
        f.refused(target);
    }
    f.answered("/admin/x", 403, "");
    f.answered("/admin", 403, "");
    f.answered("/public/x", 200, "/public/x");
}

/// Forms `path_policy: strict` refuses, on a path `{dir}{leaf}` of a route:
/// dot segments (raw and encoded), parameters on them, backslashes raw and
/// encoded, encoded slashes — the review's, the earlier tests' and more.
fn refused_forms(dir: &str, leaf: &str) -> Vec<String> {
    [
        "{d}./{l}",
        "{d}a/../{l}",
        "{d}a/b/../../{l}",
        "{d}%2e/{l}",
        "{d}a/%2e%2e/{l}",
        "{d}a/%2E%2E/{l}",
        "{d}a/.%2E/{l}",
        "{d}a/%2e./{l}",
        "{d}{l}/.",
        "{d}{l}/..",
        "{d}{l}/%2e",
        "{d}../{l}",
        "{d}a/../../admin/x",
        "{d}../../etc/passwd",
        "{d}%2e%2e/%2e%2e/x",
        "/other/..{d}{l}",
        "{d}..;/{l}",
        "{d}a/..;/{l}",
        "{d}.;/{l}",
        "{d}.;x/{l}",
        "{d}a/%2e%2e;/{l}",
        "{d}a/..;jsessionid=1/{l}",
        "{d}a/..%3B/{l}",
        "{d}a/.%2e;x/{l}",
        "{d}..;/..;/admin/x",
        "{d}a\\{l}",
        "{d}a%5C{l}",
        "{d}a%5c..%5c{l}",
        "{d}..%5C{l}",
        "{d}..\\..\\admin/x",
        "{d}a%2F{l}",
        "{d}a%2f..%2f{l}",
        "{d}..%2F{l}",
        "{d}%2F{l}",
    ]
    .iter()
    .map(|f| f.replace("{d}", dir).replace("{l}", leaf))
    .collect()
}

#[test]
fn strict_routes_of_every_kind_refuse_every_form() {
    let f = Fixture::start();
    // Prefix and exact routes, with and without a token check.
    for (dir, leaf) in [
        ("/public/", "x"),
        ("/open/", "x"),
        ("/exact/", "doc"),
        ("/exact/", "jwt"),
    ] {
        let forms = refused_forms(dir, leaf);
        assert_eq!(forms.len(), 34);
        for target in forms {
            f.refused(&target);
        }
    }
    assert_eq!(f.up.hits(), 0);
    // Counted just after each answer is sent: waited for, not raced.
    f.t.wait_metric(
        r#"tollgate_requests_total{route="_invalid",status="400"}"#,
        136.0,
    );
}

#[test]
fn strict_routes_pass_clean_forms_normalised() {
    let f = Fixture::start();
    for (dir, leaf, first) in [
        ("/public/", "x", "%78"),
        ("/open/", "x", "%78"),
        ("/exact/", "doc", "%64oc"),
        ("/exact/", "jwt", "%6A%77%74"),
    ] {
        let path = format!("{dir}{leaf}");
        let exact = dir == "/exact/";
        f.answered(&path, 200, &path);
        f.answered(&format!("/{dir}/{leaf}"), 200, &path);
        f.answered(&format!("{dir}{first}"), 200, &path);
        // The query is not the path: it goes as it came.
        f.answered(
            &format!("{path}?q=/../..;%2f\\"),
            200,
            &format!("{path}?q=/../..;%2f\\"),
        );
        // Not dot segments, parameters on ordinary segments, a double
        // encoding (one round of decoding leaves `%2e`), case.
        for (target, prefix_status) in [
            (format!("{path};v=1"), 200),
            (format!("{dir}a;v=1/{leaf}"), 200),
            (format!("{dir}..{leaf}"), 200),
            (format!("{dir}{leaf}.."), 200),
            (format!("{dir}.{leaf}"), 200),
            (format!("{dir}%252e%252e/{leaf}"), 200),
            (format!("{dir}%25%32%65%25%32%65/{leaf}"), 200),
            (path.to_uppercase(), 404),
        ] {
            let status = if exact { 404 } else { prefix_status };
            let forwarded = target.replace("%25%32%65", "%252e");
            f.answered(&target, status, &forwarded);
        }
    }
}

/// The path tricks of the permission tests, under both policies: for a
/// token allowed `{a}/public/*` and `{a}/me`, the status under `strict`
/// (route `api`) and under `permissive` (route `lax`).
#[test]
fn permission_tricks_under_both_policies() {
    let f = Fixture::start();
    let cases: [(&str, u16, u16); 18] = [
        ("{a}/public/x", 200, 200),
        ("{a}/public", 200, 200),
        ("{a}/me", 200, 200),
        ("{a}/public/a/../b", 400, 200),
        ("{a}/./me", 400, 200),
        ("{a}/admin", 403, 403),
        ("{a}/public/../admin", 400, 403),
        ("{a}/public/%2e%2e/admin", 400, 403),
        ("{a}/public/.%2E/admin", 400, 403),
        ("{a}//admin", 403, 403),
        ("{a}/public%2f..%2fadmin", 400, 403),
        ("{a}/me/", 403, 403),
        ("{a}/me/x", 403, 403),
        ("{a}/mex", 403, 403),
        ("{a}/Public/x", 403, 403),
        ("{A}/public/x", 404, 404),
        // `/admin` is a strict route: a path that lands there with a dot
        // form is refused whichever route it was written under.
        ("{a}/public/../../admin", 400, 400),
        ("{a}/public/../../../admin", 400, 400),
    ];
    for (template, strict, permissive) in cases {
        for (a, status) in [("/api", strict), ("/lax", permissive)] {
            let target = template.replace("{a}", a).replace("{A}", &a.to_uppercase());
            let r = f.get(&target);
            assert_eq!(r.status, status, "{target}: {}", r.text());
            if status == 400 {
                r.assert_refusal(400, "bad_path");
            }
        }
    }
    // Three forms under strict and five under permissive reached the upstream.
    assert_eq!(f.up.hits(), 3 + 5);
}

#[test]
fn permissive_routes_pass_the_forms_but_every_reading_stays_inside() {
    let f = Fixture::start();
    // The forms pass, dot segments resolved, the rest as written.
    f.answered("/files/a/../b//c", 200, "/files/b/c");
    f.answered("/files/./%61bc", 200, "/files/abc");
    f.answered("/files/a/..;/b", 200, "/files/a/..;/b");
    f.answered("/files/a%2fb", 200, "/files/a%2Fb");
    f.answered("/files/a%5Cb", 200, "/files/a%5Cb");
    f.answered("/files/a\\b", 200, "/files/a\\b");
    f.answered("/other/../files/y", 200, "/files/y");
    f.answered("/lax/public/a/..;/b", 200, "/lax/public/a/..;/b");
    f.answered("/lax/public/a%2Fb", 200, "/lax/public/a%2Fb");
    // Read the way Tomcat or IIS read them, these name another route
    // (or climb above the root): refused, not forwarded.
    for target in [
        "/files/..;/admin/x",
        "/files/..;/public/x",
        "/files/%2e%2e;/open/x",
        "/files/..%5Copen/x",
        "/files/..\\open/x",
        "/files/..%2Fopen/x",
        "/files/..;/..;/x",
        "/files/..%5C..%5Cadmin",
        "/lax/..;/admin/x",
        "/lax/public/..;/..;/public/x",
        "/files/../../etc/passwd",
        // Resolved, it lands on a strict route: that route's policy rules.
        "/files/../open/x",
        "/lax/../public/x",
        // Backends that trim whitespace, stop at a NUL, fold Unicode (NFKC)
        // or accept overlong UTF-8 read these as `..` too.
        "/files/..%20/admin/x",
        "/files/..%09/open/x",
        "/files/..%00/admin/x",
        "/files/.%20./open/x",
        "/files/%ef%bc%8e%ef%bc%8e/admin/x",
        "/files/%c0%ae%c0%ae/open/x",
        "/files/..%c0%afadmin/x",
        "/files/..%ef%bc%8fopen/x",
    ] {
        f.refused(target);
    }
    // Inside the route but outside the token's allowed routes once read
    // leniently: the permission is checked against both readings.
    f.answered("/lax/public/..;/x", 403, "");
    f.answered("/lax/public/..%5Cx", 403, "");
    f.answered("/lax/public%2F..%2Fx", 403, "");
    f.answered("/lax/public/..%20/x", 403, "");
    f.answered("/lax/public/%ef%bc%8e%ef%bc%8e/x", 403, "");
    f.answered("/lax/public/x", 200, "/lax/public/x");
}

#[test]
fn a_parameter_that_hides_another_route_is_refused_on_strict_routes_too() {
    let up = Recorder::start();
    let t = Tollgate::start(&config(&up.addr()).replace(
        "routes:\n",
        "routes:\n  - { name: root, path_prefix: /, upstream: backend, auth: none }\n",
    ));
    // `/admin;x/y` is not under `/admin/`, so it routes to the open root;
    // a backend that drops segment parameters reads `/admin/y`.
    let r = t.get("/admin;x/y");
    r.assert_refusal(400, "bad_path");
    // Some backends decode before they drop parameters.
    t.get("/admin%3Bx/y").assert_refusal(400, "bad_path");
    t.get("/open;jsessionid=1").assert_refusal(400, "bad_path");
    // Parameters that stay within the route are fine.
    assert_eq!(t.get("/open/x;jsessionid=1").status, 200);
    assert_eq!(t.get("/docs;v=2/x").status, 200);
    assert_eq!(up.hits(), 2);
}

#[test]
fn check_refuses_a_strict_route_whose_own_path_strict_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    std::fs::write(
        &path,
        r#"
upstreams: { b: { peers: ["127.0.0.1:1"] } }
routes:
  - { name: a, path_prefix: "/a%2Fb/", upstream: b, auth: none }
  - { name: c, path_prefix: "/c%2Fd/", upstream: b, auth: none, path_policy: permissive }
  - { name: e, path_prefix: /e/, upstream: b, auth: none, path_policy: lenient }
"#,
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let text = format!("{out}{err}");
    assert!(
        text.contains("routes[0].path_policy: the route's own path"),
        "{text}"
    );
    assert!(
        text.contains(r#"routes[2].path_policy: expected strict or permissive, got "lenient""#),
        "{text}"
    );
    assert!(!text.contains("routes[1]"), "{text}");
}
