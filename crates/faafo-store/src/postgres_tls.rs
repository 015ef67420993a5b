//! TLS to PostgreSQL (rustls), chosen by the URL's `sslmode` and `sslrootcert` as libpq
//! reads them. tokio-postgres itself knows only `disable`, `prefer` and `require`, and
//! verifies nothing; this module takes the libpq parameters out of the URL and
//! builds the connector they describe:
//!
//! - `disable`, `allow`, `prefer` (the default): plain TCP.
//! - `require`: TLS; the certificate is checked against `sslrootcert` when one is given
//!   (as libpq does with a root file), otherwise not at all.
//! - `verify-ca`: TLS, the certificate chains to a trusted root.
//! - `verify-full`: that, and the certificate names the host connected to (a DNS name or
//!   an IP address, as the URL or Patroni gives it).
//!
//! Trusted roots: `sslrootcert=PATH` (PEM), `sslrootcert=system` (the system's), or when
//! absent the system's plus the PEM the caller passes (faafo's `--ca-cert`).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// A mistake in the URL's TLS parameters or in the files they name.
#[derive(Debug, thiserror::Error)]
pub enum TlsSettingsError {
    #[error("sslmode={0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    UnknownMode(String),
    #[error("sslrootcert needs sslmode=require, verify-ca or verify-full (sslmode is {0})")]
    RootsWithoutTls(String),
    #[error("{parameter} is only read from a postgres:// URL, not from key=value settings")]
    NotAUrl { parameter: &'static str },
    #[error("sslrootcert {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("the system's trusted roots could not be read: {0}")]
    SystemRoots(String),
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Url(#[from] tokio_postgres::Error),
}

/// libpq's `sslmode`, less `allow`, which means the same as `prefer` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, TlsSettingsError> {
        Ok(match text {
            "disable" | "allow" | "prefer" => Mode::Plain,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => return Err(TlsSettingsError::UnknownMode(other.to_owned())),
        })
    }
}

/// The connection settings of a libpq URL and the TLS connector its `sslmode` and
/// `sslrootcert` ask for. `extra_roots` is PEM trusted besides the system's when the URL
/// names no roots.
pub fn parse_url(
    url: &str,
    extra_roots: Option<&[u8]>,
) -> Result<(tokio_postgres::Config, PostgresTls), TlsSettingsError> {
    let (url, tls) = split_url(url, extra_roots)?;
    let mut config: tokio_postgres::Config = url.parse()?;
    if tls.0.is_none() {
        // tokio-postgres's default, `prefer`, would ask this connector for TLS.
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    Ok((config, tls))
}

/// Takes `sslmode` and `sslrootcert` out of `url`: the URL tokio-postgres is to parse
/// (with `sslmode=disable` or `require`) and the connector to use with it.
fn split_url(
    url: &str,
    extra_roots: Option<&[u8]>,
) -> Result<(String, PostgresTls), TlsSettingsError> {
    let Some((base, query)) = url
        .split_once('?')
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    else {
        // Key=value settings: tokio-postgres reads them, but TLS needs the URL form.
        for (needle, parameter) in [
            ("sslrootcert", "sslrootcert"),
            ("sslmode=require", "sslmode=require"),
            ("sslmode=verify", "sslmode=verify-*"),
        ] {
            if url.contains(needle) {
                return Err(TlsSettingsError::NotAUrl { parameter });
            }
        }
        return Ok((url.to_owned(), PostgresTls::plain()));
    };
    let mut mode = Mode::Plain;
    let mut mode_text = "prefer".to_owned();
    let mut roots = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        match key {
            "sslmode" => {
                mode = Mode::parse(&value)?;
                mode_text = value.into_owned();
            }
            "sslrootcert" => roots = Some(value.into_owned()),
            _ => kept.push(pair),
        }
    }
    if mode == Mode::Require && roots.is_some() {
        mode = Mode::VerifyCa;
    }
    if mode == Mode::Plain && roots.is_some() {
        return Err(TlsSettingsError::RootsWithoutTls(mode_text));
    }
    kept.push(if mode == Mode::Plain {
        "sslmode=disable"
    } else {
        "sslmode=require"
    });
    let url = format!("{base}?{}", kept.join("&"));
    let tls = match mode {
        Mode::Plain => PostgresTls::plain(),
        Mode::Require => PostgresTls::with(Arc::new(Unverified(provider())))?,
        Mode::VerifyCa | Mode::VerifyFull => {
            let roots = trusted_roots(roots.as_deref(), extra_roots)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsSettingsError::Rustls(rustls::Error::General(e.to_string())))?;
            if mode == Mode::VerifyFull {
                PostgresTls::with(webpki)?
            } else {
                PostgresTls::with(Arc::new(AnyName(webpki)))?
            }
        }
    };
    Ok((url, tls))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn trusted_roots(
    named: Option<&str>,
    extra: Option<&[u8]>,
) -> Result<RootCertStore, TlsSettingsError> {
    let path = match named {
        None => return system_roots_and(extra),
        Some("system") => return system_roots_and(None),
        Some(path) => path,
    };
    let fail = |reason: String| TlsSettingsError::Roots {
        path: path.to_owned(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(Path::new(path))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(e.to_string()))?;
    if certificates.is_empty() {
        return Err(fail("holds no PEM certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|e| fail(e.to_string()))?;
    }
    Ok(roots)
}

/// The system's trusted roots and the certificates of `extra` (PEM; faafo's `--ca-cert`).
pub fn system_roots_and(extra: Option<&[u8]>) -> Result<RootCertStore, TlsSettingsError> {
    let mut roots = RootCertStore::empty();
    add_system_roots(&mut roots)?;
    for certificate in CertificateDer::pem_slice_iter(extra.unwrap_or_default()) {
        let certificate = certificate.map_err(|e| TlsSettingsError::Roots {
            path: "--ca-cert".into(),
            reason: e.to_string(),
        })?;
        roots.add(certificate)?;
    }
    Ok(roots)
}

fn add_system_roots(roots: &mut RootCertStore) -> Result<(), TlsSettingsError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() && !found.errors.is_empty() {
        let reasons: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsSettingsError::SystemRoots(reasons.join("; ")));
    }
    // A few unparsable system certificates must not stop the rest from being trusted.
    roots.add_parsable_certificates(found.certs);
    Ok(())
}

/// `verify-ca`: the chain is checked, the name is not (libpq's meaning).
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The chain was verified before the name was looked at.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `sslmode=require` without roots: encrypted, the server not authenticated (libpq's
/// meaning; `verify-full` is what protects against an impostor).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The connector a [`parse_url`] configuration goes with. Plain URLs carry `sslmode=disable`, so
/// tokio-postgres never asks it for TLS.
#[derive(Clone)]
pub struct PostgresTls(Option<tokio_rustls::TlsConnector>);

impl std::fmt::Debug for PostgresTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PostgresTls(tls)"
        } else {
            "PostgresTls(plain)"
        })
    }
}

