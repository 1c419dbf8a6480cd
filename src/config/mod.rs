//! Configuration: the YAML file plus `TOLLGATE_*` overrides, validated into
//! a [`Config`] in one pass that reports every problem with its key path.

pub mod checked;
mod duration;
pub mod env;
pub mod keyexpr;
pub mod otel_env;
pub mod raw;
mod shape;
mod types;
mod validate;
mod words;

pub use duration::{format_duration, parse_duration};
pub use keyexpr::{KeyExpr, KeyExprError, KeyPart};
pub use types::*;
pub use validate::{check_peer, trace_endpoint, MAX_COST, MAX_REQUESTS, MAX_WINDOW};

use std::path::Path;

/// One thing wrong with a config, and where: `routes[2].upstream`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl ConfigProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A problem of the file as a whole (unreadable, not YAML).
    fn whole(message: impl Into<String>) -> Self {
        ConfigProblem::new("", message)
    }
}

/// Every problem found in one config.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub problems: Vec<ConfigProblem>,
}

impl ConfigErrors {
    /// Each problem as `key.path: message` (or just the message).
    pub fn lines(&self) -> Vec<String> {
        self.problems.iter().map(line).collect()
    }
}

/// Problems one per `sep`, each as [`line`] writes it.
pub fn join(problems: &[ConfigProblem], sep: &str) -> String {
    problems.iter().map(line).collect::<Vec<_>>().join(sep)
}

/// `key.path: message`, or the message alone for the file as a whole.
pub fn line(p: &ConfigProblem) -> String {
    if p.path.is_empty() {
        p.message.clone()
    } else {
        p.to_string()
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.lines().join("; "))
    }
}

fn one(problem: ConfigProblem) -> ConfigErrors {
    ConfigErrors {
        problems: vec![problem],
    }
}

/// Reads, overrides from the process environment, and validates.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        one(ConfigProblem::whole(format!(
            "{}: cannot read config: {e}",
            path.display()
        )))
    })?;
    parse(&text, std::env::vars(), Some(path))
}

pub fn from_str_with_env<I>(text: &str, vars: I) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    parse(text, vars, None)
}

/// `file`, when known, names the file in problems of the file as a whole.
fn parse<I>(text: &str, vars: I, file: Option<&Path>) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    let of_file = |message: String| match file {
        Some(f) => ConfigProblem::whole(format!("{}: {message}", f.display())),
        None => ConfigProblem::whole(message),
    };
    let mut tree: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| one(of_file(yaml_error(&e))))?;
    if tree.is_null() {
        tree = serde_yaml::Value::Mapping(Default::default());
    }
    if !tree.is_mapping() {
        return Err(one(of_file(format!(
            "expected a mapping of sections (server:, upstreams:, routes:, ...) at the top of the file, found {}",
            kind(&tree)
        ))));
    }
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let (mut sources, mut problems) = env::apply_overrides(&mut tree, vars.iter().cloned());
    sources.extend(otel_env::fill(&mut tree, &vars));
    let (raw, shape_problems) = shape::typed(tree);
    problems.extend(shape_problems);
    if let Some(raw) = raw {
        match Config::try_from(raw) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => {}
            Err(more) => {
                // A key already reported (and repaired to a stand-in) is
                // not reported again for what the stand-in causes.
                let reported: Vec<String> = problems
                    .iter()
                    .filter(|p| !p.path.is_empty())
                    .map(|p| p.path.clone())
                    .collect();
                problems.extend(
                    more.into_iter()
                        .filter(|p| !reported.iter().any(|r| shape::within(&p.path, r))),
                );
            }
        }
    }
    // A value that could not be read stands in as its default, which the
    // checks after may refuse too: one problem per key is enough.
    let mut unreadable: Vec<String> = Vec::new();
    problems.retain(|p| {
        if unreadable.contains(&p.path) {
            return false;
        }
        if !p.path.is_empty() && p.message.starts_with("expected ") {
            unreadable.push(p.path.clone());
        }
        true
    });
    for p in &mut problems {
        name_the_variable(p, &sources);
    }
    Err(ConfigErrors { problems })
}

/// `server.threads` -> `server.threads (from TOLLGATE_SERVER__THREADS)` when
/// that variable set the key (or a list or section it lies in), or created
/// the unknown key the problem is about.
fn name_the_variable(p: &mut ConfigProblem, sources: &[env::Source]) {
    if p.path.is_empty() || p.path.contains(" (from ") {
        return;
    }
    let unknown = p.message.starts_with("unknown key");
    if let Some(source) = sources
        .iter()
        .find(|s| shape::within(&p.path, &s.path) || (unknown && shape::within(&s.path, &p.path)))
    {
        p.path = format!("{} (from {})", p.path, source.var);
    }
}

fn kind(value: &serde_yaml::Value) -> &'static str {
    match value {
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::Bool(_) => "true or false",
        _ => "a single value",
    }
}

