//! A streamed chat answer passed on as it arrives, one server-sent event at a
//! time (an event is forwarded as soon as its blank line arrives), while the
//! usage chunk the gateway asked for is read and, unless the caller asked
//! for it too, left out. When the stream ends the hold is committed with
//! that usage; when it is cut short (the upstream fails, or the caller goes
//! away) with what was streamed: the prompt and the content tokens sent.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::HeaderValue;
use futures_util::StreamExt;
use serde_json::Value;

use super::{tokens, usage_of, Gateway};

/// What one stream has seen.
pub struct Tally {
    id: String,
    /// The caller's `Authorization`: a cluster follower commits on the leader with it.
    authorization: Option<HeaderValue>,
    model: String,
    input: u64,
    wants_usage: bool,
    usage: Option<(u64, u64)>,
    /// The content streamed so far, counted if the stream is cut short.
    streamed: String,
    /// Bytes of an event not yet complete.
    buf: Vec<u8>,
}

impl Tally {
    pub fn new(id: String, authorization: Option<HeaderValue>, model: String, input: u64, wants_usage: bool) -> Tally {
        Tally {
            id,
            authorization,
            model,
            input,
            wants_usage,
            usage: None,
            streamed: String::new(),
            buf: Vec::new(),
        }
    }

    /// Takes `chunk`; returns the complete events to pass on.
    fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        // Only the new bytes (and the 3 before them, where a separator may
        // start) are searched: a long event arriving in pieces is not
        // scanned again from its start each time.
        let mut from = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some((end, sep)) = event_end(&self.buf, from) {
            from = 0;
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            if self.keep(&event[..end]) {
                out.extend_from_slice(&event);
            }
        }
        out
    }

    /// Reads one event; false for the usage chunk the caller did not ask for.
    fn keep(&mut self, event: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(event) else {
            return true;
        };
        let data: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n");
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            return true;
        };
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for c in choices {
                if let Some(t) = c.get("delta").and_then(|d| d.get("content")).and_then(Value::as_str) {
                    self.streamed.push_str(t);
                }
            }
        }
        if let Some(u) = usage_of(&v) {
            self.usage = Some(u);
            let no_choices = v.get("choices").and_then(Value::as_array).is_none_or(|c| c.is_empty());
            return self.wants_usage || !no_choices;
        }
        true
    }

    /// What the commit charges: the reported usage, else what was streamed.
    fn charge(&self) -> (u64, u64) {
        self.usage
            .unwrap_or_else(|| (self.input, tokens::count_text(&self.model, &self.streamed)))
    }
}

/// The end of the first complete event in `buf` whose separator starts at
/// or after `from`, and the separator's length.
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let rest = &buf[from..];
    let lf = rest.windows(2).position(|w| w == b"\n\n").map(|i| (from + i, 2));
    let crlf = rest.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (from + i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Commits the hold once, when the stream ends or is dropped.
struct Guard(Option<(Arc<Gateway>, Tally)>);

impl Guard {
    async fn finish(&mut self) {
        if let Some((gw, t)) = self.0.take() {
            gw.commit(&t.id, t.authorization.as_ref(), Some(t.charge())).await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The caller went away mid-stream: charge what was streamed.
        if let Some((gw, t)) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    gw.commit(&t.id, t.authorization.as_ref(), Some(t.charge())).await;
                });
            }
        }
    }
}

/// The caller's body: the upstream's events, metered.
pub fn metered(
    gw: Arc<Gateway>,
    resp: reqwest::Response,
    tally: Tally,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let upstream = resp.bytes_stream().boxed();
    futures_util::stream::unfold(
        (upstream, Guard(Some((gw, tally)))),
        |(mut upstream, mut guard)| async move {
            loop {
                match upstream.next().await {
                    Some(Ok(chunk)) => {
                        let out = match guard.0.as_mut() {
                            Some((_, t)) => t.feed(&chunk),
                            None => chunk.to_vec(),
                        };
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), (upstream, guard)));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the upstream's stream was cut off; charging what was streamed");
                        guard.finish().await;
                        return None;
                    }
                    None => {
                        // A last event without its blank line is passed on as is.
                        let rest = guard.0.as_mut().map(|(_, t)| std::mem::take(&mut t.buf));
                        guard.finish().await;
                        return match rest.filter(|r| !r.is_empty()) {
                            Some(r) => Some((Ok(Bytes::from(r)), (futures_util::stream::empty().boxed(), guard))),
                            None => None,
                        };
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_passed_whole_and_the_usage_chunk_is_read() {
        let mut t = Tally::new("r".into(), None, "gpt-4o".into(), 10, false);
        let a = b"data: {\"choices\":[{\"delta\":{\"content\":\"hel\"}}]}\n\nda";
        assert_eq!(
            t.feed(a),
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hel\"}}]}\n\n".to_vec()
        );
        let b = b"ta: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n";
        assert_eq!(t.feed(b).len(), b.len() + 2);
        assert_eq!(t.streamed, "hello");
        assert_eq!(t.charge(), (10, tokens::count_text("gpt-4o", "hello")));
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n";
        assert!(t.feed(usage).is_empty(), "hidden from a caller who did not ask");
        assert_eq!(t.charge(), (7, 3));
        assert_eq!(t.feed(b"data: [DONE]\n\n"), b"data: [DONE]\n\n".to_vec());
        let mut asked = Tally::new("r".into(), None, "gpt-4o".into(), 10, true);
        assert_eq!(asked.feed(usage), usage.to_vec());
    }
}