impl PostgresTls {
    pub fn plain() -> PostgresTls {
        PostgresTls(None)
    }

    fn with(verifier: Arc<dyn ServerCertVerifier>) -> Result<PostgresTls, TlsSettingsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PostgresTls(Some(Arc::new(config).into())))
    }
}

impl<S> MakeTlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type TlsConnect = PostgresTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<PostgresTlsConnect> {
        Ok(PostgresTlsConnect {
            connector: self.0.clone(),
            host: host.to_owned(),
        })
    }
}

/// One connection's handshake to the named server. tokio-postgres makes one for every
/// host it tries, TLS or not (and a Unix socket has no name), so nothing is checked
/// until a handshake is asked for.
pub struct PostgresTlsConnect {
    connector: Option<tokio_rustls::TlsConnector>,
    host: String,
}

impl std::fmt::Debug for PostgresTlsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresTlsConnect")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl<S> TlsConnect<S> for PostgresTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PostgresTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = self.connector.ok_or_else(|| {
                io::Error::other("TLS was asked for on a URL whose sslmode does not use it")
            })?;
            let host = self.host;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| io::Error::other(format!("{host:?} is not a name TLS can verify")))?;
            let stream = connector.connect(name, stream).await?;
            Ok(PostgresTlsStream(stream))
        })
    }
}

/// A TLS session to PostgreSQL. It offers no channel binding, so SCRAM runs without
/// `-PLUS`, which servers accept unless told to require it.
pub struct PostgresTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> std::fmt::Debug for PostgresTlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresTlsStream")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PostgresTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PostgresTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PostgresTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(url: &str) -> Result<(String, bool), TlsSettingsError> {
        split_url(url, None).map(|(url, tls)| (url, tls.0.is_some()))
    }

    #[test]
    fn plain_modes_connect_without_tls() {
        for mode in ["disable", "allow", "prefer"] {
            let (url, tls) = rewritten(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            assert_eq!(url, "postgres://u@h/db?sslmode=disable");
            assert!(!tls);
        }
        let (url, tls) = rewritten("postgres://u@h1:5432,h2:5432/db?connect_timeout=2").unwrap();
        assert_eq!(
            url,
            "postgres://u@h1:5432,h2:5432/db?connect_timeout=2&sslmode=disable"
        );
        assert!(!tls);
        // Nothing to rewrite: tokio-postgres reads it as before.
        assert_eq!(
            rewritten("postgres://u@h/db").unwrap(),
            ("postgres://u@h/db".into(), false)
        );
    }

    #[test]
    fn verifying_modes_become_require_with_a_connector() {
        let (url, tls) = rewritten(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=system&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@h/db?target_session_attrs=read-write&sslmode=require"
        );
        assert!(tls);
        let (url, tls) = rewritten("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=require");
        assert!(tls);
    }

    #[test]
    fn mistakes_are_named() {
        let unknown = rewritten("postgres://u@h/db?sslmode=verify").unwrap_err();
        assert!(unknown.to_string().contains("\"verify\""), "{unknown}");
        let missing =
            rewritten("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fnowhere%2Fca.pem")
                .unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("sslrootcert /nowhere/ca.pem:"),
            "{missing}"
        );
        let without_tls =
            rewritten("postgres://u@h/db?sslmode=disable&sslrootcert=/ca.pem").unwrap_err();
        assert!(matches!(without_tls, TlsSettingsError::RootsWithoutTls(_)));
        let key_value = rewritten("host=h sslmode=verify-full").unwrap_err();
        assert!(matches!(key_value, TlsSettingsError::NotAUrl { .. }));
    }
}
