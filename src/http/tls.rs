//! `wss://` in process (cargo feature `tls`): TLS with rustls, through tokio-rustls, without
//! a proxy in front of the hub.
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let hub = wshub::Hub::new();
//!     // The certificate chain (the server's certificate first) and its key, as PEM files.
//!     let acceptor = wshub::tls::acceptor_from_pem("cert.pem", "key.pem")?;
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//!     // wss://127.0.0.1:8443/ws until Ctrl-C, then every client gets a 1001.
//!     wshub::tls::serve(listener, acceptor, hub, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await;
//!     Ok(())
//! }
//! ```
//!
//! What a TLS client gets is what a plain one gets (the same protocol, limits and
//! slow-consumer rules), served on the generic stream path (`http/stream.rs`): the shards
//! queue every frame for the connection's task, which encrypts and writes it, instead of
//! writing it to the socket themselves. A plain [`serve`](crate::serve) in the same process
//! keeps the fast path; the feature adds nothing to it.
//!
//! Each connection is given [`handshake_timeout`](crate::HubConfigBuilder::handshake_timeout)
//! for its TLS handshake, and then the same again for its HTTP upgrade request. A handshake
//! that fails (a plain-text client on the TLS port, a ClientHello rustls refuses) or does not
//! finish in time closes that connection only: it is logged at DEBUG and counted in
//! [`HubStats::tls_handshake_failures`](crate::HubStats::tls_handshake_failures), and the hub
//! goes on serving.
//!
//! With a `rustls::ServerConfig` of your own ([`TlsAcceptor::from`]), offer `http/1.1` in
//! ALPN or nothing: the hub speaks HTTP/1.1 only, and a browser offered `h2` would take it.
//! The same acceptor serves a hyper or axum server of your own too: hand the accepted
//! `TlsStream` to hyper with [`Hub::handler`](crate::Hub::handler) as the service, and the
//! upgraded connections take the same generic path.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::hub::Hub;

/// The tokio-rustls crate this module is built on, re-exported so that an application builds
/// its `ServerConfig` with the same rustls version (`wshub::tls::tokio_rustls::rustls`).
pub use tokio_rustls;
/// The TLS acceptor [`serve`] takes: an `Arc<rustls::ServerConfig>`, made with
/// [`acceptor_from_pem`], [`acceptor`] or `TlsAcceptor::from(Arc::new(config))`.
pub use tokio_rustls::TlsAcceptor;

/// Accepts connections on `listener`, makes each a TLS connection with `acceptor`, and serves
/// `hub` on its configured path over it (`wss://HOST:PORT/ws` by default) until `shutdown`
/// completes; then shuts the hub down gracefully and returns: [`serve`](crate::serve) with
/// TLS.
///
/// It cannot fail: accept errors are logged and retried after a pause; a failed or slow TLS
/// handshake ends that connection only (see the [module](self) docs).
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: impl Future<Output = ()>,
) {
    hub.ensure_started();
    let accept = tokio::spawn(super::accept_each(
        listener,
        hub.clone(),
        move |stream, peer, hub| {
            tokio::spawn(serve_connection(stream, peer, hub, acceptor.clone()));
        },
    ));
    hub.run(shutdown).await;
    accept.abort();
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, hub: Hub, acceptor: TlsAcceptor) {
    let _ = stream.set_nodelay(true);
    // A client that connects and says nothing (or trickles its ClientHello) must not hold
    // this task and its socket for ever: the handshake gets the same time as the upgrade
    // request.
    let timeout = hub.config().handshake_timeout;
    let failed = |why: &dyn std::fmt::Display| {
        hub.shared()
            .counters
            .tls_handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, error = %why, "TLS handshake failed");
    };
    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => return failed(&err),
        Err(_) => return failed(&"timed out"),
    };
    super::serve_http(tls, peer, hub).await
}

/// An acceptor for the certificate chain in `cert_pem` (the server's certificate first) and
/// the private key in `key_pem` (PKCS#8, PKCS#1 or SEC1), both PEM files: see [`acceptor`].
///
/// Errors: a file that cannot be read, no certificate or no key in it (`InvalidData`), or a
/// key that does not fit the certificate (`InvalidInput`); each names the file.
pub fn acceptor_from_pem(
    cert_pem: impl AsRef<Path>,
    key_pem: impl AsRef<Path>,
) -> io::Result<TlsAcceptor> {
    let (cert_pem, key_pem) = (cert_pem.as_ref(), key_pem.as_ref());
    let pem_error = |path: &Path, err: rustls::pki_types::pem::Error| match err {
        rustls::pki_types::pem::Error::Io(err) => {
            io::Error::new(err.kind(), format!("{}: {err}", path.display()))
        }
        err => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {err}", path.display()),
        ),
    };
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|e| pem_error(cert_pem, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_pem, e))?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no certificate in the file", cert_pem.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| pem_error(key_pem, e))?;
    acceptor(certs, key).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("{} and {}: {err}", cert_pem.display(), key_pem.display()),
        )
    })
}

/// An acceptor for a certificate chain and its private key: rustls with the `ring` provider,
/// TLS 1.3 and 1.2, no client certificates, and `http/1.1` in ALPN (what the hub speaks).
///
/// Errors (`InvalidInput`): a key that rustls cannot use or that does not fit the
/// certificate.
pub fn acceptor(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> io::Result<TlsAcceptor> {
    let invalid = |err: rustls::Error| io::Error::new(io::ErrorKind::InvalidInput, err);
    // The provider is named rather than taken from the process default: a process whose
    // dependencies enable both of rustls's providers has no default, and `builder()` would
    // panic there.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(invalid)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
