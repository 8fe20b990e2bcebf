//! QUIC (quinn) on the shared UDP socket, as the reliable ordered transport for a qssh
//! [`Session`] over UDP: one bidirectional stream per session carries the same stream
//! records as TCP, driven by [`super::tcp::spawn_session_io`].
//!
//! **QUIC's TLS is framing only.** quinn requires TLS 1.3, so the server presents a fresh
//! self-signed certificate and the client accepts any certificate. Nothing relies on it: the
//! qssh handshake inside the stream authenticates both peers (signed, hybrid PQ key
//! exchange), and every record after it is sealed by the ratchet. An attacker who terminates
//! the QUIC TLS sees only qssh records, exactly as one who intercepts TCP does.

use super::tcp::{spawn_session_io, Spawned};
use super::udp::UdpMux;
use crate::core::limits::{
    IDLE_TIMEOUT, QUIC_CONNECTION_WINDOW, QUIC_MAX_UDP_PAYLOAD, QUIC_SEND_WINDOW,
    QUIC_STREAM_WINDOW,
};
use crate::core::session::Session;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// ALPN of qssh over QUIC.
pub const ALPN: &[u8] = b"qssh/1";
/// The TLS server name used on every connection (certificates are not checked).
pub const SERVER_NAME: &str = "qssh";
/// QUIC-level keepalive (the qssh session has its own; this keeps quinn's idle timer and
/// relay mappings fed).
pub const QUIC_KEEPALIVE: Duration = Duration::from_secs(5);
/// Bidirectional streams a peer may open at once (one per session today).
pub const MAX_STREAMS: u32 = 4;
/// The first packets' size: every IPv4/IPv6 path carries 1200-byte UDP payloads (QUIC's
/// minimum). MTU discovery then raises it to [`QUIC_MAX_UDP_PAYLOAD`] where the path allows;
/// starting there would black-hole paths below it (a WireGuard underlay of 1420 bytes carries
/// 1392-byte IPv4 UDP payloads) until loss detection falls back.
pub const QUIC_INITIAL_MTU: u16 = 1200;
/// How long a finished session waits for its last bytes to be acknowledged before closing
/// the QUIC connection.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum QuicError {
    #[error("QUIC setup: {0}")]
    Setup(String),
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout fits"),
    ))
    .keep_alive_interval(Some(QUIC_KEEPALIVE))
    .max_concurrent_bidi_streams(MAX_STREAMS.into())
    .max_concurrent_uni_streams(0u32.into())
    // quinn's defaults (1.25 MB per stream) cap one stream at 12.5 MB/s at 100 ms RTT.
    .stream_receive_window(quinn::VarInt::from_u32(QUIC_STREAM_WINDOW))
    .receive_window(quinn::VarInt::from_u32(QUIC_CONNECTION_WINDOW))
    .send_window(QUIC_SEND_WINDOW)
    .initial_mtu(QUIC_INITIAL_MTU);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(QUIC_MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// Accepts any server certificate: see the module documentation.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<quinn::ClientConfig, QuicError> {
    let p = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(p)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let q = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Setup(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(q));
    c.transport_config(transport());
    Ok(c)
}

fn server_config() -> Result<quinn::ServerConfig, QuicError> {
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| QuicError::Setup(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| QuicError::Setup(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let q = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Setup(e.to_string()))?;
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(q));
    s.transport_config(transport());
    // Address validation (Retry) is the qssh admission's job; a relayed peer's virtual
    // address could not be validated anyway.
    s.migration(false);
    Ok(s)
}

/// A QUIC endpoint on `mux`: a client always, a server too when `server` is true.
pub fn endpoint(mux: &UdpMux, server: bool) -> Result<quinn::Endpoint, QuicError> {
    let mut cfg = quinn::EndpointConfig::default();
    // The QUIC bit stays set so the first-byte demultiplexing holds (RFC 9287 greasing off).
    cfg.grease_quic_bit(false);
    let server = if server { Some(server_config()?) } else { None };
    let mut ep = quinn::Endpoint::new_with_abstract_socket(
        cfg,
        server,
        mux.quic_socket(),
        Arc::new(quinn::TokioRuntime),
    )?;
    ep.set_default_client_config(client_config()?);
    Ok(ep)
}

/// A QUIC connection with its session stream open.
pub struct QuicLink {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Connects to `addr` (a real or virtual address) and opens the session stream.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<QuicLink, QuicError> {
    let fut = async {
        let connection = ep.connect(addr, SERVER_NAME)?.await?;
        let (send, recv) = connection.open_bi().await?;
        Ok::<_, QuicError>(QuicLink {
            connection,
            send,
            recv,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| QuicError::Timeout)?
}

/// Completes an incoming connection and waits for its session stream.
pub async fn accept(incoming: quinn::Incoming, timeout: Duration) -> Result<QuicLink, QuicError> {
    let fut = async {
        let connection = incoming.await?;
        let (send, recv) = connection.accept_bi().await?;
        Ok::<_, QuicError>(QuicLink {
            connection,
            send,
            recv,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| QuicError::Timeout)?
}

/// Drives `session` over the link's stream. The returned task ends after the session ended,
/// its last bytes were acknowledged (bounded by [`CLOSE_LINGER`]) and the connection closed.
pub fn spawn_session(link: QuicLink, session: Session) -> Spawned {
    let QuicLink {
        connection,
        send,
        recv,
    } = link;
    let acked = send.stopped();
    let label = format!("quic {}", connection.remote_address());
    let (handle, events, driver) = spawn_session_io(recv, send, session, label);
    let task = tokio::spawn(async move {
        let _ = driver.await;
        let _ = tokio::time::timeout(CLOSE_LINGER, acked).await;
        connection.close(0u32.into(), b"session ended");
    });
    (handle, events, task)
}
