//! TLS inside a cluster (`cluster up --tls-cert --tls-key`): gateways and API instances
//! serve HTTPS, PostgreSQL takes only TLS, and every member verifies the others against
//! the system's roots and `--ca-cert`. Members reach each other at `--host`, so the
//! certificate must name that address; it is checked before anything starts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::CertificateError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The certificate the members serve, and what they trust.
#[derive(Debug, Clone)]
pub struct Tls {
    /// PEM chain, leaf first.
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// `--ca-cert`: PEM trusted besides the system's roots, handed to every member.
    pub ca_cert: Option<PathBuf>,
    pub ca_pem: Option<Vec<u8>>,
}

impl Tls {
    /// Reads `--ca-cert` and checks that members will accept `certificate` at `host`:
    /// it chains to a trusted root and names `host`.
    pub fn new(
        certificate: PathBuf,
        key: PathBuf,
        ca_cert: Option<PathBuf>,
        host: IpAddr,
    ) -> anyhow::Result<Tls> {
        // Members may not share the supervisor's working directory.
        let absolute = |path: PathBuf| {
            std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))
        };
        let (certificate, key) = (absolute(certificate)?, absolute(key)?);
        let ca_cert = ca_cert.map(absolute).transpose()?;
        let ca_pem = ca_cert
            .as_deref()
            .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
            .transpose()?;
        let tls = Tls {
            certificate,
            key,
            ca_cert,
            ca_pem,
        };
        tls.check_names(host)?;
        Ok(tls)
    }

    fn check_names(&self, host: IpAddr) -> anyhow::Result<()> {
        let path = &self.certificate;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .with_context(|| format!("reading the certificate chain in {}", path.display()))?;
        let Some((leaf, intermediates)) = chain.split_first() else {
            bail!("{} holds no PEM certificate", path.display());
        };
        let roots = faafo_store::postgres_tls::system_roots_and(self.ca_pem.as_deref())?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("no trusted roots: give --ca-cert")?;
        let name = ServerName::IpAddress(host.into());
        match verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now()) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => bail!(
                "the certificate in {} does not name {host}, where the members reach each other (--host): add it to the certificate's subject alternative names",
                path.display()
            ),
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => bail!(
                "the certificate in {} is not signed by a CA the members trust: give that CA's certificate with --ca-cert",
                path.display()
            ),
            Err(error) => Err(error).with_context(|| format!("checking {}", path.display())),
        }
    }

    /// The environment a faafo member reads these settings from; `serves` for gateways
    /// and API instances.
    pub fn environment(&self, serves: bool) -> Vec<(&'static str, &Path)> {
        let mut variables = Vec::new();
        if serves {
            variables.push(("FAAFO_TLS_CERT", self.certificate.as_path()));
            variables.push(("FAAFO_TLS_KEY", self.key.as_path()));
        }
        if let Some(ca) = &self.ca_cert {
            variables.push(("FAAFO_CA_CERT", ca.as_path()));
        }
        variables
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faafo_testkit::TestCa;

    fn files(ca: &TestCa, names: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (certificate, key) = ca.issue(names);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let paths = (
            write("tls.pem", &certificate),
            write("tls.key", &key),
            write("ca.pem", ca.pem()),
        );
        (dir, paths.0, paths.1, paths.2)
    }

    #[test]
    fn a_certificate_must_name_the_host_and_chain_to_a_trusted_root() {
        let ca = TestCa::new("cluster CA");
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        let (_dir, certificate, key, ca_file) = files(&ca, &["127.0.0.1"]);
        let tls = Tls::new(
            certificate.clone(),
            key.clone(),
            Some(ca_file.clone()),
            localhost,
        )
        .unwrap();
        let variables = tls.environment(true);
        assert_eq!(variables.len(), 3);
        assert_eq!(
            tls.environment(false),
            [("FAAFO_CA_CERT", ca_file.as_path())]
        );

        let untrusted = Tls::new(certificate.clone(), key.clone(), None, localhost).unwrap_err();
        assert!(untrusted.to_string().contains("--ca-cert"), "{untrusted}");
        let other_host = "10.1.2.3".parse().unwrap();
        let unnamed = Tls::new(certificate, key, Some(ca_file), other_host).unwrap_err();
        assert!(
            unnamed.to_string().contains("does not name 10.1.2.3"),
            "{unnamed}"
        );
    }
}
