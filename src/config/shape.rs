//! The YAML tree typed into [`RawConfig`], every shape problem collected.
//!
//! serde stops at the first unknown key or wrongly typed value. So that one
//! typo does not hide the rest of the file, each problem is recorded with
//! its key path, the tree is repaired where it stands (the unknown key
//! dropped, the wrong value dropped so its default applies, or replaced by
//! a placeholder when the key is required) and typing starts again. Values
//! repaired that way are not checked further: nothing under a reported key
//! is reported twice.

use super::raw::RawConfig;
use super::words::{expected_words, friendly, listed, unknown_key};
use super::ConfigProblem;
use serde_path_to_error::Segment;
use serde_yaml::{Mapping, Value};

/// More problems than any file written by hand has; a bound on the loop.
const MAX_REPAIRS: usize = 200;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// `server.listen[0]`, as the validation writes paths.
pub fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Whether `path` is `parent` or lies under it.
pub fn within(path: &str, parent: &str) -> bool {
    path == parent
        || (path.starts_with(parent)
            && matches!(path.as_bytes().get(parent.len()), Some(b'.') | Some(b'[')))
}

/// The typed config when the tree could be made to fit, and every problem met.
pub fn typed(mut tree: Value) -> (Option<RawConfig>, Vec<ConfigProblem>) {
    let mut problems: Vec<ConfigProblem> = Vec::new();
    // The last value dropped (its path and what was expected there), so a
    // "missing field" that follows is answered with a placeholder instead.
    let mut dropped: Option<(Vec<Step>, String)> = None;
    let mut repairs: Vec<String> = Vec::new();
    for _ in 0..MAX_REPAIRS {
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(tree.clone()) {
            Ok(raw) => return (Some(raw), problems),
            Err(e) => e,
        };
        let Some(mut path) = steps(error.path()) else {
            break;
        };
        let message = error.into_inner().to_string();
        let reported = |problems: &[ConfigProblem], p: &str| {
            problems
                .iter()
                .any(|q| !q.path.is_empty() && within(p, &q.path))
        };
        let repaired = if let Some(rest) = message.strip_prefix("unknown field ") {
            let (key, expected) = rest.split_once(", ").unwrap_or((rest, ""));
            let key = key.trim_matches('`').to_string();
            let here = render(&path);
            if !reported(&problems, &here) {
                problems.push(ConfigProblem::new(
                    &here,
                    unknown_key(&key, &listed(expected)),
                ));
            }
            remove(&mut tree, &path)
        } else if let Some(field) = message.strip_prefix("missing field ") {
            path.push(Step::Key(field.trim_matches('`').to_string()));
            let here = render(&path);
            let expected = match &dropped {
                Some((p, expected)) if *p == path => expected.clone(),
                _ => String::new(),
            };
            if !reported(&problems, &here) {
                problems.push(ConfigProblem::new(&here, "required key is missing"));
            }
            set(&mut tree, &path, placeholder(&expected))
        } else {
            let here = render(&path);
            if !reported(&problems, &here) {
                problems.push(ConfigProblem::new(&here, friendly(&message)));
            }
            let expected = message
                .rsplit_once(", expected ")
                .map(|(_, e)| expected_words(e))
                .unwrap_or_default();
            match path.last() {
                Some(Step::Key(_)) => {
                    dropped = Some((path.clone(), expected));
                    remove(&mut tree, &path)
                }
                _ => set(&mut tree, &path, placeholder(&expected)),
            }
        };
        // A path repaired three times is one the repairs cannot fix.
        let here = render(&path);
        repairs.push(here.clone());
        if !repaired || repairs.iter().filter(|p| **p == here).count() > 2 {
            break;
        }
    }
    (None, problems)
}

fn steps(path: &serde_path_to_error::Path) -> Option<Vec<Step>> {
    path.iter()
        .map(|s| match s {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Enum { variant } => Some(Step::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// A value of the expected kind, standing in for a required one that was wrong.
fn placeholder(expected: &str) -> Value {
    if expected.contains("whole number") || expected == "a number" {
        Value::from(1)
    } else if expected == "true or false" {
        Value::Bool(false)
    } else if expected == "a list" {
        Value::Sequence(Vec::new())
    } else if expected.starts_with("a mapping") {
        Value::Mapping(Mapping::new())
    } else {
        Value::String(String::new())
    }
}

fn node<'a>(tree: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(tree, |node, step| match (node, step) {
        (Value::Mapping(map), Step::Key(k)) => map.get_mut(k.as_str()),
        (Value::Sequence(items), Step::Index(i)) => items.get_mut(*i),
        _ => None,
    })
}

fn remove(tree: &mut Value, path: &[Step]) -> bool {
    let Some((Step::Key(key), parent)) = path.split_last() else {
        return false;
    };
    match node(tree, parent) {
        Some(Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        _ => false,
    }
}

fn set(tree: &mut Value, path: &[Step], value: Value) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match (node(tree, parent), last) {
        (Some(Value::Mapping(map)), Step::Key(key)) => {
            map.insert(Value::String(key.clone()), value);
            true
        }
        (Some(Value::Sequence(items)), Step::Index(i)) => match items.get_mut(*i) {
            Some(item) => {
                *item = value;
                true
            }
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        let tree: Value = serde_yaml::from_str(text).unwrap();
        typed(tree).1.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn an_unknown_key_hides_nothing() {
        let found = problems(
            "server: { threads: many, colour: red }\nlog: { levle: debug, color: maybe }\n",
        );
        assert_eq!(found.len(), 4, "{found:#?}");
        for expected in [
            "server.threads: expected a whole number, got \"many\"",
            "server.colour: unknown key \"colour\"; valid keys: listen, threads,",
            "log.levle: unknown key \"levle\" (did you mean \"level\"?); valid keys: level, format, color, access_log",
            "log.color: expected true or false, got \"maybe\"",
        ] {
            assert!(
                found.iter().any(|l| l.starts_with(expected)),
                "missing {expected:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn a_wrong_required_value_gets_a_placeholder_and_one_problem() {
        let found = problems(
            "routes:\n  - { name: [a], path_prefix: /a/, upstream: b }\n  - { name: c, upstream: b, cost: lots }\n",
        );
        assert_eq!(
            found,
            vec![
                "routes[0].name: expected a string, got a list",
                "routes[1].cost: expected a whole number, got \"lots\"",
            ]
        );
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let found = problems("routes:\n  - { path_prefix: /a/, upstream: b }\n");
        assert_eq!(found, vec!["routes[0].name: required key is missing"]);
    }
}
