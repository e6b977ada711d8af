//! Cluster identity: a CA that signs one certificate per node.
//!
//! Files, in one directory: `ca.pem`, `ca.key` (keep it off the nodes), and `<node>.pem`,
//! `<node>.key` per node. A node certificate names the node as a DNS SAN (its identity on the
//! control channel) plus its IP address, and is valid for a short time (30 days by default, never
//! beyond the CA): rotation is re-issuing and `ringlb reload` (or SIGHUP). Expiry shows in
//! `ringlb status` and the metrics.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; refusing to overwrite a cluster CA")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("node name {0:?} must be 1 to 63 characters of a-z, 0-9, '-'")]
    BadName(String),
    #[error("--days {0}: {1}")]
    Lifetime(u64, String),
    #[error("{path}: not a PEM certificate: {why}")]
    Parse { path: PathBuf, why: String },
}

/// What a certificate says, for `ringlb cert show`, `check`, status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// DNS SANs: the first is the node's name.
    pub names: Vec<String>,
    pub addrs: Vec<IpAddr>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the first certificate of a PEM file.
pub fn read_info(path: &Path) -> Result<CertInfo, CertError> {
    use x509_parser::extensions::GeneralName;
    let text = fs::read(path).map_err(io(path))?;
    let bad = |why: String| CertError::Parse { path: path.to_owned(), why };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    let mut names = Vec::new();
    let mut addrs = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_owned()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => addrs.extend(<[u8; 4]>::try_from(*b).ok().map(IpAddr::from)),
                    16 => addrs.extend(<[u8; 16]>::try_from(*b).ok().map(IpAddr::from)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        names,
        addrs,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_owned(), source }
}

const CA_NAME: &str = "ringlb cluster CA";

/// The CA's parameters. Node certificates name the CA by this distinguished name, so `issue`
/// rebuilds them instead of parsing `ca.pem`.
fn ca_params(validity: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + validity;
    p
}

fn write_private(path: &Path, contents: &str) -> Result<(), CertError> {
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

fn write_public(path: &Path, contents: &str) -> Result<(), CertError> {
    fs::write(path, contents).map_err(io(path))
}

/// Creates `ca.pem` and `ca.key` in `dir`; refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<PathBuf, CertError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        return Err(CertError::Exists(cert_path));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params(Duration::from_secs(10 * 365 * 86_400)).self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(cert_path)
}

/// Valid node names: what a DNS label allows.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Issues `<name>.pem` and `<name>.key` in `dir`, signed by the CA found there.
pub fn issue(dir: &Path, name: &str, ip: IpAddr, validity: Duration) -> Result<PathBuf, CertError> {
    if !valid_name(name) {
        return Err(CertError::BadName(name.to_owned()));
    }
    let days = validity.as_secs() / 86_400;
    if validity < Duration::from_secs(86_400) {
        return Err(CertError::Lifetime(days, "a certificate must live at least one day".into()));
    }
    let ca = read_info(&dir.join("ca.pem"))?;
    let end = time::OffsetDateTime::now_utc()
        .unix_timestamp()
        .saturating_add(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX));
    if end > ca.not_after {
        return Err(CertError::Lifetime(
            days,
            format!("it would outlive the cluster CA, which expires at unix time {}", ca.not_after),
        ));
    }
    let ca_key_path = dir.join("ca.key");
    let ca_key = KeyPair::from_pem(&fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
    let issuer = Issuer::new(ca_params(validity), ca_key);
    let mut p = CertificateParams::new(vec![name.to_owned()])?;
    p.subject_alt_names.push(SanType::IpAddress(ip));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + validity;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let cert_path = dir.join(format!("{name}.pem"));
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(cert_path)
}