fn yaml_error(e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(loc) => format!(
            "invalid YAML at line {} column {}: {e}",
            loc.line(),
            loc.column()
        ),
        None => format!("invalid YAML: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
upstreams:
  backend: { peers: ["127.0.0.1:8081"] }
routes:
  - { name: api, path_prefix: /api/, upstream: backend, auth: none }
"#;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = from_str_with_env(GOOD, no_env()).unwrap();
        assert_eq!(c.server.listen, vec!["0.0.0.0:8080"]);
        assert_eq!(c.server.health_path, "/health");
        assert_eq!(c.admin.listen, "127.0.0.1:9090");
        assert_eq!(c.routes[0].upstream, 0);
        assert_eq!(
            c.upstreams[0].read_timeout,
            std::time::Duration::from_secs(30)
        );
        assert!(c.redis.is_none());
    }

    #[test]
    fn collects_every_problem_with_its_path() {
        let text = r#"
server: { threads: 0, grace_period: soon }
upstreams:
  backend: { peers: ["127.0.0.1:8081"], read_timeout: 0s }
routes:
  - { name: api, path_prefix: /api/, upstream: backend, auth: none }
  - { name: bill, path_prefix: /bill/, upstream: billing, auth: none }
  - { name: api, path: /x/../y, upstream: backend, auth: none }
"#;
        let errs = from_str_with_env(text, no_env()).unwrap_err().lines();
        let joined = errs.join("\n");
        for expected in [
            "server.threads: must be at least 1",
            "server.grace_period: expected a duration like 30s (250ms, 5s, 1m, 24h, 1h30m), got \"soon\"",
            "upstreams.backend.read_timeout: must be greater than zero",
            "routes[1].upstream: unknown upstream \"billing\"",
            "routes[2].name: duplicate route name \"api\"",
            "routes[2].path: \"/x/../y\" is not in normal form; write \"/y\"",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_paths() {
        let text = GOOD.replace("auth: none", "auth: none, psth: /x");
        let errs = from_str_with_env(&text, no_env()).unwrap_err().lines();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("routes[0].psth: unknown key \"psth\" (did you mean \"path\"?)"),
            "{errs:?}"
        );
    }

    #[test]
    fn an_unknown_key_does_not_hide_the_other_problems() {
        let text = GOOD.replace("auth: none", "auth: none, psth: /x, cost: 0")
            + "server: { threads: 0, h2c: sometimes }\n";
        let errs = from_str_with_env(&text, no_env()).unwrap_err().lines();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs[0].starts_with("routes[0].psth: unknown key \"psth\" (did you mean \"path\"?); valid keys: name, path_prefix, path,"));
        assert_eq!(
            errs[1..],
            [
                "server.h2c: expected true or false, got \"sometimes\"",
                "server.threads: must be at least 1",
                "routes[0].cost: must be from 1 to 1000000000",
            ]
        );
    }

    #[test]
    fn a_list_at_the_top_is_not_a_config() {
        let errs = from_str_with_env("- a\n- b\n", no_env())
            .unwrap_err()
            .lines();
        assert_eq!(
            errs,
            vec!["expected a mapping of sections (server:, upstreams:, routes:, ...) at the top of the file, found a list"]
        );
    }

    #[test]
    fn problems_name_the_variable_that_set_the_value() {
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let errs = from_str_with_env(GOOD, env("TOLLGATE_SERVER__THREADS", "abc"))
            .unwrap_err()
            .lines();
        assert_eq!(
            errs,
            vec!["server.threads (from TOLLGATE_SERVER__THREADS): expected a whole number, got \"abc\""]
        );
        let errs = from_str_with_env(GOOD, env("TOLLGATE_SERVR__THREADS", "3"))
            .unwrap_err()
            .lines();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "servr (from TOLLGATE_SERVR__THREADS): unknown key \"servr\" (did you mean \"server\"?)"
            ),
            "{errs:?}"
        );
        let errs = from_str_with_env(GOOD, env("TOLLGATE_SERVER__LISTEN", "[\"8080\"]"))
            .unwrap_err()
            .lines();
        assert_eq!(
            errs,
            vec!["server.listen[0] (from TOLLGATE_SERVER__LISTEN): invalid listen address \"8080\" (expected IP:PORT, e.g. 0.0.0.0:8080)"]
        );
    }

    #[test]
    fn environment_wins_over_the_file() {
        let env = vec![
            ("TOLLGATE_LOG__LEVEL".to_string(), "debug".to_string()),
            ("TOLLGATE_SERVER__THREADS".to_string(), "3".to_string()),
        ];
        let c = from_str_with_env(GOOD, env).unwrap();
        assert_eq!(c.log.level, log::LevelFilter::Debug);
        assert_eq!(c.server.threads, 3);
    }

    #[test]
    fn jwt_routes_need_keys_of_the_right_family() {
        let text = format!("{GOOD}auth: {{ jwt: {{ algorithms: [RS256], secret: abc }} }}\n");
        let errs = from_str_with_env(&text, no_env()).unwrap_err().lines();
        assert!(
            errs.iter()
                .any(|e| e.contains("auth.jwt.algorithms: a shared secret only verifies")),
            "{errs:?}"
        );
        let text = GOOD.replace("auth: none", "auth: jwt");
        let errs = from_str_with_env(&text, no_env()).unwrap_err().lines();
        assert!(
            errs.iter()
                .any(|e| e == "routes[0].auth: auth: jwt needs an auth.jwt section"),
            "{errs:?}"
        );
    }
}
