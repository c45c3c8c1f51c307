//! TLS termination and TLS/HTTP2 upstreams, with certificates made in the test (rcgen).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use intermission::control::protocol::Request as Ctl;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio_rustls::client::TlsStream;

/// A test certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `names` (DNS names or IP addresses): (cert PEM, key PEM, DER).
    fn leaf(&self, names: &[&str]) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    /// Writes a leaf for `names` that ends on the day `(year, month, day)`; its end in seconds
    /// since the Unix epoch.
    fn write_leaf_ending(&self, dir: &Path, stem: &str, names: &[&str], ymd: (i32, u8, u8)) -> i64 {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_after = rcgen::date_time_ymd(ymd.0, ymd.1, ymd.2);
        let end = params.not_after.unix_timestamp();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        end
    }

    /// A leaf valid from `ahead` from now, for a year.
    fn write_leaf_starting_in(&self, dir: &Path, stem: &str, names: &[&str], ahead: Duration) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + (now + ahead);
        params.not_after = params.not_before + Duration::from_secs(365 * 86400);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }

    fn write_leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let (cert, key, der) = self.leaf(names);
        std::fs::write(dir.join(format!("{stem}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key).unwrap();
        der
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tls_connect_on(tcp, name, config).await
}

/// `tls_connect` over `tcp`, connected already (from another loopback address, say).
async fn tls_connect_on(
    tcp: tokio::net::TcpStream,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> TlsStream<tokio::net::TcpStream> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

fn peer_cert(s: &TlsStream<tokio::net::TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

type Sender1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1(stream: TlsStream<tokio::net::TcpStream>) -> Sender1 {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get_on(sender: &mut Sender1, host: &str, path: &str) -> Response<Bytes> {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// A proxy with TLS listening, certificates written into its folder first.
async fn tls_proxy(setup: impl FnOnce(&Path) -> String) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let extra = setup(dir.path());
    let text = format!(
        "[proxy]
listen = [\"127.0.0.1:0\"]
[tls]
listen = [\"127.0.0.1:0\"]
{extra}"
    );
    spawn_proxy_in(dir, &text).await
}

/// A TLS proxy for `shop.test`, its certificate from `ca`, in front of `up`; `extra` ends its
/// config.
async fn shop_proxy(ca: &Ca, up: &Upstream, extra: &str) -> Proxy {
    tls_proxy(|dir| {
        ca.write_leaf(dir, "site", &["shop.test"]);
        format!(
            "{}[upstream]\nservers = [\"{}\"]\n{extra}",
            certs(&["site"]),
            up.url()
        )
    })
    .await
}

fn tls_addr(proxy: &Proxy) -> SocketAddr {
    proxy.running.as_ref().unwrap().tls_addrs()[0]
}

fn certs(list: &[&str]) -> String {
    list.iter()
        .map(|stem| format!("[[tls.certificates]]\ncert = \"{stem}.pem\"\nkey = \"{stem}.key\"\n"))
        .collect()
}

#[tokio::test]
async fn https_over_http1_and_http2_with_forwarded_proto() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = shop_proxy(&ca, &up, "").await;
    let addr = tls_addr(&proxy);

    let stream = tls_connect(addr, "shop.test", ca.client_config(&[b"http/1.1"])).await;
    let mut sender = h1(stream).await;
    let resp = get_on(&mut sender, "shop.test", "/over/h1").await;
    assert_eq!(resp.status(), 200);
    let seen: Seen = json(&resp);
    assert_eq!(seen.uri, "/over/h1");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("host"), Some("shop.test"));

    // A client that offers HTTP/1.0 alone is served too (a fatal alert before), as by nginx.
    let stream = tls_connect(addr, "shop.test", ca.client_config(&[b"http/1.0"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    let mut sender = h1(stream).await;
    assert_eq!(
        get_on(&mut sender, "shop.test", "/over/h1.0")
            .await
            .status(),
        200
    );

    let stream = tls_connect(addr, "shop.test", ca.client_config(&[b"h2"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://shop.test/over/h2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (parts, body) = resp.into_parts();
    let resp = Response::from_parts(parts, body.collect().await.unwrap().to_bytes());
    let seen: Seen = json(&resp);
    assert_eq!(seen.uri, "/over/h2");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
}

/// Plain HTTP sent to the TLS port (`http://host:443/`) gets a `400` that says to use
/// https://, as nginx answers, not a TLS alert; the port still serves TLS after it.
#[tokio::test]
async fn plain_http_to_the_tls_port_gets_a_400_that_says_so() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = shop_proxy(&ca, &up, "[admin]\nlisten = \"127.0.0.1:0\"\n").await;
    let addr = tls_addr(&proxy);
    let asks = [
        "GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        "POST /api/x HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\n{}",
        // Not told by a capital alone: these got a TLS alert, counted under `other`.
        "get / HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        "\r\nGET / HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        "\nGET / HTTP/1.1\r\nHost: shop.test\r\n\r\n",
    ];
    for ask in asks {
        let out = raw_exchange(addr, ask.as_bytes(), Duration::from_secs(10)).await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out:?}");
        assert!(out.contains("connection: close"), "{out:?}");
        assert!(
            out.ends_with("ask for https:// rather than http://.\n"),
            "{out:?}"
        );
    }
    // Counted with the 4xx answers, as hyper's 400s to heads it cannot read are.
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let metrics = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(metrics.body()).into_owned();
    for line in [
        format!(
            "intermission_responses_total{{class=\"4xx\"}} {}",
            asks.len()
        ),
        format!(
            "intermission_tls_handshake_failures_total{{reason=\"plain_http\"}} {}",
            asks.len()
        ),
        "intermission_tls_handshake_failures_total{reason=\"other\"} 0".to_owned(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    let stream = tls_connect(addr, "shop.test", ca.client_config(&[b"http/1.1"])).await;
    let mut sender = h1(stream).await;
    let resp = get_on(&mut sender, "shop.test", "/after").await;
    assert_eq!(resp.status(), 200);
}

/// A TLS 1.2 client that renegotiates between requests is refused at once (a
/// `no_renegotiation` alert, as nginx refuses it). rustls queued the alert and the relay,
/// waiting for the next request, wrote nothing: the client waited for `header_read_timeout`
/// (10 s here), and the close, to hear it. Driven by `openssl s_client`, whose `R`
/// renegotiates (rustls's client cannot).
#[tokio::test]
async fn a_tls_1_2_renegotiation_is_refused_at_once() {
    use tokio::io::AsyncWriteExt;
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: needs the openssl command");
        return;
    }
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = shop_proxy(&ca, &up, "").await;
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-msg", "-servername", "shop.test"])
        .arg("-connect")
        .arg(tls_addr(&proxy).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let done = line_with(&mut lines, &mut seen, "Verify return code", 10).await;
    assert!(done, "no handshake: {seen}");
    stdin.write_all(b"R\n").await.unwrap();
    let refused = line_with(&mut lines, &mut seen, "no_renegotiation", 3).await;
    assert!(
        refused,
        "the renegotiation was not refused within 3 s: {seen}"
    );
}

/// Whether a line holding `what` comes within `secs`; what was read is added to `seen`.
async fn line_with(
    lines: &mut (impl tokio::io::AsyncBufRead + Unpin),
    seen: &mut String,
    what: &str,
    secs: u64,
) -> bool {
    use tokio::io::AsyncBufReadExt;
    // Not `read_line`: openssl's output is not always UTF-8.
    let found = async {
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&line);
                    seen.push_str(&line);
                    if line.contains(what) {
                        return true;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), found)
        .await
        .unwrap_or(false)
}

/// A stop does not wait for TLS connections that have nothing to finish: one that has sent
/// nothing (a load balancer's TCP check, a port scan, `nc host 443` left open), one answered as
/// plain HTTP that stays open, and a handshake begun and left (it gets `STALLED` from its
/// start, as a real one takes a round trip or two). Each held every stop for
/// `header_read_timeout` (to `shutdown_timeout`), the listeners closed meanwhile, where a
/// plaintext connection that has sent nothing is closed at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_does_not_wait_for_tls_connections_with_nothing_to_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nheader_read_timeout = \"30s\"\n\
         shutdown_timeout = \"30s\"\n[tls]\nlisten = [\"127.0.0.1:0\"]\n{}\
         [upstream]\nservers = [\"{}\"]\n",
        certs(&["site"]),
        up.url()
    );
    let mut proxy = spawn_proxy_in(dir, &text).await;
    let addr = tls_addr(&proxy);
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut head = [0u8; 12];
    plain.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 400");
    // A handshake record's header and the first bytes of a ClientHello, and no more.
    let mut begun = tokio::net::TcpStream::connect(addr).await.unwrap();
    begun
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    // A client served before the stop, whose connection idles: closed by the drain too.
    let stream = tls_connect(addr, "shop.test", ca.client_config(&[b"http/1.1"])).await;
    let mut sender = h1(stream).await;
    assert_eq!(get_on(&mut sender, "shop.test", "/").await.status(), 200);
    let running = proxy.running.take().unwrap();
    let signalled = std::time::Instant::now();
    let drained = tokio::time::timeout(Duration::from_secs(20), running.shutdown()).await;
    let took = signalled.elapsed();
    assert_eq!(drained.ok(), Some(true), "the stop took {took:?}");
    assert!(took < Duration::from_secs(10), "the stop took {took:?}");
    drop((silent, plain, begun));
}

/// Failed handshakes are counted by reason, so that an operator sees a chain that clients
/// refuse (`certificate`), old clients (`protocol`), stalled ones (`timeout`) and plain HTTP
/// on the TLS port, which were logged at debug level only.
#[tokio::test(flavor = "multi_thread")]
async fn failed_handshakes_are_counted_by_reason() {
    use tokio::io::AsyncWriteExt;
    let up = echo_upstream().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let config = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nheader_read_timeout = \"1s\"\n\
         [tls]\nlisten = [\"127.0.0.1:0\"]\n{}[upstream]\nservers = [\"{}\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        certs(&["site"]),
        up.url()
    );
    let proxy = spawn_proxy_in(dir, &config).await;
    let addr = tls_addr(&proxy);
    let name = || ServerName::try_from("shop.test".to_owned()).unwrap();
    // A client that does not know the certificate's issuer refuses it.
    let stranger = Ca::new();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(stranger.client_config(&[]))
        .connect(name(), tcp)
        .await;
    assert!(refused.is_err());
    // A client whose only protocol the proxy does not speak.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(ca.client_config(&[b"spdy/1"]))
        .connect(name(), tcp)
        .await;
    assert!(refused.is_err());
    // A client that begins its hello and stops.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    // Plain HTTP.
    raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    // Clients that close or reset before their first byte (TCP health checks) began no
    // handshake: each was counted under `other`.
    for _ in 0..5 {
        drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let reset = tokio::net::TcpStream::connect(addr).await.unwrap();
    reset.set_zero_linger().unwrap();
    drop(reset);
    // A client that connects and says nothing is idle, not a failure.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Closed at header_read_timeout: accepted, and so were those before it (one accept loop
    // takes them in turn); once no connection is open, all of them have been counted.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut idle, &mut rest),
    );
    assert!(closed.await.is_ok(), "the idle client was not closed");
    assert_eq!(
        series_reaches(&proxy, "intermission_client_connections", 0.0).await,
        Some(0.0)
    );
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let counted = |text: &str, reason: &str| {
        text.lines().any(|l| {
            l == format!("intermission_tls_handshake_failures_total{{reason=\"{reason}\"}} 1")
        })
    };
    let mut metrics = String::new();
    for _ in 0..100 {
        let got = get(&format!("http://{admin}/metrics")).await;
        metrics = String::from_utf8_lossy(got.body()).into_owned();
        if counted(&metrics, "timeout") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for reason in ["certificate", "protocol", "timeout", "plain_http"] {
        assert!(counted(&metrics, reason), "{reason}: {metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l == "intermission_tls_handshake_failures_total{reason=\"other\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_certificate_is_chosen_by_sni_with_a_default() {
    let ca = Ca::new();
    let mut ders = Vec::new();
    let proxy = tls_proxy(|dir| {
        ders.push(ca.write_leaf(dir, "a", &["a.test"]));
        ders.push(ca.write_leaf(dir, "b", &["b.test"]));
        ders.push(ca.write_leaf(dir, "wild", &["*.wild.test"]));
        certs(&["a", "b", "wild"])
    })
    .await;
    let addr = tls_addr(&proxy);
    let client = ca.client_config(&[b"http/1.1"]);
    assert_eq!(
        peer_cert(&tls_connect(addr, "b.test", client.clone()).await),
        ders[1]
    );
    assert_eq!(
        peer_cert(&tls_connect(addr, "a.test", client.clone()).await),
        ders[0]
    );
    assert_eq!(
        peer_cert(&tls_connect(addr, "shop.wild.test", client.clone()).await),
        ders[2]
    );
    // No name matches, or no SNI at all (an IP address sends none): the first certificate.
    let mut insecure = (*client).clone();
    insecure
        .dangerous()
        .set_certificate_verifier(Arc::new(NoVerify(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))));
    let insecure = Arc::new(insecure);
    assert_eq!(
        peer_cert(&tls_connect(addr, "other.test", insecure.clone()).await),
        ders[0]
    );
    assert_eq!(
        peer_cert(&tls_connect(addr, "127.0.0.1", insecure).await),
        ders[0]
    );
}

/// Among the certificates valid for the name asked, one that names it exactly is chosen
/// before a wildcard listed earlier (as nginx chooses), and one whose key signs in a scheme
/// the client verifies before one it cannot (an Ed25519 and an ECDSA certificate for the same
/// name: a client that verifies ECDSA alone got the Ed25519 one, listed first, and failed).
#[tokio::test]
async fn sni_prefers_an_exact_name_and_a_key_the_client_verifies() {
    let ca = Ca::new();
    let mut ders = Vec::new();
    let proxy = tls_proxy(|dir| {
        ders.push(ca.write_leaf(dir, "wild", &["*.shop.test"]));
        ders.push(ca.write_leaf(dir, "admin", &["admin.shop.test"]));
        // The same name twice: Ed25519 first, then ECDSA P-256.
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let params = CertificateParams::new(vec!["both.test".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        std::fs::write(dir.join("ed.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ed.key"), key.serialize_pem()).unwrap();
        ders.push(cert.der().clone());
        ders.push(ca.write_leaf(dir, "ec", &["both.test"]));
        certs(&["wild", "admin", "ed", "ec"])
    })
    .await;
    let addr = tls_addr(&proxy);
    let client = ca.client_config(&[b"http/1.1"]);
    let chosen = |name: &'static str, client: Arc<rustls::ClientConfig>| async move {
        peer_cert(&tls_connect(addr, name, client).await)
    };
    assert_eq!(chosen("admin.shop.test", client.clone()).await, ders[1]);
    assert_eq!(chosen("ADMIN.shop.test", client.clone()).await, ders[1]);
    assert_eq!(chosen("www.shop.test", client.clone()).await, ders[0]);
    // A client offering every scheme gets the first listed.
    assert_eq!(chosen("both.test", client.clone()).await, ders[2]);

    // A client that verifies ECDSA P-256 signatures alone.
    let mut provider = rustls::crypto::ring::default_provider();
    let only_p256: Vec<_> = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| *scheme == rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
        .copied()
        .collect();
    provider.signature_verification_algorithms.mapping = Box::leak(only_p256.into_boxed_slice());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let p256 = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert_eq!(chosen("both.test", Arc::new(p256.clone())).await, ders[3]);

    // Without SNI, the first listed whose key it verifies too, not the first listed.
    let mut unnamed = Vec::new();
    let proxy = tls_proxy(|dir| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let params = CertificateParams::new(vec!["both.test".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        std::fs::write(dir.join("ed.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ed.key"), key.serialize_pem()).unwrap();
        unnamed.push(cert.der().clone());
        unnamed.push(ca.write_leaf(dir, "ec", &["both.test"]));
        certs(&["ed", "ec"])
    })
    .await;
    let mut no_sni = p256;
    no_sni.enable_sni = false;
    let stream = tls_connect(tls_addr(&proxy), "both.test", Arc::new(no_sni)).await;
    assert_eq!(peer_cert(&stream), unnamed[1]);
}

/// A client of `ca` speaking only `version`, which keeps the sessions it is given.
fn resuming_client(
    ca: &Ca,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(c)
}

/// One connection's handshake, full or resumed, after a request on it: the session tickets
/// TLS 1.3 sends come after the handshake, and are read with the answer.
async fn visit(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let stream = tls_connect(addr, "shop.test", client.clone()).await;
    let kind = stream.get_ref().1.handshake_kind().unwrap();
    let mut sender = h1(stream).await;
    assert_eq!(get_on(&mut sender, "shop.test", "/").await.status(), 200);
    kind
}

/// A returning client resumes its TLS session (no certificate, no signature, a round trip
/// less), however many clients came since, and after a reload that serves the same
/// certificates; a reload serving others starts afresh. rustls' default held the last 256
/// sessions, and a reload lost all of them.
#[tokio::test]
async fn sessions_resume_after_many_others_and_a_reload_keeping_the_certificates() {
    use rustls::HandshakeKind::{Full, Resumed};
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = shop_proxy(&ca, &up, "[admin]\nlisten = \"127.0.0.1:0\"\n").await;
    let addr = tls_addr(&proxy);
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let clients: Vec<_> = versions.iter().map(|v| resuming_client(&ca, v)).collect();
    for (client, version) in clients.iter().zip(versions) {
        assert_eq!(visit(addr, client).await, Full);
        assert_eq!(visit(addr, client).await, Resumed, "{version:?}");
        for _ in 0..300 {
            visit(addr, &resuming_client(&ca, version)).await;
        }
        assert_eq!(
            visit(addr, client).await,
            Resumed,
            "{version:?} after 300 other clients"
        );
    }

    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    for (client, version) in clients.iter().zip(versions) {
        assert_eq!(
            visit(addr, client).await,
            Resumed,
            "{version:?} after a reload keeping the certificates"
        );
    }
    // Counted for an operator to follow: each client's first and 300 others full, the rest
    // resumed.
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let metrics = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(metrics.body()).into_owned();
    for line in [
        "intermission_tls_handshakes_total{kind=\"full\"} 602",
        "intermission_tls_handshakes_total{kind=\"resumed\"} 6",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }

    let renewed = ca.write_leaf(proxy.dir.path(), "site", &["shop.test"]);
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    for (client, version) in clients.iter().zip(versions) {
        let stream = tls_connect(addr, "shop.test", client.clone()).await;
        assert_eq!(
            stream.get_ref().1.handshake_kind(),
            Some(Full),
            "{version:?} after a reload changing the certificate"
        );
        assert_eq!(peer_cert(&stream), renewed);
    }
}

#[tokio::test]
async fn reload_swaps_the_certificate_and_old_connections_keep_working() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let mut first = None;
    let proxy = tls_proxy(|dir| {
        first = Some(ca.write_leaf(dir, "site", &["shop.test"]));
        format!(
            "{}[upstream]\nservers = [\"{}\"]\n",
            certs(&["site"]),
            up.url()
        )
    })
    .await;
    let addr = tls_addr(&proxy);
    let client = ca.client_config(&[b"http/1.1"]);
    let old = tls_connect(addr, "shop.test", client.clone()).await;
    assert_eq!(Some(peer_cert(&old)), first);
    let mut old = h1(old).await;
    assert_eq!(get_on(&mut old, "shop.test", "/").await.status(), 200);

    let second = ca.write_leaf(proxy.dir.path(), "site", &["shop.test"]);
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        peer_cert(&tls_connect(addr, "shop.test", client.clone()).await),
        second
    );
    assert_eq!(
        get_on(&mut old, "shop.test", "/still").await.status(),
        200,
        "the old connection was dropped"
    );

    // A key that does not match its certificate is refused; the running one keeps serving.
    let (_, other_key, _) = ca.leaf(&["shop.test"]);
    std::fs::write(proxy.dir.path().join("site.key"), other_key).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    let e = r.error.unwrap();
    assert_eq!(e.code, "reload_failed");
    assert!(
        e.message.contains("site.key") && e.message.contains("does not match"),
        "{}",
        e.message
    );
    assert_eq!(
        peer_cert(&tls_connect(addr, "shop.test", client).await),
        second
    );
}

/// A reload whose certificate file now holds one clients refuse by its dates (an old backup
/// copied back, a renewal caught with an expired file) is refused, naming the file and why,
/// and the certificate served stays: it used to be swapped in with a warning, and every
/// client was refused from then on. A proxy serving an expired certificate already takes
/// another one, as its start did.
#[tokio::test]
async fn a_reload_to_an_expired_certificate_keeps_the_valid_one() {
    let ca = Ca::new();
    let mut served = None;
    let proxy = tls_proxy(|dir| {
        served = Some(ca.write_leaf(dir, "site", &["shop.test"]));
        certs(&["site"])
    })
    .await;
    let addr = tls_addr(&proxy);
    let client = ca.client_config(&[b"http/1.1"]);
    ca.write_leaf_ending(proxy.dir.path(), "site", &["shop.test"], (2020, 1, 1));
    let r = ctl(&proxy, Ctl::Reload).await;
    let e = r.error.expect("the reload was refused");
    assert_eq!(e.code, "reload_failed");
    assert!(
        e.message.contains("tls.certificates[0]: ")
            && e.message.contains("site.pem")
            && e.message.contains("expired on 2020-01-01")
            && e.message.contains("the one served stays"),
        "{}",
        e.message
    );
    let stream = tls_connect(addr, "shop.test", client).await;
    assert_eq!(Some(peer_cert(&stream)), served);

    // One not valid for hours yet is refused too; one a minute ahead (issuers backdate by a
    // minute or less, and clocks drift) is taken.
    let later = Duration::from_secs(3 * 3600);
    ca.write_leaf_starting_in(proxy.dir.path(), "site", &["shop.test"], later);
    let e = ctl(&proxy, Ctl::Reload).await.error.expect("refused");
    assert!(e.message.contains("is not valid before"), "{}", e.message);
    let soon = Duration::from_secs(60);
    ca.write_leaf_starting_in(proxy.dir.path(), "site", &["shop.test"], soon);
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");

    // Serving an expired one already, nothing gets worse: the reload takes.
    let expired = tls_proxy(|dir| {
        ca.write_leaf_ending(dir, "site", &["shop.test"], (2020, 1, 1));
        certs(&["site"])
    })
    .await;
    ca.write_leaf_ending(expired.dir.path(), "site", &["shop.test"], (2021, 1, 1));
    let r = ctl(&expired, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
}

/// A key or certificate file that cannot be read says so and why, not that the key is of an
/// unsupported kind ("unsupported private key: Permission denied" sent operators to the
/// key's format); one missing says it does not exist, or where its symbolic link points.
#[test]
fn a_key_that_cannot_be_read_is_not_called_unsupported() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    // Larger than a PEM file is read: a read error, as a permission would be (root here).
    let big = std::fs::File::options()
        .write(true)
        .open(dir.path().join("site.key"))
        .unwrap();
    big.set_len(5 << 20).unwrap();
    let text = format!("[tls]\nlisten = [\"127.0.0.1:0\"]\n{}", certs(&["site"]));
    let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
    let err = intermission::tls::server_config(&cfg.tls)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("cannot read") && err.contains("site.key") && !err.contains("unsupported"),
        "{err}"
    );
    let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    assert!(
        intermission::tls::read_problem(&denied).contains("the user the proxy runs as"),
        "{}",
        intermission::tls::read_problem(&denied)
    );

    std::os::unix::fs::symlink(
        dir.path().join("..data/tls.crt"),
        dir.path().join("k8s.pem"),
    )
    .unwrap();
    let text = "[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\ncert = \"k8s.pem\"\n\
                key = \"gone.key\"\n";
    let err = match intermission::config::Config::parse(text, dir.path(), None) {
        Ok(_) => panic!("parsed with files that are not there"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("k8s.pem is not a readable file: it is a symbolic link to ")
            && err.contains("..data/tls.crt, which does not exist")
            && err.contains("gone.key is not a readable file: it does not exist"),
        "{err}"
    );
}

/// `/metrics` shows when each served certificate ends, by file, for an alert well before it;
/// a reload that stops serving a file takes its series away, and a new one adds its own.
#[tokio::test]
async fn the_certificates_ends_are_in_metrics_and_follow_a_reload() {
    let ca = Ca::new();
    let (mut a_end, mut b_end) = (0, 0);
    let proxy = tls_proxy(|dir| {
        a_end = ca.write_leaf_ending(dir, "a", &["a.test"], (2031, 1, 1));
        b_end = ca.write_leaf_ending(dir, "b", &["b.test"], (2032, 6, 1));
        format!("{}[admin]\nlisten = \"127.0.0.1:0\"\n", certs(&["a", "b"]))
    })
    .await;
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let ends = || async move {
        let got = get(&format!("http://{admin}/metrics")).await;
        let text = String::from_utf8_lossy(got.body()).into_owned();
        let mut ends: Vec<(String, i64)> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("intermission_tls_certificate_expiry_timestamp_seconds{file=\"")
            })
            .map(|l| {
                let (file, value) = l.split_once("\"} ").unwrap();
                let file = Path::new(file).file_name().unwrap().to_string_lossy();
                (file.into_owned(), value.parse().unwrap())
            })
            .collect();
        ends.sort();
        ends
    };
    assert_eq!(
        ends().await,
        [("a.pem".to_owned(), a_end), ("b.pem".to_owned(), b_end)]
    );
    assert_eq!(a_end, 1_924_992_000);

    let dir = proxy.dir.path();
    let c_end = ca.write_leaf_ending(dir, "c", &["c.test"], (2030, 3, 1));
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        text.replace(&certs(&["a", "b"]), &certs(&["c", "a"])),
    )
    .unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        ends().await,
        [("a.pem".to_owned(), a_end), ("c.pem".to_owned(), c_end)]
    );
}

/// Certificates with no TLS listener to serve them have no end to show or warn of: only the
/// warning that nothing serves them.
#[test]
fn certificates_nothing_serves_have_no_end_to_watch() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf_ending(dir.path(), "a", &["a.test"], (2031, 1, 1));
    let ends = |listen: &str| {
        let text = format!("[tls]\nlisten = [{listen}]\n{}", certs(&["a"]));
        let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
        let (served, _) =
            intermission::tls::server_config_checked(&cfg.tls, std::time::SystemTime::now(), None)
                .unwrap();
        served.ends.len()
    };
    assert_eq!(ends("\"127.0.0.1:0\""), 1);
    assert_eq!(ends(""), 0);
}

#[tokio::test]
async fn a_bad_certificate_stops_the_start_with_the_file_named() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let (_, other_key, _) = ca.leaf(&["shop.test"]);
    std::fs::write(dir.path().join("site.key"), other_key).unwrap();
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    for (cert, key, named) in [
        ("site.pem", "site.key", "site.key"),
        ("garbage.pem", "site.key", "garbage.pem"),
    ] {
        let text = format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\ncert = \"{cert}\"\nkey = \"{key}\"\n"
        );
        let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
        let err = match intermission::app::start(cfg).await {
            Ok(_) => panic!("started with {cert} / {key}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(named), "{err}");
    }
}

/// A certificate file that does not load is refused with its real fault: a chain out of order,
/// a cut-short file or a damaged certificate is not called a key mismatch, and no error
/// is a list of bytes.
#[test]
fn a_certificate_that_does_not_load_says_why() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (leaf, key, _) = ca.leaf(&["shop.test"]);
    std::fs::write(dir.path().join("site.key"), &key).unwrap();
    // An intermediate (here the CA) before the server's certificate.
    std::fs::write(
        dir.path().join("reversed.pem"),
        format!("{}{leaf}", ca.cert.pem()),
    )
    .unwrap();
    // A renewal caught halfway through writing the file.
    std::fs::write(dir.path().join("cut.pem"), &leaf[..leaf.len() / 2]).unwrap();
    std::fs::write(
        dir.path().join("damaged.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (cert, says) in [
        ("reversed.pem", "is certificate 2 of the file"),
        ("cut.pem", "no \"-----END CERTIFICATE-----\" line"),
        ("damaged.pem", "not a well-formed X.509 certificate"),
    ] {
        let text = format!(
            "[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\ncert = \"{cert}\"\nkey = \"site.key\"\n"
        );
        let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
        let err = intermission::tls::server_config(&cfg.tls)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(cert) && err.contains(says), "{cert}: {err}");
        assert!(
            !err.contains("does not match") && !err.contains("[67, "),
            "{cert}: {err}"
        );
    }
}

/// A `cert` and `key` swapped, or the certificate named for both, say so: they were "no
/// certificate found" and "unsupported private key: no PEM \"PRIVATE KEY\" block found".
#[test]
fn a_certificate_and_key_swapped_say_so() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    for (cert, key, says) in [
        (
            "site.key",
            "site.pem",
            vec![
                "site.key: it holds a private key and no certificate",
                "site.pem: it holds a certificate and no private key",
            ],
        ),
        (
            "site.pem",
            "site.pem",
            vec!["site.pem: it holds a certificate and no private key"],
        ),
    ] {
        let text = format!(
            "[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\ncert = \"{cert}\"\nkey = \"{key}\"\n"
        );
        let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
        let err = intermission::tls::server_config(&cfg.tls)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for said in says {
            assert!(
                err.contains(said) && err.contains("swapped"),
                "{cert}, {key}: {err}"
            );
        }
        assert!(!err.contains("unsupported"), "{err}");
    }
    // `upstream.ca_file` has no key beside it to swap with: a key there is no certificate.
    let text = "[upstream]\nservers = [\"https://127.0.0.1:3000\"]\nca_file = \"site.key\"\n";
    let cfg = intermission::config::Config::parse(text, dir.path(), None).unwrap();
    let err = intermission::tls::client_config(&cfg.upstream)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("no certificate found") && !err.contains("swapped"),
        "{err}"
    );
}

/// A certificate and a key saved with a UTF-8 byte order mark first (Windows Notepad) load, as
/// OpenSSL (nginx) loads them: they were refused as holding no certificate and no key.
#[test]
fn a_certificate_and_key_with_a_byte_order_mark_load() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (leaf, key, _) = ca.leaf(&["shop.test"]);
    std::fs::write(dir.path().join("site.pem"), format!("\u{feff}{leaf}")).unwrap();
    std::fs::write(dir.path().join("site.key"), format!("\u{feff}{key}")).unwrap();
    let text = "[tls]\nlisten = [\"127.0.0.1:0\"]\n[[tls.certificates]]\ncert = \"site.pem\"\nkey = \"site.key\"\n";
    let cfg = intermission::config::Config::parse(text, dir.path(), None).unwrap();
    let loaded = intermission::tls::server_config(&cfg.tls).map(|t| t.config.is_some());
    assert_eq!(loaded.map_err(|e| e.to_string()), Ok(true));
}

/// A certificate that loads but that clients would refuse is warned about (check prints it,
/// start and reload log it): an expired one, and a file without the intermediate of its
/// issuer. A complete chain in date gets no warning.
#[test]
fn a_certificate_clients_would_refuse_is_warned_about() {
    // A CA named apart from its leaves (rcgen names both alike by default, which would make a
    // leaf look self-issued).
    let ca = {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test intermediate");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    };
    let dir = tempfile::tempdir().unwrap();
    let (leaf, key, _) = ca.leaf(&["shop.test"]);
    std::fs::write(
        dir.path().join("full.pem"),
        format!("{leaf}{}", ca.cert.pem()),
    )
    .unwrap();
    std::fs::write(dir.path().join("full.key"), &key).unwrap();
    std::fs::write(dir.path().join("alone.pem"), &leaf).unwrap();
    std::fs::write(dir.path().join("alone.key"), &key).unwrap();
    let old_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["old.test".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old = params.signed_by(&old_key, &ca.cert, &ca.key).unwrap();
    std::fs::write(
        dir.path().join("old.pem"),
        format!("{}{}", old.pem(), ca.cert.pem()),
    )
    .unwrap();
    std::fs::write(dir.path().join("old.key"), old_key.serialize_pem()).unwrap();
    for (stem, says) in [
        ("full", None),
        ("alone", Some("holds only the server's certificate")),
        ("old", Some("expired on 2021-01-01T00:00:00Z")),
    ] {
        let text = format!("[tls]\nlisten = [\"127.0.0.1:0\"]\n{}", certs(&[stem]));
        let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
        let (config, warnings) =
            intermission::tls::server_config_checked(&cfg.tls, std::time::SystemTime::now(), None)
                .unwrap();
        assert!(config.config.is_some(), "{stem}");
        match says {
            None => assert!(warnings.is_empty(), "{stem}: {warnings:?}"),
            Some(says) => assert!(
                warnings.len() == 1
                    && warnings[0].starts_with("tls.certificates[0]: ")
                    && warnings[0].contains(says),
                "{stem}: {warnings:?}"
            ),
        }
    }
}

#[tokio::test]
async fn sec1_and_pkcs1_keys_load() {
    if !tool_present("openssl", "version", "openssl") {
        return;
    }
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    // SEC1 ("EC PRIVATE KEY"): rcgen's P-256 key converted by openssl.
    ca.write_leaf(dir.path(), "ec", &["ec.test"]);
    convert(dir.path(), &["ec", "-in", "ec.key", "-out", "ec.key"]);
    assert!(std::fs::read_to_string(dir.path().join("ec.key"))
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    // PKCS#1 ("RSA PRIVATE KEY"): an RSA key made by openssl, certified by the test CA.
    convert(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa8.key",
        ],
    );
    let rsa =
        KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("rsa8.key")).unwrap()).unwrap();
    let params = CertificateParams::new(vec!["rsa.test".to_string()]).unwrap();
    let cert = params.signed_by(&rsa, &ca.cert, &ca.key).unwrap();
    std::fs::write(dir.path().join("rsa.pem"), cert.pem()).unwrap();
    convert(
        dir.path(),
        &["rsa", "-in", "rsa8.key", "-traditional", "-out", "rsa.key"],
    );
    assert!(std::fs::read_to_string(dir.path().join("rsa.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let text = format!(
        "[tls]\nlisten = [\"127.0.0.1:0\"]\n{}",
        certs(&["ec", "rsa"])
    );
    let cfg = intermission::config::Config::parse(&text, dir.path(), None).unwrap();
    assert!(intermission::tls::server_config(&cfg.tls)
        .unwrap()
        .config
        .is_some());
}

fn convert(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An upstream speaking HTTPS with a certificate from `ca` for 127.0.0.1, HTTP/2 preferred.
async fn https_upstream(ca: &Ca) -> SocketAddr {
    https_upstream_alpn(ca, &[b"h2", b"http/1.1"]).await.0
}

/// The same, offering the ALPN protocols `alpn`. `/host` answers with what names the host:
/// the version, the URI's authority (HTTP/2's `:authority`) and every `host` header. An
/// HTTP/2 request with a `host` beside `:authority` gets 400, as from nginx.
async fn https_upstream_alpn(
    ca: &Ca,
    alpn: &[&[u8]],
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<usize>>>) {
    https_upstream_on(upstream_acceptor(ca, alpn)).await
}

/// The same, with the TLS side `acceptor`.
async fn https_upstream_on(
    acceptor: tokio_rustls::TlsAcceptor,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    https_upstream_listening(listener, acceptor)
}

/// The same, on `listener`.
fn https_upstream_listening(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<usize>>>) {
    let addr = listener.local_addr().unwrap();
    let bursts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bursts.clone();
    tokio::spawn(async move {
        let mut next = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (seen, connection) = (seen.clone(), next);
            next += 1;
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        // As nginx: over HTTP/2 a `host` beside `:authority` is a duplicate
                        // ("client sent duplicate host header"), answered 400.
                        if req.version() == http::Version::HTTP_2
                            && req.uri().authority().is_some()
                            && req.headers().contains_key("host")
                        {
                            let mut refused = Response::new(full("duplicate host"));
                            *refused.status_mut() = http::StatusCode::BAD_REQUEST;
                            return Ok::<_, std::convert::Infallible>(refused);
                        }
                        if req.uri().path() == "/burst" {
                            seen.lock().unwrap().push(connection);
                        }
                        let body = if req.uri().path() == "/host" {
                            let hosts: Vec<_> = req
                                .headers()
                                .get_all("host")
                                .iter()
                                .map(|h| h.to_str().unwrap_or("?"))
                                .collect();
                            let authority = req.uri().authority().map_or("-", |a| a.as_str());
                            format!("{:?} authority={authority} host={hosts:?}", req.version())
                        } else {
                            format!("secure {:?} {}", req.version(), req.uri().path())
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(full(body)))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, bursts)
}

/// An upstream's TLS side: a certificate from `ca` for 127.0.0.1, and the ALPN protocols `alpn`.
fn upstream_acceptor(ca: &Ca, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let (cert, key, _) = ca.leaf(&["127.0.0.1"]);
    support::tls::acceptor(&cert, &key, alpn)
}

/// `health.host` goes over HTTP/1.1 to an `https://` server that prefers HTTP/2: beside
/// HTTP/2's `:authority` (the server as listed), a `Host` naming the site is a duplicate that
/// nginx (and this server) answer with 400, which would take the server out.
#[tokio::test]
async fn a_health_host_reaches_an_https_server_that_prefers_http2() {
    let ca = Ca::new();
    let addr = https_upstream(&ca).await;
    let proxy = trusting(
        &ca,
        &format!(
            "[upstream]\nservers = [\"https://{addr}\"]\n\
             [health]\nhost = \"shop.example.com\"\ninterval = \"1h\"\ntimeout = \"10s\"\n"
        ),
    )
    .await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    // Requests still choose HTTP/2 with it.
    assert_eq!(
        get(&proxy.url("/via/tls")).await.body(),
        "secure HTTP/2.0 /via/tls"
    );
}

/// A link-local address of this machine, with its interface's name and index, read from
/// `/proc/net/if_inet6` (address, index, prefix, scope, flags, name; scope 0x20 is link).
fn link_local() -> Option<(std::net::Ipv6Addr, String, u32)> {
    let table = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [hex, index, _, "20", _, name] = fields[..] else {
            return None;
        };
        let address = std::net::Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
        Some((
            address,
            name.to_owned(),
            u32::from_str_radix(index, 16).ok()?,
        ))
    })
}

/// An `https://` server written with an IPv6 zone (`[fe80::…%25eth0]`) is checked and
/// forwarded to, its certificate verified against the address without the zone: the zone was
/// taken for part of a host name, and every connection failed ("invalid dns name"), the site
/// in outage.
#[tokio::test]
async fn an_https_server_written_with_an_ipv6_zone_is_reached_and_verified() {
    let Some((address, interface, index)) = link_local() else {
        eprintln!("SKIPPED: no link-local IPv6 address here");
        return;
    };
    let bound = std::net::SocketAddrV6::new(address, 0, 0, index);
    let Ok(listener) = tokio::net::TcpListener::bind(bound).await else {
        eprintln!("SKIPPED: cannot listen on {address}%{interface}");
        return;
    };
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf(&[&address.to_string()]);
    let acceptor = support::tls::acceptor(&cert, &key, &[b"h2", b"http/1.1"]);
    let (addr, _) = https_upstream_listening(listener, acceptor);
    let port = addr.port();
    let proxy = trusting(
        &ca,
        &format!(
            "[upstream]\nservers = [\"https://[{address}%25{interface}]:{port}\"]\n\
             [health]\ninterval = \"1h\"\ntimeout = \"10s\"\n"
        ),
    )
    .await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    assert_eq!(
        get(&proxy.url("/via/tls")).await.body(),
        "secure HTTP/2.0 /via/tls"
    );
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca() {
    let ca = Ca::new();
    let addr = https_upstream(&ca).await;
    let proxy = trusting(
        &ca,
        &format!("[upstream]\nservers = [\"https://{addr}\"]\n"),
    )
    .await;
    // The HTTP health check speaks TLS (and HTTP/2) to it too.
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    let resp = get(&proxy.url("/via/tls")).await;
    assert_eq!(resp.status(), 200);
    // ALPN chose HTTP/2 with this server.
    assert_eq!(resp.body(), "secure HTTP/2.0 /via/tls");
    // An HTTP/1.0 client may name no host; the server is named instead, as nginx's
    // `$proxy_host`, since the hop needs one.
    let out = raw_exchange(
        proxy.addr,
        b"GET /host HTTP/1.0\r\n\r\n",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(
        out.ends_with(&format!("\r\n\r\nHTTP/2.0 authority={addr} host=[]")),
        "{out:?}"
    );

    // Without that CA the certificate is refused: never a raw error, the outage answer.
    let other = spawn_proxy(&format!(
        "[upstream]\nservers = [\"https://{addr}\"]\n[health]\nkind = \"tcp\"\n"
    ))
    .await;
    let resp = get(&other.url("/via/tls")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-intermission-mode"], "outage");

    // Only the loudly named key turns verification off.
    let lab = spawn_proxy(&format!(
        "[upstream]\nservers = [\"https://{addr}\"]\ndanger_accept_invalid_certs = true\n[health]\nkind = \"tcp\"\n"
    ))
    .await;
    assert_eq!(
        get(&lab.url("/via/tls")).await.body(),
        "secure HTTP/2.0 /via/tls"
    );
}

/// A server presenting a self-signed certificate marked a CA (`openssl req -x509`'s default),
/// that `ca_file` holds, is forwarded to, as nginx and Go forward to it: webpki alone refuses a
/// CA's certificate as a server's, and showed the application as down. Its name and time are
/// still checked, and a certificate the file does not hold is still refused.
#[tokio::test]
async fn a_self_signed_ca_certificate_in_ca_file_is_trusted_as_the_servers_own() {
    /// A self-signed certificate marked `CA:TRUE`, for `name`, and its key.
    fn ca_marked(name: &str, expired: bool) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
    /// A proxy to a server presenting `served`, with `trusted` as its `ca_file`.
    async fn through(served: &(String, String), trusted: &str) -> http::Response<bytes::Bytes> {
        let acceptor = support::tls::acceptor(&served.0, &served.1, &[b"http/1.1"]);
        let addr = https_upstream_on(acceptor).await.0;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), trusted).unwrap();
        let text = with_listen(&format!(
            "[upstream]\nca_file = \"ca.pem\"\nservers = [\"https://{addr}\"]\n\
             [health]\nkind = \"tcp\"\n"
        ));
        let proxy = spawn_proxy_in(dir, &text).await;
        get(&proxy.url("/pinned")).await
    }
    let own = ca_marked("127.0.0.1", false);
    let resp = through(&own, &own.0).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(resp.body(), "secure HTTP/1.1 /pinned");

    let outage = |resp: http::Response<bytes::Bytes>, what: &str| {
        assert_eq!(resp.status(), 503, "{what}: {:?}", resp.body());
        assert_eq!(resp.headers()["x-intermission-mode"], "outage", "{what}");
    };
    let elsewhere = ca_marked("elsewhere.test", false);
    outage(through(&elsewhere, &elsewhere.0).await, "another name");
    let expired = ca_marked("127.0.0.1", true);
    outage(through(&expired, &expired.0).await, "expired");
    let other = ca_marked("127.0.0.1", false);
    outage(through(&other, &own.0).await, "not in the file");
}

/// A server whose certificate is refused for want of trust says so in words, with what
/// mends it, in `ctl health` (and so the log): a certificate made by `openssl req -x509`, the
/// commonest backend's, was `invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))`,
/// and one from a private authority `UnknownIssuer`, neither naming `upstream.ca_file`.
/// Checked by a request (TCP checks pass such a server) and by an HTTP check, which say it
/// each their own way. An `https://` server that answers in plaintext was "received corrupt
/// message of type InvalidContentType", and an expired certificate's dates were seconds since
/// 1970.
#[tokio::test]
async fn a_certificate_refused_for_want_of_trust_says_what_trusts_it() {
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let own = params.self_signed(&key).unwrap();
    let acceptor = support::tls::acceptor(&own.pem(), &key.serialize_pem(), &[b"http/1.1"]);
    let self_signed = https_upstream_on(acceptor).await.0;
    let private = https_upstream(&Ca::new()).await;
    // Its dates are checked before its issuer.
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old = params.self_signed(&key).unwrap();
    let acceptor = support::tls::acceptor(&old.pem(), &key.serialize_pem(), &[b"http/1.1"]);
    let expired = https_upstream_on(acceptor).await.0;
    // An `https://` written for a plaintext server: its answer is no TLS at all.
    let plaintext = upstream(|_| async { Response::new(full("plain")) }).await;
    for (addr, said, fix, health) in [
        (
            self_signed,
            "a self-signed certificate marked a CA",
            "in upstream.ca_file",
            "tcp",
        ),
        (
            private,
            "issued by an authority not trusted here",
            "in upstream.ca_file",
            "http",
        ),
        (
            expired,
            "certificate expired on 2021-01-01T00:00:00Z (checked at 20",
            "",
            "tcp",
        ),
        (
            plaintext.addr,
            "InvalidContentType",
            "not TLS: a server speaking plaintext",
            "http",
        ),
    ] {
        let proxy = spawn_proxy(&format!(
            "[upstream]\nservers = [\"https://{addr}\"]\n[health]\nkind = \"{health}\"\n\
             interval = \"1h\"\n"
        ))
        .await;
        let resp = get(&proxy.url("/refused")).await;
        assert_eq!(resp.status(), 503, "{said}");
        assert_eq!(resp.headers()["x-intermission-mode"], "outage", "{said}");
        let error = last_error(&proxy).await.unwrap_or_default();
        assert!(error.contains(said) && error.contains(fix), "{error}");
        assert!(!error.contains("OtherError"), "{error}");
    }
}

/// An HTTP/2 request naming its host twice, differently, is malformed (RFC 9113 §8.3.1): strict
/// servers (Python's h2) reset it. The client's host must reach an `https://` server that chose
/// HTTP/2 as `:authority` alone, and one that chose HTTP/1.1 as `Host`, as before.
#[tokio::test]
async fn https_upstreams_see_the_clients_host_once_over_http2_and_http1() {
    let ca = Ca::new();
    let h2 = https_upstream_alpn(&ca, &[b"h2", b"http/1.1"]).await.0;
    let h1 = https_upstream_alpn(&ca, &[b"http/1.1"]).await.0;
    let cases = [
        (h2, "HTTP/2.0 authority=shop.test:8443 host=[]"),
        (h1, "HTTP/1.1 authority=- host=[\"shop.test:8443\"]"),
    ];
    for (addr, want) in cases {
        let proxy = trusting(
            &ca,
            &format!("[upstream]\nservers = [\"https://{addr}\"]\n"),
        )
        .await;
        assert_eq!(wait_healthy(&proxy).await, Some(true));
        // Twice: the second goes on the connection the first opened.
        for _ in 0..2 {
            let out = raw_exchange(
                proxy.addr,
                b"GET /host HTTP/1.1\r\nHost: shop.test:8443\r\nConnection: close\r\n\r\n",
                std::time::Duration::from_secs(10),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 200"), "{addr}: {out:?}");
            assert!(out.ends_with(&format!("\r\n\r\n{want}")), "{addr}: {out:?}");
        }
    }
}

/// A burst of requests to an `https://` server that chose HTTP/2, before any connection to it
/// exists, waits for one handshake and shares its connection, rather than each dialing one.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_to_an_http2_https_upstream_shares_one_new_connection() {
    let ca = Ca::new();
    let (addr, bursts) = https_upstream_alpn(&ca, &[b"h2", b"http/1.1"]).await;
    let proxy = trusting(
        &ca,
        &format!("[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{addr}\"]\n"),
    )
    .await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    burst(&proxy, "HTTP/1.1 200").await;
    let mut used = bursts.lock().unwrap().clone();
    assert_eq!(used.len(), 16);
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), 1, "the burst dialed {} connections", used.len());
}

/// Sixteen requests at once, each on a connection of its own; every answer must start with
/// `status`.
async fn burst(proxy: &Proxy, status: &str) {
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let to = proxy.addr;
            tokio::spawn(async move {
                raw_exchange(
                    to,
                    b"GET /burst HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
                    std::time::Duration::from_secs(20),
                )
                .await
            })
        })
        .collect();
    for r in requests {
        let out = r.await.unwrap();
        assert!(out.starts_with(status), "{out:?}");
    }
}

