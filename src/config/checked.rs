//! Typed values that do not stop deserialisation when they are wrong, so one
//! pass over a config reports every problem with its key path, not just the
//! first one serde meets.

use super::duration::parse_duration;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A value of type `T` as written, or why it is not one.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked<T> {
    Valid(T),
    Invalid(String),
}

impl<T: Default> Default for Checked<T> {
    fn default() -> Self {
        Checked::Valid(T::default())
    }
}

impl<T> From<T> for Checked<T> {
    fn from(value: T) -> Self {
        Checked::Valid(value)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(deserializer)?;
        Ok(match T::deserialize(value) {
            Ok(v) => Checked::Valid(v),
            Err(e) => Checked::Invalid(super::words::friendly(&e.to_string())),
        })
    }
}

/// A duration written with a unit: `250ms`, `5s`, `1m`, `24h`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(deserializer)?;
        let text = match &value {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            other => {
                let got = match other {
                    serde_yaml::Value::Sequence(_) => "a list",
                    serde_yaml::Value::Mapping(_) => "a mapping",
                    serde_yaml::Value::Bool(_) => "true or false",
                    _ => "an empty value",
                };
                return Err(serde::de::Error::custom(format!(
                    "expected a duration like 30s (250ms, 5s, 1m, 24h), got {got}"
                )));
            }
        };
        parse_duration(&text)
            .map(Span)
            .map_err(serde::de::Error::custom)
    }
}

/// `Checked<Span>` from a string literal, for defaults.
pub fn span(text: &str) -> Checked<Span> {
    match parse_duration(text) {
        Ok(d) => Checked::Valid(Span(d)),
        Err(e) => Checked::Invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        a: Checked<Span>,
        b: Checked<u16>,
    }

    #[test]
    fn collects_instead_of_failing() {
        let t: T = serde_yaml::from_str("a: soon\nb: 70000\n").unwrap();
        assert!(
            matches!(t.a, Checked::Invalid(ref e) if e == "expected a duration like 30s (250ms, 5s, 1m, 24h, 1h30m), got \"soon\"")
        );
        assert_eq!(
            t.b,
            Checked::Invalid("expected a whole number from 0 to 65535, got 70000".into())
        );
        let t: T = serde_yaml::from_str("a: 1m30s\nb: 8\n").unwrap();
        assert_eq!(t.a, Checked::Valid(Span(Duration::from_secs(90))));
        assert_eq!(t.b, Checked::Valid(8));
        let t: T = serde_yaml::from_str("a: 30\nb: 1\n").unwrap();
        assert!(matches!(t.a, Checked::Invalid(ref e) if e.contains("a unit is required")));
    }
}
