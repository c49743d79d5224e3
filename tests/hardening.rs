//! The HTTP edge: CORS on every answer to an allowed origin, the `Host` check against DNS
//! rebinding, security headers, `client_id` in every error event of a refused send, and line
//! separators escaped in event JSON.

mod support;

use std::net::SocketAddr;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{join, send, within, ws_event, ws_send, TestServer};
use switchyard::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 GET with this `Host`; returns the status line and the whole reply.
async fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> (String, String) {
    let mut stream = within("a TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    within("the reply", stream.read_to_end(&mut reply))
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply.lines().next().unwrap_or("").to_owned();
    (status, reply)
}

#[tokio::test]
async fn an_allowed_origin_gets_cors_headers_on_errors_too() {
    let server = TestServer::with_config(Config {
        allowed_origins: vec!["http://app.example".into()],
        ..Config::default()
    })
    .await;
    let origin = [("origin", "http://app.example")];
    let session = server.session("cors").await;
    let held = {
        let path = format!("/v1/sessions/{session}/poll?wait=3000");
        let server = TestServer::attached_to(server.addr);
        tokio::spawn(async move { server.request(Method::GET, &path, &[], "").await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let cases = [
        (
            Method::GET,
            "/v1/sessions/nope/poll?wait=0".to_owned(),
            "",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            format!("/v1/sessions/{session}/poll?wait=0&after=x"),
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("/v1/sessions/{session}/poll?wait=0"),
            "",
            StatusCode::CONFLICT,
        ),
        (
            Method::POST,
            format!("/v1/sessions/{session}/commands"),
            "x",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, path, body, expected) in cases {
        let (status, headers, reply) = server.request(method, &path, &origin, body).await;
        assert_eq!(status, expected, "{path}: {reply:?}");
        assert_eq!(
            headers["access-control-allow-origin"], "http://app.example",
            "{path} answers {status} with CORS"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }
    let big = "x".repeat(20_000);
    let path = format!("/v1/sessions/{session}/commands");
    let (status, headers, _) = server.request(Method::POST, &path, &origin, big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers["access-control-allow-origin"], "http://app.example");
    // Not to an origin that is not allowed.
    let (status, headers, _) = server
        .request(
            Method::GET,
            "/healthz",
            &[("origin", "http://evil.example")],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("access-control-allow-origin").is_none());
    within("the held poll", held).await.unwrap();
}

#[tokio::test]
async fn a_host_the_server_does_not_answer_to_is_refused() {
    let server = TestServer::with_config(Config {
        allowed_hosts: vec!["chat.example".into(), "other.example:9000".into()],
        ..Config::default()
    })
    .await;
    let port = server.addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]:8080".to_owned(),
        "chat.example".to_owned(),
        format!("chat.example:{port}"),
        "other.example:9000".to_owned(),
    ] {
        let (status, _) = get_with_host(server.addr, "/healthz", &host).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{host}: {status}");
    }
    for host in [
        "evil.example",
        "rebind.attacker.test:8080",
        "other.example:9001",
    ] {
        let (status, reply) = get_with_host(server.addr, "/", host).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{host}: {status}");
        assert!(reply.contains("\"code\":\"forbidden_host\""), "{reply}");
    }
}

#[tokio::test]
async fn every_answer_says_nosniff_and_the_pages_have_a_content_security_policy() {
    let server = TestServer::start().await;
    for path in ["/", "/compare", "/switchyard.js", "/healthz", "/nope"] {
        let (_, headers, _) = server.request(Method::GET, path, &[], "").await;
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
    for page in ["/", "/compare"] {
        let (status, headers, _) = server.request(Method::GET, page, &[], "").await;
        assert_eq!(status, StatusCode::OK);
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert_eq!(headers["x-frame-options"], "DENY");
    }
}

#[tokio::test]
async fn a_refused_send_names_its_client_id_whatever_failed() {
    let server = TestServer::start().await;
    let session = server.session("ids").await;
    let mut ws = server.websocket(&session, 0).await;
    ws_send(&mut ws, join("r")).await;
    for _ in 0..3 {
        ws_event(&mut ws).await; // history, presence, presence_diff
    }
    let refused = [
        (
            json!({"type": "send", "room": "bad room", "text": "hi", "client_id": "c1"}),
            "invalid_room",
        ),
        (
            json!({"type": "send", "room": "r", "text": "", "client_id": "c2"}),
            "invalid_text",
        ),
        (
            json!({"type": "send", "room": "elsewhere", "text": "hi", "client_id": "c3"}),
            "not_in_room",
        ),
    ];
    for (command, code) in refused {
        let client_id = command["client_id"].clone();
        ws_send(&mut ws, command).await;
        let event = ws_event(&mut ws).await;
        assert_eq!(event["type"], "error");
        assert_eq!(
            (&event["code"], &event["client_id"]),
            (&json!(code), &client_id)
        );
    }
}

#[tokio::test]
async fn line_separators_reach_every_transport_escaped() {
    let server = TestServer::start().await;
    let session = server.session("lines").await;
    server.ok(&session, join("r")).await;
    let text = "one\u{2028}two\u{2029}three\u{85}four";
    server.ok(&session, send("r", text, "l1")).await;
    // SSE, raw: no separator may appear in the stream's bytes.
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    let request =
        format!("GET /v1/sessions/{session}/sse?after=0 HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    within("the message on SSE", async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"client_id\":\"l1\"") {
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the stream ended");
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let stream = String::from_utf8(seen).unwrap();
    assert!(
        !stream.contains(['\u{2028}', '\u{2029}', '\u{85}']),
        "{stream}"
    );
    assert!(
        stream.contains(r"one\u2028two\u2029three\u0085four"),
        "{stream}"
    );
    // A poll reply decodes to the same text.
    let (_, reply) = server.poll(&session, 0, 0).await;
    let message: Vec<&Value> = reply["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .collect();
    assert_eq!(message[0]["text"], text);
}