#[tokio::test]
async fn h2c_upstreams_get_http2_with_prior_knowledge() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"h2c://{}\"]\n", up.addr)).await;
    assert_eq!(
        wait_healthy(&proxy).await,
        Some(true),
        "the health check speaks h2c too"
    );
    let resp = send(
        Request::post(proxy.url("/h2c?q=1"))
            .header("host", "shop.test")
            .body(full("ping"))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen: Seen = json(&resp);
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.uri, format!("http://{}/h2c?q=1", up.addr));
    assert_eq!(seen.body, "ping");
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.test"));
}

#[tokio::test]
async fn plaintext_is_redirected_to_https_except_reserved_and_allowed_paths() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = tls_proxy(|dir| {
        ca.write_leaf(dir, "site", &["shop.test"]);
        format!(
            "{}[upstream]\nservers = [\"{}\"]\n[maintenance]\nallow_paths = [\"/.well-known/acme-challenge/\"]\n",
            certs(&["site"]),
            up.url()
        )
    })
    .await;
    let port = tls_addr(&proxy).port();
    edit_config(&proxy, |text| {
        text.replacen(
            "[proxy]\n",
            &format!("[proxy]\nredirect_https = true\nhttps_port = {port}\n"),
            1,
        )
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let resp = send(
        Request::get(proxy.url("/shop?item=7"))
            .header("host", "shop.test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://shop.test:{port}/shop?item=7").as_str()
    );
    let acme = send(
        Request::get(proxy.url("/.well-known/acme-challenge/tok"))
            .header("host", "shop.test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(acme.status(), 200);
    // A dot segment would take the path out from under its prefix upstream: redirected, as
    // it would be held in maintenance.
    for path in [
        "/.well-known/acme-challenge/../../secret",
        "/.well-known/acme-challenge/%2e%2e/x",
    ] {
        let out = raw_exchange(
            proxy.addr,
            format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            std::time::Duration::from_secs(10),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 308"), "{path}: {out}");
    }
    // A Host with userinfo is no host: refused, not redirected to the part after the `@`.
    let out = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: shop.test@evil.test\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let status = get(&proxy.url("/_intermission/status")).await;
    assert_eq!(status.status(), 200);
}

#[tokio::test]
async fn the_bypass_cookie_is_secure_over_tls() {
    let ca = Ca::new();
    let proxy = tls_proxy(|dir| {
        ca.write_leaf(dir, "site", &["shop.test"]);
        format!(
            "{}[maintenance]\nbypass_secret = \"team-only-0123456789\"\n",
            certs(&["site"])
        )
    })
    .await;
    let stream = tls_connect(
        tls_addr(&proxy),
        "shop.test",
        ca.client_config(&[b"http/1.1"]),
    )
    .await;
    let mut sender = h1(stream).await;
    let resp = get_on(
        &mut sender,
        "shop.test",
        "/_intermission/bypass/team-only-0123456789",
    )
    .await;
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
}

/// For the tests that need a handshake whatever the name.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Waits (bounded) for the first server's first health result.
async fn wait_healthy(proxy: &Proxy) -> Option<bool> {
    for _ in 0..250 {
        let h = ctl(proxy, Ctl::Health).await.health.unwrap();
        if h[0].last_check.is_some() {
            return h[0].healthy;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn with_redirect_the_bypass_link_goes_to_https_too() {
    let ca = Ca::new();
    let proxy = tls_proxy(|dir| {
        ca.write_leaf(dir, "site", &["shop.test"]);
        format!(
            "{}[maintenance]\nbypass_secret = \"team-only-0123456789\"\n",
            certs(&["site"])
        )
    })
    .await;
    edit_config(&proxy, |text| {
        text.replacen(
            "[proxy]\n",
            "[proxy]\nredirect_https = true\nhttps_port = 8443\n",
            1,
        )
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let resp = send(
        Request::get(proxy.url("/_intermission/bypass/team-only-0123456789"))
            .header("host", "shop.test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 308);
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "no cookie over cleartext"
    );
    assert_eq!(
        resp.headers()["location"],
        "https://shop.test:8443/_intermission/bypass/team-only-0123456789"
    );
    // An IPv6 literal host keeps one pair of brackets.
    let resp = send(
        Request::get(proxy.url("/x"))
            .header("host", "[::1]:8080")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.headers()["location"], "https://[::1]:8443/x");
}

/// A server that accepts TCP connections and never writes: a TLS handshake with it never ends.
/// Its sockets are kept open, so that the proxy meets silence rather than a close.
/// Counts the connections it accepted.
async fn black_hole() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (addr, accepted)
}

/// Proxies to `servers` with a short `connect_timeout` and a `response_timeout` no test waits
/// out, so that only `connect_timeout` can end a handshake that never finishes. TCP health
/// checks, which a black hole passes, keep it in the rotation, as a server whose TLS is stuck
/// would be.
async fn impatient_proxy(servers: &[String], ca: &Ca) -> Proxy {
    proxy_with_connect_timeout(servers, ca, "1s").await
}

async fn proxy_with_connect_timeout(servers: &[String], ca: &Ca, connect_timeout: &str) -> Proxy {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [{}]\nconnect_timeout = \"{connect_timeout}\"\n\
         response_timeout = \"1h\"\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\nfall = 3\n",
        servers.join(", ")
    );
    trusting(ca, &text).await
}

/// A request sent through the proxy, which must be answered well within `response_timeout`.
async fn answered(req: Request<TestBody>) -> Response<Bytes> {
    let limit = std::time::Duration::from_secs(20);
    tokio::time::timeout(limit, send(req))
        .await
        .expect("no answer in 20 s: the handshake was waited on past connect_timeout")
}

/// The first server's last error, once its checker has one (bounded, as `wait_healthy`).
async fn last_error(proxy: &Proxy) -> Option<String> {
    for _ in 0..250 {
        let h = ctl(proxy, Ctl::Health).await.health.unwrap();
        if let Some(error) = &h[0].last_error {
            return Some(error.clone());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    None
}

/// The HTTP/2 path (`connect_h2`): a request's first connection to an `https://` server asks
/// for HTTP/2 by ALPN. A server stuck in the handshake fails it as a connect error after
/// `connect_timeout`, and the request goes to the next server.
#[tokio::test]
async fn a_tls_handshake_that_never_ends_fails_after_connect_timeout_and_is_retried() {
    let ca = Ca::new();
    let (hole, _) = black_hole().await;
    let working = https_upstream(&ca).await;
    let proxy = impatient_proxy(
        &[format!("https://{hole}"), format!("https://{working}")],
        &ca,
    )
    .await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    let resp = answered(Request::get(proxy.url("/via/tls")).body(empty()).unwrap()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body(), "secure HTTP/2.0 /via/tls");
    // Tried first, and failed as a connection that was never opened.
    let error = last_error(&proxy).await.unwrap_or_default();
    assert!(
        error.contains("cannot connect") && error.contains("connect_timeout (1s)"),
        "{error}"
    );
}

/// The HTTP/1.1 path (hyper-util's client): a request asking for an upgrade, which HTTP/2 does
/// not carry, is never sent twice; it gets the outage answer after `connect_timeout`. With TCP
/// checks, which a server stuck in its handshake passes, three in a row (`fall`) take it out:
/// the timeouts are all that shows it.
#[tokio::test]
async fn an_upgrade_to_a_tls_handshake_that_never_ends_fails_after_connect_timeout() {
    let ca = Ca::new();
    let (hole, _) = black_hole().await;
    let proxy = impatient_proxy(&[format!("https://{hole}")], &ca).await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    for _ in 0..3 {
        let resp = answered(
            Request::get(proxy.url("/socket"))
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-intermission-mode"], "outage");
    }
    let error = last_error(&proxy).await.unwrap_or_default();
    assert!(
        error.contains("cannot connect") && error.contains("connect_timeout (1s)"),
        "the cause is named: {error}"
    );
    let out = wait_until_async(|| async {
        ctl(&proxy, Ctl::Health).await.health.unwrap()[0].healthy == Some(false)
    })
    .await;
    assert!(out, "{:?}", ctl(&proxy, Ctl::Health).await.health);
}

/// A burst of requests to a server stuck in its handshake makes one attempt, which fails them
/// all after `connect_timeout`, rather than one attempt per request in turn (the last of 16
/// would have waited 16 × `connect_timeout`, and the server taken 16 handshakes).
#[tokio::test]
async fn a_burst_to_a_tls_handshake_that_never_ends_waits_for_one_attempt() {
    let ca = Ca::new();
    let (hole, accepted) = black_hole().await;
    // Long enough for the whole burst to queue behind the first dial on a slow machine.
    let proxy = proxy_with_connect_timeout(&[format!("https://{hole}")], &ca, "2s").await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    let checks = accepted.load(Ordering::SeqCst);
    burst(&proxy, "HTTP/1.1 503").await;
    let dials = accepted.load(Ordering::SeqCst) - checks;
    assert_eq!(dials, 1, "the burst dialed {dials} times");
    // One failed connection counts once against the server, not once per waiting request:
    // with `fall = 3`, sixteen would have taken it out.
    assert!(
        last_error(&proxy).await.is_some(),
        "the failure was not told"
    );
    let health = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert_eq!(health[0].healthy, Some(true), "{health:?}");
    assert_eq!(health[0].consecutive, 1, "{health:?}");
}

/// How `refusing_upstream` refuses streams.
#[derive(Clone, Copy, PartialEq)]
enum Refusal {
    /// `RST_STREAM` with `REFUSED_STREAM` to the first, third, fifth… stream it gets.
    Reset,
    /// A `GOAWAY` whose last stream id is 0 to the first stream of its first connection, which
    /// it then closes: a restart begun as the request came.
    GoAway,
}

/// An `https://` upstream speaking HTTP/2 alone, through the h2 crate's server so that it can
/// refuse streams, as `refusal` says; it answers the others `200` with "fine" and the method.
/// Counts the streams it got, refused ones included.
async fn refusing_upstream(ca: &Ca, refusal: Refusal) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = upstream_acceptor(ca, &[b"h2"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = streams.clone();
    let go_away = Arc::new(AtomicBool::new(refusal == Refusal::GoAway));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen, go_away) = (acceptor.clone(), seen.clone(), go_away.clone());
            tokio::spawn(async move {
                // A TCP health check's connection ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if go_away.swap(false, Ordering::SeqCst) {
                    go_away_at_first_stream(tls, &seen).await;
                    return;
                }
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    if refusal == Refusal::Reset && n % 2 == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    // "fine METHOD", then the body's length and its trailer when it had them.
                    let mut answer = format!("fine {}", req.method());
                    let mut body = req.into_body();
                    let mut length = 0;
                    while let Some(Ok(data)) = body.data().await {
                        length += data.len();
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                    if length > 0 {
                        answer.push_str(&format!(" {length}"));
                    }
                    if let Ok(Some(trailers)) = body.trailers().await {
                        let sum = trailers.get("x-checksum").and_then(|v| v.to_str().ok());
                        answer.push_str(&format!(" {}", sum.unwrap_or("?")));
                    }
                    let body = Bytes::from(answer);
                    if let Ok(mut send) = respond.send_response(Response::new(()), false) {
                        let _ = send.send_data(body, true);
                    }
                }
            });
        }
    });
    (addr, streams)
}

/// Answers the connection's first stream with `GOAWAY` (last stream id 0, `NO_ERROR`) and
/// closes the connection, counting the stream in `seen`. Written in frames: h2's server names
/// every stream it has read in its `GOAWAY`, as processed.
async fn go_away_at_first_stream(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    seen: &AtomicUsize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CLIENT_PREFACE: usize = 24;
    const HEADERS: u8 = 1;
    // The server's preface: SETTINGS, empty.
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let (mut got, mut frame) = (Vec::new(), CLIENT_PREFACE);
    loop {
        // Each frame starts with its payload's length (3 bytes) and its type.
        while let Some(head) = got.get(frame..frame + 9) {
            if head[3] == HEADERS {
                seen.fetch_add(1, Ordering::SeqCst);
                let go_away = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                tls.write_all(&go_away).await.unwrap();
                let _ = tls.shutdown().await;
                return;
            }
            frame += 9 + u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        }
        let mut buf = [0u8; 4096];
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A proxy from `config`, which trusts `ca` for its `https://` servers (`upstream.ca_file`,
/// written into its folder).
async fn trusting(ca: &Ca, config: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let text = with_listen(config).replace("[upstream]\n", "[upstream]\nca_file = \"ca.pem\"\n");
    assert!(text.contains("ca_file"), "no [upstream] in {config}");
    spawn_proxy_in(dir, &text).await
}

/// A proxy with `addr` as its one `https://` server, checked over TCP alone, so that every
/// stream the server gets is a forwarded request.
async fn proxy_to_one(addr: SocketAddr, ca: &Ca) -> Proxy {
    let text = format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{addr}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    );
    let proxy = trusting(ca, &text).await;
    assert_eq!(wait_healthy(&proxy).await, Some(true));
    proxy
}

/// A stream the server refused unprocessed (RFC 9113 §8.7) is sent again on a new connection,
/// whatever its method, rather than answered as an outage while the server is fine.
#[tokio::test]
async fn a_request_an_http2_upstream_refuses_unprocessed_is_sent_again() {
    let ca = Ca::new();
    let (addr, streams) = refusing_upstream(&ca, Refusal::Reset).await;
    let proxy = proxy_to_one(addr, &ca).await;
    let resp = get(&proxy.url("/x")).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(resp.body(), "fine GET");
    // The server says it did nothing with it: a POST is sent again too.
    let resp = send(Request::post(proxy.url("/x")).body(empty()).unwrap()).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(resp.body(), "fine POST");
    assert_eq!(streams.load(Ordering::SeqCst), 4);
    // And one with a body (a form, an API call): held whole, so that it can be sent again.
    let post = Request::post(proxy.url("/x"))
        .header("content-length", "5")
        .body(full("hello"))
        .unwrap();
    let resp = send(post).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(resp.body(), "fine POST 5");
    assert_eq!(streams.load(Ordering::SeqCst), 6);
    // An HTTP/2 client's, trailers and all.
    let post = Request::post(proxy.url("/x"))
        .header("content-length", "7")
        .header("te", "trailers")
        .body(BodyExt::boxed(WithTrailers(0)))
        .unwrap();
    let resp = h2c_client().request(post).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "fine POST 7 abc123");
    assert_eq!(streams.load(Ordering::SeqCst), 8);
}

/// A server beginning a graceful restart as a request comes says with `GOAWAY` that it did not
/// process it (a last stream id below it): it is sent again on a new connection.
#[tokio::test]
async fn a_request_above_an_http2_upstreams_goaway_is_sent_again_on_a_new_connection() {
    let ca = Ca::new();
    let (addr, streams) = refusing_upstream(&ca, Refusal::GoAway).await;
    let proxy = proxy_to_one(addr, &ca).await;
    let resp = get(&proxy.url("/x")).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(resp.body(), "fine GET");
    assert_eq!(streams.load(Ordering::SeqCst), 2);
}

/// A body that streams is never held to be sent twice: refused, its request gets the outage
/// answer, and the server sees it once.
#[tokio::test]
async fn a_refused_request_whose_body_streams_is_not_sent_again() {
    let ca = Ca::new();
    let (addr, streams) = refusing_upstream(&ca, Refusal::Reset).await;
    let proxy = proxy_to_one(addr, &ca).await;
    let out = raw_exchange(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out:?}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-intermission-mode: outage"),
        "{out:?}"
    );
    assert_eq!(streams.load(Ordering::SeqCst), 1);
}

/// A proxy that serves one connection at a time, over TLS and plaintext.
async fn one_connection_proxy(ca: &Ca, up: &Upstream) -> Proxy {
    one_connection_proxy_with(ca, up, "").await
}

/// `one_connection_proxy` with more `[proxy]` lines.
async fn one_connection_proxy_with(ca: &Ca, up: &Upstream, proxy: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 1\n{proxy}\
         [tls]\nlisten = [\"127.0.0.1:0\"]\n{}[upstream]\nservers = [\"{}\"]\n",
        certs(&["site"]),
        up.url()
    );
    spawn_proxy_in(dir, &text).await
}

/// At `max_connections`, an idle HTTPS connection the relay serves makes room for a new
/// client, as a parked plaintext one does: it is closed.
#[tokio::test]
async fn at_max_connections_an_idle_https_connection_makes_room() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy(&ca, &up).await;
    let stream = tls_connect(
        tls_addr(&proxy),
        "shop.test",
        ca.client_config(&[b"http/1.1"]),
    )
    .await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let closed = tokio::spawn(conn);
    assert_eq!(
        get_on(&mut sender, "shop.test", "/idle").await.status(),
        200
    );
    assert_makes_room(&proxy, closed, "HTTPS").await;
}

/// A TLS connection that has not sent its hello is idle once it has waited 2 s, as a
/// plaintext one that has sent nothing is: at `max_connections` it is closed to make room
/// for a new client.
#[tokio::test]
async fn at_max_connections_a_tls_connection_that_sent_nothing_makes_room() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy(&ca, &up).await;
    let mut silent = tokio::net::TcpStream::connect(tls_addr(&proxy))
        .await
        .unwrap();
    let begun = std::time::Instant::now();
    room_made_once_stalled(&proxy, begun, "a TLS connection that sent nothing").await;
    let mut chunk = [0u8; 64];
    let read = tokio::io::AsyncReadExt::read(&mut silent, &mut chunk);
    let read = tokio::time::timeout(Duration::from_secs(5), read).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the silent TLS connection was not closed: {read:?}"
    );
}

/// An HTTPS connection whose handshake is done and whose first request has not come is not
/// closed for room until it has waited 2 s: its client sends the request as the handshake
/// ends, and one picked in that moment lost its handshake unserved. Over HTTP/1.1 (the
/// relay's wait) and HTTP/2 (no stream yet) alike.
#[tokio::test]
async fn at_max_connections_an_https_connection_makes_room_only_2_s_before_its_first_request() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let proxy = one_connection_proxy(&ca, &up).await;
        let mut stream =
            tls_connect(tls_addr(&proxy), "shop.test", ca.client_config(&[alpn])).await;
        if alpn == b"h2" {
            use tokio::io::AsyncWriteExt;
            // The preface and SETTINGS, and no stream.
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .unwrap();
        }
        let begun = std::time::Instant::now();
        let what = format!("{} before its first request", String::from_utf8_lossy(alpn));
        room_made_once_stalled(&proxy, begun, &what).await;
        let mut rest = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest);
        let ended = tokio::time::timeout(Duration::from_secs(5), read).await;
        assert!(ended.is_ok(), "the {what} was not closed");
    }
}

/// A server held by the test: `/slow` reads its body, tells `arrived` and answers `ok` once
/// `release` is told; `/drip` sends `first,` at once and `last` once `release` is told;
/// anything else is answered `ok`. Returns the server, `release` and `arrived`.
async fn gated_upstream() -> (Upstream, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (r, a) = (release.clone(), arrived.clone());
    let up = upstream(move |req: Request<Incoming>| {
        let (release, arrived) = (r.clone(), a.clone());
        async move {
            match req.uri().path() {
                "/slow" => {
                    let _ = req.into_body().collect().await;
                    arrived.notify_one();
                    release.notified().await;
                    Response::new(full("ok"))
                }
                "/drip" => {
                    let (tx, body) = mpsc_body();
                    tokio::spawn(async move {
                        tx.send(Bytes::from_static(b"first,")).await.unwrap();
                        release.notified().await;
                        tx.send(Bytes::from_static(b"last")).await.unwrap();
                    });
                    Response::new(body)
                }
                _ => Response::new(full("ok")),
            }
        }
    })
    .await;
    (up, release, arrived)
}

/// An HTTP/2 connection with no stream open is idle: at `max_connections` it is told to go
/// (GOAWAY) to make room. One with a stream open is not.
#[tokio::test]
async fn at_max_connections_an_idle_http2_connection_makes_room_and_a_busy_one_does_not() {
    let (up, release, arrived) = gated_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy(&ca, &up).await;
    let stream = tls_connect(tls_addr(&proxy), "shop.test", ca.client_config(&[b"h2"])).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let closed = tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("https://shop.test{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    // Busy: a stream waits on the server, and a new client is refused.
    let slow = sender.send_request(get("/slow"));
    let slow = tokio::spawn(slow);
    arrived.notified().await;
    let out = new_client(&proxy).await;
    assert_eq!(out, "", "a busy HTTP/2 connection was closed for room");
    release.notify_one();
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);

    // Idle: it makes room.
    let resp = sender.send_request(get("/idle")).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    assert_makes_room(&proxy, closed, "HTTP/2").await;
}

/// An HTTP/1.1 client over TLS whose requests carry `TestBody`s.
async fn h1_with_bodies(
    proxy: &Proxy,
    ca: &Ca,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let config = ca.client_config(&[b"http/1.1"]);
    let stream = tls_connect(tls_addr(proxy), "shop.test", config).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

/// A POST whose body is chunked and sent after its head: the relay leaves such a request
/// (`Transfer-Encoding`) to hyper, which serves the connection from then on.
fn chunked_post(path: &str) -> (tokio::sync::mpsc::Sender<Bytes>, Request<TestBody>) {
    let (tx, body) = mpsc_body();
    let req = Request::post(path)
        .header("host", "shop.test")
        .body(body)
        .unwrap();
    (tx, req)
}

/// At `max_connections`, an idle HTTPS connection that hyper serves (after a request the
/// relay does not take: here a POST with a chunked body that comes after its head) makes
/// room for a new client, as one the relay serves does: it is closed.
#[tokio::test]
async fn at_max_connections_an_idle_https_connection_hyper_serves_makes_room() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy(&ca, &up).await;
    let (mut sender, closed) = h1_with_bodies(&proxy, &ca).await;
    let (tx, req) = chunked_post("/api/orders");
    let resp = tokio::spawn(sender.send_request(req));
    tx.send(Bytes::from_static(b"{\"order\":")).await.unwrap();
    tx.send(Bytes::from_static(b"1}")).await.unwrap();
    drop(tx);
    let resp = resp.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body"], "{\"order\":1}");
    assert_makes_room(&proxy, closed, "HTTPS").await;
}

/// An HTTPS connection with a request head begun is not closed for room until the head has
/// lasted two seconds, as a handshake: then it has stalled, and makes room. Both ways a head
/// waits over TLS: in the relay (a next head after an answer), and in hyper (a first head
/// the relay left to it unfinished).
#[tokio::test]
async fn an_https_connection_whose_head_stalled_makes_room() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream().await;
    let ca = Ca::new();
    for in_hyper in [false, true] {
        // Longer than the test: the head's deadline would free the slot too.
        let proxy = one_connection_proxy_with(&ca, &up, "header_read_timeout = \"60s\"\n").await;
        let config = ca.client_config(&[b"http/1.1"]);
        let mut stream = tls_connect(tls_addr(&proxy), "shop.test", config).await;
        let next = b"GET /second HTTP/1.1\r\nHo";
        let begun = if in_hyper {
            stream.write_all(next).await.unwrap();
            let begun = std::time::Instant::now();
            // Until the proxy has read it, the connection has sent nothing and is idle.
            let client = (
                stream.get_ref().0.local_addr().unwrap(),
                stream.get_ref().0.peer_addr().unwrap(),
            );
            assert!(
                wait_until(Duration::from_secs(5), || read_by_peer(client)).await,
                "the proxy did not read the head"
            );
            begun
        } else {
            let mut both = b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\n".to_vec();
            both.extend_from_slice(next);
            stream.write_all(&both).await.unwrap();
            let begun = std::time::Instant::now();
            let resp = read_response(&mut stream).await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            begun
        };
        room_made_once_stalled(&proxy, begun, &format!("in hyper: {in_hyper}")).await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
        assert!(
            matches!(read.await, Ok(Ok(0)) | Ok(Err(_))),
            "the stalled connection was not the one closed (in hyper: {in_hyper})"
        );
    }
}

