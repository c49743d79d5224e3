//! Cluster mode across real processes: a `redis-server` of the test's own and three
//! `switchyard serve --redis ... --node-id ...` children on 127.0.0.2, 127.0.0.3 and
//! 127.0.0.4, talked to through a client that sends every request, every transport and every
//! poll to the next node (docs/cluster.md).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::{join, scenarios, send, within, ServerProcess, TestServer};
use switchyard::protocol::TransportKind;

/// Where the nodes listen: one loopback address each.
const NODES: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

struct Cluster {
    _redis: RedisServer,
    nodes: Vec<Option<ServerProcess>>,
}

impl Cluster {
    /// Redis and three nodes, each with the same `args`: presence told at once (the
    /// scenarios' sequences must not depend on timing) and rate limits the scenarios fit in.
    async fn start(args: &[&str]) -> Cluster {
        let redis = RedisServer::start().await;
        let url = redis.url();
        let mut nodes = Vec::new();
        for (i, ip) in NODES.iter().enumerate() {
            let node = format!("node{}", i + 1);
            let mut all = vec![
                "--redis",
                &url,
                "--node-id",
                &node,
                "--presence-interval",
                "0s",
                "--rate-limit",
                "10000",
                "--session-rate-limit",
                "off",
            ];
            all.extend_from_slice(args);
            nodes.push(Some(ServerProcess::start_on(ip, &all).await));
        }
        Cluster {
            _redis: redis,
            nodes,
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().flatten().map(|node| node.addr).collect()
    }

    /// A client for every live node, round robin.
    fn client(&self) -> TestServer {
        TestServer::round_robin(&self.addrs())
    }

    /// A client for node `i` only.
    fn node(&self, i: usize) -> TestServer {
        self.nodes[i].as_ref().expect("a live node").client()
    }

    /// SIGKILL to node `i`.
    async fn kill(&mut self, i: usize) {
        self.nodes[i].take().expect("a live node").kill().await;
    }
}

#[tokio::test]
async fn every_scenario_of_one_node_across_three_nodes_round_robin() {
    let cluster = Cluster::start(&[]).await;
    let client = cluster.client();
    scenarios::each_transport_alone(&client).await;
    scenarios::same_conversation(&client).await;
    scenarios::hopping(&client).await;
}

#[tokio::test]
async fn two_polls_of_one_session_on_two_nodes_one_gets_409() {
    let cluster = Cluster::start(&[]).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let session = a.session("ann").await;
    let held = tokio::spawn({
        let path = format!("/v1/sessions/{session}/poll?after=0&wait=3000");
        async move { a.json(Method::GET, &path, None).await }
    });
    // The first poll holds the lease once node A has answered nothing for a while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, reply) = b.poll(&session, 0, 0).await;
    assert_eq!(status, StatusCode::CONFLICT, "{reply}");
    assert_eq!(reply["error"]["code"], "poll_in_progress");
    let (status, reply) = within("the held poll", held).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{reply}");
    // Its reply given, the poll holds nothing: the next one, on B, is served.
    let (status, reply) = b.poll(&session, 0, 0).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
}

/// Reads a subscriber's messages until `count` have arrived; the client checks every seq
/// follows the one before.
async fn messages(client: &mut support::Client, into: &mut Vec<String>, count: usize) {
    while into.len() < count {
        let event = client.next().await;
        if event["type"] == "message" {
            into.push(event["text"].as_str().unwrap().to_owned());
        }
    }
}

#[tokio::test]
async fn sessions_of_killed_nodes_resume_on_a_survivor_and_the_others_leave_presence() {
    const SENT: usize = 200;
    let ttl = Duration::from_secs(1);
    let mut cluster = Cluster::start(&["--session-ttl", "1s"]).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let ws = a.session("ws").await;
    let sse = b.session("sse").await;
    let gone = a.session("gone").await;
    let watcher = c.session("watcher").await;
    for session in [&ws, &sse, &gone, &watcher] {
        c.ok(session, join("r")).await;
    }
    let mut ws_client = a.attach(TransportKind::WebSocket, &ws, 0).await;
    let mut sse_client = b.attach(TransportKind::Sse, &sse, 0).await;
    let _gone_client = a.attach(TransportKind::WebSocket, &gone, 0).await;
    let mut watching = c.attach(TransportKind::WebSocket, &watcher, 0).await;

    let sender = c.session("sender").await;
    c.ok(&sender, join("r")).await;
    // Attached, so it does not fall idle (the TTL is short).
    let _sender_ws = c.websocket(&sender, 0).await;
    let sending = tokio::spawn({
        let c = cluster.node(2);
        async move {
            for i in 0..SENT {
                c.ok(&sender, send("r", &format!("m{i}"), &format!("c{i}")))
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let (mut ws_got, mut sse_got) = (Vec::new(), Vec::new());
    messages(&mut ws_client, &mut ws_got, 50).await;
    messages(&mut sse_client, &mut sse_got, 50).await;
    cluster.kill(0).await;
    cluster.kill(1).await;
    let killed = Instant::now();
    // Both resume on the survivor, from the last seq each read.
    let mut ws_client = c
        .attach(TransportKind::WebSocket, &ws, ws_client.last_seq)
        .await;
    let mut sse_client = c
        .attach(TransportKind::Sse, &sse, sse_client.last_seq)
        .await;
    messages(&mut ws_client, &mut ws_got, SENT).await;
    messages(&mut sse_client, &mut sse_got, SENT).await;
    within("the sender to finish", sending).await.unwrap();
    let expected: Vec<String> = (0..SENT).map(|i| format!("m{i}")).collect();
    assert_eq!(
        ws_got, expected,
        "the WebSocket's messages, exactly once, in order"
    );
    assert_eq!(
        sse_got, expected,
        "the SSE stream's messages, exactly once, in order"
    );

    // "gone" did not resume: it leaves presence within a lease and a TTL (and a sweep).
    let bound = switchyard::cluster::sequencer::ATTACH_LEASE + ttl + Duration::from_secs(1);
    within("the dead node's session to leave presence", async {
        loop {
            let event = watching.next().await;
            if event["type"] == "presence_diff" && event["left"] == json!(["gone"]) {
                return;
            }
        }
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took <= bound + Duration::from_secs(2),
        "left after {took:?}, bound {bound:?}"
    );
    let (status, reply) = c
        .json(Method::GET, &format!("/v1/sessions/{gone}"), None::<Value>)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
}
