//! switchyard behind real reverse proxies: `nginx` and `haproxy` processes (Debian's packages,
//! installed by scripts/test) started with the configurations of docs/deploy.md, read from
//! that file, in front of a real server on loopback ports; a proxy that breaks event streams;
//! a proxy with a short idle timeout; and `--trusted-proxies`.

mod support;

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::proxy::{documented, Proxy};
use support::{join, scenarios, send, within, TestServer};
use switchyard::Config;

/// The backend every proxy test puts a proxy in front of: presence told at once (for the
/// same-conversation scenario) and a rate limit the hopping scenario's sender fits in.
async fn backend(config: Config) -> TestServer {
    TestServer::with_config(Config {
        presence_interval: Duration::ZERO,
        trusted_proxies: switchyard::proxy::parse_trusted("127.0.0.1").unwrap(),
        ..config.with_rate_limit(10_000.0)
    })
    .await
}

async fn every_scenario_through(proxy: &Proxy) {
    let client = proxy.client();
    scenarios::each_transport_alone(&client).await;
    scenarios::same_conversation(&client).await;
    scenarios::hopping(&client).await;
}

#[tokio::test]
async fn the_documented_nginx_config_carries_every_transport_and_the_hopping_scenario() {
    let server = backend(Config::default()).await;
    let proxy = Proxy::nginx(documented("nginx", "listen 80;", server.addr)).await;
    every_scenario_through(&proxy).await;
}

#[tokio::test]
async fn the_documented_haproxy_config_carries_every_transport_and_the_hopping_scenario() {
    let server = backend(Config::default()).await;
    let proxy = Proxy::haproxy(documented("haproxy", "bind :80", server.addr)).await;
    every_scenario_through(&proxy).await;
}

/// Reads every frame of a WebSocket (answering pings, as a browser does) until it closes;
/// returns the text frames and how it ended.
fn read_all(mut ws: support::Ws) -> tokio::task::JoinHandle<(Vec<Value>, String)> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::spawn(async move {
        let mut texts = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => texts.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(frame))) => return (texts, format!("closed {frame:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return (texts, format!("failed: {e}")),
                None => return (texts, "ended".into()),
            }
        }
    })
}

/// The documented nginx config with its timeouts cut to `seconds`.
fn nginx_with_timeout(upstream: std::net::SocketAddr, seconds: u32) -> String {
    documented("nginx", "listen 80;", upstream)
        .replace(
            "proxy_read_timeout 75s;",
            &format!("proxy_read_timeout {seconds}s;"),
        )
        .replace(
            "proxy_send_timeout 75s;",
            &format!("proxy_send_timeout {seconds}s;"),
        )
}

