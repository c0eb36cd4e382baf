//! Passing a streamed answer through: chunk by chunk, measuring time to
//! first token and inter-token latency, reading the final `usage`, and
//! ending with an OpenAI-style error event if the upstream fails mid-stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use serde_json::Value;
use tokio::time::Instant;

use crate::openai::Usage;

/// What a streamed (or plain) answer turned out to be, reported once when
/// its body ends, fails or is dropped.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct StreamReport {
    /// Time from the request's start to the first body bytes.
    pub first_byte: Option<std::time::Duration>,
    /// Gaps between consecutive chunks after the first.
    pub gaps: Vec<std::time::Duration>,
    /// The `usage` the upstream reported (the last one seen), if any.
    pub usage: Option<Usage>,
    /// How the body ended.
    pub end: StreamEnd,
}

/// How a passed-through body ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The upstream finished it.
    Complete,
    /// The upstream failed mid-body; the client got an error event.
    UpstreamFailed,
    /// The client went away first (the body was dropped).
    #[default]
    ClientGone,
}

pin_project! {
    /// An upstream body passed through to the client, observed on the way.
    /// `on_end` runs exactly once: at the end, at a failure, or on drop.
    pub struct Observed<B, F: FnOnce(StreamReport)> {
        #[pin]
        inner: B,
        started: Instant,
        last: Option<Instant>,
        report: StreamReport,
        sse: bool,
        // Bytes of an SSE event not yet terminated by a blank line.
        pending: BytesMut,
        on_end: Option<F>,
        failed: bool,
    }

    impl<B, F: FnOnce(StreamReport)> PinnedDrop for Observed<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                on_end(std::mem::take(this.report));
            }
        }
    }
}

impl<B, F: FnOnce(StreamReport)> Observed<B, F> {
    /// Observes `inner`; `started` is when the request began (for time to
    /// first byte); `sse` parses `data:` events for `usage`.
    pub fn new(inner: B, started: Instant, sse: bool, on_end: F) -> Self {
        Observed {
            inner,
            started,
            last: None,
            report: StreamReport::default(),
            sse,
            pending: BytesMut::new(),
            on_end: Some(on_end),
            failed: false,
        }
    }
}

/// The SSE event sent to the client when the upstream fails mid-stream.
pub fn error_event(message: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {"message": message, "type": "server_error", "code": "upstream_failed"}
    });
    Bytes::from(format!("data: {body}\n\n"))
}

impl<B, F> Body for Observed<B, F>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
    F: FnOnce(StreamReport),
{
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let now = Instant::now();
                    match *this.last {
                        None => this.report.first_byte = Some(now - *this.started),
                        Some(last) => this.report.gaps.push(now - last),
                    }
                    *this.last = Some(now);
                    if *this.sse {
                        this.pending.extend_from_slice(data);
                        read_usage(this.pending, &mut this.report.usage);
                    } else if this.report.usage.is_none() {
                        // A plain JSON answer: buffer it to read `usage` at the end.
                        this.pending.extend_from_slice(data);
                    }
                }
                // A body of known length ends with its last frame: hyper
                // does not poll again, so finish here.
                if this.inner.is_end_stream() {
                    finish(this.report, this.pending, *this.sse, this.on_end);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                *this.failed = true;
                this.report.end = StreamEnd::UpstreamFailed;
                let event = error_event(&format!("the upstream failed mid-stream: {err}"));
                if let Some(on_end) = this.on_end.take() {
                    on_end(std::mem::take(this.report));
                }
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            Poll::Ready(None) => {
                finish(this.report, this.pending, *this.sse, this.on_end);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }
}

/// The one field of a plain answer the gateway reads.
#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
}

