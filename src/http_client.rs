//! A small HTTP/1.1 client on Pingora's connector, for the few calls
//! tollgate makes itself (JWKS, upstream token endpoints). Plain `http://`:
//! this build has no TLS client.

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// `http://host[:port]/path`.
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    if url.starts_with("https://") {
        return Err(format!(
            "{url:?}: this build calls plain http:// endpoints only (use an internal http:// address)"
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        ),
        None => (hostport.to_string(), 80),
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(HttpUrl {
        host,
        port,
        path: path.to_string(),
    })
}

/// One request; returns the status and a body of at most `max_body` bytes.
pub async fn call(
    url: &HttpUrl,
    method: &str,
    form: Option<String>,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, Vec<u8>), String> {
    let addr = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", url.host))?;
    let mut peer = HttpPeer::new(addr, false, url.host.clone());
    peer.options.connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    let connector = pingora::connectors::http::Connector::new(None);
    let (mut session, _) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| e.to_string())?;
    let mut req =
        RequestHeader::build(method, url.path.as_bytes(), None).map_err(|e| e.to_string())?;
    let set = |req: &mut RequestHeader| -> pingora::Result<()> {
        req.insert_header(http::header::HOST, url.host.as_str())?;
        req.insert_header(http::header::ACCEPT, "application/json")?;
        if let Some(body) = &form {
            req.insert_header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )?;
            req.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        }
        Ok(())
    };
    set(&mut req).map_err(|e| e.to_string())?;
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(body) = form {
        session
            .write_request_body(Bytes::from(body), true)
            .await
            .map_err(|e| e.to_string())?;
    }
    session
        .finish_request_body()
        .await
        .map_err(|e| e.to_string())?;
    session
        .read_response_header()
        .await
        .map_err(|e| e.to_string())?;
    let status = session.response_header().map_or(0, |h| h.status.as_u16());
    let mut body = Vec::new();
    while let Some(chunk) = session
        .read_response_body()
        .await
        .map_err(|e| e.to_string())?
    {
        body.extend_from_slice(&chunk);
        if body.len() > max_body {
            return Err(format!("answer larger than {max_body} bytes"));
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        assert_eq!(
            parse_url("http://keys.internal:8080/.well-known/jwks.json").unwrap(),
            HttpUrl {
                host: "keys.internal".into(),
                port: 8080,
                path: "/.well-known/jwks.json".into()
            }
        );
        assert_eq!(parse_url("http://keys").unwrap().port, 80);
        assert_eq!(parse_url("http://keys").unwrap().path, "/");
        assert!(parse_url("https://keys/jwks").is_err());
        assert!(parse_url("ftp://keys").is_err());
        assert!(parse_url("http://:80/x").is_err());
        assert!(parse_url("http://h:port/x").is_err());
    }
}
