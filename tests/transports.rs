//! Each transport alone, transports chatting with each other, and the same conversation
//! observed over all four transports.

mod support;

use serde_json::{json, Value};
use support::{join, send, without_ts, Client, TestServer};
use switchyard::protocol::TransportKind;

#[tokio::test]
async fn each_transport_alone_joins_sends_and_gets_the_echo() {
    let server = TestServer::start().await;
    for kind in TransportKind::ALL {
        let session = server.session(&format!("solo-{kind}")).await;
        let mut client = server.attach(kind, &session, 0).await;
        let room = format!("room-{}", kind.as_str());
        server.ok(&session, join(&room)).await;
        let history = client.next().await;
        assert_eq!(history["type"], "history", "{kind}: {history}");
        assert_eq!(history["room"], room.as_str());
        assert_eq!(history["messages"], json!([]));
        // The room as it was published (empty), then the change: this session joined.
        let presence = client.next().await;
        assert_eq!(presence["type"], "presence", "{kind}: {presence}");
        assert_eq!(
            (
                &presence["count"],
                &presence["online"],
                &presence["complete"]
            ),
            (&json!(0), &json!([]), &json!(true))
        );
        let diff = client.next().await;
        assert_eq!(diff["type"], "presence_diff", "{kind}: {diff}");
        assert_eq!(diff["joined"], json!([format!("solo-{kind}")]));
        assert_eq!((&diff["left"], &diff["count"]), (&json!([]), &json!(1)));
        let reply = server.ok(&session, send(&room, "hello", "c1")).await;
        assert_eq!(reply["results"][0]["duplicate"], false);
        let echo = client.next().await;
        assert_eq!(echo["type"], "message", "{kind}: {echo}");
        assert_eq!(echo["text"], "hello");
        assert_eq!(echo["from"], format!("solo-{kind}"));
        assert_eq!(echo["client_id"], "c1");
        assert_eq!(echo["id"], reply["results"][0]["id"]);
        assert!(
            echo["ts"].as_u64().unwrap() > 1_600_000_000_000_000,
            "ts in µs"
        );
    }
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

/// Reads events until a `message` with this text; returns everything read.
async fn read_until_message(client: &mut Client, text: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = client.next().await;
        let done = event["type"] == "message" && event["text"] == text;
        events.push(event);
        if done {
            return events;
        }
    }
}

#[tokio::test]
async fn the_same_conversation_yields_identical_sequences_on_all_four_transports() {
    // Every presence change is told at once, so the sequence does not depend on timing.
    let server = TestServer::with_config(switchyard::Config {
        presence_interval: std::time::Duration::ZERO,
        ..switchyard::Config::default()
    })
    .await;
    let mut observers = Vec::new();
    for kind in TransportKind::ALL {
        let session = server.session(&format!("obs-{kind}")).await;
        observers.push(server.attach(kind, &session, 0).await);
    }
    for observer in &observers {
        server
            .ok(&observer.session, json!([join("alpha"), join("beta")]))
            .await;
    }
    // A marker ends the set-up: everything after it must be the same for every observer.
    let setup = server.session("setup").await;
    server
        .ok(&setup, json!([join("alpha"), send("alpha", "START", "s")]))
        .await;
    for observer in &mut observers {
        read_until_message(observer, "START").await;
    }

    let ann = server.session("ann").await;
    let bob = server.session("bob").await;
    let script = [
        (&ann, json!([join("alpha"), join("beta")])),
        (&bob, json!(join("alpha"))),
        (&ann, send("alpha", "hi bob", "a1")),
        (&bob, json!({"type": "typing", "room": "alpha"})),
        (&bob, send("alpha", "hi ann", "b1")),
        (&ann, send("beta", "anyone in beta?", "a2")),
        (&ann, json!({"type": "typing", "room": "beta"})),
        (&bob, json!(join("beta"))),
        (&bob, send("beta", "me", "b2")),
        (&ann, send("beta", "me", "a3")),
        (&bob, json!({"type": "leave", "room": "alpha"})),
        (&ann, send("alpha", "bob left", "a4")),
        (&setup, send("alpha", "END", "e")),
    ];
    for (session, commands) in script {
        server.ok(session, commands).await;
    }

    let mut sequences = Vec::new();
    for observer in &mut observers {
        let first_seq = observer.last_seq;
        let events: Vec<Value> = read_until_message(observer, "END")
            .await
            .into_iter()
            .map(|mut event| {
                // Seqs are per session: compare their offsets from the set-up marker.
                event["seq"] = json!(event["seq"].as_u64().unwrap() - first_seq);
                without_ts(event)
            })
            .collect();
        sequences.push((observer.kind, events));
    }
    let (_, reference) = &sequences[0];
    let types: Vec<&str> = reference
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "presence_diff",
            "presence_diff",
            "presence_diff",
            "message",
            "typing",
            "message",
            "message",
            "typing",
            "presence_diff",
            "message",
            "message",
            "presence_diff",
            "message",
            "message"
        ],
        "{reference:#?}"
    );
    for (kind, events) in &sequences[1..] {
        assert_eq!(events, reference, "{kind} differs from websocket");
    }
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
