//! Follows the request framing of one HTTP/1.1 connection in the bytes as they
//! are read, to find a request head that carries both `Content-Length` and
//! `Transfer-Encoding`. hyper takes such a request by its `Transfer-Encoding`
//! and drops the `Content-Length` before the request reaches a service, so
//! nothing after the parser can tell; a proxy in front that went by the
//! length would disagree about where the request ends (request smuggling).
//!
//! The scanner keeps the framing rules hyper applies (RFC 9112): empty lines
//! before a request line are skipped, a body is chunked when
//! `Transfer-Encoding` is present, else `Content-Length` bytes long, else
//! empty. Bytes hyper would refuse (a bad length or chunk line) stop the
//! scan: hyper answers those itself and closes the connection.

/// `content-length`, lower case.
const CONTENT_LENGTH: &[u8] = b"content-length";
/// `transfer-encoding`, lower case.
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding";

/// Where in the stream of requests the next byte falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before a request line; empty lines are skipped here.
    Start,
    /// In the request line.
    RequestLine,
    /// At the start of a header line (`cr`: after a CR there).
    LineStart { cr: bool },
    /// In a header name, `pos` bytes in; which of the two names still match.
    Name { pos: usize, length: bool, encoding: bool },
    /// In a `Content-Length` value (`digits` seen, then `done` at white space).
    Length { value: u64, digits: bool, done: bool },
    /// In the rest of a header line that does not matter here.
    Skip,
    /// In a body of this many more bytes.
    Fixed(u64),
    /// At the first hex digit of a chunk size.
    ChunkStart,
    /// In a chunk size.
    ChunkSize(u64),
    /// In white space after a chunk size.
    ChunkSpace(u64),
    /// In a chunk extension.
    ChunkExtension(u64),
    /// At the LF after a chunk size line.
    ChunkSizeLf(u64),
    /// In chunk data, this many more bytes.
    ChunkData(u64),
    /// At the CR after chunk data.
    ChunkDataCr,
    /// At the LF after chunk data.
    ChunkDataLf,
    /// After the last chunk: a CR (the end) or a trailer line.
    EndCr,
    /// In a trailer line.
    Trailer,
    /// At the LF ending a trailer line.
    TrailerLf,
    /// At the LF ending the body.
    EndLf,
    /// The bytes broke the protocol; hyper closes the connection.
    Lost,
}

/// The framing state of one connection's incoming bytes.
#[derive(Debug)]
pub(crate) struct Scanner {
    /// Where the next byte falls.
    at: At,
    /// Request heads completed so far (wrapping); the current head is number `heads + 1`.
    heads: u32,
    /// The current head's `Content-Length`.
    length: Option<u64>,
    /// Whether the current head has `Transfer-Encoding`.
    encoding: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            at: At::Start,
            heads: 0,
            length: None,
            encoding: false,
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

impl Scanner {
    /// A scanner for a connection whose first `heads` requests were read
    /// before it (on the direct path): the next head is number `heads + 1`.
    pub(crate) fn after(heads: u32) -> Scanner {
        Scanner {
            heads,
            ..Scanner::default()
        }
    }

    /// Takes the next bytes read from the connection. Returns the number
    /// (1 for the first request on the connection, wrapping) of the first head
    /// among them that carried both `Content-Length` and `Transfer-Encoding`.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<u32> {
        let mut found = None;
        let mut i = 0;
        while i < bytes.len() {
            // Bodies are skipped by length, not byte by byte.
            match self.at {
                At::Lost => return found,
                At::Fixed(n) | At::ChunkData(n) => {
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    let left = n - take;
                    self.at = match (self.at, left) {
                        (At::Fixed(_), 0) => At::Start,
                        (At::Fixed(_), _) => At::Fixed(left),
                        (_, 0) => At::ChunkDataCr,
                        _ => At::ChunkData(left),
                    };
                    continue;
                }
                At::Skip | At::RequestLine => {
                    match bytes[i..].iter().position(|&b| b == b'\n') {
                        Some(p) => {
                            i += p + 1;
                            self.at = At::LineStart { cr: false };
                        }
                        None => i = bytes.len(),
                    }
                    continue;
                }
                _ => {}
            }
            if let Some(n) = self.step(bytes[i]) {
                found = found.or(Some(n));
            }
            i += 1;
        }
        found
    }

