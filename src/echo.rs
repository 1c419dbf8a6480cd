//! `tollgate echo`: a whoami-style upstream. Every request is answered with
//! its request line, headers, client address and body size as plain text.
//! `?wait=250ms` delays the answer (for timeout and drain tests);
//! `?status=503` picks the status code; `?cost=7` answers `X-Cost: 7` (an
//! upstream reporting what a request cost, for `cost_from_response_header`).

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::fmt::Write;

pub struct EchoApp;

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[async_trait]
impl ServeHttp for EchoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body_len = 0usize;
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => body_len += chunk.len(),
                Ok(None) => break,
                Err(e) => {
                    log::debug!("echo: cannot read request body: {e}");
                    break;
                }
            }
        }
        let req = session.req_header();
        let query = req.uri.query();
        if let Some(wait) =
            query_param(query, "wait").and_then(|w| crate::config::parse_duration(w).ok())
        {
            tokio::time::sleep(wait).await;
        }
        let status = query_param(query, "status")
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (200..600).contains(s))
            .unwrap_or(200);
        let mut text = String::new();
        let _ = writeln!(text, "{} {} {:?}", req.method, req.uri, req.version);
        for (name, value) in req.headers.iter() {
            let _ = writeln!(
                text,
                "{}: {}",
                name,
                String::from_utf8_lossy(value.as_bytes())
            );
        }
        let client = session
            .client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let _ = writeln!(text, "RemoteAddr: {client}");
        let _ = writeln!(text, "BodyLength: {body_len}");
        let mut builder = Response::builder().status(status);
        if let Some(cost) = query_param(query, "cost") {
            builder = builder.header("x-cost", cost);
        }
        builder
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(http::header::CONTENT_LENGTH, text.len())
            .body(text.into_bytes())
            .unwrap_or_default()
    }
}
