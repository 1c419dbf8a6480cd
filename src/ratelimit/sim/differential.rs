//! The simulated server checked against a real `redis-server`: the same
//! script calls, with random arguments, go to both; their answers and the
//! counters and ledgers they leave must agree (the fields that depend on
//! the moment of the call — time left, retry — within a few milliseconds).
//! This is what lets the simulation stand for Redis: Lua 5.1's numbers,
//! Redis' conversions between Lua and its replies, and the commands the
//! scripts use behave the same in both.

use super::server::Server;
use redis::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private redis-server, stopped when dropped.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn start_redis() -> RedisServer {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..4 {
        let port = free_port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            let ping = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return RedisServer {
                    child,
                    port,
                    _dir: dir,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("redis-server did not start");
}

/// The scripts as `remote.rs` loads them.
fn source(file: &str) -> String {
    let read = |f: &str| {
        std::fs::read_to_string(format!("{}/lua/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    match file {
        "fleet.lua" | "concurrency.lua" => read(file),
        _ => read("prelude.lua") + &read(file),
    }
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => *n,
                _ => i64::MIN,
            })
            .collect(),
        Value::Int(n) => vec![*n],
        Value::Nil => vec![],
        _ => vec![i64::MIN],
    }
}

/// One random call of a window script: its script, keys and arguments.
fn window_call(rng: &mut fastrand::Rng) -> (&'static str, Vec<String>, Vec<String>) {
    let script = ["fixed_window.lua", "sliding_window.lua", "gcra.lua"][rng.usize(0..3)];
    let n = rng.usize(1..=2);
    let key = format!("d:rl:{{k:{}}}", rng.u32(0..3));
    let mut keys = Vec::new();
    let mut args = vec![n.to_string(), format!("i{}", rng.u32(0..2))];
    let mut lengths = Vec::new();
    for _ in 0..n {
        // Windows of this script's kinds; a calendar day now and then.
        let window: i64 = if script != "gcra.lua" && rng.u32(0..6) == 0 {
            -1
        } else {
            loop {
                let w = [1, 2, 5, 30, 60, 3600][rng.usize(0..6)] * 1_000_000;
                if !lengths.contains(&w) {
                    break w;
                }
            }
        };
        lengths.push(window);
        keys.push(format!(
            "{key}:{}",
            if window < 0 {
                "day".into()
            } else {
                (window / 1_000_000).to_string()
            }
        ));
        let limit = [1u64, 7, 100, 1 << 40, 1 << 53][rng.usize(0..5)];
        let need = [0u64, 1, 3, 10, 1 << 45][rng.usize(0..5)];
        let divisor = [1u64, 32, u64::MAX / 2][rng.usize(0..3)];
        let max_chunk = [0u64, 64, 1 << 40][rng.usize(0..3)];
        // A period the caller names: this one (worked out as the script
        // does), an older one, or none.
        let now = crate::clock::now_us();
        let period: i64 = match rng.u32(0..3) {
            0 => -1,
            1 if window > 0 => (now - now % window as u64) as i64,
            1 => (now - now % 86_400_000_000) as i64,
            _ => 1_000_000,
        };
        let floor = [0u64, 1, 5, 100][rng.usize(0..4)];
        let back = [0u64, 1, 3][rng.usize(0..3)];
        let consumed: i64 = [-1, 0, 2][rng.usize(0..3)];
        let incarnation = rng.u32(0..3);
        for a in [
            limit.to_string(),
            window.to_string(),
            need.to_string(),
            divisor.to_string(),
            max_chunk.to_string(),
            period.to_string(),
            floor.to_string(),
            back.to_string(),
            consumed.to_string(),
            incarnation.to_string(),
        ] {
            args.push(a);
        }
    }
    (script, keys, args)
}

/// Whether two answers agree: exactly, but for times (the time left and
/// the retry of window scripts, a GCRA bucket's) which may differ by the
/// time between the two calls (`apart_us`: both servers read this
/// machine's clock within it, however busy the machine is).
fn agree(script: &str, real: &[i64], sim: &[i64], apart_us: u64) -> bool {
    if real.len() != sim.len() {
        return false;
    }
    real.iter().zip(sim).enumerate().all(|(i, (a, b))| {
        // A few milliseconds, or a hundredth of a value that a sliding
        // window's weight moves every microsecond.
        let slack = apart_us.max(a.unsigned_abs().max(b.unsigned_abs()) / 100);
        let timed = match script {
            "fixed_window.lua" => matches!(i % 6, 2 | 3),
            // The weight moves what is available, and so a share of it.
            "sliding_window.lua" => i % 6 != 4,
            // A bucket drains by the microsecond: what it grants too.
            "gcra.lua" => matches!(i % 6, 0..=3),
            "quota.lua" => i % 3 == 2,
            _ => false,
        };
        if timed {
            a.abs_diff(*b) <= slack
        } else {
            a == b
        }
    })
}

#[test]
fn the_simulated_server_agrees_with_redis() {
    let real = start_redis();
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{}", real.port))
        .and_then(|c| c.get_connection())
        .unwrap();
    let sim = Server::new(1);
    let mut rng = fastrand::Rng::with_seed(7);
    let calls = std::env::var("SIM_DIFF_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1500);
    let mut compared = 0;
    let mut apart_us = 0u64;
    for call in 0..calls {
        let (script, keys, args) = match rng.u32(0..10) {
            0 => (
                "fleet.lua",
                vec!["d:instances".to_string()],
                vec![format!("i{}", rng.u32(0..3)), "10000".into()],
            ),
            1 => (
                "concurrency.lua",
                vec![format!("d:cc:{{k:{}}}", rng.u32(0..2))],
                vec![
                    format!("i{}", rng.u32(0..3)),
                    rng.u32(0..5).to_string(),
                    rng.u32(1..4).to_string(),
                    "30000".into(),
                ],
            ),
            2 => {
                let n = rng.usize(1..=2);
                let key = format!("d:rl:{{k:{}}}", rng.u32(0..3));
                let windows: Vec<i64> = [1_000_000, 60_000_000, -1][..n].to_vec();
                let keys = windows
                    .iter()
                    .map(|w| {
                        format!(
                            "{key}:{}",
                            if *w < 0 {
                                "day".into()
                            } else {
                                (w / 1_000_000).to_string()
                            }
                        )
                    })
                    .collect();
                let mut args = vec![n.to_string(), format!("i{}", rng.u32(0..2))];
                args.extend(windows.iter().map(|w| w.to_string()));
                ("quota.lua", keys, args)
            }
            _ => window_call(&mut rng),
        };
        let src = source(script);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&src).arg(keys.len()).arg(&keys).arg(&args);
        let asked = Instant::now();
        let from_redis: redis::RedisResult<Value> = cmd.query(&mut con);
        let mut sim_args: Vec<Vec<u8>> = vec![
            b"EVAL".to_vec(),
            src.clone().into_bytes(),
            keys.len().to_string().into_bytes(),
        ];
        sim_args.extend(keys.iter().map(|k| k.clone().into_bytes()));
        sim_args.extend(args.iter().map(|a| a.clone().into_bytes()));
        let from_sim = sim.execute_now(sim_args);
        // What the two servers' clocks can differ by (a millisecond of the
        // clocks' rounding more, and never under 50 ms).
        // Stored times carry the differences of earlier calls since the
        // last fresh start: the largest counts.
        apart_us = apart_us.max((asked.elapsed().as_micros() as u64 + 1_000).max(50_000));
        match (&from_redis, &from_sim) {
            (Ok(a), Ok(b)) => {
                let (a, b) = (ints(a), ints(b));
                // A call that straddled a period's end may see two periods.
                let straddled = (script.ends_with("window.lua")
                    && a.chunks(6).zip(b.chunks(6)).any(|(x, y)| x.get(4) != y.get(4)))
                    || (script == "quota.lua"
                        && a.chunks(3).zip(b.chunks(3)).any(|(x, y)| {
                            x.get(2).zip(y.get(2)).is_some_and(|(p, q)| p.abs_diff(*q) > 500_000)
                        }));
                if straddled {
                    let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
                    sim.restart();
                    apart_us = 0;
                    continue;
                }
                assert!(
                    agree(script, &a, &b, apart_us),
                    "call {call}: {script} {keys:?} {args:?}\n  redis-server: {a:?}\n  simulated:    {b:?}"
                );
                compared += 1;
                if a != b && script != "quota.lua" {
                    // Answers that depend on the microsecond leave the two
                    // servers a little apart: both start again from empty.
                    let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
                    sim.restart();
                    apart_us = 0;
                    continue;
                }
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.kind(), b.kind(), "call {call}: {script} {args:?}: {a} / {b}");
            }
            _ => panic!("call {call}: {script} {keys:?} {args:?}\n  redis-server: {from_redis:?}\n  simulated:    {from_sim:?}"),
        }
        // The counters and ledgers the call left.
        for k in &keys {
            let names: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{k}*"))
                .query(&mut con)
                .unwrap();
            for name in names {
                let kind: String = redis::cmd("TYPE").arg(&name).query(&mut con).unwrap();
                match kind.as_str() {
                    "string" => {
                        let v: String = redis::cmd("GET").arg(&name).query(&mut con).unwrap();
                        let mine = sim.string(&name).unwrap_or_default();
                        if name.ends_with(":gcra") {
                            let (a, b): (i64, i64) =
                                (v.parse().unwrap(), mine.parse().unwrap_or(0));
                            assert!(
                                a.abs_diff(b) <= apart_us,
                                "call {call}: {name}: {v} / {mine} ({apart_us} µs apart at most)"
                            );
                        } else {
                            assert_eq!(v, mine, "call {call}: {name}");
                        }
                    }
                    "hash" => {
                        let v: std::collections::BTreeMap<String, String> =
                            redis::cmd("HGETALL").arg(&name).query(&mut con).unwrap();
                        let mine = sim.hash(&name);
                        // Concurrency holdings carry an expiry time in ms.
                        if !name.contains(":cc:") {
                            assert_eq!(v, mine, "call {call}: {name}");
                        } else {
                            assert_eq!(
                                v.keys().collect::<Vec<_>>(),
                                mine.keys().collect::<Vec<_>>(),
                                "call {call}: {name}"
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(
        compared > calls / 2,
        "only {compared} of {calls} calls compared"
    );
}
