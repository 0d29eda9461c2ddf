//! The HTTP side of the upgrade: 404 on other paths, 400 for a plain GET, authentication
//! (401 and `on_auth_failure`; success with user id and claims), `send_to_user`, origins
//! (403; no `Origin` accepted), the connection limit (503), `on_connect`, no extension or
//! subprotocol negotiated, and `Hub::handler` and `Hub::handle_websocket` on the
//! application's own hyper server.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use serde_json::json;
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wshub::{
    ApiKeyAuth, AuthError, AuthRequest, BearerTokenAuth, HubConfig, Identity, Message,
    QueryTokenAuth,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_answer_404() {
    let server = Server::default_hub().await;
    let (status, _) = http_request(
        server.addr,
        &format!("{}\r\n", upgrade_request(server.addr, "/other")),
    )
    .await;
    assert_eq!(status, 404);
    let status = refused_status(try_connect(server.addr, request(server.addr, "/wss")).await);
    assert_eq!(status, 404);
    // The path is matched exactly; a query string is not part of it.
    let (_ws, response) = try_connect(server.addr, request(server.addr, "/ws?x=1"))
        .await
        .expect("/ws with a query upgrades");
    assert_eq!(response.status().as_u16(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_path_is_served_instead_of_ws() {
    let server = Server::start(HubConfig::builder().path("/live").build().unwrap()).await;
    let status = refused_status(try_connect(server.addr, request(server.addr, "/ws")).await);
    assert_eq!(status, 404);
    let (mut ws, _) = try_connect(server.addr, request(server.addr, "/live"))
        .await
        .expect("upgrade on the configured path");
    sync(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_on_the_websocket_path_answers_400() {
    let server = Server::default_hub().await;
    let (status, answer) = http_request(
        server.addr,
        &format!("GET /ws HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    // An upgrade to something other than WebSocket is not one either.
    let (status, _) = http_request(
        server.addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            server.addr
        ),
    )
    .await;
    assert_eq!(status, 400);
    // A WebSocket upgrade without its key is a bad one.
    let (status, _) = http_request(
        server.addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(server.hub.client_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_negotiates_no_compression_and_no_subprotocol() {
    let server = Server::default_hub().await;
    let (status, answer) = http_request(
        server.addr,
        &format!(
            "{}Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
             Sec-WebSocket-Protocol: chat, superchat\r\n\r\n",
            upgrade_request(server.addr, "/ws")
        ),
    )
    .await;
    assert_eq!(status, 101, "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{answer}"
    );
    assert!(!lower.contains("sec-websocket-extensions"), "{answer}");
    assert!(!lower.contains("sec-websocket-protocol"), "{answer}");
}

/// What `on_auth_failure` saw: the peer address and the reason, per refusal.
type Failures = Arc<Mutex<Vec<(Option<SocketAddr>, String)>>>;

fn api_key_config(failures: Failures) -> HubConfig {
    HubConfig::builder()
        .authenticator(ApiKeyAuth::new([("key-a", "alice"), ("key-b", "bob")]))
        .on_auth_failure(move |addr, err| {
            failures
                .lock()
                .unwrap()
                .push((addr, err.reason().to_owned()));
        })
        .build()
        .unwrap()
}

fn with_header(addr: SocketAddr, name: &'static str, value: &str) -> http::Request<()> {
    let mut request = request(addr, "/ws");
    request
        .headers_mut()
        .insert(name, HeaderValue::from_str(value).unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_authentication_answers_401_and_calls_on_auth_failure() {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let server = Server::start(api_key_config(Arc::clone(&failures))).await;

    let status = refused_status(try_connect(server.addr, request(server.addr, "/ws")).await);
    assert_eq!(status, 401);
    let wrong = with_header(server.addr, "authorization", "Bearer nope");
    assert_eq!(refused_status(try_connect(server.addr, wrong).await), 401);
    let basic = with_header(server.addr, "authorization", "Basic a2V5LWE=");
    assert_eq!(refused_status(try_connect(server.addr, basic).await), 401);

    let failures = failures.lock().unwrap().clone();
    assert_eq!(
        failures.len(),
        3,
        "on_auth_failure once per refusal: {failures:?}"
    );
    for (addr, reason) in &failures {
        let addr = addr.expect("the peer address is known");
        assert!(addr.ip().is_loopback(), "{addr}");
        assert!(!reason.is_empty());
    }
    assert_eq!(server.hub.client_count(), 0);
    assert_eq!(server.hub.stats().connection_tasks, 0);
    assert!(server.hub.stats().upgrades_refused >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_names_the_user_and_send_to_user_reaches_each_of_its_connections() {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let server = Server::start(api_key_config(Arc::clone(&failures))).await;
    let before = server.hub.client_count();
    // The scheme is case-insensitive.
    let (mut alice_1, _) = try_connect(
        server.addr,
        with_header(server.addr, "authorization", "bearer key-a"),
    )
    .await
    .expect("alice's key is accepted");
    let (mut alice_2, _) = try_connect(
        server.addr,
        with_header(server.addr, "authorization", "BEARER key-a"),
    )
    .await
    .expect("alice again");
    let (mut bob, _) = try_connect(
        server.addr,
        with_header(server.addr, "authorization", "Bearer key-b"),
    )
    .await
    .expect("bob's key is accepted");
    let hub = server.hub.clone();
    wait_until("three clients", move || hub.client_count() == before + 3).await;
    assert!(failures.lock().unwrap().is_empty());

    let mut users: Vec<Option<String>> = server
        .hub
        .clients()
        .await
        .into_iter()
        .map(|c| c.info.user_id)
        .collect();
    users.sort();
    assert_eq!(
        users,
        [
            Some("alice".to_owned()),
            Some("alice".to_owned()),
            Some("bob".to_owned())
        ]
    );

    server
        .hub
        .send_to_user("alice", &Message::new("for-alice").with_data(1))
        .unwrap();
    server
        .hub
        .send_to_user("nobody", &Message::new("lost"))
        .unwrap();
    server
        .hub
        .send_to_user("bob", &Message::new("for-bob"))
        .unwrap();
    assert_envelope(
        &next_text(&mut alice_1).await,
        r#"{"type":"for-alice","data":1}"#,
    );
    assert_envelope(
        &next_text(&mut alice_2).await,
        r#"{"type":"for-alice","data":1}"#,
    );
    assert_envelope(&next_text(&mut bob).await, r#"{"type":"for-bob"}"#);

    // Once one of alice's connections is gone, the other still gets her messages.
    close(&mut alice_1, 1000).await;
    let hub = server.hub.clone();
    wait_until("alice's first connection to go", move || {
        hub.client_count() == before + 2
    })
    .await;
    server
        .hub
        .send_to_user("alice", &Message::new("again"))
        .unwrap();
    assert_eq!(next_json(&mut alice_2).await["type"], "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_from_a_bearer_token_are_visible_in_snapshots_and_policies() {
    let seen_by_policy = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&seen_by_policy);
    let config = HubConfig::builder()
        .authenticator(BearerTokenAuth::new(|token| match token {
            "t-admin" => {
                Ok(Identity::new("u-1").with_claims(json!({"role": "admin", "tenant": 7})))
            }
            _ => Err(AuthError::new("bad token")),
        }))
        .subscribe_policy(move |client, channel| {
            seen.lock()
                .unwrap()
                .push((client.user_id.clone(), client.claims.clone()));
            channel != "forbidden"
        })
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let (mut ws, _) = try_connect(
        server.addr,
        with_header(server.addr, "authorization", "Bearer t-admin"),
    )
    .await
    .expect("token accepted");
    subscribe(&mut ws, "ops").await;

    let clients = server.hub.clients().await;
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].info.user_id.as_deref(), Some("u-1"));
    assert_eq!(
        clients[0].info.claims,
        json!({"role": "admin", "tenant": 7})
    );
    assert_eq!(
        seen_by_policy.lock().unwrap().clone(),
        vec![(
            Some("u-1".to_owned()),
            json!({"role": "admin", "tenant": 7})
        )]
    );
    let bad = with_header(server.addr, "authorization", "Bearer t-other");
    assert_eq!(refused_status(try_connect(server.addr, bad).await), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_token_authenticates_browsers() {
    let config = HubConfig::builder()
        .authenticator(QueryTokenAuth::new(|token| {
            if token == "a b&c" {
                Ok(Identity::new("browser-user"))
            } else {
                Err(AuthError::new("bad token"))
            }
        }))
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let refused = try_connect(server.addr, request(server.addr, "/ws?token=wrong")).await;
    assert_eq!(refused_status(refused), 401);
    let missing = try_connect(server.addr, request(server.addr, "/ws")).await;
    assert_eq!(refused_status(missing), 401);
    let (mut ws, _) = try_connect(server.addr, request(server.addr, "/ws?x=1&token=a%20b%26c"))
        .await
        .expect("a valid query token");
    sync(&mut ws).await;
    let clients = server.hub.clients().await;
    assert_eq!(clients[0].info.user_id.as_deref(), Some("browser-user"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_is_an_authenticator_and_sees_the_request() {
    let config = HubConfig::builder()
        .authenticator(|request: &AuthRequest<'_>| {
            let tenant = request
                .headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| AuthError::new("no tenant"))?;
            assert!(request.remote_addr.is_some_and(|a| a.ip().is_loopback()));
            Ok(Identity::new(format!("user@{tenant}")))
        })
        .build()
        .unwrap();
    let server = Server::start(config).await;
    assert_eq!(
        refused_status(try_connect(server.addr, request(server.addr, "/ws")).await),
        401
    );
    let (mut ws, _) = try_connect(server.addr, with_header(server.addr, "x-tenant", "acme"))
        .await
        .expect("accepted");
    sync(&mut ws).await;
    assert_eq!(
        server.hub.clients().await[0].info.user_id.as_deref(),
        Some("user@acme")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_connect_sees_the_client_the_address_and_the_headers() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let config = HubConfig::builder()
        .authenticator(ApiKeyAuth::new([("k", "carol")]))
        .on_connect(move |client, headers| {
            record.lock().unwrap().push((
                client.id,
                client.remote_addr,
                client.user_id.clone(),
                headers.get("x-app").map(|v| v.to_str().unwrap().to_owned()),
            ));
        })
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let mut request = with_header(server.addr, "authorization", "Bearer k");
    request
        .headers_mut()
        .insert("x-app", HeaderValue::from_static("demo"));
    let (mut ws, _) = try_connect(server.addr, request).await.expect("accepted");
    sync(&mut ws).await;
    let local = ws.get_ref().local_addr().unwrap();
    let id = server.newest_client().await;
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![(
            id,
            Some(local),
            Some("carol".to_owned()),
            Some("demo".to_owned())
        )]
    );
}

fn origin_request(addr: SocketAddr, origin: &str) -> http::Request<()> {
    with_header(addr, "origin", origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allow_list_answer_403() {
    let config = HubConfig::builder()
        .allowed_origins(["https://app.example.com", "http://localhost:3000"])
        .build()
        .unwrap();
    let server = Server::start(config).await;
    let addr = server.addr;
    for refused in [
        "https://evil.example.com",
        "http://app.example.com",       // scheme differs
        "https://app.example.com:8443", // port differs
        "http://localhost:3001",
        "http://localhost",
        "null",
    ] {
        let status = refused_status(try_connect(addr, origin_request(addr, refused)).await);
        assert_eq!(status, 403, "origin {refused}");
    }
    for accepted in [
        "https://app.example.com",
        "https://APP.Example.com", // host in any case
        "https://app.example.com:443",
        "http://localhost:3000",
    ] {
        let (mut ws, _) = try_connect(addr, origin_request(addr, accepted))
            .await
            .unwrap_or_else(|e| panic!("origin {accepted} refused: {e}"));
        sync(&mut ws).await;
    }
    // A request without Origin is not from a browser: accepted.
    let (mut ws, _) = try_connect(addr, request(addr, "/ws"))
        .await
        .expect("no Origin is accepted");
    sync(&mut ws).await;
    assert!(server.hub.stats().upgrades_refused >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_origin_is_allowed_by_default() {
    let server = Server::default_hub().await;
    let (mut ws, _) = try_connect(
        server.addr,
        origin_request(server.addr, "https://anywhere.example"),
    )
    .await
    .expect("any origin by default");
    sync(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_over_the_connection_limit_answer_503() {
    let config = HubConfig::builder().max_connections(2).build().unwrap();
    let server = Server::start(config).await;
    let mut first = server.connect().await;
    let _second = server.connect().await;
    let refused = try_connect(server.addr, request(server.addr, "/ws")).await;
    assert_eq!(refused_status(refused), 503);
    assert_eq!(server.hub.client_count(), 2);

    // A place frees up when a client leaves.
    close(&mut first, 1000).await;
    let hub = server.hub.clone();
    wait_until("the first client to be gone", move || {
        hub.stats().connection_tasks == 1
    })
    .await;
    let (mut third, _) = try_connect(server.addr, request(server.addr, "/ws"))
        .await
        .expect("room for one more");
    sync(&mut third).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_serves_the_hub_on_an_application_hyper_server() {
    let hub = wshub::Hub::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let hub = hub.clone();
        async move {
            hub.run(async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let accept = tokio::spawn({
        let hub = hub.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let service = hub.handler();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        }
    });

    let status = refused_status(try_connect(addr, request(addr, "/elsewhere")).await);
    assert_eq!(status, 404);
    let mut ws = connect(addr).await;
    subscribe(&mut ws, "process:job").await;
    hub.send_process_output("job", "line").unwrap();
    assert_eq!(next_json(&mut ws).await["data"], "line");

    // Shutting down: the client gets 1001, and later upgrades on the same server get 503.
    let _ = stop.send(());
    assert_eq!(read_until_close(&mut ws).await.0, 1001);
    within("run to return", run).await.unwrap();
    let refused = try_connect(addr, request(addr, "/ws")).await;
    assert_eq!(refused_status(refused), 503);
    accept.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_websocket_upgrades_a_request_on_any_path_the_application_routes() {
    let hub = wshub::Hub::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn({
        let hub = hub.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hub = hub.clone();
                let service = hyper::service::service_fn(move |request| {
                    let response = if request.uri().path() == "/app/live" {
                        hub.handle_websocket(request)
                    } else {
                        let mut response = http::Response::new(wshub::Body::default());
                        *response.status_mut() = http::StatusCode::IM_A_TEAPOT;
                        response
                    };
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        }
    });
    let status = refused_status(try_connect(addr, request(addr, "/ws")).await);
    assert_eq!(status, 418, "the application's own answer");
    let (mut ws, _) = try_connect(addr, request(addr, "/app/live"))
        .await
        .expect("upgraded by handle_websocket");
    subscribe(&mut ws, "c").await;
    hub.send_to_channel("c", &Message::new("m")).unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "m");
    assert_eq!(hub.client_count(), 1);
    accept.abort();
}
