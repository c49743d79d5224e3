//! Every bad input gets its stable error code, on HTTP and on the WebSocket, and loses
//! nothing: the WebSocket stays open and later commands still work.

mod support;

use futures_util::SinkExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{join, send, within, ws_event, ws_send, TestServer};
use switchyard::protocol::TransportKind;
use switchyard::Config;
use tokio_tungstenite::tungstenite::Message;

/// Bad commands with the code each must get.
fn bad_commands() -> Vec<(&'static str, String)> {
    let long_text = "y".repeat(4001);
    vec![
        ("bad_command", "{not json".to_owned()),
        (
            "bad_command",
            r#"{"type":"dance","room":"lobby"}"#.to_owned(),
        ),
        ("bad_command", r#"{"room":"lobby"}"#.to_owned()),
        ("bad_command", r#"{"type":"join"}"#.to_owned()),
        ("bad_command", r#"{"type":"join","room":7}"#.to_owned()),
        (
            "bad_command",
            r#"{"type":"send","room":"lobby","text":"no id"}"#.to_owned(),
        ),
        ("bad_command", "[]".to_owned()),
        ("bad_command", "\"join\"".to_owned()),
        (
            "invalid_room",
            r#"{"type":"join","room":"no spaces"}"#.to_owned(),
        ),
        ("invalid_room", r#"{"type":"join","room":""}"#.to_owned()),
        (
            "invalid_room",
            format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(65)),
        ),
        (
            "invalid_text",
            r#"{"type":"send","room":"lobby","text":"","client_id":"c"}"#.to_owned(),
        ),
        (
            "invalid_text",
            format!(r#"{{"type":"send","room":"lobby","text":"{long_text}","client_id":"c"}}"#),
        ),
        (
            "not_in_room",
            r#"{"type":"send","room":"elsewhere","text":"hi","client_id":"c"}"#.to_owned(),
        ),
        (
            "not_in_room",
            r#"{"type":"typing","room":"elsewhere"}"#.to_owned(),
        ),
        (
            "not_in_room",
            r#"{"type":"leave","room":"elsewhere"}"#.to_owned(),
        ),
        ("bad_command", r#"{"type":"ack"}"#.to_owned()),
        ("bad_command", r#"{"type":"ack","seq":-1}"#.to_owned()),
        ("bad_command", r#"{"type":"ack","seq":"3"}"#.to_owned()),
        ("invalid_ack", r#"{"type":"ack","seq":999999}"#.to_owned()),
        (
            "too_large",
            format!(r#"{{"type":"join","room":"{}"}}"#, "z".repeat(17 * 1024)),
        ),
    ]
}

fn status_for(code: &str) -> StatusCode {
    match code {
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    }
}

#[tokio::test]
async fn bad_commands_over_http_get_their_code_and_status() {
    let server = TestServer::start().await;
    let session = server.session("http").await;
    server.ok(&session, join("lobby")).await;
    for (code, body) in bad_commands() {
        let (status, _, reply) = server
            .request(
                Method::POST,
                &format!("/v1/sessions/{session}/commands"),
                &[("content-type", "application/json")],
                body.clone(),
            )
            .await;
        let reply: Value = serde_json::from_slice(&reply).expect("JSON error body");
        assert_eq!(status, status_for(code), "{body:.80} -> {reply}");
        assert_eq!(reply["error"]["code"], code, "{body:.80} -> {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Nothing was lost: the session still works.
    server.ok(&session, send("lobby", "still here", "ok")).await;
}

#[tokio::test]
async fn bad_commands_over_websocket_get_error_events_and_the_socket_stays_open() {
    let server = TestServer::start().await;
    let session = server.session("ws").await;
    let mut ws = server.websocket(&session, 0).await;
    ws_send(&mut ws, join("lobby")).await;
    assert_eq!(ws_event(&mut ws).await["type"], "history");
    assert_eq!(ws_event(&mut ws).await["type"], "presence");
    assert_eq!(ws_event(&mut ws).await["type"], "presence_diff");
    for (code, body) in bad_commands() {
        within("a ws send", ws.send(Message::text(body.clone())))
            .await
            .unwrap();
        let event = ws_event(&mut ws).await;
        assert_eq!(event["type"], "error", "{body:.80} -> {event}");
        assert_eq!(event["code"], code, "{body:.80} -> {event}");
    }
    within("a binary frame", ws.send(Message::binary(vec![1, 2, 3])))
        .await
        .unwrap();
    let event = ws_event(&mut ws).await;
    assert_eq!(
        (event["type"].as_str(), event["code"].as_str()),
        (Some("error"), Some("bad_command"))
    );

    ws_send(&mut ws, send("elsewhere", "lost?", "which-one")).await;
    let event = ws_event(&mut ws).await;
    assert_eq!(event["code"], "not_in_room");
    assert_eq!(
        event["client_id"], "which-one",
        "a failed send names its client_id"
    );

    ws_send(&mut ws, send("lobby", "still open", "s1")).await;
    let echo = ws_event(&mut ws).await;
    assert_eq!(echo["text"], "still open");
}

#[tokio::test]
async fn a_websocket_frame_past_the_hard_limit_closes_with_1009() {
    let server = TestServer::start().await;
    let session = server.session("huge").await;
    let mut ws = server.websocket(&session, 0).await;
    let huge = "h".repeat((1 << 20) + 10);
    let _ = ws.send(Message::text(huge)).await;
    let (code, reason) = support::ws_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1009, "too_large"));
}

#[tokio::test]
async fn batches_apply_in_order_with_a_result_per_command() {
    let server = TestServer::start().await;
    let session = server.session("batch").await;
    let (status, reply) = server
        .commands(
            &session,
            json!([join("a"), send("b", "x", "1"), send("a", "y", "2")]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["results"][0], json!({"ok": true}));
    assert_eq!(reply["results"][1]["error"]["code"], "not_in_room");
    assert_eq!(reply["results"][2]["ok"], true);
    assert_eq!(reply["error"]["code"], "not_in_room");
    let too_many: Vec<Value> = (0..101).map(|_| join("a")).collect();
    let (status, reply) = server.commands(&session, Value::Array(too_many)).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_command"))
    );
}

#[tokio::test]
async fn a_retried_send_is_not_broadcast_twice() {
    let server = TestServer::start().await;
    let ann = server.session("ann").await;
    let bob = server.session("bob").await;
    server.ok(&ann, join("r")).await;
    server.ok(&bob, join("r")).await;
    let mut ann_ws = server.attach(TransportKind::WebSocket, &ann, 0).await;
    let mut bob_ws = server.attach(TransportKind::WebSocket, &bob, 0).await;
    let first = server.ok(&ann, send("r", "once", "same")).await;
    let again = server.ok(&ann, send("r", "once", "same")).await;
    assert_eq!(first["results"][0]["duplicate"], false);
    assert_eq!(again["results"][0]["duplicate"], true);
    assert_eq!(first["results"][0]["id"], again["results"][0]["id"]);
    let echo1 = ann_ws.next_of("message").await;
    let echo2 = ann_ws.next_of("message").await;
    assert_eq!(echo1["id"], echo2["id"], "the original echoed again");
    assert_eq!(support::without_ts(echo1.clone())["text"], "once");
    assert_eq!(echo1["ts"], echo2["ts"]);
    server.ok(&ann, send("r", "next", "other")).await;
    assert_eq!(bob_ws.next_of("message").await["text"], "once");
    assert_eq!(
        bob_ws.next_of("message").await["text"],
        "next",
        "bob got no second copy"
    );
}

#[tokio::test]
async fn the_rate_limit_answers_429_over_http_and_an_error_event_over_websocket() {
    let server = TestServer::start().await;
    let session = server.session("fast").await;
    server.ok(&session, join("r")).await;
    let batch: Vec<Value> = (0..45)
        .map(|i| send("r", "spam", &format!("s{i}")))
        .collect();
    let (status, reply) = server.commands(&session, Value::Array(batch)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{reply}");
    let limited = reply["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["error"]["code"] == "rate_limited")
        .count();
    // 40 tokens at once (one was spent on the join, a few refilled while sending).
    assert!((3..=8).contains(&limited), "{limited} limited: {reply}");

    let other = server.session("fast-ws").await;
    let mut ws = server.websocket(&other, 0).await;
    let burst: Vec<Value> = (0..41)
        .map(|_| json!({"type": "typing", "room": "nope"}))
        .collect();
    ws_send(&mut ws, Value::Array(burst)).await;
    let mut codes = Vec::new();
    for _ in 0..41 {
        codes.push(ws_event(&mut ws).await["code"].as_str().unwrap().to_owned());
    }
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
}

#[tokio::test]
async fn a_room_over_its_message_rate_answers_429_with_when_to_retry() {
    let server = TestServer::with_config(Config {
        room_rate_limit: Some((1.0, 2.0)),
        ..Config::default()
    })
    .await;
    let ann = server.session("ann").await;
    let bob = server.session("bob").await;
    server.ok(&ann, join("busy")).await;
    server.ok(&bob, join("busy")).await;
    server.ok(&ann, send("busy", "one", "a1")).await;
    server.ok(&bob, send("busy", "two", "b1")).await;
    // The room's burst of 2 is spent, whoever sent it.
    let (status, headers, body) = server
        .request(
            Method::POST,
            &format!("/v1/sessions/{ann}/commands"),
            &[],
            send("busy", "three", "a2").to_string(),
        )
        .await;
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{reply}");
    assert_eq!(reply["error"]["code"], "rate_limited");
    let wait = reply["error"]["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&wait), "{reply}");
    assert_eq!(headers["retry-after"], "1");
    // Other rooms are not affected.
    server
        .ok(&ann, json!([join("calm"), send("calm", "fine", "a3")]))
        .await;
    // Over the WebSocket, the refused send's error event names its client_id and the wait.
    let mut ws = server.websocket(&bob, 0).await;
    ws_send(&mut ws, send("busy", "four", "b2")).await;
    let refused = loop {
        let event = ws_event(&mut ws).await;
        if event["type"] == "error" {
            break event;
        }
    };
    assert_eq!(refused["code"], "rate_limited");
    assert_eq!(refused["client_id"], "b2");
    assert!(refused["retry_after_ms"].as_u64().is_some(), "{refused}");
}

#[tokio::test]
async fn session_creation_is_rate_limited_per_client_address() {
    let server = TestServer::with_config(Config {
        session_rate_limit: Some((1.0, 2.0)),
        session_rate_limit_loopback: true,
        ..Config::default()
    })
    .await;
    server.session("one").await;
    server.session("two").await;
    let (status, headers, body) = server
        .request(Method::POST, "/v1/sessions", &[], r#"{"name":"three"}"#)
        .await;
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{reply}");
    assert_eq!(reply["error"]["code"], "rate_limited");
    assert!(reply["error"]["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(headers["retry-after"], "1");
    // Loopback clients are exempt by default.
    let exempt = TestServer::with_config(Config {
        session_rate_limit: Some((1.0, 1.0)),
        ..Config::default()
    })
    .await;
    for i in 0..5 {
        exempt.session(&format!("local{i}")).await;
    }
}

#[tokio::test]
async fn http_errors_have_stable_codes() {
    let config = Config {
        transports: vec![TransportKind::WebSocket, TransportKind::Sse],
        allowed_origins: vec!["http://allowed.example".into()],
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    let session = server.session("errs").await;
    let cases: Vec<(Method, String, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::GET,
            "/v1/sessions/nope/poll?wait=0".into(),
            None,
            StatusCode::NOT_FOUND,
            "transport_disabled",
        ),
        (
            Method::GET,
            "/v1/sessions/nope/sse".into(),
            None,
            StatusCode::NOT_FOUND,
            "unknown_session",
        ),
        (
            Method::POST,
            "/v1/sessions/nope/commands".into(),
            Some(join("a")),
            StatusCode::NOT_FOUND,
            "unknown_session",
        ),
        (
            Method::DELETE,
            "/v1/sessions/nope".into(),
            None,
            StatusCode::NOT_FOUND,
            "unknown_session",
        ),
        (
            Method::GET,
            "/v1/sessions/nope/ws".into(),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            format!("/v1/sessions/{session}/sse?after=99"),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_after",
        ),
        (
            Method::GET,
            format!("/v1/sessions/{session}/sse?after=x"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/nowhere".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/sessions".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::PUT,
            format!("/v1/sessions/{session}/commands"),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/v1/sessions".into(),
            Some(json!({"name": ""})),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/sessions".into(),
            Some(json!({"name": "x".repeat(33)})),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/sessions".into(),
            Some(json!({"name": "bell\u{7}"})),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/sessions".into(),
            Some(json!({"nom": "x"})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, reply) = server.json(method.clone(), &path, body).await;
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {reply}"
        );
    }
    let (_, headers, _) = server.request(Method::GET, "/v1/sessions", &[], "").await;
    assert_eq!(headers["allow"], "POST");
    let (status, headers, _) = server
        .request(Method::PUT, &format!("/v1/sessions/{session}"), &[], "")
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, DELETE");
}

#[tokio::test]
async fn polls_check_their_parameters_and_allow_one_at_a_time() {
    let server = TestServer::start().await;
    let session = server.session("poller").await;
    let (status, reply) = server
        .json(
            Method::GET,
            &format!("/v1/sessions/{session}/poll?wait=soon"),
            None,
        )
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    let held = tokio::spawn(support::poll_json(
        server.addr,
        Box::leak(format!("/v1/sessions/{session}/poll?wait=3000").into_boxed_str()),
    ));
    // Once the first poll is held, a second one (long or short) is refused. Short polls
    // probe for that moment without ever holding a poll themselves.
    let mut second = (StatusCode::OK, Value::Null);
    for _ in 0..200 {
        second = server.poll(&session, 0, 0).await;
        if second.0 == StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(second.0, StatusCode::CONFLICT, "{}", second.1);
    assert_eq!(second.1["error"]["code"], "poll_in_progress");
    let (status, reply) = server.poll(&session, 0, 1000).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("poll_in_progress"))
    );
    server.ok(&session, join("wake")).await;
    let (status, first) = within("the held poll", held).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["events"][0]["type"], "history", "{first}");
}

#[tokio::test]
async fn cross_origin_requests_need_an_allowed_origin() {
    let config = Config {
        allowed_origins: vec!["http://allowed.example".into()],
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    let body = json!({"name": "o"}).to_string();
    let host_origin = format!("http://{}", server.addr);
    let (status, _, reply) = server
        .request(
            Method::POST,
            "/v1/sessions",
            &[("origin", "http://evil.example")],
            body.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&reply).contains("forbidden_origin"));
    let (status, headers, _) = server
        .request(
            Method::POST,
            "/v1/sessions",
            &[("origin", "http://allowed.example")],
            body.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://allowed.example"
    );
    let (status, _, _) = server
        .request(
            Method::POST,
            "/v1/sessions",
            &[("origin", host_origin.as_str())],
            body.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "same origin is allowed");
    let (status, headers, _) = server
        .request(
            Method::OPTIONS,
            "/v1/sessions",
            &[("origin", "http://allowed.example")],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-methods"], "POST");
    let session = server.session("ws-origin").await;
    let request = tokio_tungstenite::tungstenite::http::Request::builder()
        .uri(format!("ws://{}/v1/sessions/{session}/ws", server.addr))
        .header("host", server.addr.to_string())
        .header("origin", "http://evil.example")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(())
        .unwrap();
    let refused = within(
        "a refused handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected 403, got {other:?}"),
    }
}

#[tokio::test]
async fn limits_on_rooms_and_sessions_answer_with_their_codes() {
    let config = Config {
        max_rooms_per_session: 3,
        max_rooms: 4,
        max_sessions: 2,
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    let ann = server.session("ann").await;
    server
        .ok(&ann, json!([join("a"), join("b"), join("c")]))
        .await;
    let (status, reply) = server.commands(&ann, join("d")).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("too_many_rooms"))
    );

    // Four rooms exist; a fifth needs an empty one to drop, and all four have members.
    let bob = server.session("bob").await;
    server.ok(&bob, join("d")).await;
    let (status, reply) = server.commands(&bob, join("e")).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("server_full"))
    );
    // Once a room empties, it makes way (its history goes with it).
    server.ok(&ann, json!({"type": "leave", "room": "a"})).await;
    server.ok(&bob, join("e")).await;

    let (status, reply) = server
        .json(Method::POST, "/v1/sessions", Some(json!({"name": "third"})))
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("server_full"))
    );
}

#[tokio::test]
async fn a_server_shutting_down_refuses_new_sessions_and_transports() {
    let server = TestServer::start().await;
    let session = server.session("late").await;
    server.hub.as_ref().expect("in-process hub").shutdown();
    let (status, reply) = server
        .json(Method::POST, "/v1/sessions", Some(json!({"name": "later"})))
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
    );
    let (status, reply) = server.poll(&session, 0, 0).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
    );
}

#[tokio::test]
async fn a_session_is_created_only_from_a_json_object() {
    let server = TestServer::start().await;
    for body in [r#"["bob"]"#, r#""bob""#, "7", "null", "{}"] {
        let (status, _, reply) = server
            .request(Method::POST, "/v1/sessions", &[], body)
            .await;
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{body}: {reply}");
    }
}
