//! `wss://` in process (feature `tls`): a TLS client subscribes and receives; what is not a
//! TLS client (plain text on the TLS port, a client that never sends its ClientHello) is
//! closed without holding anything and the hub keeps serving TLS clients. The certificate is
//! made here, with rcgen, for 127.0.0.1 and localhost.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{wait_until, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use wshub::tls::tokio_rustls::client::TlsStream;
use wshub::tls::tokio_rustls::rustls;
use wshub::tls::tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use wshub::tls::tokio_rustls::TlsConnector;
use wshub::{Hub, HubConfig, Message};

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files (so that
/// `acceptor_from_pem` is what the hub uses), and its DER for the clients' root store.
struct Cert {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn new() -> Cert {
        let made = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .expect("a self-signed certificate");
        let dir = std::env::temp_dir().join(format!(
            "wshub-tls-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).expect("write cert.pem");
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem())
            .expect("write key.pem");
        Cert {
            dir,
            der: made.cert.der().clone(),
        }
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("the test certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A hub served by `wshub::tls::serve` on 127.0.0.1:0; stops when dropped.
struct TlsServer {
    hub: Hub,
    addr: SocketAddr,
    cert: Cert,
    _stop: oneshot::Sender<()>,
}

impl TlsServer {
    async fn start(config: HubConfig) -> TlsServer {
        let cert = Cert::new();
        let acceptor =
            wshub::tls::acceptor_from_pem(cert.dir.join("cert.pem"), cert.dir.join("key.pem"))
                .expect("the acceptor");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let hub = Hub::with_config(config);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(wshub::tls::serve(listener, acceptor, hub.clone(), async {
            let _ = stopped.await;
        }));
        TlsServer {
            hub,
            addr,
            cert,
            _stop: stop,
        }
    }

    /// A `wss://` client, connected and counted by the hub.
    async fn connect(&self) -> Wss {
        let before = self.hub.client_count();
        let ws = within("the wss:// handshake", async {
            let tcp = TcpStream::connect(self.addr).await.expect("tcp connect");
            let name = ServerName::try_from("localhost").expect("a server name");
            let tls = self
                .cert
                .connector()
                .connect(name, tcp)
                .await
                .expect("the TLS handshake");
            let url = format!("wss://localhost:{}/ws", self.addr.port());
            let (ws, _) = tokio_tungstenite::client_async(url, tls)
                .await
                .expect("the WebSocket upgrade over TLS");
            ws
        })
        .await;
        let hub = self.hub.clone();
        wait_until("the TLS client to be registered", move || {
            hub.client_count() > before
        })
        .await;
        ws
    }
}

async fn send_json(ws: &mut Wss, value: &Value) {
    within("a send", ws.send(WsMessage::text(value.to_string())))
        .await
        .expect("send over TLS");
}

/// The next text message as JSON, skipping keep-alive pings and pongs.
async fn next_json(ws: &mut Wss) -> Value {
    loop {
        let next = within("the next frame over TLS", ws.next()).await;
        match next {
            Some(Ok(WsMessage::Text(text))) => {
                return serde_json::from_str(&text).expect("JSON");
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn subscribe(ws: &mut Wss, channel: &str) {
    send_json(ws, &json!({"type": "subscribe", "data": channel})).await;
    let ack = next_json(ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["channel"], channel, "{ack}");
}

/// A TLS client subscribes, receives what is published, and its requests are answered;
/// returned still connected.
async fn subscribes_and_receives(server: &TlsServer, channel: &str) -> Wss {
    let mut ws = server.connect().await;
    subscribe(&mut ws, channel).await;
    for n in 0..3 {
        server
            .hub
            .send_to_channel(channel, &Message::new("m").with_data(json!({ "n": n })))
            .unwrap();
    }
    for n in 0..3 {
        let got = next_json(&mut ws).await;
        assert_eq!(got["channel"], channel, "{got}");
        assert_eq!(got["data"]["n"], n, "{got}");
    }
    send_json(&mut ws, &json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    ws
}

/// Reads what the server sends until it closes the connection; fails if it does not within
/// the deadline. Returns the bytes read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match within(
            "the server to close the connection",
            stream.read(&mut chunk),
        )
        .await
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => {
                got.extend_from_slice(&chunk[..n]);
                assert!(got.len() < 1 << 20, "the server keeps sending");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_client_subscribes_and_receives() {
    let server = TlsServer::start(HubConfig::default()).await;
    let _ws = subscribes_and_receives(&server, "news").await;

    // Served on the generic path, which knows the peer from the request.
    let clients = server.hub.clients().await;
    assert_eq!(clients.len(), 1);
    assert!(
        clients[0]
            .info
            .remote_addr
            .is_some_and(|a| a.ip().is_loopback()),
        "{:?}",
        clients[0].info.remote_addr
    );
    assert_eq!(server.hub.stats().tls_handshake_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_client_on_the_tls_port_is_refused_and_the_hub_keeps_serving() {
    let server = TlsServer::start(HubConfig::default()).await;

    // What a client configured with ws:// instead of wss:// sends.
    let mut plain = TcpStream::connect(server.addr).await.expect("tcp connect");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    plain.write_all(request.as_bytes()).await.expect("write");
    let answer = read_to_close(&mut plain).await;
    // At most a TLS alert record (content type 21), never an HTTP answer or an upgrade.
    assert!(
        answer.is_empty() || answer[0] == 21,
        "the server answered plain text with {:?}",
        String::from_utf8_lossy(&answer)
    );
    let hub = server.hub.clone();
    wait_until("the failed handshake to be counted", move || {
        hub.stats().tls_handshake_failures == 1
    })
    .await;
    assert_eq!(server.hub.client_count(), 0);

    // A ClientHello that is not one: a handshake record of garbage.
    let mut garbage = TcpStream::connect(server.addr).await.expect("tcp connect");
    garbage
        .write_all(&[22, 3, 1, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    read_to_close(&mut garbage).await;
    let hub = server.hub.clone();
    wait_until("the bad ClientHello to be counted", move || {
        hub.stats().tls_handshake_failures == 2
    })
    .await;

    // The hub goes on serving TLS clients.
    subscribes_and_receives(&server, "after").await;
    assert_eq!(server.hub.stats().tls_handshake_failures, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_its_client_hello_is_dropped_after_the_handshake_timeout() {
    let timeout = Duration::from_millis(500);
    let config = HubConfig::builder()
        .handshake_timeout(timeout)
        .build()
        .unwrap();
    let server = TlsServer::start(config).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.expect("tcp connect");
    let got = read_to_close(&mut silent).await;
    let waited = started.elapsed();
    assert!(got.is_empty(), "the server sent {got:?} to a silent client");
    assert!(
        waited >= timeout,
        "closed after {waited:?}, before the handshake timeout of {timeout:?}"
    );
    let hub = server.hub.clone();
    wait_until("the timed-out handshake to be counted", move || {
        hub.stats().tls_handshake_failures == 1
    })
    .await;

    // Not a refusal of everyone: a client that does its handshake is served.
    subscribes_and_receives(&server, "news").await;
}
