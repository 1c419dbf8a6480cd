//! serde's messages in the words of a YAML author: "expected a whole number,
//! got \"many\"" rather than "invalid type: string \"many\", expected usize".

/// Rewrites one serde message; a message it does not recognise is kept.
pub fn friendly(message: &str) -> String {
    if let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    {
        if let Some((got, expected)) = rest.rsplit_once(", expected ") {
            return format!(
                "expected {}, got {}",
                expected_words(expected),
                got_words(got)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            let choices = listed(expected);
            let got = got.trim_matches('`');
            return format!("expected {}, got {got:?}", or_list(&choices));
        }
    }
    message.to_string()
}

/// What `expected ...` says, for a person: Rust type names become words.
pub fn expected_words(expected: &str) -> String {
    match expected.trim() {
        "usize" | "u64" | "u128" | "isize" | "i64" | "i32" | "i128" => "a whole number".into(),
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping (key: value lines)".into(),
        "a character" => "a single character".into(),
        e if e.starts_with("struct ") => "a mapping (key: value lines)".into(),
        e => e.to_string(),
    }
}

/// serde's `Unexpected` as YAML shows it: `"many"`, `5`, `a list`.
fn got_words(got: &str) -> String {
    let quoted = |prefix: &str| {
        got.strip_prefix(prefix)
            .map(|v| v.trim_matches('`').to_string())
    };
    if let Some(s) = got.strip_prefix("string ") {
        return s.to_string();
    }
    for prefix in ["integer ", "floating point ", "boolean ", "char "] {
        if let Some(v) = quoted(prefix) {
            return v;
        }
    }
    match got {
        "unit value" => "an empty value".into(),
        "sequence" => "a list".into(),
        "map" => "a mapping".into(),
        other => other.to_string(),
    }
}

/// The names in "one of `a`, `b`, `c`" / "`a` or `b`" / "`a`".
pub fn listed(expected: &str) -> Vec<String> {
    expected
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, name)| name.to_string())
        .collect()
}

fn or_list(names: &[String]) -> String {
    match names {
        [] => "nothing".into(),
        [one] => one.clone(),
        [a, b] => format!("{a} or {b}"),
        many => format!("one of {}", many.join(", ")),
    }
}

/// An unknown key, with the closest valid one when a typo is likely.
pub fn unknown_key(key: &str, valid: &[String]) -> String {
    let mut out = format!("unknown key {key:?}");
    if let Some(near) = closest(key, valid) {
        out.push_str(&format!(" (did you mean {near:?}?)"));
    }
    if valid.is_empty() {
        out.push_str("; this section takes no keys");
    } else {
        out.push_str(&format!("; valid keys: {}", valid.join(", ")));
    }
    out
}

/// The valid name within two edits (a swap of neighbours is one) of `key`.
pub fn closest<'a>(key: &str, valid: &'a [String]) -> Option<&'a String> {
    valid
        .iter()
        .map(|v| (edits(key, v), v))
        .filter(|(d, _)| *d <= 2 && *d < key.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

/// Optimal string alignment distance (Levenshtein plus adjacent swaps).
fn edits(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for (i, row) in d.chunks_mut(width).enumerate() {
        row[0] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_types_become_words() {
        assert_eq!(
            friendly("invalid type: string \"many\", expected usize"),
            "expected a whole number, got \"many\""
        );
        assert_eq!(
            friendly("invalid value: integer `70000`, expected u16"),
            "expected a whole number from 0 to 65535, got 70000"
        );
        assert_eq!(
            friendly("invalid type: string \"yes please\", expected a boolean"),
            "expected true or false, got \"yes please\""
        );
        assert_eq!(
            friendly("invalid type: string \"a\", expected a sequence"),
            "expected a list, got \"a\""
        );
        assert_eq!(
            friendly("invalid type: unit value, expected a string"),
            "expected a string, got an empty value"
        );
        assert_eq!(
            friendly("invalid type: sequence, expected struct RawServer"),
            "expected a mapping (key: value lines), got a list"
        );
        assert_eq!(
            friendly("unknown variant `maybe`, expected one of `local`, `open`, `closed`"),
            "expected one of local, open, closed, got \"maybe\""
        );
        assert_eq!(
            friendly("unknown variant `x`, expected `jwt` or `none`"),
            "expected jwt or none, got \"x\""
        );
        assert_eq!(friendly("something else"), "something else");
    }

    #[test]
    fn typos_find_their_key() {
        let valid: Vec<String> = ["server", "admin", "log", "routes"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(closest("servr", &valid).map(String::as_str), Some("server"));
        assert_eq!(closest("lgo", &valid).map(String::as_str), Some("log"));
        assert_eq!(closest("colour", &valid), None);
        assert_eq!(
            unknown_key("levle", &["level".into(), "format".into()]),
            "unknown key \"levle\" (did you mean \"level\"?); valid keys: level, format"
        );
    }
}