#[tokio::test]
async fn behind_a_proxy_with_a_short_idle_timeout_a_matching_heartbeat_keeps_streams_up() {
    // A 3 s idle timeout and a 1 s heartbeat (below half of it, as docs/deploy.md says).
    let server = backend(Config {
        heartbeat: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let proxy = Proxy::nginx(nginx_with_timeout(server.addr, 3)).await;
    let client = proxy.client();
    let ws_session = client.session("ws").await;
    client.ok(&ws_session, join("quiet")).await;
    let sse_session = client.session("sse").await;
    client.ok(&sse_session, join("quiet")).await;
    let ws = read_all(client.websocket(&ws_session, 0).await);
    let mut sse = client.sse(&sse_session, "?after=0", &[]).await;
    // Three timeouts with no traffic but heartbeats; the SSE reader takes each as it comes.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut heartbeats = 0;
    while tokio::time::Instant::now() < quiet_until {
        let block = sse.next_block().await.expect("the SSE stream stays open");
        if block.event.as_deref() == Some("heartbeat") {
            heartbeats += 1;
        }
    }
    assert!(heartbeats >= 8, "{heartbeats} heartbeats in 10 s");
    client
        .ok(&ws_session, send("quiet", "still here", "q1"))
        .await;
    let event = sse.next_event().await;
    assert!(event.data.contains("still here"), "{event:?}");
    // The WebSocket saw the message too, and was never closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!ws.is_finished(), "the WebSocket ended: {:?}", ws.await);
    ws.abort();

    // The control: the default heartbeat (15 s) is too slow for this proxy, which cuts the
    // quiet stream after its 3 s.
    let slow = backend(Config::default()).await;
    let proxy = Proxy::nginx(nginx_with_timeout(slow.addr, 3)).await;
    let client = proxy.client();
    let session = client.session("cut").await;
    let response = client
        .send(
            hyper::Method::GET,
            &format!("/v1/sessions/{session}/sse"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    within("the proxy to cut a quiet stream", async {
        use http_body_util::BodyExt;
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// Creates a session from source address `from`, saying the client is `forwarded`.
async fn create_from(server: &TestServer, from: &str, forwarded: &str) -> StatusCode {
    create_with(server, from, &[("x-forwarded-for", forwarded)])
        .await
        .0
}

/// Creates a session from source address `from` with extra headers; the status and the error
/// code, if any.
async fn create_with(
    server: &TestServer,
    from: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse().unwrap())
        .expect("bind a loopback source address");
    let stream = within("a TCP connect", socket.connect(server.addr))
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::post("/v1/sessions").header("host", server.addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"name": "x"}).to_string(),
        )))
        .unwrap();
    let response = within("a session", sender.send_request(request))
        .await
        .expect("a reply");
    let status = response.status();
    let body = within(
        "a body",
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await
    .expect("read the body")
    .to_bytes();
    let reply: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, reply["error"]["code"].clone())
}

#[tokio::test]
async fn trusted_proxies_name_the_client_and_others_cannot() {
    // Two sessions per client address at once, loopback clients counted too; only
    // 127.0.0.1 is a trusted proxy.
    let server = TestServer::with_config(Config {
        session_rate_limit: Some((0.001, 2.0)),
        session_rate_limit_loopback: true,
        trusted_proxies: switchyard::proxy::parse_trusted("127.0.0.1").unwrap(),
        ..Config::default()
    })
    .await;
    // Through the trusted proxy, each forwarded client has its own allowance.
    for _ in 0..2 {
        assert_eq!(
            create_from(&server, "127.0.0.1", "203.0.113.5").await,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        create_from(&server, "127.0.0.1", "203.0.113.5").await,
        StatusCode::TOO_MANY_REQUESTS,
        "the third from the same client"
    );
    // A forged leftmost entry does not help: the rightmost untrusted address is the client.
    assert_eq!(
        create_from(&server, "127.0.0.1", "198.51.100.1, 203.0.113.5").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        create_from(&server, "127.0.0.1", "203.0.113.6").await,
        StatusCode::CREATED
    );
    // From a peer that is not trusted, the header is ignored: every request is that peer's.
    for forwarded in ["192.0.2.1", "192.0.2.2"] {
        assert_eq!(
            create_from(&server, "127.0.0.2", forwarded).await,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        create_from(&server, "127.0.0.2", "192.0.2.3").await,
        StatusCode::TOO_MANY_REQUESTS,
        "a new forwarded address from an untrusted peer is still that peer"
    );
}

#[tokio::test]
async fn the_host_and_scheme_a_trusted_proxy_forwards_decide_the_origin_checks() {
    let server = TestServer::with_config(Config {
        allowed_hosts: vec!["chat.example".into()],
        trusted_proxies: switchyard::proxy::parse_trusted("127.0.0.1").unwrap(),
        ..Config::default()
    })
    .await;
    let page = |origin: &'static str, host: &'static str| {
        [
            ("origin", origin),
            ("x-forwarded-host", host),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "203.0.113.9"),
        ]
    };
    // The browser's page is https://chat.example; the proxy reached us on an IP address.
    let ok = create_with(
        &server,
        "127.0.0.1",
        &page("https://chat.example", "chat.example"),
    )
    .await;
    assert_eq!(ok.0, StatusCode::CREATED, "{ok:?}");
    let wrong_scheme = create_with(
        &server,
        "127.0.0.1",
        &page("http://chat.example", "chat.example"),
    )
    .await;
    assert_eq!(
        wrong_scheme,
        (StatusCode::FORBIDDEN, json!("forbidden_origin"))
    );
    let other_name = create_with(
        &server,
        "127.0.0.1",
        &page("https://evil.example", "evil.example"),
    )
    .await;
    assert_eq!(other_name, (StatusCode::FORBIDDEN, json!("forbidden_host")));
    // From an untrusted peer the forwarded host is ignored: the page is cross-origin.
    let untrusted = create_with(
        &server,
        "127.0.0.2",
        &page("https://chat.example", "chat.example"),
    )
    .await;
    assert_eq!(
        untrusted,
        (StatusCode::FORBIDDEN, json!("forbidden_origin"))
    );
}
