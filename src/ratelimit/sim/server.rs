//! A simulated Redis for the limiter's simulation: the real scripts of
//! `lua/` run in Lua 5.1 (the version Redis embeds) against an in-memory
//! keyspace, on the virtual clock of the simulation's runtime.
//!
//! Faults are what a real deployment sees: latency on the way there and
//! back, a server that stalls (everything queues behind it, as with
//! `DEBUG SLEEP` or a slow expire cycle), a server that is down (calls are
//! refused), a restart that loses every key and script, and an instance cut
//! off from it (its calls vanish and time out). A call whose caller gave up
//! still runs when it reaches the server, as in Redis.
//!
//! The server also checks what tollgate sends it: a command Redis would
//! reject as malformed (a non-positive expiry, a non-integer where an
//! integer is due, a wrong number of arguments) is recorded as a violation.

use crate::clock::Instant;
use crate::redis_client::sim::Link;
use mlua::{Lua, Value as LuaValue};
use redis::{Cmd, RedisError, RedisFuture, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Clone, Debug)]
enum Data {
    Str(String),
    Hash(BTreeMap<String, String>),
    /// Members and scores.
    ZSet(BTreeMap<String, f64>),
}

#[derive(Clone, Debug)]
struct Entry {
    data: Data,
    /// Wall-clock microseconds of the server when the key goes.
    expires_at: Option<u64>,
}

/// What one script call granted, for the simulation's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    pub instance: usize,
    pub sha: String,
    pub keys: Vec<String>,
    pub args: Vec<String>,
    pub reply: Vec<i64>,
    /// Server wall-clock microseconds when it ran.
    pub at_us: u64,
}

/// The network and the server as they are now; the world changes them.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// One-way latency range, each way.
    pub latency: (Duration, Duration),
    /// Nothing executes before this (a stall).
    pub stalled_until: Option<Instant>,
    /// Connections are refused until then.
    pub down_until: Option<Instant>,
    /// Instances whose calls vanish.
    pub partitioned: Vec<usize>,
}

struct State {
    keys: HashMap<String, Entry>,
    scripts: HashMap<String, String>,
    lua: Lua,
    compiled: HashMap<String, mlua::Function>,
    faults: Faults,
    rng: fastrand::Rng,
    /// Connections that lost their socket at a restart: their next call fails.
    dropped: Vec<bool>,
    pub violations: Vec<String>,
    pub executed: Vec<Executed>,
    pub restarts: u64,
    /// Integer values lost at restarts, by key.
    lost: HashMap<String, i64>,
    /// Calls on their way to or back from the server.
    in_flight: usize,
    /// Window counters units were handed back to: (base key, period start).
    handed_back: std::collections::HashSet<(String, u64)>,
    /// The least a window's counter counted as used in a period by an
    /// answer sent to an instance: (base key, period start, instance).
    /// What the instance may know was left is at most its limit minus it.
    /// Each entry: when the answer reached the instance (the simulation's
    /// wall clock, microseconds) and what it said was used. Answers that
    /// never arrived (the caller had given up) taught nothing.
    least_used: HashMap<(String, u64, usize), Vec<(u64, u64)>>,
    /// What the window script just run says of each window: (base key,
    /// period start, used), kept until its answer is delivered.
    answer: Vec<(String, u64, u64)>,
    /// Offset of the server's clock from the simulation's wall clock.
    skew_us: i64,
}