/// A request whose head came whole and whose body is late is under way, not stalled: past
/// the 2 s after which a head still arriving makes room, it is not closed for a new client,
/// and its answer comes once its body does.
#[tokio::test]
async fn an_https_request_whose_body_is_late_is_not_closed_for_room() {
    use tokio::io::AsyncWriteExt;
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy_with(&ca, &up, "header_read_timeout = \"60s\"\n").await;
    let config = ca.client_config(&[b"http/1.1"]);
    let mut stream = tls_connect(tls_addr(&proxy), "shop.test", config).await;
    let mut both = b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\n".to_vec();
    both.extend_from_slice(
        b"POST /late HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 10\r\n\r\nhello",
    );
    stream.write_all(&both).await.unwrap();
    let resp = read_response(&mut stream).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // What is tested is the time passing: past the stalled-head mark, with room to spare.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        new_client(&proxy).await,
        "",
        "a request under way was closed for room"
    );
    stream.write_all(b"world").await.unwrap();
    let resp = read_response(&mut stream).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("helloworld"), "{resp}");
}

/// A proxy in maintenance serving one connection at a time, with a long
/// `header_read_timeout`, and an HTTPS HTTP/1.1 connection to it.
async fn held_on_one_connection() -> (Upstream, Proxy, TlsStream<tokio::net::TcpStream>) {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy_with(&ca, &up, "header_read_timeout = \"60s\"\n").await;
    assert!(ctl(&proxy, on(None)).await.ok);
    let config = ca.client_config(&[b"http/1.1"]);
    let stream = tls_connect(tls_addr(&proxy), "shop.test", config).await;
    (up, proxy, stream)
}

