//! The exporter thread: a runtime of its own, so a slow or absent collector
//! never takes time from the proxy's workers. Spans are sent in batches;
//! a batch the collector did not take in time is dropped and counted.

use crate::config::{TraceProtocol, TracingSettings};
use crate::metrics::{TRACE_SPANS_DROPPED, TRACE_SPANS_EXPORTED};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Receiver;

/// Most spans in one export call.
const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for others: each export has a
/// fixed cost (an HTTP/2 or HTTP call, the resource encoded again), which a
/// low sample ratio would otherwise pay for every few spans.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Export failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

pub fn spawn(settings: TracingSettings, receiver: Receiver<SpanData>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tollgate-otlp".into())
        .spawn(move || run(settings, receiver))
        .map(|_| ())
}

fn run(settings: TracingSettings, mut receiver: Receiver<SpanData>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            // The queue's receiver goes with this thread: every span is
            // then counted as dropped where it is submitted.
            log::error!("tracing: cannot start the exporter runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let mut exporter = match build(&settings) {
            Ok(e) => e,
            Err(e) => {
                log::error!("tracing: cannot build the OTLP exporter: {e}");
                while receiver.recv().await.is_some() {
                    TRACE_SPANS_DROPPED.inc();
                }
                return;
            }
        };
        exporter.set_resource(&resource(&settings));
        let mut last_warning: Option<Instant> = None;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = receiver.recv().await {
            batch.push(first);
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            // The exporter has its own timeout; this one bounds it whatever
            // the transport does.
            let limit = settings.timeout + Duration::from_secs(1);
            let failure = match tokio::time::timeout(limit, exporter.export(std::mem::take(&mut batch))).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {limit:?}")),
            };
            match failure {
                None => TRACE_SPANS_EXPORTED.inc_by(n),
                Some(why) => {
                    TRACE_SPANS_DROPPED.inc_by(n);
                    if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        last_warning = Some(Instant::now());
                        log::warn!(
                            "tracing: {n} spans dropped, the collector at {} did not take them: {why}",
                            settings.endpoint
                        );
                    }
                }
            }
        }
        let _ = exporter.shutdown();
    });
}

fn resource(settings: &TracingSettings) -> Resource {
    Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

/// The OTLP exporter of `settings`; built inside the exporter's runtime
/// (the gRPC channel belongs to it).
fn build(
    settings: &TracingSettings,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    // The exporter's own retries (a few, with back-off) stay within its
    // timeout.
    match settings.protocol {
        TraceProtocol::Grpc => {
            let mut headers = http::HeaderMap::new();
            for (name, value) in &settings.headers {
                // Checked when the config was read; a pair that still does
                // not fit is left out rather than failing the exporter.
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_str(value),
                ) {
                    headers.insert(k, v);
                }
            }
            let metadata =
                opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(metadata)
                .build()
        }
        TraceProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(settings.endpoint.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(settings.timeout)
            .with_headers(settings.headers.clone().into_iter().collect())
            .build(),
    }
}
