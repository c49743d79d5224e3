//! Session lifecycle: superseding, expiry and `presence left`, DELETE, heartbeats and graceful
//! shutdown of open WebSocket, SSE and long-poll connections.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{join, within, ws_close, TestServer};
use switchyard::protocol::TransportKind;
use switchyard::Config;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_new_transport_supersedes_the_old_one_which_is_told_why() {
    let server = TestServer::start().await;
    let session = server.session("hop").await;
    let mut ws = server.websocket(&session, 0).await;
    let mut sse = server.sse(&session, "", &[]).await;
    assert_eq!(ws_close(&mut ws).await, (4000, "superseded".to_owned()));

    let path = format!("/v1/sessions/{session}/poll?wait=5000");
    let held = tokio::spawn(support::poll_json(
        server.addr,
        Box::leak(path.into_boxed_str()),
    ));
    let close = sse.next_event().await;
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.id, None, "the close event has no id line");
    assert_eq!(
        serde_json::from_str::<Value>(&close.data).unwrap(),
        json!({"reason": "superseded"})
    );
    assert!(
        sse.next_block().await.is_none(),
        "the stream ends after close"
    );

    let _ws = server.websocket(&session, 0).await;
    let (status, reply) = within("the superseded poll", held).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply, json!({"events": [], "closed": "superseded"}));
}

#[tokio::test]
async fn an_unattached_session_expires_after_its_ttl_and_its_rooms_see_it_leave() {
    let config = Config {
        session_ttl: Duration::from_millis(300),
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    let watcher = server.session("watcher").await;
    let mut ws = server.attach(TransportKind::WebSocket, &watcher, 0).await;
    server.ok(&watcher, join("room")).await;
    let poller = server.session("poller").await;
    let talker = server.session("talker").await;
    server.ok(&poller, join("room")).await;
    server.ok(&talker, join("room")).await;

    // The poller keeps polling; the talker only sends commands, which do not keep it alive.
    let started = Instant::now();
    let mut after = 0;
    let mut talker_alive = true;
    while started.elapsed() < Duration::from_millis(1200) {
        let (status, reply) = server.poll(&poller, after, 0).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the polling session stays alive: {reply}"
        );
        if let Some(last) = reply["events"].as_array().unwrap().last() {
            after = last["seq"].as_u64().unwrap();
        }
        if talker_alive {
            let (status, _) = server
                .commands(&talker, json!({"type": "typing", "room": "room"}))
                .await;
            talker_alive = status == StatusCode::OK;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!talker_alive, "commands alone do not keep a session alive");
    let (status, reply) = server.commands(&talker, join("room")).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_session"))
    );

    let left = loop {
        let event = ws.next_of("presence_diff").await;
        if event["left"] != json!([]) {
            break event;
        }
    };
    assert_eq!(left["left"], json!(["talker"]));
    assert_eq!(left["count"], 2, "the watcher and the poller");
}

