//! Tracing: W3C trace context on every request, OpenTelemetry spans for the
//! sampled ones.
//!
//! A request not sampled costs two random numbers and the `traceparent` it
//! forwards. A sampled one records the timings of its stages in its context
//! (no span objects while it runs); at its end the spans are built from
//! them at once and handed to the exporter thread through a bounded queue.
//! Nothing on the request path waits for export: a full queue, a collector
//! down or one that does not answer drops spans, counted in
//! `tollgate_trace_spans_dropped_total`.

pub mod context;
mod export;
pub mod spans;

use crate::config::{ConfigProblem, TracingSettings};
use context::Parent;
use http::HeaderMap;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SpanData;
use std::time::{Instant, SystemTime};

/// One exporter (its thread, queue and connection) per tracing config.
/// A reload that leaves `telemetry.tracing` as it was keeps it.
pub struct Tracer {
    pub settings: TracingSettings,
    /// New traces whose id reads below this are sampled.
    threshold: u64,
    queue: tokio::sync::mpsc::Sender<SpanData>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Tracer {
    /// Starts the exporter thread (it connects when it has spans to send).
    pub fn new(settings: TracingSettings) -> Result<Tracer, ConfigProblem> {
        let (queue, receiver) = tokio::sync::mpsc::channel(settings.queue_size.max(1));
        export::spawn(settings.clone(), receiver).map_err(|e| {
            ConfigProblem::new(
                "telemetry.tracing",
                format!("cannot start the span exporter: {e}"),
            )
        })?;
        log::info!(
            "tracing: exporter started for {} over OTLP/{} (new traces sampled at {})",
            settings.endpoint,
            match settings.protocol {
                crate::config::TraceProtocol::Grpc => "gRPC",
                crate::config::TraceProtocol::Http => "HTTP",
            },
            settings.sample_ratio
        );
        Ok(Tracer {
            threshold: threshold(settings.sample_ratio),
            settings,
            queue,
        })
    }

    /// The trace of a new request: continued from `traceparent` when the
    /// peer is trusted to send one (`trusted` is asked only then), else new.
    pub fn start(&self, headers: &HeaderMap, trusted: impl FnOnce() -> bool) -> RequestTrace {
        let incoming = if headers.contains_key(context::TRACEPARENT) && trusted() {
            context::incoming(headers)
        } else {
            None
        };
        let span_id = fastrand::u64(1..).to_be_bytes();
        let upstream_span_id = fastrand::u64(1..).to_be_bytes();
        let (trace_id, parent, sampled, tracestate) = match incoming {
            Some((
                Parent {
                    trace_id,
                    span_id,
                    sampled,
                },
                state,
            )) => (trace_id, Some(span_id), sampled, state),
            None => {
                let id = fastrand::u128(1..).to_be_bytes();
                (id, None, sampled_by_ratio(&id, self.threshold), None)
            }
        };
        RequestTrace {
            trace_id,
            span_id,
            upstream_span_id,
            parent,
            sampled,
            tracestate,
            timings: sampled.then(|| Box::new(Timings::new())),
        }
    }

    /// Queues the spans of one request; never waits.
    pub fn submit(&self, spans: Vec<SpanData>) {
        for span in spans {
            if self.queue.try_send(span).is_err() {
                crate::metrics::TRACE_SPANS_DROPPED.inc();
            }
        }
    }
}

/// `ratio` of the 2^63 values a trace id's last 8 bytes give (shifted).
fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio > 0.0 {
        (ratio * (1u64 << 63) as f64) as u64
    } else {
        0
    }
}

/// Trace-id-ratio sampling: the same trace id gives the same answer on
/// every instance with the same ratio.
fn sampled_by_ratio(trace_id: &[u8; 16], threshold: u64) -> bool {
    if threshold == u64::MAX {
        return true;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < threshold
}

/// A request's place in its trace.
#[derive(Debug)]
pub struct RequestTrace {
    pub trace_id: [u8; 16],
    /// tollgate's server span.
    pub span_id: [u8; 8],
    /// The span of the call to the upstream: the parent the upstream sees.
    pub upstream_span_id: [u8; 8],
    /// The caller's span, when the trace was continued.
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    /// Passed on with a continued trace.
    pub tracestate: Option<String>,
    /// Only for a sampled request.
    pub timings: Option<Box<Timings>>,
}

impl RequestTrace {
    /// The `traceparent` the upstream receives.
    pub fn upstream_traceparent(&self) -> String {
        context::traceparent(&self.trace_id, &self.upstream_span_id, self.sampled)
    }

    pub fn trace_id_hex(&self) -> String {
        context::trace_id_hex(&self.trace_id)
    }
}

/// What a sampled request did, and when.
#[derive(Debug)]
pub struct Timings {
    pub wall: SystemTime,
    pub start: Instant,
    pub stages: Vec<Stage>,
    pub upstream: Option<UpstreamTiming>,
}

impl Timings {
    fn new() -> Self {
        Timings {
            wall: SystemTime::now(),
            start: Instant::now(),
            stages: Vec::new(),
            upstream: None,
        }
    }

    /// A finished stage: a child span of the server span.
    pub fn stage(&mut self, name: &'static str, start: Instant, attributes: Vec<KeyValue>) {
        self.stages.push(Stage {
            name,
            start,
            end: Instant::now(),
            attributes,
            error: None,
        });
    }

    /// The wall-clock time of `at`.
    pub fn wall_of(&self, at: Instant) -> SystemTime {
        self.wall + at.saturating_duration_since(self.start)
    }
}

/// One step of the request path (authentication, limits, ...).
#[derive(Debug)]
pub struct Stage {
    pub name: &'static str,
    pub start: Instant,
    pub end: Instant,
    pub attributes: Vec<KeyValue>,
    /// tollgate's error code when the step refused the request.
    pub error: Option<&'static str>,
}

/// The call to the upstream, over every attempt.
#[derive(Debug)]
pub struct UpstreamTiming {
    pub start: Instant,
    pub connected: Option<Instant>,
    pub reused: Option<bool>,
    pub first_byte: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_sample_about_their_share_and_the_ends_exactly() {
        let all = threshold(1.0);
        let none = threshold(0.0);
        let tenth = threshold(0.1);
        let mut hits = 0;
        for _ in 0..20_000 {
            let id = fastrand::u128(1..).to_be_bytes();
            assert!(sampled_by_ratio(&id, all));
            assert!(!sampled_by_ratio(&id, none));
            hits += usize::from(sampled_by_ratio(&id, tenth));
        }
        assert!((1_500..2_500).contains(&hits), "{hits}");
    }
}
