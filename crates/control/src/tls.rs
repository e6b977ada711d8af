//! Mutual TLS for the control channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// ALPN of the control protocol; bumped with incompatible changes (2: field-list messages).
pub const ALPN: &[u8] = b"ringlb/2";

/// Where a node's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("tls configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_owned(), what: what.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Loaded {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&files.ca).map_err(|e| file_err(&files.ca, e))? {
        roots.add(c.map_err(|e| file_err(&files.ca, e))?).map_err(|e| file_err(&files.ca, e))?;
    }
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_err(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(&files.cert, e))?;
    if chain.is_empty() {
        return Err(file_err(&files.cert, "no certificate in file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
    Ok(Loaded { roots: Arc::new(roots), chain, key })
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Failure detection is the cluster protocol's business, not the transport's: a connection
    // outlives a peer's stall (a paused process, a starved CPU) so that its refutation needs no
    // new handshake, which is what a starved node can least afford.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    t.datagram_receive_buffer_size(Some(256 * 1024));
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

/// The server side: requires a client certificate chaining to the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let l = load(files)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(l.roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain, l.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The client side: presents this node's certificate, checks the server's against the CA and
/// the node name it dials.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let l = load(files)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(l.roots)
        .with_client_auth_cert(l.chain, l.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The node name this node's own certificate carries (its first DNS SAN): a reloaded
/// certificate must carry the same.
pub fn own_name(files: &TlsFiles) -> Result<Option<String>, TlsError> {
    let l = load(files)?;
    let Some(first) = l.chain.first() else { return Ok(None) };
    let ee = webpki::EndEntityCert::try_from(first).map_err(|e| TlsError::Config(format!("{e:?}")))?;
    let name = ee.valid_dns_names().next().map(str::to_owned);
    Ok(name)
}

/// The IP addresses an authenticated peer's certificate names (its IP SANs): the only
/// addresses it may claim as its own.
pub fn peer_addrs(conn: &quinn::Connection) -> Vec<std::net::IpAddr> {
    let Some(certs) = conn.peer_identity().and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok()) else {
        return Vec::new();
    };
    certs.first().map(|c| cert_addrs(c)).unwrap_or_default()
}

/// The IP SANs of a DER certificate.
pub fn cert_addrs(der: &[u8]) -> Vec<std::net::IpAddr> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The node name an authenticated peer's certificate carries (its first DNS SAN).
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let first = certs.first()?;
    let ee = webpki::EndEntityCert::try_from(first).ok()?;
    let name = ee.valid_dns_names().next().map(str::to_owned);
    name
}
