//! A self-signed certificate for `localhost` and a client that trusts it, for the tests that
//! speak to the proxy over TLS (tests/relay.rs, tests/response_fuzz.rs); and the same
//! certificate on the servers' side, for the tests of `https://` servers, with a connection
//! such a server can misuse (`Faulty`).

use super::{spawn_proxy_in, with_listen, Proxy};
use rustls::pki_types::pem::PemObject;
use std::future::poll_fn;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A self-signed certificate for `localhost`, and a client that trusts it.
pub struct Tls {
    pub cert: String,
    pub key: String,
    pub client: Arc<rustls::ClientConfig>,
}

/// A server's side of TLS with the PEM certificate chain `cert` and key `key`, offering
/// `alpn` (none: no ALPN at all).
pub fn acceptor(cert: &str, key: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl Tls {
    pub fn new() -> Tls {
        // 127.0.0.1 too, for a server dialed by address (`https://127.0.0.1:PORT`).
        Tls::for_names(&["localhost", "127.0.0.1"], false)
    }

    /// A self-signed certificate for `names`, or with `expired`, one whose time has passed.
    pub fn for_names(names: &[&str], expired: bool) -> Tls {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key_pair).unwrap();
        let made = rcgen::CertifiedKey { cert, key_pair };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Tls {
            cert: made.cert.pem(),
            key: made.key_pair.serialize_pem(),
            client: Arc::new(client),
        }
    }

    /// A proxy from `config` that also listens for HTTPS, with this certificate.
    pub async fn proxy(&self, config: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("site.pem"), &self.cert).unwrap();
        std::fs::write(dir.path().join("site.key"), &self.key).unwrap();
        let text = format!(
            "[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\ncert = \"site.pem\"\nkey = \"site.key\"\n{config}"
        );
        let text = if text.contains("[proxy]") {
            text.replacen("[proxy]", "[proxy]\nlisten = [\"127.0.0.1:0\"]", 1)
        } else {
            format!("[proxy]\nlisten = [\"127.0.0.1:0\"]\n{text}")
        };
        spawn_proxy_in(dir, &text).await
    }

    /// A server's side of TLS with this certificate, offering `alpn` (none: no ALPN at all).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        acceptor(&self.cert, &self.key, alpn)
    }

    /// A proxy from `config` (which has an `[upstream]` section) that trusts this certificate
    /// for its `https://` servers (`upstream.ca_file`).
    pub async fn trusting(&self, config: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &self.cert).unwrap();
        let text =
            with_listen(config).replacen("[upstream]\n", "[upstream]\nca_file = \"ca.pem\"\n", 1);
        assert!(text.contains("ca_file"), "no [upstream] in {config}");
        spawn_proxy_in(dir, &text).await
    }
}

/// What a misbehaving TLS server does to its connection (`Faulty::commit`), after what it
/// wrote before has left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Closes the TCP connection with no `close_notify`: to TLS, a truncation.
    Drop,
    /// `close_notify`, then the close.
    CloseNotify,
    /// A fatal alert (`internal_error`) written in the clear, as a broken middlebox or a
    /// server's TLS library gone wrong would: after the handshake every record is encrypted,
    /// so it fails to decrypt.
    ClearAlert,
    /// Bytes that are no TLS record at all (a plain HTTP error from something in between).
    Garbage,
    /// A real record with its last byte flipped: it fails its integrity check.
    Corrupt,
    /// So many TLS 1.3 `KeyUpdate`s in a row, each asking for the client's: rustls' client
    /// takes 32 without application data between them, and fails the connection at the 33rd.
    KeyUpdates(u8),
}

/// A server's TLS connection that the test reads and writes as any other, and can misuse
/// between writes (`commit`). Shared by the task that reads it and those that write to it, each
/// holding the lock only for one poll, which never waits.
#[derive(Clone)]
pub struct Faulty(Arc<Mutex<tokio_rustls::server::TlsStream<TcpStream>>>);

impl Faulty {
    pub fn new(tls: tokio_rustls::server::TlsStream<TcpStream>) -> Faulty {
        Faulty(Arc::new(Mutex::new(tls)))
    }

    /// The ALPN protocol the handshake chose.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.0
            .lock()
            .unwrap()
            .get_ref()
            .1
            .alpn_protocol()
            .map(<[u8]>::to_vec)
    }

    /// Does `fault`; whether the connection took it (false once closed).
    pub async fn commit(&self, fault: Fault) -> bool {
        let mut me = self.clone();
        if poll_fn(|cx| Pin::new(&mut me).poll_flush(cx))
            .await
            .is_err()
        {
            return false;
        }
        let raw = {
            let mut tls = self.0.lock().unwrap();
            let (_, conn) = tls.get_mut();
            match fault {
                Fault::Drop => Vec::new(),
                Fault::CloseNotify => {
                    conn.send_close_notify();
                    Vec::new()
                }
                Fault::ClearAlert => vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50],
                Fault::Garbage => b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                Fault::Corrupt => {
                    let _ = conn.writer().write_all(b"corrupt");
                    let mut out = Vec::new();
                    while conn.wants_write() {
                        if conn.write_tls(&mut out).is_err() {
                            break;
                        }
                    }
                    if let Some(last) = out.last_mut() {
                        *last ^= 1;
                    }
                    out
                }
                Fault::KeyUpdates(n) => {
                    for _ in 0..n {
                        if conn.refresh_traffic_keys().is_err() {
                            return false;
                        }
                    }
                    Vec::new()
                }
            }
        };
        // What rustls wrote for it (close_notify, KeyUpdates) first.
        if poll_fn(|cx| Pin::new(&mut me).poll_flush(cx))
            .await
            .is_err()
        {
            return false;
        }
        let mut at = 0;
        while at < raw.len() {
            let wrote = poll_fn(|cx| {
                let mut tls = self.0.lock().unwrap();
                Pin::new(&mut *tls.get_mut().0).poll_write(cx, &raw[at..])
            })
            .await;
            match wrote {
                Ok(n) if n > 0 => at += n,
                _ => return false,
            }
        }
        if matches!(fault, Fault::Drop | Fault::CloseNotify) {
            self.close_tcp().await;
        }
        true
    }

    /// Closes the TCP connection's sending side, saying nothing to TLS (no `close_notify`).
    pub async fn close_tcp(&self) {
        let _ = poll_fn(|cx| {
            let mut tls = self.0.lock().unwrap();
            Pin::new(&mut *tls.get_mut().0).poll_shutdown(cx)
        })
        .await;
    }
}

impl AsyncRead for Faulty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Faulty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0.lock().unwrap()).poll_shutdown(cx)
    }
}

/// A TLS connection to `addr`, offering HTTP/1.1.
pub async fn tls_stream(addr: SocketAddr, tls: &Tls) -> tokio_rustls::client::TlsStream<TcpStream> {
    connect(addr, tls.client.clone()).await
}

/// A TLS connection to `addr` on which ALPN chose HTTP/2, as browsers ask for it.
pub async fn tls_stream_h2(
    addr: SocketAddr,
    tls: &Tls,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut client = (*tls.client).clone();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let sock = connect(addr, Arc::new(client)).await;
    assert_eq!(sock.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    sock
}

async fn connect(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client);
    connector.connect(name, tcp).await.unwrap()
}

pub fn tls_addr(proxy: &Proxy) -> SocketAddr {
    proxy.running.as_ref().unwrap().tls_addrs()[0]
}