#[tokio::test]
async fn a_session_can_be_described_and_its_creation_reply_names_the_limits() {
    let server = TestServer::start().await;
    let (status, created) = server
        .json(Method::POST, "/v1/sessions", Some(json!({"name": "desc"})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        created["transports"],
        json!(["websocket", "sse", "long-polling", "short-polling"])
    );
    assert_eq!(
        (
            created["heartbeat_ms"].as_u64(),
            created["long_poll_ms"].as_u64(),
            created["replay_window"].as_u64()
        ),
        (Some(15000), Some(25000), Some(1024))
    );
    assert_eq!(
        (
            created["rate_limit_per_sec"].as_f64(),
            created["rate_limit_burst"].as_f64()
        ),
        (Some(20.0), Some(40.0))
    );
    let id = created["session"].as_str().unwrap();
    assert_eq!(id.len(), 32, "128-bit id in hex");
    server.ok(id, json!([join("one"), join("two")])).await;
    let _ws = server.websocket(id, 0).await;
    let path = format!("/v1/sessions/{id}");
    // Attached, and the joins' six events pushed (they reach the session a moment after the
    // commands return).
    let described = support::within("the session described attached with 6 events", async {
        loop {
            let (status, body) = server.json(Method::GET, &path, None).await;
            assert_eq!(status, StatusCode::OK);
            if body["attached"] == "websocket" && body["last_seq"] == 6 {
                break body;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        described,
        json!({"session": id, "name": "desc", "last_seq": 6, "oldest_seq": 1, "attached": "websocket", "rooms": ["one", "two"]})
    );
    // An ack of the first four: the session keeps the last two for resume.
    server.ok(id, json!({"type": "ack", "seq": 4})).await;
    let (_, described) = server.json(Method::GET, &path, None).await;
    assert_eq!(
        (
            described["last_seq"].as_u64(),
            described["oldest_seq"].as_u64()
        ),
        (Some(6), Some(5)),
        "{described}"
    );
}

#[tokio::test]
async fn delete_ends_the_session_closes_its_transport_and_leaves_its_rooms() {
    let server = TestServer::start().await;
    let ann = server.session("ann").await;
    let bob = server.session("bob").await;
    server.ok(&ann, join("r")).await;
    server.ok(&bob, join("r")).await;
    let mut bob_events = server.attach(TransportKind::LongPolling, &bob, 0).await;
    let mut ws = server.websocket(&ann, 0).await;
    let (status, reply) = server
        .json(Method::DELETE, &format!("/v1/sessions/{ann}"), None)
        .await;
    assert_eq!((status, reply), (StatusCode::OK, json!({"ended": true})));
    assert_eq!(ws_close(&mut ws).await, (4003, "expired".to_owned()));
    let left = loop {
        let event = bob_events.next_of("presence_diff").await;
        if event["left"] != json!([]) {
            break event;
        }
    };
    assert_eq!(
        (&left["left"], &left["count"]),
        (&json!(["ann"]), &json!(1))
    );
    let (status, _) = server.poll(&ann, 0, 0).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn heartbeats_ping_websockets_keep_sse_alive_and_close_silent_sockets() {
    let config = Config {
        heartbeat: Duration::from_millis(100),
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    let session = server.session("beat").await;
    let mut sse = server.sse(&session, "", &[]).await;
    // A `ready` event at once, then visible heartbeats: none with an id, so none moves the
    // resume point.
    let ready = sse.next_block().await.expect("stream open");
    assert_eq!(ready.event.as_deref(), Some("ready"), "{ready:?}");
    assert_eq!(ready.id, None);
    assert_eq!(
        serde_json::from_str::<Value>(&ready.data).unwrap(),
        json!({"type": "ready", "heartbeat_ms": 100})
    );
    for _ in 0..2 {
        let beat = sse.next_block().await.expect("stream open");
        assert_eq!(beat.event.as_deref(), Some("heartbeat"), "{beat:?}");
        assert_eq!(
            (beat.id, beat.data.as_str()),
            (None, r#"{"type":"heartbeat"}"#)
        );
    }

    // A WebSocket that reads (and so answers pings) sees a heartbeat frame, without a seq.
    let mut reader = server.websocket(&session, 0).await;
    let beat = loop {
        match within("a heartbeat frame", reader.next()).await {
            Some(Ok(Message::Text(text))) => break text.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    };
    assert_eq!(beat, r#"{"type":"heartbeat"}"#);
    drop(reader);

    let mut ws = server.websocket(&session, 0).await;
    // This client reads nothing, so it answers no ping: the server gives up after two beats.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ws_close(&mut ws).await,
        (4004, "heartbeat_timeout".to_owned())
    );
}

#[tokio::test]
async fn shutdown_closes_open_websocket_sse_and_long_poll_connections() {
    let mut server = TestServer::start().await;
    let a = server.session("a").await;
    let b = server.session("b").await;
    let c = server.session("c").await;
    let mut ws = server.websocket(&a, 0).await;
    let mut sse = server.sse(&b, "", &[]).await;
    let path = format!("/v1/sessions/{c}/poll?wait=20000");
    let held = tokio::spawn(support::poll_json(
        server.addr,
        Box::leak(path.into_boxed_str()),
    ));
    // Wait until the long poll is held: a short poll is refused only then.
    for _ in 0..200 {
        if server.poll(&c, 0, 0).await.0 == StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    let addr = server.addr;
    let stopping = tokio::spawn(async move { server.stop().await });
    assert_eq!(ws_close(&mut ws).await, (4002, "shutdown".to_owned()));
    let close = sse.next_event().await;
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(
        serde_json::from_str::<Value>(&close.data).unwrap(),
        json!({"reason": "shutdown"})
    );
    let (status, reply) = within("the held poll", held).await.unwrap();
    assert_eq!(
        (status, reply),
        (StatusCode::OK, json!({"events": [], "closed": "shutdown"}))
    );
    within("run() to return", stopping).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited in {:?}",
        started.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
