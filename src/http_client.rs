//! A small HTTP/1.1 client on Pingora's connector, for the few calls
//! tollgate makes itself (JWKS, upstream token endpoints), over `http://` or
//! `https://`. HTTPS verifies the server's certificate and name against the
//! system's CA store, or against the CAs of a configured PEM file.

use bytes::Bytes;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::tls::RootCertStore;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
    pub tls: bool,
    /// PEM file of the CAs trusted for this endpoint; `None`: the system store.
    pub ca_file: Option<String>,
}

/// `http[s]://host[:port]/path`.
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        ),
        None => (hostport.to_string(), if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(HttpUrl {
        host,
        port,
        path: path.to_string(),
        tls,
        ca_file: None,
    })
}

/// An endpoint and the CA file it is verified with: the URL must be
/// `https://` when a CA file is given, and the file must hold certificates.
/// `url_key` names the URL's key in messages about the CA file.
pub fn endpoint(url: &str, ca_file: Option<&str>, url_key: &str) -> Result<HttpUrl, String> {
    let mut parsed = parse_url(url)?;
    if let Some(path) = ca_file {
        if !parsed.tls {
            return Err(format!(
                "only used with an https:// {url_key}, and {url:?} is plain http://"
            ));
        }
        load_cas(Some(path))?;
        parsed.ca_file = Some(path.to_string());
    }
    Ok(parsed)
}

/// The CAs that would verify a server: the file's, or the system's.
fn load_cas(ca_file: Option<&str>) -> Result<usize, String> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            pingora::tls::load_ca_file_into_store(path, &mut store)
                .map_err(|e| format!("cannot load CA certificates from {path:?}: {e}"))?;
            if store.is_empty() {
                return Err(format!("{path:?} holds no PEM certificate"));
            }
        }
        None => pingora::tls::load_platform_certs_incl_env_into_store(&mut store)
            .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?,
    }
    Ok(store.len())
}

/// Pingora's connector panics on CA files it cannot load; load them first
/// so a bad or vanished file is an error here instead.
fn connector(url: &HttpUrl) -> Result<pingora::connectors::http::Connector, String> {
    load_cas(url.ca_file.as_deref())?;
    let mut options = ConnectorOptions::new(1);
    options.ca_file = url.ca_file.clone();
    Ok(pingora::connectors::http::Connector::new(Some(options)))
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
    let mut peer = HttpPeer::new(addr, url.tls, url.host.clone());
    peer.options.connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    let connector = connector(url)?;
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
    fn parses_http_and_https_urls() {
        assert_eq!(
            parse_url("http://keys.internal:8080/.well-known/jwks.json").unwrap(),
            HttpUrl {
                host: "keys.internal".into(),
                port: 8080,
                path: "/.well-known/jwks.json".into(),
                tls: false,
                ca_file: None,
            }
        );
        assert_eq!(parse_url("http://keys").unwrap().port, 80);
        assert_eq!(parse_url("http://keys").unwrap().path, "/");
        let https = parse_url("https://keys/jwks").unwrap();
        assert!(https.tls);
        assert_eq!(https.port, 443);
        assert!(parse_url("HTTPS//keys").is_err());
        assert!(parse_url("ftp://keys").is_err());
        assert!(parse_url("http://:80/x").is_err());
        assert!(parse_url("http://h:port/x").is_err());
    }

    #[test]
    fn ca_files_need_https_and_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let empty = empty.to_str().unwrap();
        let err = endpoint("http://keys/jwks", Some(empty), "jwks_url").unwrap_err();
        assert!(err.contains("only used with an https:// jwks_url"), "{err}");
        let err = endpoint("https://keys/jwks", Some(empty), "jwks_url").unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = endpoint("https://keys/jwks", Some("/nonexistent/ca.pem"), "x").unwrap_err();
        assert!(err.contains("cannot load CA certificates"), "{err}");
        let plain = endpoint("https://keys/jwks", None, "jwks_url").unwrap();
        assert_eq!(plain.ca_file, None);
    }
}
