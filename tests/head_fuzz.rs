//! Differential fuzzing of the HTTP/1 head guard's scanner
//! (`edge::scan::HeadScan`) against httparse, the parser Pingora runs on
//! the same bytes: arbitrary byte streams, delivered in arbitrary chunks.
//! The guard's verdict — where the head ends, whether it is over the bound
//! — must agree with what the parser makes of the same bytes.
//!
//! A few seconds run with the suite. `FUZZ_SECS=600 cargo test --release
//! --test head_fuzz` runs for that long instead (cases and time are
//! printed); `PROPTEST_CASES` is not used here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::time::{Duration, Instant};
use tollgate::edge::scan::{HeadScan, Verdict, MAX_LEADING_BLANK};

/// What httparse says of `bytes`.
#[derive(Debug, PartialEq)]
enum Parsed {
    Complete(usize),
    Partial,
    Invalid,
}

fn httparse(bytes: &[u8]) -> Parsed {
    // More header slots than a head within the bounds can fill, so the
    // count never decides.
    let mut headers = [httparse::EMPTY_HEADER; 1024];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => Parsed::Complete(n),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// The scanner's verdict on `bytes` cut at `cuts`, with the absolute
/// offset of the end or of the chunk that decided.
fn scan(bytes: &[u8], cuts: &[usize], max: usize) -> (Verdict, usize) {
    let mut scan = HeadScan::new(max);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    for pair in points.windows(2) {
        let chunk = &bytes[pair[0]..pair[1]];
        match scan.feed(chunk) {
            Verdict::More => {}
            Verdict::End(at) => return (Verdict::End(pair[0] + at), pair[0] + at),
            other => return (other, pair[1]),
        }
    }
    (Verdict::More, bytes.len())
}

fn leading_blank(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count()
}

/// The agreement the guard needs: it never ends a head where the parser
/// would read on, nor reads on where the parser has a complete head within
/// the bound; what is over the bound is refused.
fn check(bytes: &[u8], cuts: &[usize], max: usize) -> Result<(), TestCaseError> {
    let (verdict, at) = scan(bytes, cuts, max);
    tally(&verdict);
    let whole = httparse(bytes);
    let blank = leading_blank(bytes);
    match verdict {
        Verdict::End(end) => {
            prop_assert!(end <= max, "end {end} past the bound {max}");
            // Where the guard ends the head, the parser has the same head
            // complete, or refuses the bytes (Pingora answers 400).
            let head = httparse(&bytes[..end]);
            prop_assert!(
                head == Parsed::Complete(end) || head == Parsed::Invalid,
                "guard ends at {end}, parser says {head:?} on that prefix and {whole:?} on all"
            );
            prop_assert!(
                whole == Parsed::Complete(end) || whole == Parsed::Invalid,
                "guard ends at {end}, parser says {whole:?}"
            );
        }
        Verdict::More => {
            prop_assert!(
                bytes.len() <= max,
                "{} bytes read on past {max}",
                bytes.len()
            );
            prop_assert!(
                whole == Parsed::Partial || whole == Parsed::Invalid,
                "guard reads on, parser says {whole:?}"
            );
        }
        Verdict::TooLarge => {
            prop_assert!(at > max, "refused at {at}, within the bound {max}");
            if let Parsed::Complete(n) = whole {
                prop_assert!(
                    n > max,
                    "refused as too large, parser has a head of {n} <= {max}"
                );
            }
        }
        Verdict::TooManyBlankLines => {
            prop_assert!(
                blank > MAX_LEADING_BLANK,
                "only {blank} leading blank bytes"
            );
        }
    }
    if blank > MAX_LEADING_BLANK {
        // Refused for the empty lines — or for size, when the bound is
        // below them and a read brought more than the bound at once.
        prop_assert!(
            verdict == Verdict::TooManyBlankLines || (verdict == Verdict::TooLarge && max < blank),
            "{blank} leading blank bytes, bound {max}: {verdict:?}"
        );
    }
    Ok(())
}

/// How often each verdict came, so a run shows what it exercised:
/// ends, reads on, too large, too many blank lines.
static TALLY: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

fn tally(verdict: &Verdict) {
    let i = match verdict {
        Verdict::End(_) => 0,
        Verdict::More => 1,
        Verdict::TooLarge => 2,
        Verdict::TooManyBlankLines => 3,
    };
    TALLY[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes that look like heads: pieces of request lines, header lines and
/// every kind of line ending, with raw bytes mixed in.
fn head_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"GET / HTTP/1.1".to_vec()),
        Just(b"POST /a?b=c HTTP/1.0".to_vec()),
        Just(b"Host: a".to_vec()),
        Just(b"X-Long: ".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n\r\n".to_vec()),
        Just(b" ".to_vec()),
        Just(b":".to_vec()),
        Just(b"\t".to_vec()),
        Just(vec![0u8]),
        "[a-zA-Z0-9/ .:-]{1,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 1..8),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

/// A valid head, possibly after empty lines and before a body.
fn valid_head() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(prop_oneof![Just("\r\n"), Just("\n")], 0..12),
        prop::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,60}"), 0..12),
        prop_oneof![Just("\r\n"), Just("\n")],
        "[ -~]{0,20}",
    )
        .prop_map(|(blank, headers, eol, body)| {
            let mut s = blank.concat();
            s.push_str("GET /x HTTP/1.1");
            s.push_str(eol);
            for (name, value) in headers {
                s.push_str(&format!("{name}: {}{eol}", value.trim()));
            }
            s.push_str(eol);
            s.push_str(&body);
            s.into_bytes()
        })
}