/// One simulated Redis server; `link(i)` is instance `i`'s connection.
#[derive(Clone)]
pub struct Server(Arc<Mutex<State>>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(kind: redis::ErrorKind, what: &str) -> RedisError {
    RedisError::from((kind, "simulated", what.to_string()))
}

fn server_error(text: &str) -> Value {
    // A RESP error line parses into the error kind Redis would produce
    // (NOSCRIPT, ERR, ...), the same way the client library reads it.
    redis::parse_redis_value(format!("-{text}\r\n").as_bytes())
        .unwrap_or(Value::SimpleString("ERR".into()))
}

/// Lua 5.1 numbers as Redis 7 writes them into a command (`%.17g`): whole
/// numbers below 10^17 in full, anything else with an exponent or a
/// fraction, which integer commands then refuse.
fn number_arg(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e17 {
        format!("{}", n as i64)
    } else {
        format!("{n:e}")
    }
}

fn int_arg(s: &str) -> Option<i64> {
    s.parse::<i64>().ok()
}

impl Server {
    pub fn new(seed: u64) -> Server {
        Server(Arc::new(Mutex::new(State {
            keys: HashMap::new(),
            scripts: HashMap::new(),
            lua: Lua::new(),
            compiled: HashMap::new(),
            faults: Faults {
                latency: (Duration::from_micros(100), Duration::from_micros(400)),
                ..Faults::default()
            },
            rng: fastrand::Rng::with_seed(seed),
            dropped: Vec::new(),
            violations: Vec::new(),
            executed: Vec::new(),
            restarts: 0,
            lost: HashMap::new(),
            in_flight: 0,
            handed_back: Default::default(),
            least_used: HashMap::new(),
            answer: Vec::new(),
            skew_us: 0,
        })))
    }

    pub fn link(&self, instance: usize) -> Arc<dyn Link> {
        let mut s = lock(&self.0);
        if s.dropped.len() <= instance {
            s.dropped.resize(instance + 1, false);
        }
        Arc::new(SimLink {
            server: self.clone(),
            instance,
        })
    }

    pub fn set_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut lock(&self.0).faults);
    }

    /// Loses every key and script, like a restart without persistence; open
    /// connections fail their next call.
    pub fn restart(&self) {
        let mut s = lock(&self.0);
        let now = s.now_us();
        let names: Vec<String> = s.keys.keys().cloned().collect();
        for k in names {
            if let Some(Data::Str(v)) = s.get(&k, now).map(|e| e.data.clone()) {
                if let Ok(n) = v.parse::<i64>() {
                    *s.lost.entry(k).or_default() += n;
                }
            }
        }
        s.keys.clear();
        s.scripts.clear();
        s.compiled.clear();
        s.restarts += 1;
        for d in s.dropped.iter_mut() {
            *d = true;
        }
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.0).violations.clone()
    }

    pub fn take_executed(&self) -> Vec<Executed> {
        std::mem::take(&mut lock(&self.0).executed)
    }

    /// The integer value of `key` now (0 when absent).
    pub fn int(&self, key: &str) -> i64 {
        let mut s = lock(&self.0);
        let now = s.now_us();
        match s.get(key, now).map(|e| e.data.clone()) {
            Some(Data::Str(v)) => v.parse().unwrap_or(0),
            _ => 0,
        }
    }

    /// Runs one command the way a connection's would reach the server, at
    /// the server's now (the differential test against a real Redis).
    pub fn execute_now(&self, args: Vec<Vec<u8>>) -> Result<Value, RedisError> {
        match self.execute(0, args)? {
            Value::ServerError(e) => Err(e.into()),
            v => Ok(v),
        }
    }

    /// The value of a string key now.
    pub fn string(&self, key: &str) -> Option<String> {
        let mut s = lock(&self.0);
        let now = s.now_us();
        match s.get(key, now).map(|e| e.data.clone()) {
            Some(Data::Str(v)) => Some(v),
            _ => None,
        }
    }

    /// The fields of a hash key now.
    pub fn hash(&self, key: &str) -> BTreeMap<String, String> {
        let mut s = lock(&self.0);
        let now = s.now_us();
        match s.get(key, now).map(|e| e.data.clone()) {
            Some(Data::Hash(h)) => h,
            _ => BTreeMap::new(),
        }
    }

    /// Whether units were handed back to a window's counter in a period.
    pub fn handed_back(&self, base_key: &str, period: u64) -> bool {
        lock(&self.0)
            .handed_back
            .contains(&(base_key.to_string(), period))
    }

    /// The least an answer that reached `instance` before `before_us` (the
    /// simulation's wall clock) said a window's counter had used in a
    /// period (`None`: no answer had reached it).
    pub fn least_used(
        &self,
        base_key: &str,
        period: u64,
        instance: usize,
        before_us: u64,
    ) -> Option<u64> {
        lock(&self.0)
            .least_used
            .get(&(base_key.to_string(), period, instance))?
            .iter()
            .filter(|(at, _)| *at < before_us)
            .map(|(_, used)| *used)
            .min()
    }

    /// What restarts lost of an integer key.
    pub fn lost(&self, key: &str) -> u64 {
        lock(&self.0).lost.get(key).copied().unwrap_or(0).max(0) as u64
    }

    /// Whether a call is on its way to or back from the server.
    pub fn busy(&self) -> bool {
        lock(&self.0).in_flight > 0
    }

    /// Runs one command as the server would, at its (virtual) now.
    fn execute(&self, instance: usize, args: Vec<Vec<u8>>) -> Result<Value, RedisError> {
        let mut s = lock(&self.0);
        let args: Vec<String> = args
            .into_iter()
            .map(|a| String::from_utf8_lossy(&a).into_owned())
            .collect();
        let Some(name) = args.first().map(|a| a.to_ascii_uppercase()) else {
            s.violation("an empty command".into());
            return Ok(server_error("ERR empty command"));
        };
        match name.as_str() {
            "EVALSHA" | "EVAL" => Ok(s.eval(instance, &name, &args[1..])),
            "SCRIPT" if args.get(1).is_some_and(|a| a.eq_ignore_ascii_case("LOAD")) => {
                let Some(source) = args.get(2) else {
                    return Ok(server_error("ERR wrong number of arguments for 'script'"));
                };
                let sha = sha1_smol::Sha1::from(source.as_bytes())
                    .digest()
                    .to_string();
                s.scripts.insert(sha.clone(), source.clone());
                Ok(Value::BulkString(sha.into_bytes()))
            }
            _ => {
                let now = s.now_us();
                Ok(match s.command(&args, now) {
                    Ok(v) => v,
                    Err(e) => {
                        s.violation(format!("{args:?}: {e}"));
                        server_error(&e)
                    }
                })
            }
        }
    }
}

