//! A small HTTP/1.1 client on Pingora's connector, for the few calls
//! tollgate makes itself (JWKS, upstream token endpoints), over `http://` or
//! `https://`. HTTPS verifies the server's certificate and name against the
//! system's CA store, or against the CAs of a configured PEM file.
//!
//! An [`HttpUrl`] is parsed (and checked) with the config, with no I/O; an
//! [`HttpClient`] loads the CAs and builds its connector once, when the live
//! state is built, and is then used for every call.

use bytes::Bytes;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::tls::RootCertStore;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// As the URL names it; IPv6 literals without brackets.
    pub host: String,
    pub port: u16,
    /// Path and query.
    pub path: String,
    pub tls: bool,
    /// PEM file of the CAs trusted for this endpoint; `None`: the system store.
    pub ca_file: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0:?} is not an http:// or https:// URL")]
    NotHttp(String),
    #[error("{url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("only used with an https:// {url_key}, and {url:?} is plain http://")]
    CaWithoutTls { url_key: String, url: String },
    #[error("cannot load CA certificates from {path:?}: {why}")]
    CaFile { path: String, why: String },
    #[error("{0:?} holds no PEM certificate")]
    NoCertificate(String),
    #[error("cannot load the system's CA certificates: {0}")]
    SystemCas(String),
    #[error("cannot resolve {host}: {why}")]
    Resolve { host: String, why: String },
    #[error("{0}")]
    Exchange(String),
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("no complete answer within {0:?}")]
    Deadline(Duration),
}

impl HttpUrl {
    /// `http[s]://host[:port][/path][?query]`, IPv6 literals in brackets.
    pub fn parse(url: &str) -> Result<HttpUrl, HttpError> {
        let bad = |why: &str| HttpError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let uri: http::Uri = url.parse().map_err(|_| HttpError::NotHttp(url.into()))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(HttpError::NotHttp(url.into())),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information in a URL is not supported"));
        }
        let host = authority.host();
        let rest = authority.as_str().get(host.len()..).unwrap_or_default();
        if !rest.is_empty() && authority.port_u16().is_none() {
            return Err(bad("bad port"));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(HttpUrl {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |pq| pq.as_str().to_string()),
            tls,
            ca_file: None,
        })
    }

    /// The URL with the CA file that verifies it: only for `https://`.
    /// `url_key` names the URL's key in the message about the CA file.
    pub fn with_ca_file(mut self, ca_file: Option<&str>, url_key: &str) -> Result<Self, HttpError> {
        if let Some(path) = ca_file {
            if !self.tls {
                return Err(HttpError::CaWithoutTls {
                    url_key: url_key.into(),
                    url: self.to_string(),
                });
            }
            self.ca_file = Some(path.to_string());
        }
        Ok(self)
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]", self.host)?;
        } else {
            write!(f, "{scheme}://{}", self.host)?;
        }
        if self.port != if self.tls { 443 } else { 80 } {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "{}", self.path)
    }
}

/// The CAs that would verify a server: the file's, or the system's. Pingora's
/// connector panics on a CA file it cannot load, so they are loaded here
/// first and a bad or vanished file is an error instead.
fn load_cas(ca_file: Option<&str>) -> Result<usize, HttpError> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            pingora::tls::load_ca_file_into_store(path, &mut store).map_err(|e| {
                HttpError::CaFile {
                    path: path.into(),
                    why: e.to_string(),
                }
            })?;
            if store.is_empty() {
                return Err(HttpError::NoCertificate(path.into()));
            }
        }
        None => pingora::tls::load_platform_certs_incl_env_into_store(&mut store)
            .map_err(|e| HttpError::SystemCas(e.to_string()))?,
    }
    Ok(store.len())
}

/// One endpoint and the connector (with its CA store) that reaches it.
pub struct HttpClient {
    pub url: HttpUrl,
    connector: pingora::connectors::http::Connector,
    /// The contents of the CA file when the connector was built.
    ca_pem: Option<Vec<u8>>,
}

impl HttpClient {
    pub fn new(url: HttpUrl) -> Result<HttpClient, HttpError> {
        let ca_pem = match (&url.ca_file, url.tls) {
            (Some(path), true) => Some(std::fs::read(path).map_err(|e| HttpError::CaFile {
                path: path.clone(),
                why: e.to_string(),
            })?),
            _ => None,
        };
        if url.tls {
            load_cas(url.ca_file.as_deref())?;
        }
        let mut options = ConnectorOptions::new(1);
        options.ca_file = url.ca_file.clone();
        Ok(HttpClient {
            connector: pingora::connectors::http::Connector::new(Some(options)),
            url,
            ca_pem,
        })
    }

    /// Whether the CA file still holds what this client trusts: a CA
    /// rotated in place needs a new client (the connector loads it once).
    pub fn ca_unchanged(&self) -> bool {
        match (&self.url.ca_file, &self.ca_pem) {
            (Some(path), Some(pem)) => std::fs::read(path).is_ok_and(|now| now == *pem),
            _ => true,
        }
    }

