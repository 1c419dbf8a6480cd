//! HTTPS listeners. The listening sockets are plain TCP (so a binary upgrade
//! hands them over like any other); the edge runs the TLS handshake itself
//! with the acceptor of the current config, which makes certificates
//! reloadable: a SIGHUP builds new acceptors from the files, new handshakes
//! use them, connections already open keep theirs. ALPN offers `h2` and
//! `http/1.1`; the certificate is chosen by SNI among the listener's
//! certificates' DNS names (the first certificate is the default).

use crate::config::{ConfigProblem, TlsListenerSettings, TlsVersion};
use pingora::listeners::tls::Acceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// One certificate and the names it serves (lower case; `*.` wildcards).
#[derive(Debug)]
struct Served {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// Picks a certificate by SNI.
#[derive(Debug)]
struct BySni {
    certificates: Vec<Served>,
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

impl BySni {
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let chosen = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.certificates
                .iter()
                .find(|c| c.names.iter().any(|p| name_matches(p, &name)))
        });
        chosen
            .or_else(|| self.certificates.first())
            .map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// A listener's TLS, as built from the files at load or reload.
pub struct TlsListener {
    pub addr: SocketAddr,
    pub acceptor: Acceptor,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DNS names (and IP addresses) a certificate is for.
fn names_of(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            parsed
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

fn load(cert_file: &Path, key_file: &Path, base: &str) -> Result<Served, ConfigProblem> {
    let cert_key = format!("{base}.cert_file");
    let key_key = format!("{base}.key_file");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| {
            ConfigProblem::new(
                &cert_key,
                format!("cannot read {}: {e}", cert_file.display()),
            )
        })?;
    if chain.is_empty() {
        return Err(ConfigProblem::new(
            cert_key,
            format!("{} holds no PEM certificate", cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        ConfigProblem::new(
            &key_key,
            format!("cannot read a private key from {}: {e}", key_file.display()),
        )
    })?;
    let names = names_of(&chain[0]);
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        ConfigProblem::new(
            key_key,
            format!(
                "{} does not match {} ({e})",
                key_file.display(),
                cert_file.display()
            ),
        )
    })?;
    Ok(Served {
        names,
        key: Arc::new(key),
    })
}

impl TlsListener {
    /// Reads the certificates and keys and builds the acceptor. Errors name
    /// their key path: `server.tls[0].certificates[1].key_file`.
    pub fn build(i: usize, settings: &TlsListenerSettings) -> Result<TlsListener, ConfigProblem> {
        let base = format!("server.tls[{i}]");
        let addr: SocketAddr = settings
            .listen
            .parse()
            .map_err(|_| ConfigProblem::new(format!("{base}.listen"), "not an address"))?;
        let certificates = settings
            .certificates
            .iter()
            .enumerate()
            .map(|(j, c)| {
                load(
                    &c.cert_file,
                    &c.key_file,
                    &format!("{base}.certificates[{j}]"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| ConfigProblem::new(format!("{base}.min_version"), e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni { certificates }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsListener {
            addr,
            acceptor: Acceptor::from_server_config(Arc::new(config)),
        })
    }

    /// Whether a connection accepted on `local` came in on this listener.
    pub fn serves(&self, local: SocketAddr) -> bool {
        self.addr.port() == local.port()
            && (self.addr.ip().is_unspecified() || self.addr.ip() == local.ip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_label() {
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(name_matches("api.example.com", "api.example.com"));
        assert!(!name_matches("api.example.com", "www.example.com"));
    }
}
