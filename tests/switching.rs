//! Switching transports mid-stream with no loss and no duplicates, resets when the resume
//! point is too old, and slow consumers resuming.

mod support;

use futures_util::StreamExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::{join, scenarios, send, within, TestServer};
use switchyard::protocol::TransportKind;
use switchyard::Config;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn hopping_across_all_transports_mid_stream_loses_and_repeats_nothing() {
    let server = TestServer::with_config(Config::default().with_rate_limit(10_000.0)).await;
    scenarios::hopping(&server).await;
}

#[tokio::test]
async fn a_resume_point_older_than_the_replay_window_gets_a_reset_then_fresh_history() {
    let config = Config {
        replay_window: 16,
        outbox_capacity: 8,
        ..Config::default().with_rate_limit(10_000.0)
    };
    let server = TestServer::with_config(config).await;
    let reader = server.session("reader").await;
    let writer = server.session("writer").await;
    server.ok(&reader, join("r")).await;
    server.ok(&writer, join("r")).await;
    let batch: Vec<Value> = (0..30)
        .map(|i| send("r", &format!("t{i}"), &format!("x{i}")))
        .collect();
    server.ok(&writer, Value::Array(batch)).await;
    // History, presence, a diff (or two) and the 30 messages.
    server.wait_for_seq(&reader, 33).await;

    let (status, reply) = server.poll(&reader, 1, 0).await;
    assert_eq!(status, StatusCode::OK);
    let events = reply["events"].as_array().unwrap();
    assert_eq!(events[0]["type"], "reset", "{reply}");
    assert_eq!(events[0]["reason"], "replay_window_exceeded");
    assert_eq!(events[1]["type"], "history");
    assert_eq!(events[1]["room"], "r");
    let texts: Vec<&str> = events[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 30);
    assert_eq!(texts[29], "t29");
    assert_eq!(
        events[2]["type"], "presence",
        "the room's members follow its history"
    );
    assert_eq!(
        events.len(),
        3,
        "nothing but reset, history and presence: {reply}"
    );
    let seq = events[2]["seq"].as_u64().unwrap();
    assert_eq!(events[0]["seq"].as_u64().unwrap() + 2, seq);

    // Live events follow the reset on any transport.
    let mut ws = server.attach(TransportKind::WebSocket, &reader, seq).await;
    server.ok(&writer, send("r", "live", "live")).await;
    let live = ws.next_of("message").await;
    assert_eq!(live["text"], "live");
}

#[tokio::test]
async fn a_slow_websocket_consumer_is_disconnected_and_resumes_without_a_gap() {
    // The window holds the whole flood, so the consumer can resume after reading the socket.
    let config = Config {
        max_message_bytes: 1 << 20,
        replay_window: 8192,
        replay_bytes: 64 << 20,
        ..Config::default().with_rate_limit(1_000_000.0)
    };
    let server = TestServer::with_config(config).await;
    let slow = server.session("slow").await;
    let writer = server.session("writer").await;
    server.ok(&slow, join("flood")).await;
    server.ok(&writer, join("flood")).await;
    let mut ws = server.websocket(&slow, 0).await;

    // Far more than the socket buffers hold, while the client reads nothing.
    let text = "x".repeat(4000);
    let total = 4000;
    for chunk in 0..total / 100 {
        let batch: Vec<Value> = (0..100)
            .map(|i| send("flood", &text, &format!("f{}", chunk * 100 + i)))
            .collect();
        server.ok(&writer, Value::Array(batch)).await;
    }

    // Now read what made it into the socket: the stream ends (4001, or the connection is
    // dropped when even the close frame cannot be written) before all messages arrive.
    let mut last_seq = 0;
    let mut close = None;
    loop {
        match within("the slow socket to drain", ws.next()).await {
            Some(Ok(Message::Text(frame))) => {
                let event: Value = serde_json::from_str(&frame).unwrap();
                let seq = event["seq"].as_u64().unwrap();
                assert_eq!(seq, last_seq + 1);
                last_seq = seq;
            }
            Some(Ok(Message::Close(frame))) => {
                close = frame.map(|f| u16::from(f.code));
                break;
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break,
        }
    }
    if let Some(code) = close {
        assert_eq!(code, 4001, "closed as slow_consumer");
    }

    // Resume from the last seq read: the rest arrives, contiguous, up to the last message.
    let mut client = server
        .attach(TransportKind::LongPolling, &slow, last_seq)
        .await;
    let mut last_text_id = String::new();
    while last_text_id != format!("f{}", total - 1) {
        let event = client.next().await;
        assert_ne!(event["type"], "reset", "resume within the window");
        if event["type"] == "message" {
            last_text_id = event["client_id"].as_str().unwrap().to_owned();
        }
    }
    assert!(
        last_seq < total as u64,
        "the consumer was cut off before the end"
    );
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_which_wins_over_after() {
    let server = TestServer::start().await;
    let session = server.session("sse").await;
    // Seqs 1-6: history, presence and presence_diff of each room.
    server.ok(&session, json!([join("a"), join("b")])).await;
    let mut stream = server
        .sse(&session, "?after=0", &[("last-event-id", "5")])
        .await;
    let event = stream.next_event().await;
    assert_eq!(event.id.as_deref(), Some("6"), "{event:?}");
    assert_eq!(event.event.as_deref(), Some("presence_diff"));
    let (status, _, _) = server
        .request(
            Method::GET,
            &format!("/v1/sessions/{session}/sse?after=1"),
            &[("last-event-id", "nope")],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