/// The 2 s a head takes to stall on an HTTPS connection hyper serves are counted from that
/// head's start, not from an earlier one's: a request answered at once (held) after a head
/// that came in pieces left that head's clock running, and every later head on the
/// connection was closable for room as soon as it began.
#[tokio::test]
async fn an_https_head_stalls_two_seconds_after_its_own_start() {
    use tokio::io::AsyncWriteExt;
    let (_up, proxy, mut stream) = held_on_one_connection().await;
    // A first head in pieces is hyper's, which answers it held.
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let client = (
        stream.get_ref().0.local_addr().unwrap(),
        stream.get_ref().0.peer_addr().unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(5), || read_by_peer(client)).await,
        "the proxy did not read the head"
    );
    stream.write_all(b"st: shop.test\r\n\r\n").await.unwrap();
    let resp = read_response(&mut stream).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    let first = std::time::Instant::now();
    // Idle past the first head's 2 s, then a next head begins.
    while first.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream
        .write_all(b"GET /second HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let begun = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || read_by_peer(client)).await,
        "the proxy did not read the head"
    );
    let out = new_client(&proxy).await;
    if begun.elapsed() < Duration::from_millis(1500) {
        assert_eq!(out, "", "a young head was closed for room");
    }
}

/// An upload still arriving after its answer (held: answered at once, its body read and
/// dropped) is an upload under way, not a head stalled: past 2 s it is not closed for room,
/// which would reset the connection under a client still sending, and the connection serves
/// the next request once the body has ended.
#[tokio::test]
async fn an_https_upload_going_on_after_its_answer_is_not_closed_for_room() {
    use tokio::io::AsyncWriteExt;
    let (_up, proxy, mut stream) = held_on_one_connection().await;
    // Chunked: hyper's, which answers it held at once.
    stream
        .write_all(
            b"POST /up HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let resp = read_response(&mut stream).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    // The body goes on, a piece every 300 ms (a held upload that pauses for a second is
    // given up on), past the 2 s after which a head still arriving makes room.
    let sending = std::time::Instant::now();
    while sending.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(b"5\r\nworld\r\n").await.unwrap();
    }
    assert_eq!(
        new_client(&proxy).await,
        "",
        "an upload under way was closed for room"
    );
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut stream).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
}

