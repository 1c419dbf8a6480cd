//! `TOLLGATE_<SECTION>__<KEY>=value` overrides, applied to the parsed YAML tree
//! before it is typed, so an override is validated exactly like the file.
//!
//! Each `__` descends one level; names are lower-cased. A numeric segment
//! indexes a list (`TOLLGATE_ROUTES__0__UPSTREAM`). The value is read as a YAML
//! scalar or flow collection, so `true`, `8`, and `["0.0.0.0:80"]` keep their
//! types. Variables without `__` (such as `TOLLGATE_CONFIG`) are command-line
//! options, not config keys, and are left alone.

use super::ConfigProblem;
use serde_yaml::{Mapping, Value};

pub const PREFIX: &str = "TOLLGATE_";

/// A key set from the environment: its path (`server.threads`, `routes[0].upstream`)
/// and the variable that set it, so a problem with the value can name the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: String,
    pub var: String,
}

/// Applies every override found in `vars`; returns where each one went and
/// the problems (one per bad variable).
pub fn apply_overrides<I>(root: &mut Value, vars: I) -> (Vec<Source>, Vec<ConfigProblem>)
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX) && k.contains("__"))
        .collect();
    // Deterministic order, so two overrides of one key always resolve the same way.
    vars.sort();
    for (name, raw_value) in vars {
        let path: Vec<String> = name[PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(String::is_empty) {
            problems.push(ConfigProblem::new("", format!("{name}: empty key segment")));
            continue;
        }
        // An empty variable is a mistake far more often than a wish to
        // blank a key (a secret that did not reach the container); saying
        // so beats the confusing problem the empty value would cause.
        if raw_value.trim().is_empty() {
            problems.push(ConfigProblem::new(
                format!("{} (from {name})", guess_path(&path)),
                "the variable is empty; unset it or give it a value",
            ));
            continue;
        }
        let value = parse_value(&raw_value);
        let mut rendered = String::new();
        match set_path(root, &path, value, &mut rendered) {
            Ok(()) => sources.push(Source {
                path: rendered,
                var: name,
            }),
            Err(e) => problems.push(ConfigProblem::new("", format!("{name}: {e}"))),
        }
    }
    (sources, problems)
}

/// A key path from variable segments without the tree: numbers as list indexes.
fn guess_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        push_step(&mut out, s, s.parse::<usize>().is_ok());
    }
    out
}

fn push_step(out: &mut String, segment: &str, index: bool) {
    if index {
        out.push_str(&format!("[{segment}]"));
    } else {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(segment);
    }
}

fn parse_value(raw: &str) -> Value {
    match serde_yaml::from_str::<Value>(raw) {
        // A value that YAML reads as a mapping or a document marker is almost
        // certainly a plain string that happens to contain ": ".
        Ok(Value::Mapping(_)) | Err(_) => Value::String(raw.to_string()),
        Ok(Value::Null) if !raw.trim().is_empty() && raw.trim() != "null" && raw.trim() != "~" => {
            Value::String(raw.to_string())
        }
        Ok(v) => v,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum PathError {
    #[error("cannot set {0}")]
    CannotSet(String),
    #[error("{0:?} is not a list index")]
    NotAnIndex(String),
    #[error("list index {index} is out of range ({len} items)")]
    OutOfRange { index: usize, len: usize },
    #[error("{0:?} is inside a value that is not a section")]
    NotASection(String),
}

fn set_path(
    node: &mut Value,
    path: &[String],
    value: Value,
    rendered: &mut String,
) -> Result<(), PathError> {
    let Some((head, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    if node.is_null() {
        *node = Value::Mapping(Mapping::new());
    }
    match node {
        Value::Mapping(map) => {
            push_step(rendered, head, false);
            let key = Value::String(head.clone());
            if !map.contains_key(&key) {
                map.insert(key.clone(), Value::Null);
            }
            match map.get_mut(&key) {
                Some(child) => set_path(child, rest, value, rendered),
                None => Err(PathError::CannotSet(head.clone())),
            }
        }
        Value::Sequence(items) => {
            let index: usize = head
                .parse()
                .map_err(|_| PathError::NotAnIndex(head.clone()))?;
            push_step(rendered, head, true);
            let len = items.len();
            match items.get_mut(index) {
                Some(child) => set_path(child, rest, value, rendered),
                None => Err(PathError::OutOfRange { index, len }),
            }
        }
        _ => Err(PathError::NotASection(head.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overrides_nested_keys_with_typed_values() {
        let mut root: Value =
            serde_yaml::from_str("log: {level: info}\nserver: {threads: 2}").unwrap();
        let (sources, problems) = apply_overrides(
            &mut root,
            vars(&[
                ("TOLLGATE_LOG__LEVEL", "debug"),
                ("TOLLGATE_SERVER__THREADS", "4"),
                (
                    "TOLLGATE_SERVER__LISTEN",
                    "[\"127.0.0.1:1\", \"127.0.0.1:2\"]",
                ),
                ("TOLLGATE_AUTH__JWT__SECRET", "s3cret: with colon"),
                ("TOLLGATE_CONFIG", "ignored.yaml"),
                ("OTHER__THING", "x"),
            ]),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(root["log"]["level"], Value::from("debug"));
        assert_eq!(root["server"]["threads"], Value::from(4));
        assert_eq!(root["server"]["listen"][1], Value::from("127.0.0.1:2"));
        assert_eq!(
            root["auth"]["jwt"]["secret"],
            Value::from("s3cret: with colon")
        );
        assert!(root.get("config").is_none());
        assert!(sources.contains(&Source {
            path: "server.listen".into(),
            var: "TOLLGATE_SERVER__LISTEN".into()
        }));
    }

    #[test]
    fn indexes_lists_and_reports_bad_indexes() {
        let mut root: Value = serde_yaml::from_str("routes: [{name: a}]").unwrap();
        let (sources, problems) = apply_overrides(
            &mut root,
            vars(&[
                ("TOLLGATE_ROUTES__0__UPSTREAM", "b"),
                ("TOLLGATE_ROUTES__5__UPSTREAM", "c"),
                ("TOLLGATE_ROUTES__0__NAME", " "),
            ]),
        );
        assert_eq!(root["routes"][0]["upstream"], Value::from("b"));
        assert_eq!(root["routes"][0]["name"], Value::from("a"));
        assert_eq!(sources[0].path, "routes[0].upstream");
        let problems: Vec<String> = problems.iter().map(super::super::line).collect();
        assert_eq!(problems.len(), 2);
        assert_eq!(
            problems[0],
            "routes[0].name (from TOLLGATE_ROUTES__0__NAME): the variable is empty; unset it or give it a value"
        );
        assert!(problems[1].starts_with("TOLLGATE_ROUTES__5__UPSTREAM: list index 5"));
    }
}
