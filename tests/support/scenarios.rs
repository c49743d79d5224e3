//! Scenarios run against any server handle: a server of the test's own, or the same server
//! behind a reverse proxy (tests/proxies.rs).

use std::time::Duration;

use serde_json::{json, Value};
use switchyard::protocol::TransportKind;

use super::{join, poll_json, send, within, without_ts, Client, TestServer};

/// Messages the hopping scenario sends.
const MESSAGES: usize = 300;

/// Each transport alone joins a room, sees its history and presence, sends and gets the echo.
pub async fn each_transport_alone(server: &TestServer) {
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

/// The same scripted conversation, observed over all four transports, yields the same
/// events. The server must tell presence changes at once (`presence_interval` zero), so the
/// sequence does not depend on timing.
pub async fn same_conversation(server: &TestServer) {
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

/// One session hops WebSocket, SSE, long poll, short poll, WebSocket while 300 messages
/// arrive: it gets every one exactly once, in order. The server's rate limit must allow the
/// sender's pace (10,000/s).
pub async fn hopping(server: &TestServer) {
    let hopper = server.session("hopper").await;
    let sender = server.session("sender").await;
    server.ok(&hopper, join("stream")).await;
    server.ok(&sender, join("stream")).await;
    let mut last_seq = 0;

    let addr = server.addr;
    let nodes = server.nodes().to_vec();
    let sending = tokio::spawn({
        let sender = sender.clone();
        async move {
            let server = TestServer::round_robin(&nodes);
            for i in 0..MESSAGES {
                server
                    .ok(&sender, send("stream", &format!("m{i}"), &format!("c{i}")))
                    .await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    });

    let hops = [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
        TransportKind::ShortPolling,
        TransportKind::WebSocket,
    ];
    let mut received: Vec<String> = Vec::new();
    for (hop, kind) in hops.into_iter().enumerate() {
        let mut client = server.attach(kind, &hopper, last_seq).await;
        let target = if hop == hops.len() - 1 {
            MESSAGES
        } else {
            (hop + 1) * 50
        };
        while received.len() < target {
            let event = client.next().await;
            if event["type"] == "message" {
                received.push(event["text"].as_str().unwrap().to_owned());
            }
        }
        last_seq = client.last_seq;
        if kind == TransportKind::LongPolling {
            // Abandon a held poll: its reply, if any, is lost with the connection.
            let path = format!("/v1/sessions/{hopper}/poll?after={last_seq}&wait=5000");
            let poll = tokio::spawn(poll_json(addr, Box::leak(path.into_boxed_str())));
            tokio::time::sleep(Duration::from_millis(5)).await;
            poll.abort();
        }
        // Dropping the client closes its connection without a goodbye.
        drop(client);
    }
    within("the sender to finish", sending)
        .await
        .expect("sender task");

    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(received, expected, "every message exactly once, in order");
}
