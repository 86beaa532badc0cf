//! TLS for IoT Hub and DPS: system roots plus an optional CA file, the server
//! checked against the hub's (or gateway's) name even when the socket goes to a
//! different `connect_address`, and an optional X.509 client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Checks the server's certificate against one fixed name, whatever address the
/// socket was opened to.
#[derive(Debug)]
struct Named {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for Named {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An X.509 client identity: certificate chain and key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCert {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

fn read_certs(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    pv_http::client::load_pem_certs(&pem).map_err(|e| format!("{setting} {}: {e}", path.display()))
}

/// A client configuration that trusts the system's roots and `ca_file`, checks
/// the server against `server_name`, and presents `client` when given. Files are
/// read on every call, so renewed certificates apply at the next connection.
pub fn client_config(
    ca_file: Option<&Path>,
    server_name: &str,
    client: Option<&ClientCert>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(ca) = ca_file {
        for c in read_certs("ca_file", ca)? {
            roots
                .add(c)
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trust anchors: the system has no CA certificates and no ca_file is set".into(),
        );
    }
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| format!("{server_name:?} is not a valid host name for TLS"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Named { inner, name }));
    let cfg = match client {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let chain = read_certs("x509.cert_file", &c.cert_file)?;
            let key = PrivateKeyDer::from_pem_file(&c.key_file)
                .map_err(|e| format!("x509.key_file {}: {e}", c.key_file.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("x509 client certificate: {e}"))?
        }
    };
    Ok(Arc::new(cfg))
}
