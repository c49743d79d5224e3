//! Each transport alone, transports chatting with each other, and the same conversation
//! observed over all four transports.

mod support;

use serde_json::{json, Value};
use support::{join, scenarios, send, ws_event, ws_send, TestServer};
use switchyard::protocol::TransportKind;

/// Reads events until `count` messages came; returns each message's seq.
async fn message_seqs(client: &mut support::Client, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < count {
        let event = client.next_of("message").await;
        seqs.push(event["seq"].as_u64().expect("seq"));
    }
    seqs
}

/// An `ack` (over `/commands` here) and a poll's resume point let the session forget what the
/// client processed: a resume from the acknowledged seq gets every later event, one from
/// before it a `reset`, and an `ack` past the last seq is refused.
#[tokio::test]
async fn an_ack_frees_what_the_client_processed_and_a_resume_from_it_loses_nothing() {
    let server = TestServer::start().await;
    let ann = server.session("ann").await;
    let mut sse = server.attach(TransportKind::Sse, &ann, 0).await;
    server.ok(&ann, join("acks")).await;
    for i in 0..5 {
        server
            .ok(&ann, send("acks", &format!("m{i}"), &format!("c{i}")))
            .await;
    }
    let seqs = message_seqs(&mut sse, 5).await;
    let acked = seqs[2];
    let reply = server.ok(&ann, json!({"type": "ack", "seq": acked})).await;
    assert_eq!(reply["results"][0], json!({"ok": true}));
    // Again, and lower: harmless.
    server
        .ok(
            &ann,
            json!([{"type": "ack", "seq": acked}, {"type": "ack", "seq": 1}]),
        )
        .await;
    let (status, reply) = server
        .commands(&ann, json!({"type": "ack", "seq": seqs[4] + 1}))
        .await;
    assert_eq!(status, hyper::StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(
        reply["results"][0]["error"]["code"], "invalid_ack",
        "{reply}"
    );
    drop(sse);

    // From the acknowledged seq: the two later messages, nothing lost.
    let mut poll = server.attach(TransportKind::LongPolling, &ann, acked).await;
    let texts = [poll.next().await, poll.next().await];
    assert_eq!(texts.map(|e| e["text"].clone()), [json!("m3"), json!("m4")]);
    // From before it: those events are gone, so a reset and fresh histories.
    let (_, reply) = server.poll(&ann, acked - 1, 0).await;
    let events = reply["events"].as_array().expect("events");
    assert_eq!(events[0]["type"], "reset", "{reply}");
    assert_eq!(events[0]["seq"].as_u64(), Some(seqs[4] + 1), "{reply}");
    assert_eq!(events[1]["type"], "history", "{reply}");
    assert_eq!(events[1]["messages"].as_array().map(Vec::len), Some(5));

    // A poll's `after` acknowledges too: this one the reset's, the events before it gone.
    let last = events.last().and_then(|e| e["seq"].as_u64()).expect("seq");
    let (_, reply) = server.poll(&ann, last, 0).await;
    assert_eq!(reply["events"], json!([]), "{reply}");
    let (_, reply) = server.poll(&ann, seqs[4] + 1, 0).await;
    assert_eq!(reply["events"][0]["type"], "reset", "{reply}");
    assert!(reply["events"][0]["seq"].as_u64() > Some(last), "{reply}");
}

/// Over a WebSocket an `ack` is a frame. A retried send whose echo was acknowledged is still
/// not broadcast again; a single server does not echo it again either (a cluster node does:
/// its retry table is in Redis).
#[tokio::test]
async fn a_websocket_acks_with_a_frame_and_an_acknowledged_echo_is_not_sent_again() {
    let server = TestServer::start().await;
    let ann = server.session("ann").await;
    let bob = server.session("bob").await;
    let mut ws = server.websocket(&ann, 0).await;
    ws_send(&mut ws, join("r")).await;
    server.ok(&bob, join("r")).await;
    let mut bob_poll = server.attach(TransportKind::ShortPolling, &bob, 0).await;
    ws_send(&mut ws, send("r", "once", "same")).await;
    let echo = loop {
        let event = ws_event(&mut ws).await;
        if event["type"] == "message" {
            break event;
        }
    };
    let seq = echo["seq"].as_u64().expect("seq");
    ws_send(&mut ws, json!({"type": "ack", "seq": seq})).await;
    // A bad ack gets its error event; the socket stays open.
    ws_send(&mut ws, json!({"type": "ack", "seq": seq + 100})).await;
    let error = ws_event(&mut ws).await;
    assert_eq!(
        (error["type"].clone(), error["code"].clone()),
        (json!("error"), json!("invalid_ack"))
    );
    let retried = server.ok(&ann, send("r", "once", "same")).await;
    assert_eq!(retried["results"][0]["duplicate"], true, "{retried}");
    assert_eq!(retried["results"][0]["id"], echo["id"]);
    server.ok(&ann, send("r", "next", "other")).await;
    let mut next = ws_event(&mut ws).await;
    if server.clustered() {
        assert_eq!(next["client_id"], "same", "{next}");
        next = ws_event(&mut ws).await;
    }
    assert_eq!(next["client_id"], "other", "{next}");
    // Bob got the message once.
    assert_eq!(bob_poll.next_of("message").await["text"], "once");
    assert_eq!(bob_poll.next_of("message").await["text"], "next");
}

#[tokio::test]
async fn each_transport_alone_joins_sends_and_gets_the_echo() {
    scenarios::each_transport_alone(&TestServer::start().await).await;
}

#[tokio::test]
async fn websocket_carries_commands_too() {
    let server = TestServer::start().await;
    let session = server.session("ws-user").await;
    let mut ws = server.websocket(&session, 0).await;
    support::ws_send(
        &mut ws,
        json!([join("lobby"), send("lobby", "over ws", "w1")]),
    )
    .await;
    let kinds: Vec<Value> = [
        support::ws_event(&mut ws).await,
        support::ws_event(&mut ws).await,
        support::ws_event(&mut ws).await,
        support::ws_event(&mut ws).await,
    ]
    .into_iter()
    .map(|e| e["type"].clone())
    .collect();
    assert_eq!(
        kinds,
        vec!["history", "presence", "presence_diff", "message"]
    );
}

#[tokio::test]
async fn sessions_on_different_transports_chat_with_each_other() {
    let server = TestServer::start().await;
    let kinds = TransportKind::ALL;
    let mut clients = Vec::new();
    for kind in kinds {
        let session = server.session(kind.as_str()).await;
        let client = server.attach(kind, &session, 0).await;
        server.ok(&session, join("mixed")).await;
        clients.push(client);
    }
    // Every client sends one message; every client receives all four, in the same order.
    for client in &clients {
        let text = format!("from {}", client.kind);
        server
            .ok(
                &client.session,
                send("mixed", &text, &format!("id-{}", client.kind)),
            )
            .await;
    }
    for client in &mut clients {
        let mut texts = Vec::new();
        while texts.len() < 4 {
            texts.push(client.next_of("message").await["text"].clone());
        }
        assert_eq!(
            texts,
            vec![
                "from websocket",
                "from sse",
                "from long-polling",
                "from short-polling"
            ],
            "{}",
            client.kind
        );
    }
}

#[tokio::test]
async fn the_same_conversation_yields_identical_sequences_on_all_four_transports() {
    let server = TestServer::with_config(switchyard::Config {
        presence_interval: std::time::Duration::ZERO,
        ..switchyard::Config::default()
    })
    .await;
    scenarios::same_conversation(&server).await;
}

#[tokio::test]
async fn a_websocket_receives_events_of_every_frame_length() {
    let server =
        TestServer::with_config(switchyard::Config::default().with_rate_limit(1000.0)).await;
    let writer = server.session("writer").await;
    server.ok(&writer, join("big")).await;
    // 20 messages of 4000 characters: the history event is over 64 KiB.
    for i in 0..20 {
        let text = format!("{i:02}{}", "x".repeat(3998));
        server
            .ok(&writer, send("big", &text, &format!("b{i}")))
            .await;
    }
    let reader = server.session("reader").await;
    let mut ws = server.attach(TransportKind::WebSocket, &reader, 0).await;
    server
        .ok(&reader, json!([join("big"), send("big", "short", "s")]))
        .await;
    let history = ws.next().await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 20);
    assert!(history.to_string().len() > 65_535);
    assert_eq!(ws.next().await["type"], "presence");
    assert_eq!(ws.next_of("message").await["text"], "short");
    server
        .ok(&writer, send("big", &"y".repeat(4000), "mid"))
        .await;
    assert_eq!(ws.next().await["text"].as_str().unwrap().len(), 4000);
}
