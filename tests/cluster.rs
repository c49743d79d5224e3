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
use support::{join, scenarios, send, within, ws_close, ServerProcess, TestServer};
use switchyard::protocol::TransportKind;

/// Where the nodes listen: one loopback address each.
const NODES: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

struct Cluster {
    redis: RedisServer,
    nodes: Vec<Option<ServerProcess>>,
}

impl Cluster {
    /// Redis and three nodes, each with the same `args`: presence told at once (the
    /// scenarios' sequences must not depend on timing) and rate limits the scenarios fit in.
    async fn start(args: &[&str]) -> Cluster {
        Cluster::on(RedisServer::start().await, args).await
    }

    /// [`Cluster::start`] on `redis`.
    async fn on(redis: RedisServer, args: &[&str]) -> Cluster {
        let mut cluster = Cluster {
            redis,
            nodes: Vec::new(),
        };
        cluster.start_nodes(args).await;
        cluster
    }

    /// Starts the three nodes (again).
    async fn start_nodes(&mut self, args: &[&str]) {
        self.nodes.clear();
        for i in 0..NODES.len() {
            let node = self.start_node(i, args).await;
            self.nodes.push(Some(node));
        }
    }

    /// Starts node `i` on its address, as `node{i + 1}`.
    async fn start_node(&self, i: usize, args: &[&str]) -> ServerProcess {
        let url = self.redis.url();
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
        ServerProcess::start_on(NODES[i], &all).await
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().flatten().map(|node| node.addr).collect()
    }

    /// Every live node's URL, comma-separated (for `bench --url`).
    fn urls(&self) -> String {
        let urls: Vec<String> = self
            .addrs()
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect();
        urls.join(",")
    }

    /// A client for every live node, round robin.
    fn client(&self) -> TestServer {
        TestServer::round_robin(&self.addrs())
    }

    /// A client for node `i` only.
    fn node(&self, i: usize) -> TestServer {
        self.nodes[i].as_ref().expect("a live node").client()
    }

