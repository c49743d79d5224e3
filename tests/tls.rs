//! TLS, HTTP/2 and WebSockets over HTTP/2, with real clients: rustls with a certificate made
//! by the test (rcgen), hyper's HTTP/2 client (one connection for every request of a
//! client), RFC 8441 extended CONNECT for the WebSocket, and tungstenite over each.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use support::{join, send, within, ws_close, ws_event, ws_send, SseStream, TestServer};
use switchyard::Config;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// A self-signed certificate for `localhost` and 127.0.0.1, in PEM files.
struct Cert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn certificate(dir: tempfile::TempDir) -> Cert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen makes a certificate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    Cert {
        der: made.cert.der().clone(),
        _dir: dir,
        cert,
        key,
    }
}

fn new_cert() -> Cert {
    certificate(tempfile::tempdir().unwrap())
}

async fn tls_server(cert: &Cert) -> TestServer {
    let tls = switchyard::tls::Tls::load(&cert.cert, &cert.key).expect("the certificate loads");
    TestServer::with_config(Config {
        tls: Some(tls),
        ..Config::default()
    })
    .await
}

/// A TLS connection trusting the certificates `trusted`, offering these ALPN protocols.
async fn tls_connect(
    addr: SocketAddr,
    trusted: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    for cert in trusted {
        roots.add((*cert).clone()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = within("a TCP connection", TcpStream::connect(addr))
        .await
        .unwrap();
    // As browsers do: without it each request's second write waits for a delayed ACK.
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    within(
        "a TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake")
}

/// An HTTP/2 connection over `io`; every request of the test shares it.
async fn h2<I>(io: I) -> SendRequest<Full<Bytes>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// A request on the HTTP/2 connection; returns the status and the response (body streaming).
async fn h2_send(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Value,
) -> hyper::Response<hyper::body::Incoming> {
    let request = Request::builder()
        .method(method)
        .uri(format!("https://{addr}{path}"))
        .body(Full::new(Bytes::from(if body.is_null() {
            String::new()
        } else {
            body.to_string()
        })))
        .unwrap();
    let response = within("an HTTP/2 response", sender.send_request(request))
        .await
        .expect("HTTP/2 request");
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    response
}

async fn h2_json(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let response = h2_send(sender, addr, method, path, body).await;
    let status = response.status();
    let body = within("an HTTP/2 body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).expect("a JSON body"))
}

/// Creates a session over the HTTP/2 connection; returns its id.
async fn h2_session(http: &mut SendRequest<Full<Bytes>>, addr: SocketAddr, name: &str) -> String {
    let body = json!({ "name": name });
    let (status, created) = h2_json(http, addr, Method::POST, "/v1/sessions", body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["session"].as_str().unwrap().to_owned()
}

/// Opens a WebSocket as a stream of the HTTP/2 connection (RFC 8441 extended CONNECT).
async fn h2_websocket(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    session: &str,
) -> WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{addr}/v1/sessions/{session}/ws?after=0"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = within("the extended CONNECT", sender.send_request(request))
        .await
        .expect("extended CONNECT");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the WebSocket is accepted"
    );
    let upgraded = within("the HTTP/2 stream", hyper::upgrade::on(response))
        .await
        .expect("an upgraded stream");
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await
}

/// One sample of `GET /metrics`, read over the HTTP/2 connection.
async fn h2_metric(http: &mut SendRequest<Full<Bytes>>, addr: SocketAddr, sample: &str) -> f64 {
    let response = h2_send(http, addr, Method::GET, "/metrics", Value::Null).await;
    let body = within("the metrics", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|line| line.strip_prefix(sample))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
}

/// Skips events until one of `kind`.
async fn next_of<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    kind: &str,
) -> Value {
    loop {
        let event = ws_event(ws).await;
        if event["type"] == kind {
            return event;
        }
    }
}

#[tokio::test]
async fn https_serves_every_endpoint_over_one_http2_connection() {
    let cert = new_cert();
    let server = tls_server(&cert).await;
    let addr = server.addr;
    let tls = tls_connect(addr, &[&cert.der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut http = h2(tls).await;

    let session = h2_session(&mut http, addr, "ann").await;
    let commands = format!("/v1/sessions/{session}/commands");
    let (status, _) = h2_json(&mut http, addr, Method::POST, &commands, join("lobby")).await;
    assert_eq!(status, StatusCode::OK);

    // An SSE stream and the commands that feed it share the connection.
    let stream = h2_send(
        &mut http,
        addr,
        Method::GET,
        &format!("/v1/sessions/{session}/sse?after=0"),
        Value::Null,
    )
    .await;
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    assert!(
        stream.headers().get("connection").is_none(),
        "no connection-specific header in HTTP/2"
    );
    let mut sse = SseStream::new(stream.into_body());
    assert_eq!(sse.next_event().await.event.as_deref(), Some("history"));
    let (status, _) = h2_json(
        &mut http,
        addr,
        Method::POST,
        &commands,
        send("lobby", "over h2", "c1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let message = loop {
        let event = sse.next_event().await;
        if event.event.as_deref() == Some("message") {
            break event;
        }
    };
    let last: u64 = message.id.unwrap().parse().unwrap();
    drop(sse);

    // A long poll, then a short poll, on the same connection.
    let (status, reply) = h2_json(
        &mut http,
        addr,
        Method::GET,
        &format!("/v1/sessions/{session}/poll?after={}&wait=5000", last - 1),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["events"][0]["text"], "over h2");
    let (status, reply) = h2_json(
        &mut http,
        addr,
        Method::GET,
        &format!("/v1/sessions/{session}/poll?after={last}&wait=0"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["events"], json!([]));

    for transport in ["sse", "long-polling", "short-polling"] {
        let sample =
            format!(r#"switchyard_attaches_by_http_total{{transport="{transport}",http="2"}}"#);
        assert_eq!(h2_metric(&mut http, addr, &sample).await, 1.0, "{sample}");
    }
    let sample = r#"switchyard_events_delivered_by_http_total{transport="sse",http="2"}"#;
    assert!(h2_metric(&mut http, addr, sample).await >= 2.0, "{sample}");

    // A client offering only HTTP/1.1 gets it.
    let tls = tls_connect(addr, &[&cert.der], &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn a_websocket_over_http2_chats_with_websockets_over_http1() {
    let cert = new_cert();
    let server = tls_server(&cert).await;
    let addr = server.addr;
    let mut http = h2(tls_connect(addr, &[&cert.der], &[b"h2"]).await).await;
    let ann = h2_session(&mut http, addr, "ann").await;
    let mut over_h2 = h2_websocket(&mut http, addr, &ann).await;

    // Bob: a WebSocket over HTTP/1.1 inside TLS.
    let bob = h2_session(&mut http, addr, "bob").await;
    let tls = tls_connect(addr, &[&cert.der], &[b"http/1.1"]).await;
    let url = format!("wss://{addr}/v1/sessions/{bob}/ws?after=0");
    let (mut over_h1, _) = within(
        "a WebSocket handshake over TLS",
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .expect("WebSocket over HTTP/1.1");

    ws_send(&mut over_h2, join("lobby")).await;
    next_of(&mut over_h2, "history").await;
    ws_send(&mut over_h1, join("lobby")).await;
    next_of(&mut over_h1, "history").await;
    ws_send(&mut over_h2, send("lobby", "from h2", "a1")).await;
    assert_eq!(next_of(&mut over_h1, "message").await["text"], "from h2");
    assert_eq!(next_of(&mut over_h2, "message").await["text"], "from h2");
    ws_send(&mut over_h1, send("lobby", "from h1", "b1")).await;
    assert_eq!(next_of(&mut over_h2, "message").await["text"], "from h1");
    assert_eq!(next_of(&mut over_h1, "message").await["text"], "from h1");

    // Which WebSocket travelled over which HTTP version, as the server saw it.
    for (version, count) in [("2", 1.0), ("1.1", 1.0)] {
        let sample = format!(
            r#"switchyard_attaches_by_http_total{{transport="websocket",http="{version}"}}"#
        );
        assert_eq!(h2_metric(&mut http, addr, &sample).await, count, "{sample}");
    }
    let sample = r#"switchyard_events_delivered_by_http_total{transport="websocket",http="2"}"#;
    assert!(h2_metric(&mut http, addr, sample).await >= 3.0, "{sample}");

    // The server closes the HTTP/2 WebSocket with the same codes as any other.
    let (status, _) = h2_json(
        &mut http,
        addr,
        Method::DELETE,
        &format!("/v1/sessions/{ann}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ws_close(&mut over_h2).await, (4003, "expired".to_owned()));
    // The connection lives on for the other streams.
    let (status, _) = h2_json(&mut http, addr, Method::GET, "/healthz", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn plain_http_speaks_http2_with_prior_knowledge() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut http = h2(tcp).await;
    let session = h2_session(&mut http, addr, "ann").await;
    let mut ws = h2_websocket(&mut http, addr, &session).await;
    ws_send(&mut ws, join("lobby")).await;
    next_of(&mut ws, "history").await;
    let sample = r#"switchyard_attaches_by_http_total{transport="websocket",http="2"}"#;
    assert_eq!(h2_metric(&mut http, addr, sample).await, 1.0);
}

#[tokio::test]
async fn a_bad_certificate_or_key_stops_the_server_with_one_line_naming_the_file() {
    let cert = new_cert();
    let other = new_cert();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
    for (cert_file, key_file, named) in [
        (path(&missing), path(&cert.key), path(&missing)),
        (path(&garbage), path(&cert.key), path(&garbage)),
        (path(&cert.cert), path(&garbage), path(&garbage)),
        // A key that is not the certificate's.
        (path(&cert.cert), path(&other.key), path(&other.key)),
    ] {
        let stderr = support::failing_start(&[
            "--history-store",
            "memory",
            "--tls-cert",
            &cert_file,
            "--tls-key",
            &key_file,
        ])
        .await;
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(&named),
            "the error names {named}: {stderr}"
        );
    }
}

/// The certificate a fresh TLS connection is shown.
async fn served_certificate(addr: SocketAddr, trusted: &CertificateDer<'static>) -> Vec<u8> {
    let tls = tls_connect(addr, &[trusted], &[b"h2"]).await;
    let certs = tls.get_ref().1.peer_certificates().expect("a certificate");
    certs[0].to_vec()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let first = new_cert();
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::copy(&first.cert, &cert_file).unwrap();
    std::fs::copy(&first.key, &key_file).unwrap();
    let server = support::ServerProcess::start(&[
        "--history-store",
        "memory",
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
    ])
    .await;
    let addr = server.addr;
    assert_eq!(
        served_certificate(addr, &first.der).await,
        first.der.to_vec()
    );

    // A WebSocket over HTTP/2 opened with the first certificate.
    let mut http = h2(tls_connect(addr, &[&first.der], &[b"h2"]).await).await;
    let session = h2_session(&mut http, addr, "ann").await;
    let mut ws = h2_websocket(&mut http, addr, &session).await;

    // A broken file first: the server keeps its certificate.
    std::fs::write(&cert_file, "broken").unwrap();
    hang_up(&server);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        served_certificate(addr, &first.der).await,
        first.der.to_vec()
    );
    let second = new_cert();
    std::fs::copy(&second.cert, &cert_file).unwrap();
    std::fs::copy(&second.key, &key_file).unwrap();
    hang_up(&server);
    within("the new certificate to be served", async {
        loop {
            let tls = tls_connect(addr, &[&first.der, &second.der], &[b"h2"]).await;
            let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            if served == second.der.to_vec() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;

    // The connection opened before the reload still works, and so does its WebSocket.
    ws_send(&mut ws, join("lobby")).await;
    next_of(&mut ws, "history").await;
    let (status, _) = h2_json(&mut http, addr, Method::GET, "/healthz", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

fn hang_up(server: &support::ServerProcess) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
}

async fn tls_server_with(cert: &Cert, config: Config) -> TestServer {
    let tls = switchyard::tls::Tls::load(&cert.cert, &cert.key).expect("the certificate loads");
    TestServer::with_config(Config {
        tls: Some(tls),
        ..config
    })
    .await
}

#[tokio::test]
async fn an_http2_websocket_that_goes_silent_is_closed_heartbeat_timeout() {
    let cert = new_cert();
    let server = tls_server_with(
        &cert,
        Config {
            heartbeat: std::time::Duration::from_millis(200),
            ..Config::default()
        },
    )
    .await;
    let addr = server.addr;
    let mut http = h2(tls_connect(addr, &[&cert.der], &[b"h2"]).await).await;
    let session = h2_session(&mut http, addr, "ann").await;
    let mut ws = h2_websocket(&mut http, addr, &session).await;
    // Not reading means not answering pings: after two heartbeats the server gives up.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        ws_close(&mut ws).await,
        (4004, "heartbeat_timeout".to_owned())
    );
}

#[tokio::test]
async fn an_http2_websocket_that_stops_reading_is_closed_and_its_session_loses_nothing() {
    let cert = new_cert();
    let server = tls_server_with(
        &cert,
        Config {
            heartbeat: std::time::Duration::from_millis(300),
            ..Config::default().with_rate_limit(100_000.0)
        },
    )
    .await;
    let addr = server.addr;
    let mut http = h2(tls_connect(addr, &[&cert.der], &[b"h2"]).await).await;
    let reader = h2_session(&mut http, addr, "reader").await;
    let writer = h2_session(&mut http, addr, "writer").await;
    for session in [&reader, &writer] {
        let commands = format!("/v1/sessions/{session}/commands");
        h2_json(&mut http, addr, Method::POST, &commands, join("r")).await;
    }
    // The reader's socket is a stream of its own HTTP/2 connection, never read.
    let mut reader_http = h2(tls_connect(addr, &[&cert.der], &[b"h2"]).await).await;
    let _ws = h2_websocket(&mut reader_http, addr, &reader).await;
    let text = "z".repeat(4000);
    let commands = format!("/v1/sessions/{writer}/commands");
    // A client that reads nothing answers no ping either: the server closes it for whichever
    // comes first, a write stuck for two heartbeats (slow_consumer) or two heartbeats of
    // silence (heartbeat_timeout).
    let closed = [
        r#"switchyard_transport_closes_total{transport="websocket",reason="slow_consumer"}"#,
        r#"switchyard_transport_closes_total{transport="websocket",reason="heartbeat_timeout"}"#,
    ];
    let mut sent = 0;
    within("the unread socket to be closed", async {
        loop {
            let (status, _) = h2_json(
                &mut http,
                addr,
                Method::POST,
                &commands,
                send("r", &text, &format!("m{sent}")),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            sent += 1;
            let text = server.hub.as_ref().unwrap().metrics().encode();
            let is_closed =
                |l: &&str| closed.iter().any(|c| l.starts_with(c)) && !l.ends_with(" 0");
            if sent >= 100 && text.lines().any(|l| is_closed(&l)) {
                return;
            }
        }
    })
    .await;
    // Nothing is lost: a poll from the start reads every message sent.
    let mut texts = 0;
    let mut after = 0;
    within("the reader to read every message", async {
        while texts < sent {
            let (_, reply) = h2_json(
                &mut http,
                addr,
                Method::GET,
                &format!("/v1/sessions/{reader}/poll?after={after}&wait=0"),
                Value::Null,
            )
            .await;
            for event in reply["events"].as_array().unwrap() {
                assert_eq!(event["seq"].as_u64().unwrap(), after + 1, "gapless");
                after += 1;
                if event["type"] == "message" {
                    texts += 1;
                }
            }
        }
    })
    .await;
}