/// An HTTPS connection that hyper serves is not closed for room while a request is in
/// flight: neither while its server has not answered, nor while its answer's body streams.
/// A new client is refused, and the request gets its whole answer. Once idle, it makes room.
#[tokio::test]
async fn at_max_connections_a_busy_https_connection_hyper_serves_stays() {
    let (up, release, arrived) = gated_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy(&ca, &up).await;
    let (mut sender, closed) = h1_with_bodies(&proxy, &ca).await;

    // Its server has not answered yet.
    let (tx, req) = chunked_post("/slow");
    let slow = tokio::spawn(sender.send_request(req));
    tx.send(Bytes::from_static(b"data")).await.unwrap();
    drop(tx);
    arrived.notified().await;
    let out = new_client(&proxy).await;
    assert_eq!(
        out, "",
        "an HTTPS connection waiting on its server was closed"
    );
    release.notify_one();
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");

    // Its answer's body is still coming.
    let (tx, req) = chunked_post("/drip");
    drop(tx);
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first,");
    let out = new_client(&proxy).await;
    assert_eq!(
        out, "",
        "an HTTPS connection streaming an answer was closed"
    );
    release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last");

    assert_makes_room(&proxy, closed, "HTTPS").await;
}

/// A WebSocket tunnel over TLS (the relay leaves the upgrade to hyper, whose connection ends
/// when it hands the socket over) keeps its connection's slot: at `max_connections` a new
/// client is refused, and the tunnel is not taken for an idle connection and closed. Once
/// it closes, its slot is free again.
#[tokio::test]
async fn an_https_tunnel_counts_against_max_connections_until_it_closes() {
    let up = switching_upstream().await;
    let ca = Ca::new();
    let proxy = one_connection_proxy(&ca, &up.server).await;
    let config = ca.client_config(&[b"http/1.1"]);
    let mut tunnel = tunnel_over(tls_connect(tls_addr(&proxy), "shop.test", config).await).await;
    let out = new_client(&proxy).await;
    assert_eq!(out, "", "a new client was served beside an open tunnel");
    assert!(
        echoes(&mut tunnel, "still there").await,
        "the tunnel was closed for room"
    );
    drop(tunnel);
    assert!(
        served_at_the_limit(&proxy).await,
        "a closed tunnel still holds its slot"
    );
}

