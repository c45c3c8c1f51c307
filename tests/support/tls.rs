//! A self-signed certificate for `localhost` and a client that trusts it, for the tests that
//! speak to the proxy over TLS (tests/relay.rs, tests/response_fuzz.rs).

use super::{spawn_proxy_in, Proxy};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// A self-signed certificate for `localhost`, and a client that trusts it.
pub struct Tls {
    pub cert: String,
    pub key: String,
    pub client: Arc<rustls::ClientConfig>,
}

impl Tls {
    pub fn new() -> Tls {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
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
