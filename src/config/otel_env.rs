//! The OpenTelemetry exporter variables, for what `telemetry.tracing` does
//! not say. They never turn tracing on: only a `telemetry.tracing` section
//! (from the file or a `TOLLGATE_TELEMETRY__TRACING__*` variable) does.
//!
//! Precedence, per key: the file and `TOLLGATE_*` variables, then
//! `OTEL_EXPORTER_OTLP_TRACES_*`, then `OTEL_EXPORTER_OTLP_*` (and
//! `OTEL_SERVICE_NAME`), then tollgate's defaults. Read: `ENDPOINT`,
//! `PROTOCOL`, `HEADERS`, `TIMEOUT` (milliseconds). Headers are merged: those
//! of the variables are added to `headers`, and win on the same name.

use super::env::Source;
use serde_yaml::{Mapping, Value};

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";

/// Fills the keys of `telemetry.tracing` the tree leaves out; returns which
/// variable set which key, so a problem with the value names the variable.
pub fn fill(root: &mut Value, vars: &[(String, String)]) -> Vec<Source> {
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let Some(tracing) = tracing_section(root) else {
        return Vec::new();
    };
    let mut sources = Vec::new();
    let mut set = |tracing: &mut Mapping, key: &str, value: Value, var: &str| {
        tracing.insert(Value::from(key), value);
        sources.push(Source {
            path: format!("telemetry.tracing.{key}"),
            var: var.to_string(),
        });
    };
    let has = |m: &Mapping, key: &str| m.get(key).is_some_and(|v| !v.is_null());
    if !has(tracing, "protocol") {
        if let Some((var, value)) = [TRACES_PROTOCOL, PROTOCOL]
            .into_iter()
            .find_map(|var| get(var).map(|v| (var, v)))
        {
            // The standard's names; `http/json` stays as written and is refused.
            let word = match value {
                "grpc" => "grpc",
                "http/protobuf" => "http",
                other => other,
            };
            set(tracing, "protocol", Value::from(word), var);
        }
    }
    if !has(tracing, "endpoint") {
        if let Some(v) = get(TRACES_ENDPOINT) {
            set(tracing, "endpoint", Value::from(v), TRACES_ENDPOINT);
        } else if let Some(v) = get(ENDPOINT) {
            // The general variable is a base URL: OTLP/HTTP appends the
            // signal's path to it, whatever path it has.
            let http = tracing.get("protocol").and_then(Value::as_str) == Some("http");
            let value = if http {
                format!("{}/v1/traces", v.trim_end_matches('/'))
            } else {
                v.to_string()
            };
            set(tracing, "endpoint", Value::from(value), ENDPOINT);
        }
    }
    if !has(tracing, "timeout") {
        if let Some((var, value)) = [TRACES_TIMEOUT, TIMEOUT]
            .into_iter()
            .find_map(|var| get(var).map(|v| (var, v)))
        {
            // Milliseconds, as the standard has it; anything else is left
            // as written, for the duration check to refuse.
            let value = match value.parse::<u64>() {
                Ok(ms) => format!("{ms}ms"),
                Err(_) => value.to_string(),
            };
            set(tracing, "timeout", Value::from(value), var);
        }
    }
    if !has(tracing, "service_name") {
        if let Some(v) = get(SERVICE_NAME) {
            set(tracing, "service_name", Value::from(v), SERVICE_NAME);
        }
    }
    for var in [HEADERS, TRACES_HEADERS] {
        let Some(list) = get(var) else { continue };
        let headers = match tracing.get_mut("headers") {
            Some(Value::Mapping(m)) => m,
            Some(_) => continue,
            None => {
                tracing.insert(Value::from("headers"), Value::Mapping(Mapping::new()));
                match tracing.get_mut("headers") {
                    Some(Value::Mapping(m)) => m,
                    _ => continue,
                }
            }
        };
        for (name, value) in parse_headers(list) {
            headers.insert(Value::from(name), Value::from(value));
        }
        sources.push(Source {
            path: "telemetry.tracing.headers".into(),
            var: var.to_string(),
        });
    }
    sources
}

/// The `telemetry.tracing` mapping when the tree has one; a key written
/// with no value (`tracing:`) turns tracing on with every default.
fn tracing_section(root: &mut Value) -> Option<&mut Mapping> {
    let telemetry = root.as_mapping_mut()?.get_mut("telemetry")?;
    let slot = telemetry.as_mapping_mut()?.get_mut("tracing")?;
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut()
}

/// `k1=v1,k2=v2`, values percent-decoded (the W3C Baggage form the standard
/// uses); an entry without `=` is skipped.
pub fn parse_headers(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|entry| {
            let (k, v) = entry.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            let v = percent_decoded(v.trim());
            Some((k.to_ascii_lowercase(), v))
        })
        .collect()
}

/// `%XX` escapes decoded; a malformed escape is kept as written.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let (h, l) = (hex(h).unwrap_or(0), hex(l).unwrap_or(0));
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn variables_fill_only_what_the_file_leaves_out() {
        let mut t = tree("telemetry: { tracing: { endpoint: http://file:4317 } }");
        let sources = fill(
            &mut t,
            &vars(&[
                (ENDPOINT, "http://env:4317"),
                (SERVICE_NAME, "edge-eu"),
                (PROTOCOL, "grpc"),
                (TIMEOUT, "2500"),
            ]),
        );
        let tr = &t["telemetry"]["tracing"];
        assert_eq!(tr["endpoint"].as_str(), Some("http://file:4317"));
        assert_eq!(tr["service_name"].as_str(), Some("edge-eu"));
        assert_eq!(tr["protocol"].as_str(), Some("grpc"));
        assert_eq!(tr["timeout"].as_str(), Some("2500ms"));
        assert_eq!(sources.len(), 3);
    }

    #[test]
    fn no_section_no_tracing_whatever_the_variables() {
        let mut t = tree("server: { threads: 1 }");
        assert!(fill(&mut t, &vars(&[(ENDPOINT, "http://env:4317")])).is_empty());
        assert!(t.get("telemetry").is_none());
    }

    #[test]
    fn the_traces_variables_win_and_http_bases_get_the_signal_path() {
        let mut t = tree("telemetry: { tracing: }");
        fill(
            &mut t,
            &vars(&[
                (ENDPOINT, "http://base:4318/otlp/"),
                (PROTOCOL, "http/protobuf"),
                (TRACES_PROTOCOL, "http/protobuf"),
            ]),
        );
        let tr = &t["telemetry"]["tracing"];
        assert_eq!(tr["protocol"].as_str(), Some("http"));
        assert_eq!(
            tr["endpoint"].as_str(),
            Some("http://base:4318/otlp/v1/traces")
        );
        let mut t = tree("telemetry: { tracing: {} }");
        fill(
            &mut t,
            &vars(&[
                (ENDPOINT, "http://base:4317"),
                (TRACES_ENDPOINT, "http://traces:4317"),
            ]),
        );
        assert_eq!(
            t["telemetry"]["tracing"]["endpoint"].as_str(),
            Some("http://traces:4317")
        );
    }

    #[test]
    fn headers_are_merged_and_decoded() {
        let mut t = tree("telemetry: { tracing: { headers: { x-a: file, x-b: file } } }");
        fill(
            &mut t,
            &vars(&[(HEADERS, "X-B=env%20value, x-c = c+1 ,broken")]),
        );
        let h = &t["telemetry"]["tracing"]["headers"];
        assert_eq!(h["x-a"].as_str(), Some("file"));
        assert_eq!(h["x-b"].as_str(), Some("env value"));
        assert_eq!(h["x-c"].as_str(), Some("c+1"));
    }
}
