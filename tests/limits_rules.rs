//! `limits.rules` (keys from the client address, headers, claims, routes),
//! calendar windows, shadow rules and the rate-limit response fields, with
//! real tollgate processes, a real redis-server and tokens from PyJWT.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "rules-secret-0123456789abcdef0123";

// Tests send more requests on one kept-alive connection than the default
// server.max_requests_per_connection (1000): no limit here.
/// A public route (no token) and a JWT route; `extra` is appended at the
/// top level (redis, limits...).
fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 2, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock", max_requests_per_connection: 0, trusted_proxies: ["127.0.0.1/32"] }}
admin: {{ listen: "127.0.0.1:{{admin}}", token: "admin-secret" }}
log: {{ level: warn, color: false }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
upstreams: {{ backend: {{ peers: ["{upstream}"] }} }}
routes:
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
  - {{ name: api, path_prefix: /api/, upstream: backend }}
{extra}
"#
    )
}

/// `limits:` with `sync` and the given body (indented by two spaces).
fn limits(sync: &str, body: &str) -> String {
    format!("limits:\n  sync: {sync}\n{body}")
}

fn token(claims: serde_json::Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(unix_now() + 3600);
    claims["allowed_routes"] = json!(["/*"]);
    pyjwt(json!({"alg": "HS256", "key": SECRET, "claims": claims}))
}

fn get_with(t: &Tollgate, path: &str, headers: &str) -> Response {
    t.request(&format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
    ))
}

const PER_IP: &str = r#"  default: [{ requests: 1000000, window: 1m }]
  rules:
    - { name: per-ip, key: client_ip, windows: [{ requests: 200, window: 1h }] }"#;

#[test]
fn a_per_ip_rule_is_exact_across_three_instances() {
    let up = Recorder::start();
    let redis = Redis::start();
    let redis_cfg = format!(
        "redis: {{ url: \"{}\", timeout: 500ms, key_prefix: \"tg:\" }}",
        redis.url()
    );
    for (sync, low, high) in [("hybrid", 200, 206), ("exact", 200, 200)] {
        let cfg = config(
            &up.addr(),
            &format!("{redis_cfg}\n{}", limits(sync, PER_IP)),
        );
        let fleet: Vec<Tollgate> = (0..3).map(|_| Tollgate::start(&cfg)).collect();
        avoid_window_edge(3600, Duration::from_secs(20));
        let before = up.hits();
        // Every instance sees the client through a trusted hop (127.0.0.1):
        // the address that counts is the one X-Forwarded-For names.
        let client = format!(
            "X-Forwarded-For: 198.51.100.{}\r\n",
            if sync == "hybrid" { 1 } else { 2 }
        );
        let (admitted, limited) = hammer_with(&fleet, "/public/x", &client, 300);
        assert_eq!(admitted + limited, 900);
        assert!(
            (low..=high).contains(&admitted),
            "{sync}: admitted {admitted} of 900 with a per-ip limit of 200"
        );
        assert_eq!(up.hits() - before, admitted, "what reached the upstream");
        // Another address has its own budget.
        let other = get_with(&fleet[0], "/public/x", "X-Forwarded-For: 198.51.100.77\r\n");
        assert_eq!(other.status, 200);
        if sync == "hybrid" {
            // An instance may still hold a unit of a late lease top-up.
            continue;
        }
        // A request with a token is counted by the rule as well.
        let tok = token(json!({"api_key": format!("ip-{sync}")}));
        let with_token = get_with(
            &fleet[1],
            "/api/x",
            &format!("{client}Authorization: Bearer {tok}\r\n"),
        );
        with_token.assert_refusal(429, "rate_limited");
        assert!(
            with_token.json()["message"]
                .as_str()
                .is_some_and(|m| m.contains("200 requests per 1h")),
            "{}",
            with_token.text()
        );
    }
}

