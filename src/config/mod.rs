//! Configuration: the YAML file plus `TOLLGATE_*` overrides, validated into
//! a [`Config`] in one pass that reports every problem with its key path.

pub mod checked;
mod duration;
pub mod env;
pub mod keyexpr;
pub mod raw;
mod types;
mod validate;

pub use duration::{format_duration, parse_duration};
pub use keyexpr::{KeyExpr, KeyExprError, KeyPart};
pub use types::*;
pub use validate::{check_peer, MAX_COST, MAX_REQUESTS, MAX_WINDOW};

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
    from_str_with_env(&text, std::env::vars())
}

pub fn from_str_with_env<I>(text: &str, vars: I) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut tree: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| one(ConfigProblem::whole(yaml_error(&e))))?;
    if tree.is_null() {
        tree = serde_yaml::Value::Mapping(Default::default());
    }
    let env_problems = env::apply_overrides(&mut tree, vars);
    if !env_problems.is_empty() {
        return Err(ConfigErrors {
            problems: env_problems.into_iter().map(ConfigProblem::whole).collect(),
        });
    }
    let raw: raw::RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            one(ConfigProblem::whole(inner))
        } else {
            one(ConfigProblem::new(path, inner))
        }
    })?;
    Config::try_from(raw).map_err(|problems| ConfigErrors { problems })
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
            "server.grace_period: invalid duration \"soon\"",
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
            errs[0].starts_with("routes[0].psth: unknown field `psth`"),
            "{errs:?}"
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