impl State {
    fn now_us(&self) -> u64 {
        (crate::clock::now_us() as i64)
            .saturating_add(self.skew_us)
            .max(0) as u64
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 100 {
            self.violations.push(what);
        }
    }

    fn get(&mut self, key: &str, now: u64) -> Option<&mut Entry> {
        let expired = self
            .keys
            .get(key)
            .is_some_and(|e| e.expires_at.is_some_and(|t| t <= now));
        if expired {
            self.keys.remove(key);
        }
        self.keys.get_mut(key)
    }

    fn eval(&mut self, instance: usize, name: &str, args: &[String]) -> Value {
        let Some(first) = args.first() else {
            return server_error("ERR wrong number of arguments for 'evalsha'");
        };
        let (sha, source): (String, String) = if name == "EVAL" {
            let sha = sha1_smol::Sha1::from(first.as_bytes()).digest().to_string();
            self.scripts.insert(sha.clone(), first.clone());
            (sha, first.clone())
        } else {
            match self.scripts.get(&first.to_ascii_lowercase()) {
                Some(src) => (first.to_ascii_lowercase(), src.clone()),
                None => return server_error("NOSCRIPT No matching script. Please use EVAL."),
            }
        };
        let Some(numkeys) = args.get(1).and_then(|n| n.parse::<usize>().ok()) else {
            self.violation(format!("script call without a key count: {args:?}"));
            return server_error("ERR value is not an integer or out of range");
        };
        if args.len() < 2 + numkeys {
            self.violation(format!(
                "script call with fewer keys than it says: {args:?}"
            ));
            return server_error("ERR Number of keys can't be greater than number of args");
        }
        let keys = args[2..2 + numkeys].to_vec();
        let argv = args[2 + numkeys..].to_vec();
        let now = self.now_us();
        let reply = self.run_script(&sha, &source, &keys, &argv, now);
        let ints = match &reply {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => *i,
                    _ => i64::MIN,
                })
                .collect(),
            Value::Int(i) => vec![*i],
            _ => Vec::new(),
        };
        if std::env::var_os("SIM_TRACE").is_some() {
            println!(
                "{:>9.3}   redis i{instance} {} {:?} {:?} -> {:?}",
                (now % 100_000_000) as f64 / 1e6,
                &sha[..6],
                keys,
                argv,
                ints
            );
        }
        // Window scripts: ARGV n, instance, then 10 values per window.
        let n: usize = argv.first().and_then(|a| a.parse().ok()).unwrap_or(0);
        if argv.len() == 2 + 10 * n && ints.len() == 6 * n {
            for i in 0..n {
                let back: u64 = argv[2 + 10 * i + 7].parse().unwrap_or(0);
                let period = ints[6 * i + 4].max(0) as u64;
                if let (true, Some(key)) = (back > 0, keys.get(i)) {
                    self.handed_back.insert((key.clone(), period));
                }
                let limit: u64 = argv[2 + 10 * i].parse().unwrap_or(0);
                let used = limit.saturating_sub(ints[6 * i + 1].max(0) as u64);
                if let Some(key) = keys.get(i) {
                    self.answer.push((key.clone(), period, used));
                }
            }
        }
        self.executed.push(Executed {
            instance,
            sha,
            keys,
            args: argv,
            reply: ints,
            at_us: now,
        });
        reply
    }

    fn run_script(
        &mut self,
        sha: &str,
        source: &str,
        keys: &[String],
        argv: &[String],
        now: u64,
    ) -> Value {
        let lua = self.lua.clone();
        let function = match self.compiled.get(sha) {
            Some(f) => f.clone(),
            None => match lua.load(source).set_name(sha).into_function() {
                Ok(f) => {
                    self.compiled.insert(sha.to_string(), f.clone());
                    f
                }
                Err(e) => {
                    self.violation(format!("script does not compile: {e}"));
                    return server_error(&format!("ERR Error compiling script {e}"));
                }
            },
        };
        let state = std::cell::RefCell::new(&mut *self);
        let result: mlua::Result<Value> = lua.scope(|scope| {
            let call = scope.create_function(|lua, cmd: mlua::Variadic<LuaValue>| {
                let mut args = Vec::with_capacity(cmd.len());
                for v in cmd.iter() {
                    args.push(match v {
                        LuaValue::String(s) => s.to_string_lossy(),
                        LuaValue::Integer(i) => number_arg(*i as f64),
                        LuaValue::Number(n) => number_arg(*n),
                        other => {
                            return Err(mlua::Error::runtime(format!(
                                "Lua redis lib command arguments must be strings or integers ({})",
                                other.type_name()
                            )))
                        }
                    });
                }
                let mut st = state.borrow_mut();
                match st.command(&args, now) {
                    Ok(v) => to_lua(lua, &v),
                    Err(e) => {
                        st.violation(format!("{args:?}: {e}"));
                        Err(mlua::Error::runtime(e))
                    }
                }
            })?;
            let sha1hex = scope.create_function(|_, text: mlua::LuaString| {
                Ok(sha1_smol::Sha1::from(&text.as_bytes()[..])
                    .digest()
                    .to_string())
            })?;
            let redis = lua.create_table()?;
            redis.set("call", call)?;
            redis.set("sha1hex", sha1hex)?;
            let globals = lua.globals();
            globals.set("redis", redis)?;
            globals.set("KEYS", keys.to_vec())?;
            globals.set("ARGV", argv.to_vec())?;
            let out: LuaValue = function.call(())?;
            Ok(from_lua(&out))
        });
        match result {
            Ok(v) => v,
            Err(e) => {
                let text = e.to_string().replace(['\r', '\n'], " ");
                server_error(&format!("ERR {text}"))
            }
        }
    }

    /// The commands the scripts and the limiter use, with Redis' checks.
    fn command(&mut self, args: &[String], now: u64) -> Result<Value, String> {
        let name = args
            .first()
            .map(|a| a.to_ascii_uppercase())
            .unwrap_or_default();
        let arity = |n: usize| -> Result<(), String> {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!("ERR wrong number of arguments for '{name}'"))
            }
        };
        let integer = |s: &str| -> Result<i64, String> {
            int_arg(s).ok_or_else(|| "ERR value is not an integer or out of range".to_string())
        };
        match name.as_str() {
            "TIME" => {
                arity(1)?;
                Ok(Value::Array(vec![
                    Value::BulkString((now / 1_000_000).to_string().into_bytes()),
                    Value::BulkString((now % 1_000_000).to_string().into_bytes()),
                ]))
            }
            "PING" => Ok(Value::SimpleString("PONG".into())),
            "GET" => {
                arity(2)?;
                match self.get(&args[1], now).map(|e| e.data.clone()) {
                    None => Ok(Value::Nil),
                    Some(Data::Str(v)) => Ok(Value::BulkString(v.into_bytes())),
                    Some(_) => Err(
                        "WRONGTYPE Operation against a key holding the wrong kind of value".into(),
                    ),
                }
            }
            "SET" => {
                if args.len() < 3 {
                    return Err("ERR wrong number of arguments for 'set'".into());
                }
                let mut expires_at = None;
                let mut keep_ttl = false;
                let mut i = 3;
                while i < args.len() {
                    match args[i].to_ascii_uppercase().as_str() {
                        "PX" | "EX" => {
                            let unit = if args[i].eq_ignore_ascii_case("PX") {
                                1_000
                            } else {
                                1_000_000
                            };
                            let n = integer(args.get(i + 1).map_or("", |s| s.as_str()))?;
                            if n <= 0 {
                                return Err("ERR invalid expire time in 'set' command".into());
                            }
                            expires_at = Some(now.saturating_add(n as u64 * unit));
                            i += 2;
                        }
                        "KEEPTTL" => {
                            keep_ttl = true;
                            i += 1;
                        }
                        _ => return Err("ERR syntax error".into()),
                    }
                }
                if keep_ttl {
                    expires_at = self.get(&args[1], now).and_then(|e| e.expires_at);
                }
                self.keys.insert(
                    args[1].clone(),
                    Entry {
                        data: Data::Str(args[2].clone()),
                        expires_at,
                    },
                );
                Ok(Value::Okay)
            }
            "INCRBY" | "DECRBY" => {
                arity(3)?;
                let by = integer(&args[2])?;
                let by = if name == "DECRBY" {
                    by.checked_neg().ok_or("ERR overflow")?
                } else {
                    by
                };
                let current = match self.get(&args[1], now) {
                    None => 0,
                    Some(Entry {
                        data: Data::Str(v), ..
                    }) => integer(v)?,
                    Some(_) => return Err("WRONGTYPE".into()),
                };
                let next = current
                    .checked_add(by)
                    .ok_or("ERR increment or decrement would overflow")?;
                let expires_at = self.get(&args[1], now).and_then(|e| e.expires_at);
                self.keys.insert(
                    args[1].clone(),
                    Entry {
                        data: Data::Str(next.to_string()),
                        expires_at,
                    },
                );
                Ok(Value::Int(next))
            }
            "PEXPIRE" | "EXPIRE" => {
                arity(3)?;
                let n = integer(&args[2])?;
                if n <= 0 {
                    // Redis deletes the key: a counter that vanishes.
                    self.keys.remove(&args[1]);
                    return Err(format!("{name} with a non-positive time deletes the key"));
                }
                let unit = if name == "PEXPIRE" { 1_000 } else { 1_000_000 };
                match self.get(&args[1], now) {
                    Some(e) => {
                        e.expires_at = Some(now.saturating_add(n as u64 * unit));
                        Ok(Value::Int(1))
                    }
                    None => Ok(Value::Int(0)),
                }
            }
            "PTTL" => {
                arity(2)?;
                Ok(Value::Int(match self.get(&args[1], now) {
                    None => -2,
                    Some(Entry {
                        expires_at: None, ..
                    }) => -1,
                    Some(Entry {
                        expires_at: Some(t),
                        ..
                    }) => ((*t - now) / 1000) as i64,
                }))
            }
            "DEL" => {
                let mut n = 0;
                for k in &args[1..] {
                    if self.get(k, now).is_some() {
                        self.keys.remove(k);
                        n += 1;
                    }
                }
                Ok(Value::Int(n))
            }
            "HGET" | "HGETALL" | "HSET" | "HDEL" | "HINCRBY" => self.hash_command(&name, args, now),
            "ZADD" | "ZREMRANGEBYSCORE" | "ZCARD" => self.zset_command(&name, args, now),
            _ => Err(format!("ERR unknown command '{name}'")),
        }
    }

    fn zset_command(&mut self, name: &str, args: &[String], now: u64) -> Result<Value, String> {
        let wrong = || {
            format!(
                "ERR wrong number of arguments for '{}'",
                name.to_lowercase()
            )
        };
        let score = |s: &str| -> Result<f64, String> {
            match s {
                "-inf" => Ok(f64::NEG_INFINITY),
                "+inf" | "inf" => Ok(f64::INFINITY),
                _ => s
                    .parse::<f64>()
                    .map_err(|_| "ERR min or max is not a float".to_string()),
            }
        };
        if args.len() < 2 {
            return Err(wrong());
        }
        let key = &args[1];
        let expires_at = self.get(key, now).and_then(|e| e.expires_at);
        let mut z = match self.get(key, now) {
            None => BTreeMap::new(),
            Some(Entry {
                data: Data::ZSet(z),
                ..
            }) => z.clone(),
            Some(_) => return Err("WRONGTYPE".into()),
        };
        let reply = match name {
            "ZCARD" => {
                if args.len() != 2 {
                    return Err(wrong());
                }
                return Ok(Value::Int(z.len() as i64));
            }
            "ZADD" => {
                if args.len() != 4 {
                    return Err(wrong());
                }
                let added = z.insert(args[3].clone(), score(&args[2])?).is_none();
                Value::Int(added as i64)
            }
            _ => {
                if args.len() != 4 {
                    return Err(wrong());
                }
                let (lo, hi) = (score(&args[2])?, score(&args[3])?);
                let before = z.len();
                z.retain(|_, s| *s < lo || *s > hi);
                Value::Int((before - z.len()) as i64)
            }
        };
        if z.is_empty() {
            self.keys.remove(key);
        } else {
            self.keys.insert(
                key.clone(),
                Entry {
                    data: Data::ZSet(z),
                    expires_at,
                },
            );
        }
        Ok(reply)
    }

    fn hash_command(&mut self, name: &str, args: &[String], now: u64) -> Result<Value, String> {
        let wrong = || {
            format!(
                "ERR wrong number of arguments for '{}'",
                name.to_lowercase()
            )
        };
        if args.len() < 2 {
            return Err(wrong());
        }
        let key = &args[1];
        let hash = match self.get(key, now) {
            None => None,
            Some(Entry {
                data: Data::Hash(h),
                ..
            }) => Some(h.clone()),
            Some(_) => return Err("WRONGTYPE".into()),
        };
        let expires_at = self.get(key, now).and_then(|e| e.expires_at);
        let mut h = hash.unwrap_or_default();
        let reply = match name {
            "HGET" => {
                if args.len() != 3 {
                    return Err(wrong());
                }
                return Ok(h
                    .get(&args[2])
                    .map_or(Value::Nil, |v| Value::BulkString(v.clone().into_bytes())));
            }
            "HGETALL" => {
                if args.len() != 2 {
                    return Err(wrong());
                }
                return Ok(Value::Array(
                    h.iter()
                        .flat_map(|(k, v)| {
                            [
                                Value::BulkString(k.clone().into_bytes()),
                                Value::BulkString(v.clone().into_bytes()),
                            ]
                        })
                        .collect(),
                ));
            }
            "HSET" => {
                if args.len() < 4 || !args.len().is_multiple_of(2) {
                    return Err(wrong());
                }
                let mut added = 0;
                for pair in args[2..].chunks(2) {
                    if h.insert(pair[0].clone(), pair[1].clone()).is_none() {
                        added += 1;
                    }
                }
                Value::Int(added)
            }
            "HDEL" => {
                if args.len() < 3 {
                    return Err(wrong());
                }
                let n = args[2..].iter().filter(|f| h.remove(*f).is_some()).count();
                Value::Int(n as i64)
            }
            _ => {
                if args.len() != 4 {
                    return Err(wrong());
                }
                let by = int_arg(&args[3]).ok_or("ERR value is not an integer or out of range")?;
                let current = match h.get(&args[2]) {
                    Some(v) => int_arg(v).ok_or("ERR hash value is not an integer")?,
                    None => 0,
                };
                let next = current
                    .checked_add(by)
                    .ok_or("ERR increment or decrement would overflow")?;
                h.insert(args[2].clone(), next.to_string());
                Value::Int(next)
            }
        };
        if h.is_empty() {
            self.keys.remove(key);
        } else {
            self.keys.insert(
                key.clone(),
                Entry {
                    data: Data::Hash(h),
                    expires_at,
                },
            );
        }
        Ok(reply)
    }
}

