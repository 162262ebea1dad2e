//! TLS towards the servers, with libpq's `sslmode` semantics: the SSLRequest handshake,
//! and the three ways a server certificate is checked (not at all, its chain, its chain
//! and the node's address).

use crate::config::{ServerTlsConfig, ServerTlsMode};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How pgshard speaks TLS to servers, built once per configuration.
pub struct TlsClient {
    pub mode: ServerTlsMode,
    config: Arc<ClientConfig>,
    /// The settings and the files' contents: pools survive a reload only when unchanged.
    fingerprint: u64,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({}, {:x})", self.mode, self.fingerprint)
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for TlsClient {}

impl Hash for TlsClient {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.fingerprint.hash(state);
    }
}

/// A configuration problem: the key it is about, and what is wrong.
pub type TlsConfigError = (&'static str, String);

impl TlsClient {
    /// Reads the certificate files and prepares the client configuration.
    pub fn new(cfg: &ServerTlsConfig) -> Result<TlsClient, TlsConfigError> {
        let provider = Arc::new(crypto::ring::default_provider());
        let mut h = std::collections::hash_map::DefaultHasher::new();
        cfg.mode.hash(&mut h);
        let mut read = |key: &'static str, p: &Path| -> Result<Vec<u8>, TlsConfigError> {
            let b =
                std::fs::read(p).map_err(|e| (key, format!("cannot read {}: {e}", p.display())))?;
            (key, &b).hash(&mut h);
            Ok(b)
        };
        let certs = |key: &'static str, p: &Path, pem: &[u8]| {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (key, format!("{}: {e}", p.display())))?;
            if v.is_empty() {
                return Err((key, format!("{}: no PEM certificate in it", p.display())));
            }
            Ok(v)
        };
        let roots = match &cfg.ca {
            Some(p) => {
                let mut roots = RootCertStore::empty();
                for c in certs("server_tls.ca", p, &read("server_tls.ca", p)?)? {
                    roots
                        .add(c)
                        .map_err(|e| ("server_tls.ca", format!("{}: {e}", p.display())))?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let chain = |roots: Arc<RootCertStore>| {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| ("server_tls.ca", e.to_string()))
        };
        use ServerTlsMode::*;
        let verifier: Arc<dyn ServerCertVerifier> = match (cfg.mode, roots) {
            (VerifyFull, Some(r)) => chain(r)?,
            (VerifyCa | Require, Some(r)) => Arc::new(Lenient {
                chain: Some(chain(r)?),
                provider: provider.clone(),
            }),
            (VerifyCa | VerifyFull, None) => {
                return Err(("server_tls.ca", format!("required with mode {}", cfg.mode)));
            }
            (Disable | Prefer | Require, None) | (Disable | Prefer, Some(_)) => Arc::new(Lenient {
                chain: None,
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("server_tls", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&cfg.cert, &cfg.key) {
            (Some(c), Some(k)) => {
                let chain = certs("server_tls.cert", c, &read("server_tls.cert", c)?)?;
                let key = PrivateKeyDer::from_pem_slice(&read("server_tls.key", k)?)
                    .map_err(|e| ("server_tls.key", format!("{}: {e}", k.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ("server_tls.key", e.to_string()))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(("server_tls.key", "required with cert".into())),
            (None, Some(_)) => return Err(("server_tls.cert", "required with key".into())),
        };
        Ok(TlsClient {
            mode: cfg.mode,
            config: Arc::new(config),
            fingerprint: h.finish(),
        })
    }

    /// The rustls configuration (for tokio-postgres control connections as well).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Asks the server for TLS on a fresh connection (SSLRequest): the TLS stream, or the
    /// plain one when the server declines and the mode allows it.
    pub async fn negotiate(
        &self,
        mut s: TcpStream,
        ip: IpAddr,
    ) -> io::Result<Result<Box<TlsStream<TcpStream>>, TcpStream>> {
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&crate::protocol::SSL_REQUEST.to_be_bytes());
        s.write_all(&request).await?;
        // One byte exactly: anything the server sends after 'S' belongs to the handshake.
        match s.read_u8().await? {
            b'S' => {
                let connector = tokio_rustls::TlsConnector::from(self.config.clone());
                let tls = connector
                    .connect(ServerName::IpAddress(ip.into()), s)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
                Ok(Ok(Box::new(tls)))
            }
            b'N' if self.mode == ServerTlsMode::Prefer => Ok(Err(s)),
            b'N' => Err(io::Error::other(format!(
                "the server does not support TLS, and server_tls.mode is {}",
                self.mode
            ))),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {other} to SSLRequest"),
            )),
        }
    }
}

/// The certificate checks short of `verify-full`, as libpq does them. Without `chain`
/// (`prefer`, and `require` without a CA): encrypted, the certificate unchecked. With it
/// (`verify-ca`, and `require` with a CA): the chain must lead to the CA, the names in the
/// certificate do not matter. The handshake signatures are verified either way, with the
/// provider's algorithms (those the chain verifier was built with).
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
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
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