const OPEN: &str = "intermission_client_connections";
const REFUSED: &str = "intermission_client_connection_limit_reached_total{outcome=\"refused\"}";
const MADE_ROOM: &str = "intermission_client_connection_limit_reached_total{outcome=\"made_room\"}";

/// A proxy with plaintext and TLS listeners and room for two connections, whose idle ones
/// wait 30 s for a request: a test sees them make room, not time out.
async fn two_slot_proxy(ca: &Ca, up: &Upstream, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let config = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 2\nheader_read_timeout = \"30s\"\n\
         [tls]\nlisten = [\"127.0.0.1:0\"]\n{}[upstream]\nservers = [\"{}\"]\n{extra}",
        certs(&["site"]),
        up.url()
    );
    spawn_proxy_in(dir, &config).await
}

/// A client that sends plain HTTP to the TLS port, reads its `400` and then waits holds its
/// slot no longer than an idle connection: at `max_connections` it makes room. Such clients
/// held every slot until `header_read_timeout`, as cheaply as stalled handshakes did.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_the_tls_port_answered_makes_room() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = two_slot_proxy(&ca, &up, "").await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(tls_addr(&proxy))
            .await
            .unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 400");
        waiting.push(tcp);
    }
    assert!(served_at_the_limit(&proxy).await, "no room was made");
}