/// A command's answer as a script sees it (Redis' RESP2-to-Lua conversion).
fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        Value::Nil => LuaValue::Boolean(false),
        Value::Int(i) => LuaValue::Number(*i as f64),
        Value::BulkString(b) => LuaValue::String(lua.create_string(b)?),
        Value::Array(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.iter().enumerate() {
                t.set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
        Value::Okay | Value::SimpleString(_) => {
            let t = lua.create_table()?;
            t.set("ok", "OK")?;
            LuaValue::Table(t)
        }
        _ => LuaValue::Boolean(false),
    })
}

/// A script's result as Redis returns it (Lua-to-RESP2: numbers truncated
/// to integers, tables to arrays up to the first nil).
fn from_lua(v: &LuaValue) -> Value {
    match v {
        LuaValue::Nil | LuaValue::Boolean(false) => Value::Nil,
        LuaValue::Boolean(true) => Value::Int(1),
        LuaValue::Integer(i) => Value::Int(*i),
        // Redis converts with a C cast: out of range is i64::MIN on x86-64.
        LuaValue::Number(n) if n.is_finite() && n.abs() < 9.223_372_036_854_775e18 => {
            Value::Int(*n as i64)
        }
        LuaValue::Number(_) => Value::Int(i64::MIN),
        LuaValue::String(s) => Value::BulkString(s.as_bytes().to_vec()),
        LuaValue::Table(t) => {
            if let Ok(e) = t.get::<String>("err") {
                return server_error(&e);
            }
            let mut out = Vec::new();
            for i in 1.. {
                match t.get::<LuaValue>(i) {
                    Ok(LuaValue::Nil) | Err(_) => break,
                    Ok(v) => out.push(from_lua(&v)),
                }
            }
            Value::Array(out)
        }
        _ => Value::Nil,
    }
}

