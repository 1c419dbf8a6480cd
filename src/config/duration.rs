//! Human durations: `250ms`, `5s`, `1m`, `24h`, `7d`, and sums such as `1h30m`.
//! A bare number is refused: a unit-less TTL is how seconds become milliseconds.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("expected a duration like 30s (250ms, 5s, 1m, 24h, 1h30m), got an empty value")]
    Empty,
    #[error("expected a duration like 30s (250ms, 5s, 1m, 24h, 1h30m), got {0:?}")]
    Invalid(String),
    #[error("expected a duration like 30s, got {0:?}: a unit is required (ms, s, m, h or d)")]
    NoUnit(String),
    #[error(
        "expected a duration like 30s, got {text:?}: unknown unit {unit:?} (ms, s, m, h or d)"
    )]
    UnknownUnit { text: String, unit: String },
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Invalid(text.into()));
        }
        let number: u128 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::TooLarge(text.into()))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(DurationError::NoUnit(text.into())),
            other => {
                return Err(DurationError::UnknownUnit {
                    text: text.into(),
                    unit: other.into(),
                })
            }
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError::TooLarge(text.into()))?;
    }
    let ms = u64::try_from(total).map_err(|_| DurationError::TooLarge(text.into()))?;
    Ok(Duration::from_millis(ms))
}

/// Prints a window the way an operator wrote it (`5s`, `1m`, `1h`), for messages.
pub fn format_duration(d: Duration) -> String {
    let mut out = String::with_capacity(8);
    write_duration(&mut out, d);
    out
}

/// `format_duration` appended to `out`, with no allocation of its own.
pub fn write_duration(out: &mut String, d: Duration) {
    // In u64: u128 division is a library call, and this runs for every
    // rate-limit header (no configurable duration comes near u64::MAX ms).
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    const UNITS: [(u64, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    let (size, unit) = UNITS
        .into_iter()
        .find(|(size, _)| ms >= *size && ms.is_multiple_of(*size))
        .unwrap_or((1, "ms"));
    out.push_str(itoa::Buffer::new().format(ms / size));
    out.push_str(unit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(
            parse_duration(" 2d ").unwrap(),
            Duration::from_secs(172_800)
        );
    }

    #[test]
    fn refuses_bare_numbers_and_junk() {
        for bad in [
            "",
            "5",
            "5x",
            "s",
            "1.5s",
            "-1s",
            "99999999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formats_like_an_operator() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }
}