    /// One byte outside a body or a skipped line.
    fn step(&mut self, b: u8) -> Option<u32> {
        self.at = match self.at {
            At::Start if b == b'\r' || b == b'\n' => At::Start,
            At::Start => At::RequestLine,
            At::LineStart { cr: _ } if b == b'\n' => return self.end_of_head(),
            At::LineStart { cr: false } if b == b'\r' => At::LineStart { cr: true },
            At::LineStart { cr: true } => At::Lost,
            At::LineStart { cr: false } => self.name(0, true, true, b),
            At::Name { pos, length, encoding } => self.name(pos, length, encoding, b),
            At::Length { value, digits, done } => match b {
                b'0'..=b'9' if !done => match value.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))) {
                    Some(value) => At::Length {
                        value,
                        digits: true,
                        done,
                    },
                    None => At::Lost,
                },
                b' ' | b'\t' => At::Length {
                    value,
                    digits,
                    done: digits,
                },
                b'\r' => At::Length {
                    value,
                    digits,
                    done: true,
                },
                b'\n' if digits && self.length.is_none_or(|l| l == value) => {
                    self.length = Some(value);
                    At::LineStart { cr: false }
                }
                _ => At::Lost,
            },
            At::ChunkStart => hex(b).map_or(At::Lost, At::ChunkSize),
            At::ChunkSize(n) => match (hex(b), b) {
                (Some(d), _) => n
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(d))
                    .map_or(At::Lost, At::ChunkSize),
                (None, b' ' | b'\t') => At::ChunkSpace(n),
                (None, b';') => At::ChunkExtension(n),
                (None, b'\r') => At::ChunkSizeLf(n),
                _ => At::Lost,
            },
            At::ChunkSpace(n) => match b {
                b' ' | b'\t' => At::ChunkSpace(n),
                b';' => At::ChunkExtension(n),
                b'\r' => At::ChunkSizeLf(n),
                _ => At::Lost,
            },
            At::ChunkExtension(n) => match b {
                b'\r' => At::ChunkSizeLf(n),
                b'\n' => At::Lost,
                _ => At::ChunkExtension(n),
            },
            At::ChunkSizeLf(0) if b == b'\n' => At::EndCr,
            At::ChunkSizeLf(n) if b == b'\n' => At::ChunkData(n),
            At::ChunkDataCr if b == b'\r' => At::ChunkDataLf,
            At::ChunkDataLf if b == b'\n' => At::ChunkStart,
            At::EndCr if b == b'\r' => At::EndLf,
            At::EndCr | At::Trailer if b != b'\r' => At::Trailer,
            At::Trailer => At::TrailerLf,
            At::TrailerLf if b == b'\n' => At::EndCr,
            At::EndLf if b == b'\n' => At::Start,
            _ => At::Lost,
        };
        None
    }

    /// The state after byte `b` of a header name, `pos` bytes in.
    fn name(&mut self, pos: usize, length: bool, encoding: bool, b: u8) -> At {
        if b == b':' {
            if length && pos == CONTENT_LENGTH.len() {
                return At::Length {
                    value: 0,
                    digits: false,
                    done: false,
                };
            }
            if encoding && pos == TRANSFER_ENCODING.len() {
                self.encoding = true;
            }
            return At::Skip;
        }
        if b == b'\r' || b == b'\n' {
            // A line without a colon: hyper refuses the head.
            return At::Lost;
        }
        let b = b.to_ascii_lowercase();
        let length = length && CONTENT_LENGTH.get(pos) == Some(&b);
        let encoding = encoding && TRANSFER_ENCODING.get(pos) == Some(&b);
        if length || encoding {
            At::Name {
                pos: pos + 1,
                length,
                encoding,
            }
        } else {
            At::Skip
        }
    }

    /// The empty line after a head: counts it and starts its body.
    fn end_of_head(&mut self) -> Option<u32> {
        self.heads = self.heads.wrapping_add(1);
        let both = (self.length.is_some() && self.encoding).then_some(self.heads);
        self.at = if self.encoding {
            At::ChunkStart
        } else {
            match self.length {
                Some(n) if n > 0 => At::Fixed(n),
                _ => At::Start,
            }
        };
        self.length = None;
        self.encoding = false;
        both
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` whole and also in every split into two reads and byte by
    /// byte; every way must find the same heads.
    fn found(wire: &str) -> Vec<u32> {
        let bytes = wire.as_bytes();
        let mut whole = Scanner::default();
        let mut at_once = vec![];
        // Byte by byte, so that each found head is reported on its own.
        for b in bytes {
            at_once.extend(whole.feed(std::slice::from_ref(b)));
        }
        for split in 0..=bytes.len() {
            let mut s = Scanner::default();
            let mut got = vec![];
            got.extend(s.feed(&bytes[..split]));
            got.extend(s.feed(&bytes[split..]));
            // Two reads report at most the first head of each.
            assert!(
                got.iter().all(|n| at_once.contains(n)),
                "split at {split}: {got:?} vs {at_once:?}"
            );
            assert_eq!(s.heads, whole.heads, "split at {split}");
            assert_eq!(s.at, whole.at, "split at {split}");
        }
        at_once
    }

    #[test]
    fn plain_requests_are_counted_and_not_flagged() {
        let wire = "GET /healthz HTTP/1.1\r\nHost: q\r\n\r\n\
                    POST /v1/consume HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"subject\":\"u\"}\
                    \r\nPOST /v1/consume HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
                    GET / HTTP/1.1\nHost: q\n\n";
        let mut s = Scanner::default();
        assert_eq!(found(wire), Vec::<u32>::new());
        s.feed(wire.as_bytes());
        assert_eq!((s.heads, s.at), (4, At::Start));
    }

    #[test]
    fn both_lengths_are_found_in_either_order_and_any_case() {
        assert_eq!(
            found("POST /v1/consume HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            vec![1]
        );
        assert_eq!(
            found("GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH:3\r\n\r\n"),
            vec![2]
        );
    }

    #[test]
    fn a_head_inside_a_body_is_body() {
        let inner = "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let wire = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{inner}\
             POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            inner.len(),
            inner.len()
        );
        assert_eq!(found(&wire), Vec::<u32>::new());
        let mut s = Scanner::default();
        s.feed(wire.as_bytes());
        assert_eq!((s.heads, s.at), (3, At::Start));
    }

    #[test]
    fn similar_names_and_broken_framing() {
        assert_eq!(
            found("POST / HTTP/1.1\r\nContent-Lengths: 3\r\nX-Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n"),
            Vec::<u32>::new()
        );
        for broken in [
            "POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            "GET / HTTP/1.1\r\ncontent-len\r\n\r\n",
        ] {
            let mut s = Scanner::default();
            s.feed(broken.as_bytes());
            assert_eq!(s.at, At::Lost, "{broken:?}");
        }
    }
}
