//! Each transport alone, transports chatting with each other, and the same conversation
//! observed over all four transports.

mod support;

use serde_json::{json, Value};
use support::{join, scenarios, send, TestServer};
use switchyard::protocol::TransportKind;

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
