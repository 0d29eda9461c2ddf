//! Feature `tls`: the client connects to a `wss://` hub (`wshub::tls::serve`, with a
//! certificate made here by rcgen) that its root store trusts, and refuses one it does not.

mod support;

use support::{next_event, wait_for_event, wait_until};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use wshub::{Hub, Message};
use wshub_client::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use wshub_client::rustls::RootCertStore;
use wshub_client::{Client, ClientConfig, Event, State};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_servers_certificate_in_its_roots_subscribes_over_wss() {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let acceptor = wshub::tls::acceptor(vec![made.cert.der().clone()], key).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hub = Hub::new();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(wshub::tls::serve(listener, acceptor, hub.clone(), async {
        let _ = stopped.await;
    }));
    let url = format!("wss://localhost:{port}/ws");

    let mut roots = RootCertStore::empty();
    roots.add(made.cert.der().clone()).unwrap();
    let (client, mut events) = Client::start(
        ClientConfig::builder(&url)
            .tls_roots(roots)
            .build()
            .unwrap(),
    );
    assert_eq!(next_event(&mut events, "Connected").await, Event::Connected);
    client.subscribe("room").await.expect("subscribe");
    wait_for_event(&mut events, "the acknowledgement", |e| {
        matches!(e, Event::Subscribed { .. })
    })
    .await;
    hub.send_to_channel("room", &Message::new("chat").with_data("over TLS"))
        .unwrap();
    match next_event(&mut events, "the hub's message").await {
        Event::Message(m) => assert_eq!(m.data, Some(serde_json::json!("over TLS"))),
        other => panic!("expected the message, got {other:?}"),
    }
    client.close().await;

    // A root store without the certificate: every attempt fails, nothing is delivered.
    let (untrusting, mut events) = Client::start(
        ClientConfig::builder(&url)
            .tls_roots(RootCertStore::empty())
            .max_retries(1)
            .build()
            .unwrap(),
    );
    let (closed, _) = wait_for_event(&mut events, "the client to give up", |e| {
        matches!(e, Event::Closed { .. })
    })
    .await;
    assert!(
        matches!(&closed, Event::Closed { error: Some(_) }),
        "{closed:?}"
    );
    assert_eq!(untrusting.state(), State::Closed);
    // The hub saw the refused handshake (the client's alert reaches it after the client's
    // own error).
    wait_until("the hub to count the failed handshake", || {
        hub.stats().tls_handshake_failures >= 1
    })
    .await;
}