/// Resolves when the first of `futures` does.
async fn first_of<F: std::future::Future<Output = ()> + Unpin>(futures: impl Iterator<Item = F>) {
    let mut all: Vec<F> = futures.collect();
    std::future::poll_fn(|cx| {
        for f in all.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Clients in the middle of a handshake fill `proxy.max_connections`: for their first two
/// seconds every new client on either port is closed at once, and `/metrics` shows the
/// connections open and those turned away, where only a log line said so while `/readyz`
/// said ready. Past two seconds a handshake has stalled, and a new client closes the one
/// under way longest to be served: clients that begin handshakes and never end them held
/// every slot until `header_read_timeout`, renewing them as cheaply.
#[tokio::test(flavor = "multi_thread")]
async fn connections_open_and_turned_away_at_the_limit_are_in_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = two_slot_proxy(&ca, &up, "[admin]\nlisten = \"127.0.0.1:0\"\n").await;
    let addr = tls_addr(&proxy);
    assert_eq!(series(&proxy, OPEN).await, Some(0.0));
    assert_eq!(series(&proxy, REFUSED).await, Some(0.0));
    assert_eq!(series(&proxy, MADE_ROOM).await, Some(0.0));
    // Each sends its hello, reads the first of the proxy's answer, and goes no further: in its
    // handshake, not closed to make room for its first two seconds.
    let began = std::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let name = ServerName::try_from("shop.test".to_owned()).unwrap();
        let mut client =
            rustls::ClientConnection::new(ca.client_config(&[b"http/1.1"]), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        let mut first = [0u8; 1];
        tcp.read_exact(&mut first).await.unwrap();
        assert_eq!(first[0], 0x16, "the proxy's answer is a handshake record");
        stalled.push(tcp);
    }
    assert_eq!(series(&proxy, OPEN).await, Some(2.0));
    // A new client is closed unserved, and counted: unless the machine took so long that
    // the handshakes are two seconds old already (checked after, so that it cannot lie).
    let refused = new_client(&proxy).await;
    if began.elapsed() < Duration::from_millis(1800) {
        assert_eq!(refused, "", "a new client was served at the limit");
        assert_eq!(series(&proxy, REFUSED).await, Some(1.0));
        assert_eq!(series(&proxy, MADE_ROOM).await, Some(0.0));
        assert_eq!(series(&proxy, OPEN).await, Some(2.0));
    }
    // Two seconds in, a stalled handshake makes room, and is closed. (Which of the two: the
    // one whose 2 s came first, to within the timers' lateness: they began moments apart.)
    tokio::time::sleep_until((began + Duration::from_millis(2100)).into()).await;
    assert!(
        served_at_the_limit(&proxy).await,
        "no stalled handshake made room"
    );
    let ends = stalled.iter_mut().map(|tcp| {
        Box::pin(async move {
            let mut buf = [0u8; 4096];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
    });
    let closed = tokio::time::timeout(Duration::from_secs(5), first_of(ends)).await;
    assert!(closed.is_ok(), "no stalled handshake was closed");
    let made_room = series(&proxy, MADE_ROOM).await.unwrap();
    assert!(made_room >= 1.0, "{made_room}");

    drop(stalled);
    assert_eq!(series_reaches(&proxy, OPEN, 0.0).await, Some(0.0));
    // Two that sent nothing are idle once they have waited 2 s: a new client closes one to
    // be served.
    let _silent = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    let begun = std::time::Instant::now();
    assert_eq!(series_reaches(&proxy, OPEN, 2.0).await, Some(2.0));
    room_made_once_stalled(&proxy, begun, "TLS connections that sent nothing").await;
    assert_eq!(series(&proxy, MADE_ROOM).await, Some(made_room + 1.0));
}

const PENDING_PER_CLIENT: &str =
    "intermission_client_connection_limit_reached_total{outcome=\"pending_per_client\"}";

/// Begins a TLS handshake to `addr` from the loopback address `local` and goes no further:
/// sends its hello and reads the first byte of the proxy's answer. `None` when the proxy
/// closes the connection instead of answering.
async fn begin_handshake(ca: &Ca, local: &str, addr: SocketAddr) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = ServerName::try_from("shop.test".to_owned()).unwrap();
    let mut client = rustls::ClientConnection::new(ca.client_config(&[b"http/1.1"]), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let mut tcp = connect_from(local, addr).await;
    // Closed at accept, the connection may refuse the hello already.
    let _ = tcp.write_all(&hello).await;
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut first)).await;
    match read.expect("the proxy neither answered the hello nor closed within 5 s") {
        Ok(_) => {
            assert_eq!(first[0], 0x16, "the proxy's answer is a handshake record");
            Some(tcp)
        }
        Err(_) => None,
    }
}

/// One host that opens handshakes and leaves them under way (a hello each, as fast as they
/// age) fills its `max_pending_per_client` and no more: its next connection is closed at
/// once and counted, while a client at another address is served in the slot left. Without
/// the cap such a host held every slot with handshakes younger than 2 s, never closed for
/// room, and every other client was turned away on both ports. Its place comes back when
/// one of its handshakes ends.
#[tokio::test(flavor = "multi_thread")]
async fn one_host_s_handshakes_beyond_its_cap_are_refused_while_another_is_served() {
    let up = echo_upstream().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let config = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 3\nmax_pending_per_client = 2\n\
         header_read_timeout = \"30s\"\n[tls]\nlisten = [\"127.0.0.1:0\"]\n{}\
         [upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        certs(&["site"]),
        up.url()
    );
    let proxy = spawn_proxy_in(dir, &config).await;
    let addr = tls_addr(&proxy);
    let mut stalled = Vec::new();
    for n in 1..=2 {
        let tcp = begin_handshake(&ca, "127.0.0.1", addr).await;
        stalled.push(tcp.unwrap_or_else(|| panic!("handshake {n} of 2 was refused")));
    }
    assert!(
        begin_handshake(&ca, "127.0.0.1", addr).await.is_none(),
        "a third handshake from the same host was answered"
    );
    assert_eq!(series(&proxy, PENDING_PER_CLIENT).await, Some(1.0));
    assert_eq!(series(&proxy, REFUSED).await, Some(0.0));
    assert_eq!(series_reaches(&proxy, OPEN, 2.0).await, Some(2.0));

    // Another host is served in the slot left, over TLS and on the plaintext port.
    let tcp = connect_from("127.0.0.2", addr).await;
    let stream = tls_connect_on(tcp, "shop.test", ca.client_config(&[b"http/1.1"])).await;
    let mut sender = h1(stream).await;
    assert_eq!(
        get_on(&mut sender, "shop.test", "/other").await.status(),
        200
    );
    drop(sender);
    assert_eq!(series_reaches(&proxy, OPEN, 2.0).await, Some(2.0));
    let plain = raw_exchange_from(
        "127.0.0.3",
        proxy.addr,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain:?}");
    assert_eq!(series(&proxy, PENDING_PER_CLIENT).await, Some(1.0));

    // One of its handshakes given up, the host may begin another.
    stalled.pop();
    let mut again = None;
    for _ in 0..100 {
        again = begin_handshake(&ca, "127.0.0.1", addr).await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "a closed handshake still counts against its host"
    );
}

/// A connection the proxy ends while its client is still sending (a `400` to a head it
/// cannot read, before the body behind it; a held upload past the 16 MiB read and dropped) is
/// closed as nginx's lingering close closes one: the client's writes all go through, and it
/// reads the answer and then a clean end. Closed with the client's bytes unread, the
/// connection was reset: the client's write failed (`EPIPE`, `ECONNRESET`: what curl shows
/// in place of the answer), and an answer not yet out of the proxy's socket was lost. On
/// plaintext and over TLS.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_ended_under_a_client_still_sending_is_closed_lingering() {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn sends_all_then_reads<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        head: &str,
        body: usize,
    ) -> String {
        let mut ask = head.as_bytes().to_vec();
        ask.resize(ask.len() + body, b'x');
        let wrote = tokio::time::timeout(Duration::from_secs(20), s.write_all(&ask)).await;
        assert!(matches!(wrote, Ok(Ok(()))), "{head:?}: {wrote:?}");
        let mut read = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut read)).await;
        assert!(matches!(end, Ok(Ok(_))), "{head:?}: {end:?}");
        String::from_utf8_lossy(&read).into_owned()
    }
    let up = echo_upstream().await;
    let ca = Ca::new();
    let proxy = shop_proxy(&ca, &up, "").await;
    let config = ca.client_config(&[b"http/1.1"]);
    let bad = "GET / HTTP/1.1\r\nHost: shop.test\r\nBad Header\r\n\r\n";
    let held = "POST /form HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 20971520\r\n\r\n";
    for (head, body, status) in [(bad, 4 << 20, "400"), (held, 20 << 20, "503")] {
        if status == "503" {
            ctl(&proxy, on(None)).await;
        }
        let plain = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let out = sends_all_then_reads(plain, head, body).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out:?}");
        let tls = tls_connect(tls_addr(&proxy), "shop.test", config.clone()).await;
        let out = sends_all_then_reads(tls, head, body).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out:?}");
    }
}

/// An intermediate of the chain that ends before the server's own certificate (Let's
/// Encrypt's chains of 2021 ended with their cross-signed root) is the chain's end: the gauge
/// shows it and the warnings name it, by its place in the file and its name. Before, only the
/// server's own end was watched, and nothing was said until clients refused the chain.
#[tokio::test]
async fn an_intermediate_that_ends_first_is_the_chains_end() {
    let root = Ca::new();
    let intermediate = |not_before: Option<(i32, u8, u8)>, not_after: u64| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test Intermediate R9");
        if let Some((y, m, d)) = not_before {
            params.not_before = rcgen::date_time_ymd(y, m, d);
        }
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_after);
        let end = params.not_after.unix_timestamp();
        let cert = params.signed_by(&key, &root.cert, &root.key).unwrap();
        (Ca { cert, key }, end)
    };
    let write = |dir: &Path, stem: &str, ca: &Ca, leaf_end: Option<(i32, u8, u8)>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["shop.test".to_string()]).unwrap();
        if let Some((y, m, d)) = leaf_end {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let leaf = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        std::fs::write(
            dir.join(format!("{stem}.pem")),
            format!("{}{}{}", leaf.pem(), ca.cert.pem(), root.cert.pem()),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    };
    let now = std::time::SystemTime::now();
    let since_epoch = now.duration_since(std::time::UNIX_EPOCH).unwrap();
    // Five days left: within the 14 days warned of; the server's own runs to 4096.
    let (soon, soon_end) = intermediate(None, since_epoch.as_secs() + 5 * 86400);
    let (gone, _) = intermediate(Some((2020, 1, 1)), 1_609_459_200);
    let proxy = tls_proxy(|dir| {
        write(dir, "site", &soon, None);
        write(dir, "old", &gone, None);
        // The server's own ended too, after its intermediate: that is what is said.
        write(dir, "both", &gone, Some((2022, 1, 1)));
        format!(
            "{}[admin]\nlisten = \"127.0.0.1:0\"\n",
            certs(&["site", "old", "both"])
        )
    })
    .await;
    let dir = proxy.dir.path();
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let cfg = intermission::config::Config::parse(&text, dir, None).unwrap();
    let (served, warnings) = intermission::tls::server_config_checked(&cfg.tls, now, None).unwrap();
    let date = |secs: i64| {
        intermission::time::Timestamp(
            std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap()),
        )
        .rfc3339()
    };
    let site = dir.join("site.pem");
    let old = dir.join("old.pem");
    let both = dir.join("both.pem");
    assert_eq!(
        warnings,
        [
            format!(
                "tls.certificates[0]: certificate 2 of {} (an intermediate, CN=Test \
                 Intermediate R9) expires on {}, before the server's own: clients that follow \
                 the chain refuse it from then; use the chain your certificate authority \
                 issues now (a renewal brings it) and reload",
                site.display(),
                date(soon_end)
            ),
            format!(
                "tls.certificates[1]: certificate 2 of {} (an intermediate, CN=Test \
                 Intermediate R9) expired on 2021-01-01T00:00:00Z, before the server's own: \
                 clients that follow the chain refuse it; use the chain your certificate \
                 authority issues now (a renewal brings it) and reload",
                old.display()
            ),
            format!(
                "tls.certificates[2]: the certificate in {} expired on 2022-01-01T00:00:00Z: \
                 clients refuse it; renew it and reload",
                both.display()
            ),
        ]
    );
    let ends: Vec<i64> = served
        .ends
        .iter()
        .map(|e| {
            let secs = e.not_after.duration_since(std::time::UNIX_EPOCH).unwrap();
            i64::try_from(secs.as_secs()).unwrap()
        })
        .collect();
    assert_eq!(ends, [soon_end, 1_609_459_200, 1_609_459_200]);

    // The gauge shows the chain's end, the intermediate's.
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let got = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(got.body()).into_owned();
    let gauge = format!(
        "intermission_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}} {soon_end}",
        site.display()
    );
    assert!(metrics.lines().any(|l| l == gauge), "{gauge}\n{metrics}");
}