struct SimLink {
    server: Server,
    instance: usize,
}

impl Link for SimLink {
    fn request(&self, cmd: &Cmd) -> RedisFuture<'static, Value> {
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => b"0".to_vec(),
            })
            .collect();
        let server = self.server.clone();
        let instance = self.instance;
        let (there, back, dropped, partitioned) = {
            let mut s = lock(&server.0);
            let (lo, hi) = s.faults.latency;
            let span = hi.saturating_sub(lo).as_micros() as u64;
            let there = lo + Duration::from_micros(s.rng.u64(0..=span));
            let back = lo + Duration::from_micros(s.rng.u64(0..=span));
            let partitioned = s.faults.partitioned.contains(&instance);
            // A call that vanishes in a partition learns nothing of a lost socket.
            let dropped = !partitioned && std::mem::take(&mut s.dropped[instance]);
            (there, back, dropped, partitioned)
        };
        if partitioned {
            return Box::pin(std::future::pending());
        }
        if dropped && std::env::var_os("SIM_TRACE").is_some() {
            println!(
                "{:>9.3}   redis i{instance}: connection reset (restarted)",
                (crate::clock::now_us() % 100_000_000) as f64 / 1e6
            );
        }
        if dropped {
            // The socket is dead until a caller sees it fail (one that
            // gave up before the error arrived learned nothing).
            let (tx, rx) = tokio::sync::oneshot::channel::<Result<Value, RedisError>>();
            tokio::spawn(async move {
                tokio::time::sleep(there).await;
                let reset = Err(err(
                    redis::ErrorKind::Io,
                    "connection reset by peer (server restarted)",
                ));
                if tx.send(reset).is_err() {
                    lock(&server.0).dropped[instance] = true;
                }
            });
            return Box::pin(async move {
                rx.await
                    .unwrap_or_else(|_| Err(err(redis::ErrorKind::Io, "connection lost")))
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&server.0).in_flight += 1;
        // The call goes on even if its caller gives up: Redis runs it anyway.
        tokio::spawn(async move {
            tokio::time::sleep(there).await;
            let (down, stalled) = {
                let s = lock(&server.0);
                let now = Instant::now();
                (
                    s.faults.down_until.is_some_and(|t| t > now),
                    s.faults.stalled_until.filter(|t| *t > now),
                )
            };
            if down {
                lock(&server.0).in_flight -= 1;
                let _ = tx.send(Err(err(redis::ErrorKind::Io, "connection refused")));
                return;
            }
            if let Some(until) = stalled {
                tokio::time::sleep_until(until).await;
            }
            let reply = server.execute(instance, args);
            let answer = std::mem::take(&mut lock(&server.0).answer);
            tokio::time::sleep(back).await;
            lock(&server.0).in_flight -= 1;
            if tx.send(reply).is_ok() {
                let at = crate::clock::now_us();
                let mut s = lock(&server.0);
                for (key, period, used) in answer {
                    s.least_used
                        .entry((key, period, instance))
                        .or_default()
                        .push((at, used));
                }
            }
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(err(redis::ErrorKind::Io, "connection lost")))
        })
    }
}