/// Reports a body that ended complete (once: `on_end` is taken).
fn finish<F: FnOnce(StreamReport)>(
    report: &mut StreamReport,
    pending: &BytesMut,
    sse: bool,
    on_end: &mut Option<F>,
) {
    let Some(on_end) = on_end.take() else {
        return;
    };
    report.end = StreamEnd::Complete;
    if !sse && report.usage.is_none() {
        // Only `usage` is read; the rest of the answer is skipped, not built.
        report.usage = serde_json::from_slice::<WithUsage>(pending)
            .ok()
            .and_then(|answer| answer.usage);
    }
    on_end(std::mem::take(report));
}

/// Consumes complete SSE events from `pending`, keeping the last `usage`.
fn read_usage(pending: &mut BytesMut, usage: &mut Option<Usage>) {
    while let Some(end) = find_event_end(pending) {
        let event = pending.split_to(end);
        for line in event[..].split(|b: &u8| *b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            // Only the (rare) events that carry usage are parsed.
            if !contains(data, b"\"usage\"") {
                continue;
            }
            if let Ok(value) = serde_json::from_slice::<Value>(data.trim_ascii())
                && let Some(found) = value.get("usage").filter(|u| !u.is_null())
                && let Ok(found) = serde_json::from_value::<Usage>(found.clone())
            {
                *usage = Some(found);
            }
        }
    }
}

/// The index just past the first blank line (`\n\n`) in `bytes`.
fn find_event_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::{BodyExt, StreamBody};
    use parking_lot::Mutex;

    use super::*;

    fn body(
        chunks: Vec<Result<&'static str, &'static str>>,
    ) -> impl Body<Data = Bytes, Error = String> {
        StreamBody::new(futures::stream::iter(chunks.into_iter().map(|c| {
            c.map(|s| Frame::data(Bytes::from_static(s.as_bytes())))
                .map_err(str::to_owned)
        })))
    }

    #[tokio::test]
    async fn reads_usage_across_chunk_boundaries() {
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let observed = Observed::new(
            body(vec![
                Ok("data: {\"choices\":[]}\n\n"),
                Ok("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,"),
                Ok("\"completion_tokens\":5,\"total_tokens\":8}}\n\ndata: [DONE]\n\n"),
            ]),
            Instant::now(),
            true,
            move |report| *sink.lock() = Some(report),
        );
        let all = observed.collect().await.unwrap().to_bytes();
        assert!(all.ends_with(b"data: [DONE]\n\n"));
        let report = seen.lock().take().unwrap();
        assert_eq!(report.usage, Some(Usage::new(3, 5)));
        assert_eq!(report.end, StreamEnd::Complete);
        assert_eq!(report.gaps.len(), 2);
    }

    #[tokio::test]
    async fn a_failure_mid_stream_becomes_an_error_event() {
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let observed = Observed::new(
            body(vec![
                Ok("data: {\"choices\":[]}\n\n"),
                Err("connection reset"),
            ]),
            Instant::now(),
            true,
            move |report| *sink.lock() = Some(report),
        );
        let all = observed.collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&all);
        assert!(text.contains("\"code\":\"upstream_failed\""), "{text}");
        assert_eq!(seen.lock().take().unwrap().end, StreamEnd::UpstreamFailed);
    }

    #[tokio::test]
    async fn a_dropped_body_reports_the_client_gone_once() {
        let count = Arc::new(Mutex::new(Vec::new()));
        let sink = count.clone();
        let observed = Observed::new(
            body(vec![Ok("data: x\n\n")]),
            Instant::now(),
            true,
            move |report| sink.lock().push(report.end),
        );
        drop(observed);
        assert_eq!(*count.lock(), vec![StreamEnd::ClientGone]);
    }

    #[tokio::test]
    async fn plain_json_answers_yield_their_usage() {
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let observed = Observed::new(
            body(vec![
                Ok("{\"usage\":{\"prompt_tokens\":1,"),
                Ok("\"total_tokens\":1}}"),
            ]),
            Instant::now(),
            false,
            move |report| *sink.lock() = Some(report),
        );
        observed.collect().await.unwrap();
        assert_eq!(seen.lock().take().unwrap().usage, Some(Usage::new(1, 0)));
    }
}