/// Sends a GET for `/` on `s` and reads its answer whole (framed by its `Content-Length`): its
/// head's first line, or what ended the connection.
async fn tls_answer(s: &mut TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let asked = async {
        s.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            .await?;
        let mut got = Vec::new();
        loop {
            let mut more = [0u8; 4096];
            let n = s.read(&mut more).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>("closed".to_owned());
            }
            got.extend_from_slice(&more[..n]);
            if let Some((head, _)) = whole_answer(&got) {
                return Ok(head.lines().next().unwrap_or_default().to_owned());
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), asked).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "no answer within 10 s".to_owned(),
    }
}

/// At `max_connections`, each new client closes one idle HTTPS connection, not more: a
/// connection picked to make room lingered on its slot (a second, for a client that does not
/// close as soon as it is told), no longer counted as closing, and the next client took it for
/// an excess over the limit to pay back, and closed idle connections beyond its own.
#[tokio::test(flavor = "multi_thread")]
async fn at_max_connections_a_new_client_closes_one_idle_https_connection_not_more() {
    use tokio::io::AsyncReadExt;
    let up = echo_upstream().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write_leaf(dir.path(), "site", &["shop.test"]);
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 4\n\
         [tls]\nlisten = [\"127.0.0.1:0\"]\n{}[upstream]\nservers = [\"{}\"]\n",
        certs(&["site"]),
        up.url()
    );
    let proxy = spawn_proxy_in(dir, &text).await;
    let addr = tls_addr(&proxy);
    let config = ca.client_config(&[b"http/1.1"]);
    // Four clients, each served once and idle since, that do not close when the proxy does
    // (as a pool that looks at a connection only when it next uses it).
    let mut old = Vec::new();
    for _ in 0..4 {
        let mut s = tls_connect(addr, "shop.test", config.clone()).await;
        assert_eq!(tls_answer(&mut s).await, "HTTP/1.1 200 OK");
        old.push(s);
    }
    // The first newcomer closes the oldest.
    let _first = tls_connect(addr, "shop.test", config.clone()).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), old[0].read_to_end(&mut rest)).await;
    assert!(
        matches!(ended, Ok(Ok(0))),
        "the oldest is closed: {ended:?}"
    );
    // The second, while the first one closed holds on (it is not dropped), closes one more.
    let _second = tls_connect(addr, "shop.test", config.clone()).await;
    let mut served = 0;
    for s in &mut old[1..] {
        if tls_answer(s).await == "HTTP/1.1 200 OK" {
            served += 1;
        }
    }
    assert_eq!(
        served, 2,
        "two of the other three idle clients are still served"
    );
}

/// An upstream whose answer to `/own` carries its own `Strict-Transport-Security`.
async fn hsts_upstream() -> Upstream {
    upstream(|req: Request<Incoming>| async move {
        let mut resp = Response::builder();
        if req.uri().path() == "/own" {
            resp = resp.header("strict-transport-security", "max-age=5");
        }
        resp.body(full("ok")).unwrap()
    })
    .await
}

/// The `Strict-Transport-Security` values of an answer, each line apart.
fn sts<B>(resp: &Response<B>) -> Vec<String> {
    resp.headers()
        .get_all("strict-transport-security")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// An answer over HTTP/2 on a new TLS connection.
async fn get_h2(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Response<Bytes> {
    let stream = tls_connect(addr, "shop.test", config).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://shop.test{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// `GET path` over HTTP/1.1 on `sender`, with `headers` added.
async fn get_with(sender: &mut Sender1, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
    let mut req = Request::get(path).header("host", "shop.test");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// With `tls.hsts_*`, every answer over TLS carries `Strict-Transport-Security` once: forwarded
/// ones that have none (by the relay, by hyper's HTTP/1.1 path, over HTTP/2), intermission's
/// own (the status document, holding answers however they are written, the outage answer),
/// while an application's own is passed on alone; answers over plaintext carry none (RFC 6797
/// §7.2). Before, none was ever sent, and during maintenance nothing could send it.
#[tokio::test]
async fn hsts_is_sent_over_tls_only_and_the_application_s_own_is_kept() {
    let up = hsts_upstream().await;
    let ca = Ca::new();
    let proxy = tls_proxy(|dir| {
        ca.write_leaf(dir, "site", &["shop.test"]);
        format!(
            "hsts_max_age = \"365d\"\nhsts_include_subdomains = true\n{}\
             [upstream]\nservers = [\"{}\"]\n\
             [maintenance]\ncors_origins = [\"https://app.test\"]\n",
            certs(&["site"]),
            up.url()
        )
    })
    .await;
    let addr = tls_addr(&proxy);
    let ours = vec!["max-age=31536000; includeSubDomains".to_owned()];
    let theirs = vec!["max-age=5".to_owned()];
    let h1_config = ca.client_config(&[b"http/1.1"]);
    let h2_config = ca.client_config(&[b"h2"]);

    // Forwarded: by the relay (keep-alive), by hyper (`Connection: close` is not the relay's),
    // and over HTTP/2.
    let mut sender = h1(tls_connect(addr, "shop.test", h1_config.clone()).await).await;
    let resp = get_with(&mut sender, "/plain", &[]).await;
    assert_eq!((resp.status().as_u16(), sts(&resp)), (200, ours.clone()));
    let resp = get_with(&mut sender, "/own", &[]).await;
    assert_eq!((resp.status().as_u16(), sts(&resp)), (200, theirs.clone()));
    // A reserved path is hyper's, and so is the connection from then on.
    let resp = get_with(&mut sender, "/_intermission/status", &[]).await;
    assert_eq!((resp.status().as_u16(), sts(&resp)), (200, ours.clone()));
    for path in ["/plain", "/own"] {
        let mut sender = h1(tls_connect(addr, "shop.test", h1_config.clone()).await).await;
        let resp = get_with(&mut sender, path, &[("connection", "close")]).await;
        let want = if path == "/own" { &theirs } else { &ours };
        assert_eq!(&sts(&resp), want, "{path} through hyper's HTTP/1.1 path");
        let resp = get_h2(addr, h2_config.clone(), path).await;
        assert_eq!(&sts(&resp), want, "{path} over HTTP/2");
    }
    // Never over plaintext, forwarded or not.
    for path in ["/plain", "/_intermission/status"] {
        let resp = get(&proxy.url(path)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(sts(&resp), Vec::<String>::new(), "{path} over plaintext");
    }

    // Held: the encoded page and problem+json (by the relay, on a new connection, or by
    // hyper on one it took), one a listed origin reads (written from its map), and over HTTP/2.
    assert!(ctl(&proxy, on(Some("Upgrading"))).await.ok);
    for accept in [
        &[("accept", "text/html")][..],
        &[("accept", "application/json")],
        &[
            ("accept", "application/json"),
            ("origin", "https://app.test"),
        ],
    ] {
        let mut relayed = h1(tls_connect(addr, "shop.test", h1_config.clone()).await).await;
        for (sender, how) in [(&mut relayed, "relay"), (&mut sender, "hyper")] {
            let resp = get_with(sender, "/plain", accept).await;
            assert_eq!(
                (resp.status().as_u16(), sts(&resp)),
                (503, ours.clone()),
                "{accept:?} by the {how}"
            );
        }
    }
    let resp = get_h2(addr, h2_config.clone(), "/plain").await;
    assert_eq!((resp.status().as_u16(), sts(&resp)), (503, ours.clone()));
    let resp = get(&proxy.url("/plain")).await;
    assert_eq!((resp.status().as_u16(), sts(&resp)), (503, vec![]));
    assert!(ctl(&proxy, Ctl::Off).await.ok);

    // The application gone: the outage answer the relay writes carries it too.
    up.stopped().await;
    let mut sender = h1(tls_connect(addr, "shop.test", h1_config).await).await;
    let resp = get_with(&mut sender, "/plain", &[]).await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert_eq!(sts(&resp), ours);
    let resp = get_h2(addr, h2_config, "/plain").await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert_eq!(sts(&resp), ours);
}

/// `tls.hsts_*` is taken by a reload, changed and switched off, and a value that would not
/// make a valid header (or one the preload list refuses) is refused at start and at reload
/// with its key named, the header in force staying.
#[tokio::test]
async fn hsts_follows_a_reload_and_bad_values_are_refused_with_the_key_named() {
    let up = hsts_upstream().await;
    let ca = Ca::new();
    let proxy = tls_proxy(|dir| {
        ca.write_leaf(dir, "site", &["shop.test"]);
        format!(
            "hsts_max_age = \"365d\"\n{}[upstream]\nservers = [\"{}\"]\n",
            certs(&["site"]),
            up.url()
        )
    })
    .await;
    let addr = tls_addr(&proxy);
    let config = ca.client_config(&[b"http/1.1"]);
    let sent = |config: Arc<rustls::ClientConfig>| async move {
        let mut sender = h1(tls_connect(addr, "shop.test", config).await).await;
        sts(&get_with(&mut sender, "/", &[]).await)
    };
    assert_eq!(sent(config.clone()).await, ["max-age=31536000"]);

    edit_config(&proxy, |t| {
        t.replace(
            "hsts_max_age = \"365d\"\n",
            "hsts_max_age = \"104w\"\nhsts_include_subdomains = true\nhsts_preload = true\n",
        )
    });
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    let preloaded = "max-age=62899200; includeSubDomains; preload";
    assert_eq!(sent(config.clone()).await, [preloaded]);

    for (from, to, key, why) in [
        ("\"104w\"", "\"10m\"", "tls.hsts_preload", "at least a year"),
        (
            "hsts_include_subdomains = true",
            "hsts_include_subdomains = false",
            "tls.hsts_preload",
            "tls.hsts_include_subdomains",
        ),
        ("\"104w\"", "\"3y\"", "tls.hsts_max_age", "not a unit"),
        (
            "\"104w\"",
            "\"1000d\"",
            "tls.hsts_max_age",
            "longer than 2 years",
        ),
        (
            "\"104w\"",
            "\"1.5s\"",
            "tls.hsts_max_age",
            "whole number of seconds",
        ),
        (
            "hsts_max_age = \"104w\"",
            "",
            "tls.hsts_include_subdomains",
            "needs tls.hsts_max_age",
        ),
        (
            "hsts_preload = true",
            "hsts_preload = \"yes\"",
            "tls.hsts_preload",
            "bool",
        ),
    ] {
        let text = std::fs::read_to_string(proxy.dir.path().join("config.toml")).unwrap();
        let bad = text.replace(from, to);
        assert_ne!(bad, text);
        std::fs::write(proxy.dir.path().join("config.toml"), &bad).unwrap();
        let e = ctl(&proxy, Ctl::Reload).await.error.expect("refused");
        assert!(
            e.message.contains(&format!("{key}: ")) && e.message.contains(why),
            "{to}: {}",
            e.message
        );
        // At start too.
        let e = intermission::config::Config::parse(&bad, proxy.dir.path(), None)
            .expect_err("refused at start")
            .to_string();
        assert!(e.contains(key) && e.contains(why), "{to}: {e}");
        std::fs::write(proxy.dir.path().join("config.toml"), &text).unwrap();
        assert_eq!(sent(config.clone()).await, [preloaded], "after {to}");
    }

    // `"0"` tells browsers to forget; no key, no header.
    edit_config(&proxy, |t| {
        t.replace("\"104w\"", "\"0\"")
            .replace("hsts_preload = true\n", "")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    assert_eq!(sent(config.clone()).await, ["max-age=0; includeSubDomains"]);
    edit_config(&proxy, |t| {
        t.replace("hsts_max_age = \"0\"\n", "")
            .replace("hsts_include_subdomains = true\n", "")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    assert_eq!(sent(config).await, Vec::<String>::new());
}