#[test]
fn rules_far_from_their_limit_cost_few_redis_calls() {
    let up = Recorder::start();
    let redis = Redis::start();
    let body = r#"  default: [{ requests: 1000000, window: 1m }]
  rules:
    - { name: per-ip, key: client_ip, windows: [{ requests: 1000000, window: 1h }] }
    - { name: per-route, key: api_key+route, windows: [{ requests: 1000000, window: 1m }, { requests: 100000000, calendar: month }] }"#;
    let cfg = config(
        &up.addr(),
        &format!(
            "redis: {{ url: \"{}\", timeout: 500ms }}\n{}",
            redis.url(),
            limits("hybrid", body)
        ),
    );
    let t = Tollgate::start(&cfg);
    let tok = token(json!({"api_key": "busy"}));
    let (admitted, _) = hammer_with(
        std::slice::from_ref(&t),
        "/api/x",
        &format!("Authorization: Bearer {tok}\r\n"),
        2000,
    );
    assert_eq!(admitted, 2000);
    let calls =
        metric_value(&t.metrics(), r#"tollgate_redis_calls_total{op="acquire"}"#).unwrap_or(0.0);
    // Three scopes (the key, two rules), four windows, 2,000 requests.
    eprintln!("{calls} lease calls for 2000 requests");
    assert!(
        calls / 2000.0 <= 0.02,
        "{calls} lease calls for 2000 requests"
    );
}

#[test]
fn a_rule_without_its_key_is_skipped_and_claims_and_headers_key_it() {
    let up = Recorder::start();
    let body = r#"  default: [{ requests: 1000000, window: 1m }]
  rules:
    - { name: tenant, key: "header:X-Tenant", routes: [public], windows: [{ requests: 2, window: 1h }] }
    - { name: per-user, key: "claim:sub", routes: [api], windows: [{ requests: 1, window: 1h }] }"#;
    let t = Tollgate::start(&config(&up.addr(), &limits("hybrid", body)));
    avoid_window_edge(3600, Duration::from_secs(10));
    // No X-Tenant header: the rule does not apply, so nothing limits.
    for _ in 0..5 {
        assert_eq!(t.get("/public/x").status, 200);
    }
    let tenant = |name: &str| get_with(&t, "/public/x", &format!("X-Tenant: {name}\r\n"));
    assert_eq!(tenant("acme").status, 200);
    assert_eq!(tenant("acme").status, 200);
    tenant("acme").assert_refusal(429, "rate_limited");
    assert_eq!(tenant("globex").status, 200);
    // The claim keys the rule: another subject has its own budget; a token
    // without the claim skips the rule.
    let call = |claims: serde_json::Value| {
        get_with(
            &t,
            "/api/x",
            &format!("Authorization: Bearer {}\r\n", token(claims)),
        )
    };
    assert_eq!(call(json!({"api_key": "k1", "sub": "alice"})).status, 200);
    call(json!({"api_key": "k2", "sub": "alice"})).assert_refusal(429, "rate_limited");
    assert_eq!(call(json!({"api_key": "k1", "sub": "bob"})).status, 200);
    for _ in 0..3 {
        assert_eq!(call(json!({"api_key": "k3"})).status, 200);
    }
}

#[test]
fn shadow_rules_count_and_report_but_never_refuse() {
    let up = Recorder::start();
    let body = r#"  default: [{ requests: 100, window: 1m }]
  rules:
    - { name: trial, key: api_key, windows: [{ requests: 2, window: 1m }], shadow: true }"#;
    let t = Tollgate::start(&config(&up.addr(), &limits("hybrid", body)));
    avoid_window_edge(60, Duration::from_secs(10));
    let auth = format!(
        "Authorization: Bearer {}\r\n",
        token(json!({"api_key": "shadowed"}))
    );
    let answers: Vec<Response> = (0..5).map(|_| get_with(&t, "/api/x", &auth)).collect();
    assert!(answers.iter().all(|r| r.status == 200));
    assert_eq!(up.hits(), 5);
    let last = &answers[4];
    assert_eq!(
        last.header("ratelimit-policy"),
        Some("\"default-1m\";q=100;w=60, \"trial-1m\";q=2;w=60")
    );
    let current = last.header("ratelimit").unwrap_or_default();
    assert!(
        current.starts_with("\"default-1m\";r=95;t=") && current.contains("\"trial-1m\";r=0;t="),
        "{current}"
    );
    t.wait_metric(
        r#"tollgate_ratelimit_decisions_total{decision="shadow_limited",source="local"}"#,
        3.0,
    );
    t.wait_metric(
        r#"tollgate_ratelimit_decisions_total{decision="allowed",source="local"}"#,
        2.0,
    );
    // Per rule, and per policy for the dashboard's refusal panel.
    let m = t.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"tollgate_ratelimit_rule_decisions_total{decision="shadow_limited",rule="trial"}"#
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"tollgate_ratelimit_refusals_total{decision="shadow_limited",policy="trial-1m"}"#
        ),
        Some(3.0)
    );
}