fn input() -> impl Strategy<Value = (Vec<u8>, Vec<usize>, usize)> {
    (
        prop_oneof![
            head_like(),
            valid_head(),
            prop::collection::vec(any::<u8>(), 0..64)
        ],
        prop::collection::vec(any::<usize>(), 0..8),
        prop_oneof![8usize..64, 64usize..400, Just(1024usize)],
    )
}

/// Runs the property for the default number of cases, or for `FUZZ_SECS`
/// seconds; returns the number of cases run.
fn run(default_cases: u32) -> u64 {
    let secs: Option<u64> = std::env::var("FUZZ_SECS").ok().and_then(|v| v.parse().ok());
    let started = Instant::now();
    let mut cases = 0u64;
    loop {
        let batch = if secs.is_some() {
            20_000
        } else {
            default_cases
        };
        let mut runner = TestRunner::new(Config {
            cases: batch,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&input(), |(bytes, cuts, max)| check(&bytes, &cuts, max));
        if let Err(e) = result {
            panic!("head guard and httparse disagree after {cases} cases: {e}");
        }
        cases += u64::from(batch);
        match secs {
            Some(s) if started.elapsed() < Duration::from_secs(s) => continue,
            _ => break,
        }
    }
    let t: Vec<u64> = TALLY
        .iter()
        .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    eprintln!(
        "head guard vs httparse: {cases} cases in {:.1?}, no disagreement \
         (verdicts: {} ends, {} partial, {} too large, {} too many blank lines)",
        started.elapsed(),
        t[0],
        t[1],
        t[2],
        t[3]
    );
    cases
}

#[test]
fn the_head_guard_agrees_with_httparse_on_arbitrary_bytes_and_splits() {
    assert!(run(6_000) > 0);
}

#[test]
fn known_cases_agree() {
    let cases: &[&[u8]] = &[
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\n\nGET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
        b"\r\r\n",
        b"GET / HTTP/1.1\r\nX: \r\r\n\r\n",
        b"GET / HTTP/1.1\n\r\n",
    ];
    // More empty lines than tolerated, with a bound below them (found by a
    // long run: refused as too large when a read brings more than the bound).
    let mut blank_run = b"\r\n".repeat(5);
    blank_run.extend_from_slice(b"\n\r\n\r\n\r\n\r\n\r\nGET /x HTTP/1.1\r\n\r\nAa");
    check(&blank_run, &[10], 8).unwrap();
    for bytes in cases {
        for split in 0..=bytes.len() {
            for max in [8, 20, 1024] {
                check(bytes, &[split], max).unwrap();
            }
        }
    }
}
