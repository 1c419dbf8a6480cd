//! A sampled request's spans, built at once when it ends from the timings
//! its context recorded: the server span, a child for each stage, and the
//! client span of the upstream call (the parent the upstream sees).

use super::{RequestTrace, Timings};
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::{Instant, SystemTime};

static SCOPE: LazyLock<InstrumentationScope> = LazyLock::new(|| {
    InstrumentationScope::builder("tollgate")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
});

/// What the end of the request knows about the server span.
pub struct Server {
    /// `GET api`: the method and the route name.
    pub name: String,
    pub attributes: Vec<KeyValue>,
    pub status: u16,
    /// tollgate's refusal code or upstream error kind.
    pub error: Option<&'static str>,
    /// The upstream call's attributes, when there was one.
    pub upstream: Vec<KeyValue>,
    /// The upstream call failed (no answer from it).
    pub upstream_failed: bool,
}

fn context(trace: &RequestTrace, span_id: [u8; 8]) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

#[allow(clippy::too_many_arguments)]
fn span(
    trace: &RequestTrace,
    id: [u8; 8],
    parent: Option<[u8; 8]>,
    remote_parent: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    (start, end): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
    events: Vec<Event>,
    status: Status,
) -> SpanData {
    SpanData {
        span_context: context(trace, id),
        parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: remote_parent,
        span_kind: kind,
        name,
        start_time: start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: {
            let mut e = SpanEvents::default();
            e.events = events;
            e
        },
        links: SpanLinks::default(),
        status,
        instrumentation_scope: SCOPE.clone(),
    }
}

fn error_status(code: Option<&'static str>) -> Status {
    Status::Error {
        description: Cow::Borrowed(code.unwrap_or("")),
    }
}

/// Every span of the request, the server span first.
pub fn build(trace: &RequestTrace, timings: &Timings, server: Server) -> Vec<SpanData> {
    let end = Instant::now();
    let wall = |at: Instant| timings.wall_of(at);
    let mut out = Vec::with_capacity(2 + timings.stages.len());
    let mut attributes = server.attributes;
    if let Some(code) = server.error {
        attributes.push(KeyValue::new("tollgate.error.code", code));
    }
    // OpenTelemetry's HTTP conventions: a server span is an error on 5xx only.
    let status = if server.status >= 500 {
        error_status(server.error)
    } else {
        Status::Unset
    };
    out.push(span(
        trace,
        trace.span_id,
        trace.parent,
        trace.parent.is_some(),
        SpanKind::Server,
        Cow::Owned(server.name),
        (timings.wall, wall(end)),
        attributes,
        Vec::new(),
        status,
    ));
    for stage in &timings.stages {
        let mut attributes = stage.attributes.clone();
        if let Some(code) = stage.error {
            attributes.push(KeyValue::new("tollgate.error.code", code));
        }
        out.push(span(
            trace,
            fastrand::u64(1..).to_be_bytes(),
            Some(trace.span_id),
            false,
            SpanKind::Internal,
            Cow::Borrowed(stage.name),
            (wall(stage.start), wall(stage.end)),
            attributes,
            Vec::new(),
            stage.error.map_or(Status::Unset, |c| error_status(Some(c))),
        ));
    }
    if let Some(up) = &timings.upstream {
        let mut events = Vec::new();
        if let Some(at) = up.connected {
            let reused = up.reused.unwrap_or(false);
            events.push(Event::new(
                if reused {
                    "connection reused"
                } else {
                    "connected"
                },
                wall(at),
                vec![KeyValue::new("tollgate.upstream.reused", reused)],
                0,
            ));
        }
        let mut attributes = server.upstream;
        if let Some(at) = up.first_byte {
            events.push(Event::new("first byte", wall(at), Vec::new(), 0));
            let ttfb = at.saturating_duration_since(up.start);
            attributes.push(KeyValue::new(
                "tollgate.upstream.ttfb_ms",
                ttfb.as_secs_f64() * 1000.0,
            ));
        }
        if let Some(reused) = up.reused {
            attributes.push(KeyValue::new("tollgate.upstream.reused", reused));
        }
        let status = if server.upstream_failed {
            error_status(server.error)
        } else {
            Status::Unset
        };
        out.push(span(
            trace,
            trace.upstream_span_id,
            Some(trace.span_id),
            false,
            SpanKind::Client,
            Cow::Borrowed("upstream"),
            (wall(up.start), wall(end)),
            attributes,
            events,
            status,
        ));
    }
    out
}