#[test]
fn limits_headers_choose_the_fields() {
    let up = Recorder::start();
    let auth = format!(
        "Authorization: Bearer {}\r\n",
        token(json!({"api_key": "fields-key-1"}))
    );
    let fields = [
        "ratelimit-policy",
        "ratelimit",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
    ];
    for (mode, expected) in [
        ("draft", vec![true, true, false, false, false]),
        ("legacy", vec![false, false, true, true, true]),
        ("both", vec![true, true, true, true, true]),
        ("none", vec![false, false, false, false, false]),
    ] {
        let body = format!(
            "  headers: {mode}\n  default: [{{ requests: 2, window: 1m }}, {{ requests: 50, window: 1h }}]"
        );
        let t = Tollgate::start(&config(&up.addr(), &limits("hybrid", &body)));
        avoid_window_edge(60, Duration::from_secs(10));
        let ok = get_with(&t, "/api/x", &auth);
        assert_eq!(ok.status, 200);
        let present: Vec<bool> = fields.iter().map(|f| ok.header(f).is_some()).collect();
        assert_eq!(present, expected, "{mode}: {:?}", ok.headers);
        if mode == "draft" {
            assert_eq!(
                ok.header("ratelimit-policy"),
                Some("\"default-1m\";q=2;w=60, \"default-1h\";q=50;w=3600")
            );
        }
        if mode == "legacy" {
            // The window closest to exhaustion: 1 of 2 left beats 49 of 50.
            assert_eq!(ok.header("ratelimit-limit"), Some("2"));
            assert_eq!(ok.header("ratelimit-remaining"), Some("1"));
        }
        // No field ever carries the caller's key.
        assert!(ok.headers.values().all(|v| !v.contains("fields-key-1")));
        get_with(&t, "/api/x", &auth);
        let refused = get_with(&t, "/api/x", &auth);
        refused.assert_refusal(429, "rate_limited");
        let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry));
        let present: Vec<bool> = fields.iter().map(|f| refused.header(f).is_some()).collect();
        assert_eq!(present, expected, "{mode} on 429");
    }
}

/// The next UTC midnight and the next month start (Unix seconds), worked
/// out by Python's `datetime` (an implementation independent of
/// tollgate's), and the current month's length in seconds.
fn calendar_ends() -> (u64, u64, u64) {
    let out = Command::new(python3())
        .args([
            "-c",
            "import datetime as d, time\n\
             t = d.datetime.fromtimestamp(time.time(), d.timezone.utc)\n\
             day = t.replace(hour=0, minute=0, second=0, microsecond=0)\n\
             first = day.replace(day=1)\n\
             nxt = (first + d.timedelta(days=32)).replace(day=1)\n\
             print(int((day + d.timedelta(days=1)).timestamp()),\n\
                   int(nxt.timestamp()), int((nxt - first).total_seconds()))",
        ])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    (v[0], v[1], v[2])
}

/// Unix time in seconds, with its fraction.
fn unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `f()`, and the Unix times just before and just after it ran: what it
/// reports of "now" lies between them, however long the machine made it
/// wait.
fn bracketed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let before = unix_f64();
    let out = f();
    (out, before, unix_f64())
}

/// `left` seconds to `end`, said at some instant between `before` and
/// `after`: within a second's rounding either side.
fn left_until(left: u64, end: u64, before: f64, after: f64) -> bool {
    let left = left as f64;
    let end = end as f64;
    left >= end - after - 1.5 && left <= end - before + 1.5
}

