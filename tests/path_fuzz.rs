//! Fuzzing the path normaliser and the strict policy (`tollgate::path`)
//! with proptest over arbitrary byte strings and path-like ones (cargo-fuzz
//! needs a nightly compiler): nothing panics, the normal form is a fixed
//! point, what strict accepts is still accepted once normalised (so a
//! second tollgate in a chain agrees), and the lenient reading is stable.
//!
//! A few seconds run with the suite. `FUZZ_SECS=600 cargo test --release
//! --test path_fuzz` runs for that long instead (cases and time are
//! printed), as the head guard's fuzz target does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tollgate::path::{lenient_reading, may_read_differently, normalize, strict_violation};

/// Outcomes seen, so a run shows what it exercised: normalised, refused by
/// the normaliser, refused by strict, read differently by a lenient backend.
static TALLY: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn count(i: usize) {
    TALLY[i].fetch_add(1, Ordering::Relaxed);
}

/// One round of percent-decoding, written apart from the library's (the
/// normal form has only valid escapes).
fn decode(segment: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = segment.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        match (b, tail.get(..2).and_then(|h| std::str::from_utf8(h).ok())) {
            (b'%', Some(hex)) if u8::from_str_radix(hex, 16).is_ok() => {
                out.push(u8::from_str_radix(hex, 16).unwrap());
                rest = &tail[2..];
            }
            _ => {
                out.push(b);
                rest = tail;
            }
        }
    }
    out
}

/// What the normal form promises.
fn is_normal(p: &str) -> Result<(), TestCaseError> {
    prop_assert!(p.starts_with('/'), "{p:?}");
    prop_assert!(!p.contains("//"), "{p:?}");
    let bytes = p.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        prop_assert!((0x21..0x7f).contains(b), "{p:?}: byte {b:#x}");
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
            prop_assert!(
                hex.len() == 2 && hex.iter().all(|h| matches!(h, b'0'..=b'9' | b'A'..=b'F')),
                "{p:?}: escape at {i} is not upper-case hex"
            );
            let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
            prop_assert!(
                !(value.is_ascii_alphanumeric() || b"-._~".contains(&value)),
                "{p:?}: an unreserved character left encoded"
            );
        }
    }
    for segment in p.split('/') {
        prop_assert!(segment != "." && segment != "..", "{p:?}");
    }
    Ok(())
}

fn check(raw: &str) -> Result<(), TestCaseError> {
    let verdict = strict_violation(raw);
    prop_assert_eq!(verdict, strict_violation(raw));
    if verdict.is_some() {
        count(2);
    }
    let readings = may_read_differently(raw);
    let lenient = lenient_reading(raw);
    if let Ok(l) = &lenient {
        // The lenient reading is a normal form of its own, and stable.
        is_normal(l)?;
        prop_assert_eq!(
            lenient_reading(l),
            Ok(l.clone()),
            "lenient reading of {:?}",
            raw
        );
        prop_assert_eq!(normalize(l), Ok(l.clone()));
    }
    let Ok(n) = normalize(raw) else {
        count(1);
        return Ok(());
    };
    count(0);
    is_normal(&n)?;
    // Idempotent: normalising the normal form changes nothing.
    prop_assert_eq!(normalize(&n), Ok(n.clone()), "{:?}", raw);
    if !readings {
        prop_assert_eq!(
            lenient.as_ref(),
            Ok(&n),
            "{:?} has nothing to read differently",
            raw
        );
    } else if lenient.as_ref() != Ok(&n) {
        count(3);
    }
    if verdict.is_none() {
        // What strict lets through stays acceptable as it is forwarded...
        prop_assert_eq!(strict_violation(&n), None, "{:?} -> {:?}", raw, n);
        // ...and a lenient backend finds the same segments in it, less
        // their parameters (a segment that is only a parameter is gone):
        // none split, none climbed out of.
        let read = lenient_reading(&n);
        prop_assert!(read.is_ok(), "{raw:?} -> {n:?} -> {read:?}");
        let read = read.unwrap();
        let bases = n
            .split('/')
            .filter(|s| {
                !decode(s)
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .is_empty()
            })
            .count();
        prop_assert_eq!(
            read.split('/').filter(|s| !s.is_empty()).count(),
            bases,
            "{:?} -> {:?} reads as {:?}",
            raw,
            n,
            read
        );
    }
    Ok(())
}

/// Path-like strings: segments made of the pieces that matter to
/// normalisation and to the strict policy, raw and encoded.
fn path_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("."),
        Just(".."),
        Just("/"),
        Just("//"),
        Just(";"),
        Just("\\"),
        Just("%2e"),
        Just("%2E"),
        Just("%2f"),
        Just("%2F"),
        Just("%5c"),
        Just("%5C"),
        Just("%3b"),
        Just("%25"),
        Just("%c0%ae"),
        Just("a"),
        Just("~"),
        Just("?"),
        Just("#"),
    ];
    (
        prop::collection::vec(
            prop_oneof![
                30 => piece.prop_map(str::to_string),
                10 => "%[0-9a-fA-F]{2}",
                10 => "[!-~]{1,3}",
                // What the normaliser refuses: bad escapes, spaces.
                1 => prop_oneof![Just("%"), Just("%zz"), Just("%4"), Just(" ")]
                    .prop_map(str::to_string),
            ],
            0..24,
        ),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(pieces, rooted)| {
            let body = pieces.concat();
            if rooted {
                format!("/{body}")
            } else {
                body
            }
        })
}

fn input() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => path_like(),
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        1 => "\\PC{0,40}",
    ]
}

/// Runs the properties for the default number of cases, or for `FUZZ_SECS`
/// seconds; returns the number of cases run.
fn run(default_cases: u32) -> u64 {
    let secs: Option<u64> = std::env::var("FUZZ_SECS").ok().and_then(|v| v.parse().ok());
    let started = Instant::now();
    let mut cases = 0u64;
    loop {
        let batch = if secs.is_some() {
            50_000
        } else {
            default_cases
        };
        let mut runner = TestRunner::new(Config {
            cases: batch,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&input(), |raw| check(&raw)) {
            panic!("the path normaliser failed after {cases} cases: {e}");
        }
        cases += u64::from(batch);
        match secs {
            Some(s) if started.elapsed() < Duration::from_secs(s) => continue,
            _ => break,
        }
    }
    let t: Vec<u64> = TALLY.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    eprintln!(
        "path normaliser: {cases} cases in {:.1?}, no failure \
         ({} normalised, {} refused by the normaliser, {} refused by strict, \
         {} read differently by a lenient backend)",
        started.elapsed(),
        t[0],
        t[1],
        t[2],
        t[3]
    );
    cases
}

#[test]
fn the_normaliser_and_the_strict_policy_hold_on_arbitrary_input() {
    assert!(run(5_000) > 0);
}

#[test]
fn known_cases_hold() {
    for raw in [
        "/",
        "",
        "//",
        "/..",
        "/a/..;/..;/b",
        "/a/%2e%2e;/b",
        "/a%2f..%2f..%2fb",
        "/a/b/../..;/c",
        "/%25%32%65%25%32%65/x",
        "/a\\..\\b",
        "/%c0%ae%c0%ae/x",
        "/a;/..;/b;x",
    ] {
        check(raw).unwrap();
    }
}