    /// Trims the log to its newest entry, as its retention trims it.
    fn trim_log(&self) {
        let _: u64 = ::redis::cmd("XTRIM")
            .arg("switchyard:log")
            .arg("MAXLEN")
            .arg(1)
            .query(&mut self.redis.connection())
            .unwrap();
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
    // Node B counts its round trips to Redis (two polls: two attaches, a detach) and the log
    // entries it applied (the session's creation, on A).
    assert!(support::metric(&b, "switchyard_cluster_redis_calls_total").await >= 3.0);
    assert!(support::metric(&b, "switchyard_cluster_entries_applied_total").await >= 1.0);
    assert_eq!(
        support::metric(&b, "switchyard_cluster_sessions_lost_total").await,
        0.0
    );
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

/// Waits until every node answers `GET /readyz` with `status`.
async fn all_ready(cluster: &Cluster, status: StatusCode) {
    for i in 0..cluster.nodes.len() {
        let node = cluster.node(i);
        within(&format!("node {i}'s /readyz to answer {status}"), async {
            loop {
                let (got, body) = node.json(Method::GET, "/readyz", None).await;
                if got == status {
                    if status != StatusCode::OK {
                        assert_eq!(body["error"]["code"], "backend_unavailable", "{body}");
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

/// Asserts a reply is `503 backend_unavailable`.
fn unavailable((status, body): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable", "{body}");
}

#[tokio::test]
async fn while_redis_is_down_requests_get_503_streams_stay_open_and_nothing_is_lost_after() {
    let mut cluster = Cluster::on(RedisServer::persistent().await, &[]).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let ann = a.session("ann").await;
    let bob = b.session("bob").await;
    c.ok(&ann, join("r")).await;
    c.ok(&bob, join("r")).await;
    let mut stream = b.attach(TransportKind::Sse, &ann, 0).await;
    c.ok(&bob, send("r", "before", "b1")).await;
    assert_eq!(stream.next_of("message").await["text"], "before");

    cluster.redis.kill().await;
    all_ready(&cluster, StatusCode::SERVICE_UNAVAILABLE).await;
    unavailable(c.commands(&bob, send("r", "lost?", "b2")).await);
    unavailable(
        a.json(Method::POST, "/v1/sessions", Some(json!({"name": "cy"})))
            .await,
    );
    unavailable(a.poll(&bob, 0, 0).await);

    cluster.redis.restart().await;
    all_ready(&cluster, StatusCode::OK).await;
    // The send refused while Redis was down was not applied: sent again, it is new.
    let reply = c.ok(&bob, send("r", "after", "b2")).await;
    assert_eq!(reply["results"][0]["duplicate"], false, "{reply}");
    // The stream stayed open all along: the next event follows the last one it had.
    assert_eq!(stream.next_of("message").await["text"], "after");
    let (status, info) = c
        .json(Method::GET, &format!("/v1/sessions/{ann}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["attached"], "sse");
}

#[tokio::test]
async fn when_redis_comes_back_empty_the_nodes_restore_it_and_every_session_gets_a_reset() {
    let mut cluster = Cluster::start(&[]).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let names = ["ann", "bob", "cy"];
    let mut sessions = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let session = cluster.node(i).session(name).await;
        c.ok(&session, join("r")).await;
        sessions.push(session);
    }
    // A transport of each kind on its own node, open all along.
    let mut clients = vec![
        a.attach(TransportKind::WebSocket, &sessions[0], 0).await,
        b.attach(TransportKind::Sse, &sessions[1], 0).await,
        c.attach(TransportKind::LongPolling, &sessions[2], 0).await,
    ];
    let before = c.ok(&sessions[1], send("r", "before", "b1")).await;
    for client in &mut clients {
        assert_eq!(client.next_of("message").await["text"], "before");
    }

    cluster.redis.kill().await;
    all_ready(&cluster, StatusCode::SERVICE_UNAVAILABLE).await;
    cluster.redis.restart().await;
    // Until the nodes have restored what Redis lost, a command is refused with a 503 (its
    // session is not gone: no 404 that would make its client start a new one).
    unavailable(b.commands(&sessions[0], send("r", "too soon", "a1")).await);
    all_ready(&cluster, StatusCode::OK).await;

    // Every session gets a `reset` at the next seq, then its room's history and presence.
    for client in &mut clients {
        let reset = client.next().await;
        assert_eq!(reset["type"], "reset", "{reset}");
        assert_eq!(reset["reason"], "state_lost", "{reset}");
        let history = client.next().await;
        assert_eq!(history["type"], "history", "{history}");
        assert_eq!(history["messages"][0]["text"], "before", "{history}");
        let presence = client.next().await;
        assert_eq!(presence["type"], "presence", "{presence}");
        assert_eq!(presence["count"], 3, "{presence}");
    }
    // The sessions go on, on any node: the send refused before is new, with a later id.
    let after = cluster
        .client()
        .ok(&sessions[0], send("r", "after", "a1"))
        .await;
    assert_eq!(after["results"][0]["duplicate"], false, "{after}");
    assert!(
        after["results"][0]["id"].as_u64() > before["results"][0]["id"].as_u64(),
        "{before} {after}"
    );
    for client in &mut clients {
        assert_eq!(client.next_of("message").await["text"], "after");
    }
    // A resume on another node finds the same seqs.
    let last = clients[0].last_seq;
    let mut moved = b.attach(TransportKind::Sse, &sessions[0], last - 1).await;
    assert_eq!(moved.next().await["text"], "after");
    for (i, node) in [&a, &b, &c].into_iter().enumerate() {
        assert_eq!(
            support::metric(node, "switchyard_cluster_sessions_lost_total").await,
            0.0,
            "node {i} ended no session"
        );
    }
}

/// ann (created on node A) and bob (on node B) in room `r`, ann's SSE stream open on node A
/// and bob's first message, `text`, through it: their ids and ann's stream.
async fn ann_hears_bob(cluster: &Cluster, text: &str) -> (String, String, support::Client) {
    let (a, b) = (cluster.node(0), cluster.node(1));
    let ann = a.session("ann").await;
    let bob = b.session("bob").await;
    for session in [&ann, &bob] {
        b.ok(session, join("r")).await;
    }
    let mut on_a = a.attach(TransportKind::Sse, &ann, 0).await;
    b.ok(&bob, send("r", text, "b0")).await;
    assert_eq!(on_a.next_of("message").await["text"], text);
    (ann, bob, on_a)
}

#[tokio::test]
async fn when_redis_comes_back_with_an_older_copy_the_nodes_restore_theirs_and_reset_every_session()
{
    let mut cluster = Cluster::start(&[]).await;
    let b = cluster.node(1);
    let (_, bob, mut on_a) = ann_hears_bob(&cluster, "saved").await;
    // Redis saves a copy, takes one more message, dies and comes back on the copy (as one
    // whose last writes never reached its disk does).
    let _: () = ::redis::cmd("SAVE")
        .query(&mut cluster.redis.connection())
        .unwrap();
    let unsaved = b.ok(&bob, send("r", "unsaved", "b2")).await;
    assert_eq!(on_a.next_of("message").await["text"], "unsaved");
    cluster.redis.kill().await;
    all_ready(&cluster, StatusCode::SERVICE_UNAVAILABLE).await;
    cluster.redis.restart().await;

    // The nodes find the log behind them: they restore what they hold, and ann's stream,
    // open all along, gets a `reset` at its next seq, with both messages in the history.
    let reset = on_a.next().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "state_lost", "{reset}");
    let history = on_a.next().await;
    let texts: Vec<&Value> = history["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| &m["text"]).collect())
        .unwrap_or_default();
    assert_eq!(texts, ["saved", "unsaved"], "{history}");
    all_ready(&cluster, StatusCode::OK).await;
    // Ids go on past the newest message, not the copy's.
    let after = b.ok(&bob, send("r", "after", "b3")).await;
    assert!(
        after["results"][0]["id"].as_u64() > unsaved["results"][0]["id"].as_u64(),
        "{unsaved} {after}"
    );
    assert_eq!(on_a.next_of("message").await["text"], "after");
    for i in 0..NODES.len() {
        let node = cluster.node(i);
        let lost = support::metric(&node, "switchyard_cluster_sessions_lost_total").await;
        assert_eq!(lost, 0.0, "node {i} ended no session");
    }
}

#[tokio::test]
async fn a_node_stopped_with_sigterm_tells_its_clients_and_they_resume_on_another() {
    let mut cluster = Cluster::start(&[]).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let ann = a.session("ann").await;
    let bob = b.session("bob").await;
    b.ok(&ann, join("r")).await;
    b.ok(&bob, join("r")).await;
    let mut ws = a.websocket(&ann, 0).await;
    b.ok(&bob, send("r", "one", "b1")).await;
    let last_seq = loop {
        let event = support::ws_event(&mut ws).await;
        if event["type"] == "message" {
            assert_eq!(event["text"], "one");
            break event["seq"].as_u64().expect("a seq");
        }
    };
    // A rolling restart: node A stops; its client is told, and resumes on node B.
    let stopping = tokio::spawn(cluster.nodes[0].take().expect("node A").stop());
    assert_eq!(ws_close(&mut ws).await, (4002, "shutdown".to_owned()));
    let mut resumed = b.attach(TransportKind::WebSocket, &ann, last_seq).await;
    b.ok(&bob, send("r", "two", "b2")).await;
    let next = resumed.next_of("message").await;
    assert_eq!(next["text"], "two", "nothing lost, nothing repeated");
    within("node A to exit", stopping).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_spreads_its_clients_over_the_nodes_and_counts_every_delivery() {
    let cluster = Cluster::start(&[]).await;
    let args = support::short_bench(cluster.urls(), 6);
    let report = within("the bench run", switchyard::bench::run(args))
        .await
        .expect("bench ran");
    for row in &report.transports {
        assert_eq!(
            row.delivered,
            row.published * 6,
            "{}: {row:?}",
            row.transport
        );
        assert!(!row.unhealthy(), "{}: {row:?}", row.transport);
        assert_eq!(
            row.server_events_delivered,
            Some(row.delivered),
            "{}: the nodes' /metrics, summed, agree",
            row.transport
        );
    }
    // Every node delivered some of it.
    for i in 0..NODES.len() {
        let mut delivered = 0.0;
        for transport in TransportKind::ALL {
            let sample = format!("switchyard_events_delivered_total{{transport=\"{transport}\"}}");
            delivered += support::metric(&cluster.node(i), &sample).await;
        }
        assert!(delivered > 0.0, "node {i} delivered nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_resume_storm_kills_a_node_and_every_subscriber_resumes_with_nothing_lost() {
    let cluster = Cluster::start(&[]).await;
    let victim = cluster.nodes[0].as_ref().expect("a live node").pid();
    let args = switchyard::bench::BenchArgs {
        transports: vec![TransportKind::WebSocket, TransportKind::Sse],
        duration: Duration::from_millis(1500),
        resume: true,
        kill_pid: Some(victim as i32),
        kill_after: Duration::from_millis(300),
        ..support::short_bench(cluster.urls(), 6)
    };
    let report = within("the bench run", switchyard::bench::run(args))
        .await
        .expect("bench ran");
    for row in &report.transports {
        assert!(!row.unhealthy(), "{}: {row:?}", row.transport);
        assert_eq!(
            row.delivered,
            row.published * 6,
            "{}: {row:?}",
            row.transport
        );
        let resume = row.resume.as_ref().expect("--resume reports resumes");
        assert!(
            resume.cut_subscribers > 0,
            "{}: the killed node served some: {resume:?}",
            row.transport
        );
        assert!(
            resume.resumed >= resume.cut_subscribers,
            "{}: every one resumed: {resume:?}",
            row.transport
        );
    }
}

/// Events from `client` until a `message` whose text is `text`, that one included.
async fn events_through(client: &mut support::Client, text: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = client.next().await;
        let last = event["type"] == "message" && event["text"] == text;
        events.push(event);
        if last {
            return events;
        }
    }
}

#[tokio::test]
async fn a_node_restarted_after_the_log_was_trimmed_joins_with_a_snapshot_and_a_whole_cluster_starts_anew(
) {
    let mut cluster = Cluster::start(&[]).await;
    let a = cluster.node(0);
    let ann = a.session("ann").await;
    let bob = a.session("bob").await;
    for session in [&ann, &bob] {
        a.ok(session, join("r")).await;
    }
    a.ok(&ann, send("r", "kept", "a1")).await;
    let mut on_b = cluster.node(1).attach(TransportKind::Sse, &bob, 0).await;
    let before = events_through(&mut on_b, "kept").await;
    // The log's start is trimmed, as its retention (the session TTL + 60 s) trims it: a node
    // starting now cannot read what the others hold from the log.
    cluster.trim_log();
    // Node 1 dies and starts again: it takes a snapshot of a running node.
    cluster.kill(0).await;
    let restarted = cluster.start_node(0, &[]).await;
    let again = restarted.client();
    assert_eq!(
        support::metric(&again, "switchyard_cluster_sessions_restored_total").await,
        2.0,
        "ann and bob came with the snapshot"
    );
    // It serves bob's stream from its first event, as node 2 did, seq for seq.
    drop(on_b);
    let mut resumed = again.attach(TransportKind::Sse, &bob, 0).await;
    let mut replayed = Vec::new();
    for _ in 0..before.len() {
        replayed.push(resumed.next().await);
    }
    assert_eq!(replayed, before, "bob's events on the restarted node");
    // And what comes after, on every node alike.
    again.ok(&ann, send("r", "after", "a2")).await;
    let next = resumed.next_of("message").await;
    assert_eq!(next["text"], "after", "{next}");
    assert_eq!(next["seq"], before.len() as u64 + 1, "{next}");
    cluster.nodes[0] = Some(restarted);
    // A single server is refused the cluster's database while its nodes run.
    let url = cluster.redis.url();
    let refused = support::failing_start(&["--history-store", &url]).await;
    assert!(
        refused.contains("in use by a switchyard cluster"),
        "{refused}"
    );

    // The whole cluster stopped, then started again: nobody holds the previous run's
    // sessions, so a new log starts; room history is kept.
    for node in &mut cluster.nodes {
        node.take().expect("a live node").stop().await;
    }
    cluster.start_nodes(&[]).await;
    let client = cluster.client();
    let (status, reply) = client.commands(&ann, send("r", "again?", "a3")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    let bob = client.session("bob").await;
    let mut events = client.attach(TransportKind::Sse, &bob, 0).await;
    client.ok(&bob, join("r")).await;
    let history = events.next_of("history").await;
    assert_eq!(history["messages"][0]["text"], "kept", "{history}");
    assert_eq!(history["messages"][1]["text"], "after", "{history}");
}

#[tokio::test]
async fn a_node_that_lagged_past_what_the_log_keeps_rejoins_with_a_snapshot_and_keeps_its_streams()
{
    let cluster = Cluster::start(&[]).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let (_, bob, mut on_a) = ann_hears_bob(&cluster, "m0").await;

    // Node A stops reading (SIGSTOP) while bob sends three messages, and the log keeps only
    // the last: A reads the first (its blocked read had it), then finds the chain broken.
    let pid = cluster.nodes[0].as_ref().expect("node A").pid() as i32;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for (i, text) in ["m1", "m2", "m3"].into_iter().enumerate() {
        b.ok(&bob, send("r", text, &format!("b{}", i + 1))).await;
    }
    cluster.trim_log();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };

    // A takes a snapshot of a running node: ann's stream on A stays open and gets what it
    // lacked, seq after seq, then what comes next.
    for text in ["m1", "m2", "m3"] {
        assert_eq!(on_a.next_of("message").await["text"], text);
    }
    b.ok(&bob, send("r", "m4", "b4")).await;
    assert_eq!(on_a.next_of("message").await["text"], "m4");
    all_ready(&cluster, StatusCode::OK).await;
    assert_eq!(
        support::metric(&a, "switchyard_cluster_sessions_restored_total").await,
        2.0,
        "ann and bob came with the snapshot"
    );
}

#[tokio::test]
async fn a_starting_node_passes_over_a_running_node_that_sends_no_snapshot() {
    let cluster = Cluster::start(&[]).await;
    let a = cluster.node(0);
    let ann = a.session("ann").await;
    a.ok(&ann, join("r")).await;
    // A node that beat a moment ago and died since: it is asked first, and never answers.
    let _: u64 = ::redis::cmd("ZADD")
        .arg("switchyard:c:nodes")
        .arg(u64::MAX >> 12)
        .arg("ghost")
        .query(&mut cluster.redis.connection())
        .unwrap();
    let url = cluster.redis.url();
    let started = Instant::now();
    let late = ServerProcess::start_within(
        "127.0.0.5",
        &["--redis", &url, "--node-id", "late"],
        Duration::from_secs(30),
    )
    .await;
    let wait = switchyard::hub::SNAPSHOT_WAIT;
    assert!(
        started.elapsed() >= wait,
        "it waited for the ghost first ({:?})",
        started.elapsed()
    );
    let late = late.client();
    assert_eq!(
        support::metric(&late, "switchyard_cluster_sessions_restored_total").await,
        1.0,
        "ann came with a running node's snapshot"
    );
    late.ok(&ann, send("r", "hello", "c1")).await;
    let described = late
        .json(Method::GET, &format!("/v1/sessions/{ann}"), None::<Value>)
        .await;
    assert_eq!(described.1["rooms"], json!(["r"]), "{described:?}");
}

#[tokio::test]
async fn behind_the_documented_haproxy_a_dead_node_is_taken_out_and_its_sessions_resume_through_it()
{
    let mut cluster = Cluster::start(&[]).await;
    // docs/deploy.md's HAProxy defaults and frontend, with its cluster backend.
    let single = support::proxy::block("haproxy");
    let head = &single[..single.find("\nbackend switchyard").expect("a backend") + 1];
    let mut backend = support::proxy::block("haproxy cluster");
    for (placeholder, addr) in ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
        .into_iter()
        .zip(cluster.addrs())
    {
        assert!(backend.contains(placeholder), "{placeholder} in the block");
        backend = backend.replace(placeholder, &addr.to_string());
    }
    let proxy = support::proxy::Proxy::haproxy(format!("{head}{backend}")).await;
    let client = proxy.client();
    scenarios::each_transport_alone(&client).await;
    scenarios::hopping(&client).await;

    let ann = client.session("ann").await;
    client.ok(&ann, join("r")).await;
    for i in 0..5 {
        client
            .ok(&ann, send("r", &format!("m{i}"), &format!("c{i}")))
            .await;
    }
    cluster.kill(0).await;
    within("HAProxy to send nothing more to the dead node", async {
        let mut in_a_row = 0;
        while in_a_row < 10 {
            let path = format!("/v1/sessions/{ann}");
            let (status, _, _) = client.request(Method::GET, &path, &[], "").await;
            if status == StatusCode::OK {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
    .await;
    // Through the proxy, on a survivor, from its start: every message once.
    let mut events = client.attach(TransportKind::Sse, &ann, 0).await;
    let mut texts = Vec::new();
    messages(&mut events, &mut texts, 5).await;
    let expected: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
}