#[test]
fn calendar_windows_reset_at_utc_midnight_and_the_month_start() {
    let up = Recorder::start();
    let redis = Redis::start();
    let body = r#"  default: [{ requests: 1000000, window: 1m }]
  rules:
    - { name: quota, key: api_key, windows: [{ requests: 3, calendar: day }, { requests: 1000, calendar: month }] }"#;
    let with_redis = format!(
        "redis: {{ url: \"{}\", timeout: 500ms, key_prefix: \"tg:\" }}\n{}",
        redis.url(),
        limits("hybrid", body)
    );
    for (name, cfg) in [("redis", with_redis), ("local", limits("hybrid", body))] {
        let t = Tollgate::start(&config(&up.addr(), &cfg));
        let auth = format!(
            "Authorization: Bearer {}\r\n",
            token(json!({"api_key": format!("calendar-{name}")}))
        );
        let (midnight, month_end, month_len) = calendar_ends();
        assert!(
            midnight as f64 - unix_f64() > 60.0,
            "too close to midnight UTC to count a day"
        );
        let (first, before, after) = bracketed(|| get_with(&t, "/api/x", &auth));
        assert_eq!(first.status, 200);
        let policy = first.header("ratelimit-policy").unwrap_or_default();
        assert!(
            policy.contains("\"quota-day\";q=3;w=86400")
                && policy.contains(&format!("\"quota-month\";q=1000;w={month_len}")),
            "{name}: {policy}"
        );
        let current = first.header("ratelimit").unwrap_or_default().to_string();
        let t_of = |item: &str| -> u64 {
            current
                .split(", ")
                .find(|i| i.starts_with(item))
                .and_then(|i| i.rsplit("t=").next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{item} in {current}"))
        };
        assert!(
            left_until(t_of("\"quota-day\""), midnight, before, after),
            "{name}: {current} vs midnight at {midnight}, answered between {before} and {after}"
        );
        assert!(
            left_until(t_of("\"quota-month\""), month_end, before, after),
            "{name}: {current} vs the month's end at {month_end}, answered between {before} and {after}"
        );
        assert!(current.contains("\"quota-day\";r=2;"), "{current}");
        assert!(current.contains("\"quota-month\";r=999;"), "{current}");
        get_with(&t, "/api/x", &auth);
        get_with(&t, "/api/x", &auth);
        let (refused, before, after) = bracketed(|| get_with(&t, "/api/x", &auth));
        refused.assert_refusal(429, "rate_limited");
        assert!(
            refused.text().contains("3 requests per day"),
            "{}",
            refused.text()
        );
        let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!(
            left_until(retry, midnight, before, after),
            "{name}: retry {retry} vs midnight at {midnight}, answered between {before} and {after}"
        );
        if name == "redis" {
            // The day's key dies just after midnight, the month's just after
            // the month ends: a second of slack plus up to a minute the key's
            // name picks (so one period's keys do not all expire at once).
            let keys = redis.cli(&["--scan", "--pattern", "tg:rl:*"]);
            let day_key = keys
                .lines()
                .find(|k| k.contains(":day:") && !k.ends_with(":l"))
                .expect("a day key");
            let month_key = keys
                .lines()
                .find(|k| k.contains(":month:") && !k.ends_with(":l"))
                .expect("a month key");
            let lives_past = |k: &str, end: u64| {
                let (ttl, before, after) =
                    bracketed(|| -> u64 { redis.cli(&["PTTL", k]).trim().parse().unwrap() });
                let dies = ttl as f64 / 1000.0;
                // It dies between a second and 61 s after `end` (a little
                // more for the script's own time).
                assert!(
                    dies + after >= end as f64 + 1.0 - 1.5 && dies + before <= end as f64 + 62.0,
                    "{k} lives {dies} s from between {before} and {after}, its period ends at {end}"
                );
            };
            lives_past(day_key, midnight);
            lives_past(month_key, month_end);
            // A rule's key is a hash: the api key it came from is not in it.
            assert!(
                keys.lines()
                    .filter(|k| k.contains("{r:"))
                    .all(|k| !k.contains("calendar-redis")),
                "{keys}"
            );
        }
    }
}

/// The Lua side's calendar arithmetic (lua/prelude.lua, run by a real
/// redis-server) against Python's `datetime`, at month ends, leap days and
/// year ends from 1970 to 2100.
#[test]
fn the_scripts_find_the_same_days_and_months_as_python() {
    let redis = Redis::start();
    let script = format!(
        "{}\nlocal out = {{}}\nfor i = 1, #ARGV do\n  local now = tonumber(ARGV[i])\n  \
         local ds, de = period(now, -1)\n  local ms, me = period(now, -2)\n  \
         out[#out + 1] = string.format('%.0f %.0f %.0f %.0f', ds, de, ms, me)\nend\nreturn out",
        include_str!("../lua/prelude.lua")
    );
    // Every month boundary from 1970 to 2100, a microsecond either side,
    // and the middle of each month.
    let py = Command::new(python3())
        .args([
            "-c",
            "import datetime as d\n\
             for y in range(1970, 2101):\n\
             \x20 for m in range(1, 13):\n\
             \x20   s = int(d.datetime(y, m, 1, tzinfo=d.timezone.utc).timestamp()) * 1000000\n\
             \x20   print(s - 1, s, s + 1, s + 14 * 86400 * 1000000 + 12345)",
        ])
        .output()
        .expect("python3");
    let times: Vec<String> = String::from_utf8_lossy(&py.stdout)
        .split_whitespace()
        .filter(|t| !t.starts_with('-'))
        .map(str::to_string)
        .collect();
    assert!(times.len() > 6000);
    for chunk in times.chunks(500) {
        let mut args = vec!["EVAL", script.as_str(), "0"];
        args.extend(chunk.iter().map(String::as_str));
        let lua = redis.cli(&args);
        let expected = Command::new(python3())
            .arg("-c")
            .arg(
                "import datetime as d, sys\n\
                 U = 1000000\n\
                 for t in sys.argv[1:]:\n\
                 \x20 t = int(t); x = d.datetime.fromtimestamp(t // U, d.timezone.utc)\n\
                 \x20 day = x.replace(hour=0, minute=0, second=0)\n\
                 \x20 first = day.replace(day=1); nxt = (first + d.timedelta(days=32)).replace(day=1)\n\
                 \x20 ts = lambda v: int(v.timestamp()) * U\n\
                 \x20 print(ts(day), ts(day) + 86400 * U, ts(first), ts(nxt))",
            )
            .args(chunk)
            .output()
            .expect("python3");
        let expected = String::from_utf8_lossy(&expected.stdout);
        let lua: Vec<&str> = lua
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let expected: Vec<&str> = expected.lines().collect();
        assert_eq!(lua.len(), chunk.len(), "{lua:?}");
        for ((t, got), want) in chunk.iter().zip(&lua).zip(&expected) {
            assert_eq!(got, want, "at {t} µs");
        }
    }
}

#[test]
fn the_quota_view_lists_rules_and_calendar_windows() {
    let up = Recorder::start();
    let redis = Redis::start();
    let body = r#"  default: [{ requests: 100, window: 1m }]
  rules:
    - { name: monthly, key: api_key, windows: [{ requests: 5000, calendar: month }] }
    - { name: per-route, key: api_key+route, routes: [api], windows: [{ requests: 10, window: 1h }] }
    - { name: per-ip, key: client_ip, windows: [{ requests: 10, window: 1h }] }"#;
    let cfg = format!(
        "redis: {{ url: \"{}\", timeout: 500ms }}\n{}",
        redis.url(),
        limits("hybrid", body)
    );
    let t = Tollgate::start(&config(&up.addr(), &cfg));
    avoid_window_edge(3600, Duration::from_secs(10));
    let auth = format!(
        "Authorization: Bearer {}\r\n",
        token(json!({"api_key": "viewed"}))
    );
    for _ in 0..2 {
        assert_eq!(get_with(&t, "/api/x", &auth).status, 200);
    }
    let (_, _, month_len) = calendar_ends();
    let r = admin_call(&t, "admin-secret", "GET", "/admin/quota/viewed", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let windows = v["windows"].as_array().expect("windows");
    let policies: Vec<&str> = windows
        .iter()
        .filter_map(|w| w["policy"].as_str())
        .collect();
    // The client address is not known to the admin view: per-ip is left out.
    assert_eq!(
        policies,
        ["default-1m", "monthly-month", "per-route-1h"],
        "{v}"
    );
    let monthly = &windows[1];
    assert_eq!(monthly["scope"], "rule");
    assert_eq!(monthly["calendar"], true);
    assert_eq!(monthly["window_seconds"], month_len);
    // Leases: what this instance holds counts as used in Redis, so `used`
    // is at least what was admitted.
    assert!(monthly["used"].as_u64().unwrap() >= 2, "{monthly}");
    assert_eq!(
        windows[2]["used"].as_u64().unwrap() + windows[2]["remaining"].as_u64().unwrap(),
        10
    );
}

#[test]
fn bad_rules_are_reported_with_their_key_paths() {
    let bad = r#"
limits:
  algorithm: gcra
  default: [{ requests: 10, calendar: week }]
  org: [{ requests: 10, window: 1m, calendar: day }]
  rules:
    - { name: default, key: "ip", windows: [{ requests: 5, calendar: month }] }
    - { name: ok, key: client_ip, routes: [nowhere], windows: [] }
routes: [{ name: api, path_prefix: /api/, upstream: backend, auth: none }]
upstreams: { backend: { peers: ["127.0.0.1:9"] } }
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("tollgate check");
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    for path in [
        "limits.default[0].calendar",
        "limits.org[0].calendar",
        "limits.rules[0].name",
        "limits.rules[0].key",
        "limits.rules[1].routes[0]",
        "limits.rules[1].windows",
    ] {
        assert!(text.contains(path), "{path} missing from:\n{text}");
    }
}
