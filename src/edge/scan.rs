//! Where an HTTP/1 request head ends, found across reads, and whether it
//! stays within its bounds. Pure: no I/O, so the verdict can be compared
//! with the parser's on arbitrary bytes split at arbitrary points
//! (`tests/head_fuzz.rs`).
//!
//! The parser (httparse, under Pingora) skips empty lines before the request
//! line (RFC 9112 §2.2 asks a server to ignore at least one). They are part
//! of the head here: they count towards `server.max_header_bytes`, and the
//! blank line that ends the head is only looked for after the request line
//! has begun — a scanner that looked from byte 0 would take a leading
//! `\r\n\r\n` for the end of a head, and the real head after it would be
//! bounded only by Pingora's 1 MiB.

/// Most bytes of empty lines (`\r`, `\n`) accepted before a request line.
/// One `\r\n` is what clients that add a line after a request body send;
/// more is refused with 400 (nginx skips any number).
pub const MAX_LEADING_BLANK: usize = 16;

/// What the bytes read so far say about the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The head goes on past the bytes given.
    More,
    /// The head ends this many bytes into the bytes just given.
    End(usize),
    /// The head is larger than the bound.
    TooLarge,
    /// More than [`MAX_LEADING_BLANK`] bytes of empty lines before the
    /// request line.
    TooManyBlankLines,
}

/// The state of one head's scan, carried from read to read.
#[derive(Debug, Clone, Copy)]
pub struct HeadScan {
    max: usize,
    /// Bytes of the head given so far, leading empty lines included.
    seen: usize,
    /// The request line has begun (a byte other than `\r` or `\n` came).
    started: bool,
    /// The current line holds nothing but `\r` so far, and a line ended
    /// before it (so it may be the empty line that ends the head).
    line_empty: bool,
}

impl HeadScan {
    /// A scan of a head of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        HeadScan {
            max,
            seen: 0,
            started: false,
            line_empty: false,
        }
    }

    /// Takes the next bytes of the connection. After a verdict other than
    /// [`Verdict::More`] the scan is over.
    pub fn feed(&mut self, bytes: &[u8]) -> Verdict {
        let mut start = 0;
        if !self.started {
            let blank = bytes
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .unwrap_or(bytes.len());
            if self.seen + blank > MAX_LEADING_BLANK {
                return Verdict::TooManyBlankLines;
            }
            if blank == bytes.len() {
                return self.more(bytes.len());
            }
            // The request line's first byte: it is not an empty line.
            self.started = true;
            start = blank;
        }
        match end_of_head(&mut self.line_empty, &bytes[start..]) {
            Some(at) if self.seen + start + at <= self.max => Verdict::End(start + at),
            Some(_) => Verdict::TooLarge,
            None => self.more(bytes.len()),
        }
    }

    fn more(&mut self, n: usize) -> Verdict {
        self.seen += n;
        if self.seen > self.max {
            Verdict::TooLarge
        } else {
            Verdict::More
        }
    }
}

/// The index just past the empty line that ends a head in `bytes` (after
/// CRLF or a bare LF: the parser accepts both), if it is there. Jumps from
/// line feed to line feed: a header line is ruled out at its first byte, so
/// the cost is per line, not per byte.
fn end_of_head(line_empty: &mut bool, bytes: &[u8]) -> Option<usize> {
    let only_cr = |line: &[u8]| line.iter().all(|&b| b == b'\r');
    let mut start = 0;
    // Whether the line `start` begins can still be the empty one.
    let mut may_be_empty = *line_empty;
    while let Some(at) = memchr::memchr(b'\n', &bytes[start..]) {
        let feed = start + at;
        if may_be_empty && only_cr(&bytes[start..feed]) {
            return Some(feed + 1);
        }
        start = feed + 1;
        may_be_empty = true;
    }
    *line_empty = may_be_empty && only_cr(&bytes[start..]);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The absolute end of the head, feeding `chunks` in turn.
    fn verdict(max: usize, chunks: &[&[u8]]) -> (Verdict, usize) {
        let mut scan = HeadScan::new(max);
        let mut offset = 0;
        for c in chunks {
            match scan.feed(c) {
                Verdict::More => offset += c.len(),
                Verdict::End(at) => return (Verdict::End(offset + at), offset + at),
                other => return (other, offset),
            }
        }
        (Verdict::More, offset)
    }

    #[test]
    fn finds_the_end_of_a_head_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        let end = Verdict::End(head.len() - 4);
        assert_eq!(verdict(1024, &[head]).0, end);
        for split in 0..head.len() {
            let (a, b) = head.split_at(split);
            assert_eq!(verdict(1024, &[a, b]).0, end, "split at {split}");
        }
        assert_eq!(
            verdict(1024, &[b"GET / HTTP/1.1\nHost: a\n\n"]).0,
            Verdict::End(24)
        );
        assert_eq!(
            verdict(1024, &[b"GET / HTTP/1.1\r\nHost: a\r\n"]).0,
            Verdict::More
        );
        assert_eq!(
            verdict(1024, &[b"GET / HTTP/1.1\r\nX: \r\r\n"]).0,
            Verdict::More
        );
    }

    #[test]
    fn leading_empty_lines_belong_to_the_head_and_do_not_end_it() {
        let head = b"\r\n\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(verdict(1024, &[head]).0, Verdict::End(head.len()));
        for split in 0..head.len() {
            let (a, b) = head.split_at(split);
            assert_eq!(
                verdict(1024, &[a, b]).0,
                Verdict::End(head.len()),
                "{split}"
            );
        }
        // Nothing but empty lines is no head yet.
        assert_eq!(verdict(1024, &[b"\r\n\r\n"]).0, Verdict::More);
        // They count towards the size bound.
        let mut long = b"\r\n".repeat(4);
        long.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(verdict(long.len() - 1, &[&long]).0, Verdict::TooLarge);
        assert_eq!(verdict(long.len(), &[&long]).0, Verdict::End(long.len()));
    }

    #[test]
    fn more_leading_blank_bytes_than_tolerated_are_refused() {
        let ok = b"\r\n".repeat(MAX_LEADING_BLANK / 2);
        assert_eq!(verdict(1024, &[&ok]).0, Verdict::More);
        let over = b"\n".repeat(MAX_LEADING_BLANK + 1);
        assert_eq!(verdict(1024, &[&over]).0, Verdict::TooManyBlankLines);
        let split: Vec<&[u8]> = over.chunks(3).collect();
        assert_eq!(verdict(1024, &split).0, Verdict::TooManyBlankLines);
    }

    #[test]
    fn a_head_over_the_bound_is_too_large_as_soon_as_it_shows() {
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(verdict(64, &[head.as_bytes()]).0, Verdict::TooLarge);
        let (v, at) = verdict(64, &head.as_bytes().chunks(10).collect::<Vec<_>>());
        assert_eq!(v, Verdict::TooLarge);
        assert!(at <= 64, "{at}");
    }
}
