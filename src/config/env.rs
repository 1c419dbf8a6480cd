//! `TOLLGATE_<SECTION>__<KEY>=value` overrides, applied to the parsed YAML tree
//! before it is typed, so an override is validated exactly like the file.
//!
//! Each `__` descends one level; names are lower-cased. A numeric segment
//! indexes a list (`TOLLGATE_ROUTES__0__UPSTREAM`). The value is read as a YAML
//! scalar or flow collection, so `true`, `8`, and `["0.0.0.0:80"]` keep their
//! types. Variables without `__` (such as `TOLLGATE_CONFIG`) are command-line
//! options, not config keys, and are left alone.

use serde_yaml::{Mapping, Value};

pub const PREFIX: &str = "TOLLGATE_";

/// Applies every override found in `vars`; returns the problems (one per bad variable).
pub fn apply_overrides<I>(root: &mut Value, vars: I) -> Vec<String>
where
    I: IntoIterator<Item = (String, String)>,
{
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
            problems.push(format!("{name}: empty key segment"));
            continue;
        }
        let value = parse_value(&raw_value);
        if let Err(e) = set_path(root, &path, value) {
            problems.push(format!("{name}: {e}"));
        }
    }
    problems
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

fn set_path(node: &mut Value, path: &[String], value: Value) -> Result<(), PathError> {
    let Some((head, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    if node.is_null() {
        *node = Value::Mapping(Mapping::new());
    }
    match node {
        Value::Mapping(map) => {
            let key = Value::String(head.clone());
            if !map.contains_key(&key) {
                map.insert(key.clone(), Value::Null);
            }
            match map.get_mut(&key) {
                Some(child) => set_path(child, rest, value),
                None => Err(PathError::CannotSet(head.clone())),
            }
        }
        Value::Sequence(items) => {
            let index: usize = head
                .parse()
                .map_err(|_| PathError::NotAnIndex(head.clone()))?;
            let len = items.len();
            match items.get_mut(index) {
                Some(child) => set_path(child, rest, value),
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
        let problems = apply_overrides(
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
    }

    #[test]
    fn indexes_lists_and_reports_bad_indexes() {
        let mut root: Value = serde_yaml::from_str("routes: [{name: a}]").unwrap();
        let problems = apply_overrides(
            &mut root,
            vars(&[
                ("TOLLGATE_ROUTES__0__UPSTREAM", "b"),
                ("TOLLGATE_ROUTES__5__UPSTREAM", "c"),
            ]),
        );
        assert_eq!(root["routes"][0]["upstream"], Value::from("b"));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("TOLLGATE_ROUTES__5__UPSTREAM: list index 5"));
    }
}