    /// One request; returns the status and a body of at most `max_body`
    /// bytes. Every address the host resolves to is tried in turn, all
    /// within `timeout` in total: the connector's timeouts are per read, so
    /// a server that trickles bytes would otherwise hold the call forever.
    pub async fn call(
        &self,
        method: &str,
        form: Option<String>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<(u16, Vec<u8>), HttpError> {
        tokio::time::timeout(timeout, self.call_any(method, form, timeout, max_body))
            .await
            .unwrap_or(Err(HttpError::Deadline(timeout)))
    }

    async fn call_any(
        &self,
        method: &str,
        form: Option<String>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<(u16, Vec<u8>), HttpError> {
        let url = &self.url;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|e| HttpError::Resolve {
                host: url.host.clone(),
                why: e.to_string(),
            })?
            .collect();
        let mut last = HttpError::Resolve {
            host: url.host.clone(),
            why: "no address".into(),
        };
        for addr in addrs {
            match self
                .call_at(addr, method, form.clone(), timeout, max_body)
                .await
            {
                Ok(answer) => return Ok(answer),
                // Too large is an answer, not an unreachable address.
                Err(e @ HttpError::TooLarge(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn call_at(
        &self,
        addr: SocketAddr,
        method: &str,
        form: Option<String>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<(u16, Vec<u8>), HttpError> {
        let url = &self.url;
        let failed = |e: Box<pingora::Error>| HttpError::Exchange(e.to_string());
        let mut peer = HttpPeer::new(addr, url.tls, url.host.clone());
        peer.options.connection_timeout = Some(timeout);
        peer.options.read_timeout = Some(timeout);
        peer.options.write_timeout = Some(timeout);
        let (mut session, _) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(failed)?;
        let mut req = RequestHeader::build(method, url.path.as_bytes(), None).map_err(failed)?;
        let host = if url.host.contains(':') {
            format!("[{}]", url.host)
        } else {
            url.host.clone()
        };
        req.insert_header(http::header::HOST, host)
            .map_err(failed)?;
        req.insert_header(http::header::ACCEPT, "application/json")
            .map_err(failed)?;
        if let Some(body) = &form {
            req.insert_header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .map_err(failed)?;
            req.insert_header(http::header::CONTENT_LENGTH, body.len())
                .map_err(failed)?;
        }
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(failed)?;
        if let Some(body) = form {
            session
                .write_request_body(Bytes::from(body), true)
                .await
                .map_err(failed)?;
        }
        session.finish_request_body().await.map_err(failed)?;
        session.read_response_header().await.map_err(failed)?;
        let status = session.response_header().map_or(0, |h| h.status.as_u16());
        let mut body = Vec::new();
        while let Some(chunk) = session.read_response_body().await.map_err(failed)? {
            body.extend_from_slice(&chunk);
            if body.len() > max_body {
                return Err(HttpError::TooLarge(max_body));
            }
        }
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_and_https_urls() {
        assert_eq!(
            HttpUrl::parse("http://keys.internal:8080/.well-known/jwks.json").unwrap(),
            HttpUrl {
                host: "keys.internal".into(),
                port: 8080,
                path: "/.well-known/jwks.json".into(),
                tls: false,
                ca_file: None,
            }
        );
        assert_eq!(HttpUrl::parse("http://keys").unwrap().port, 80);
        assert_eq!(HttpUrl::parse("http://keys").unwrap().path, "/");
        assert_eq!(HttpUrl::parse("http://keys/a?b=c").unwrap().path, "/a?b=c");
        let https = HttpUrl::parse("https://keys/jwks").unwrap();
        assert!(https.tls);
        assert_eq!(https.port, 443);
        let v6 = HttpUrl::parse("http://[::1]:9000/jwks").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(v6.to_string(), "http://[::1]:9000/jwks");
        assert!(HttpUrl::parse("HTTPS//keys").is_err());
        assert!(HttpUrl::parse("ftp://keys").is_err());
        assert!(HttpUrl::parse("http://:80/x").is_err());
        assert!(HttpUrl::parse("http://h:port/x").is_err());
        assert!(HttpUrl::parse("http://user:pw@h/x").is_err());
    }

    #[test]
    fn ca_files_need_https_and_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let empty = empty.to_str().unwrap();
        let http = HttpUrl::parse("http://keys/jwks").unwrap();
        let err = http.with_ca_file(Some(empty), "jwks_url").unwrap_err();
        assert!(
            err.to_string()
                .contains("only used with an https:// jwks_url"),
            "{err}"
        );
        let url = HttpUrl::parse("https://keys/jwks")
            .unwrap()
            .with_ca_file(Some(empty), "jwks_url")
            .unwrap();
        let err = HttpClient::new(url).err().unwrap();
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        let url = HttpUrl::parse("https://keys/jwks")
            .unwrap()
            .with_ca_file(Some("/nonexistent/ca.pem"), "x")
            .unwrap();
        let err = HttpClient::new(url).err().unwrap();
        assert!(
            err.to_string().contains("cannot load CA certificates"),
            "{err}"
        );
    }
}
