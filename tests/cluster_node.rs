//! A cluster node's replica (src/cluster/node.rs) on a real `redis-server`: it applies the
//! log as the sequencer writes it, a reply can wait for its own entry, it goes on across a
//! Redis restart that kept the data, and when Redis lost it every session ends (never a
//! silent gap) and it goes on with the new log.

mod support;

use std::time::Duration;

use support::redis::RedisServer;
use support::within;
use switchyard::cluster::log::LogId;
use switchyard::cluster::node::{Health, Replica};
use switchyard::cluster::sequencer::Sequencer;
use switchyard::hub::{BatchLimit, Delivery, Hub, HubConfig};
use switchyard::protocol::{CloseReason, Command, TransportKind};

fn replica(redis: &RedisServer, hub: &Hub, node: &str) -> Replica {
    let client = redis::Client::open(redis.url()).expect("a Redis URL");
    Replica::start(client, hub.clone(), node, LogId::ZERO).expect("start the replica")
}

async fn sequencer(redis: &RedisServer) -> Sequencer {
    redis.sequencer(&HubConfig::default()).await
}

/// Decides `command` and waits until `replica` applied its entry.
async fn decided(sequencer: &Sequencer, replica: &Replica, session: &str, command: Command) {
    let decision = sequencer
        .execute(session, &command)
        .await
        .expect("redis answers");
    assert!(decision.result.ok, "{command:?}: {decision:?}");
    let entry = decision.entry.expect("an entry");
    within("the replica to apply the entry", replica.caught_up(entry))
        .await
        .expect("the replica applies");
}

/// The texts of the messages a session on `hub` has, with the seqs of all its events.
fn messages(hub: &Hub, session: &str) -> (Vec<String>, Vec<u64>) {
    hub.settle();
    let mut attachment = hub.attach(session, TransportKind::Sse, 0).expect("attach");
    let Delivery::Events(events) = attachment.ready(BatchLimit::events(10_000)) else {
        panic!("closed");
    };
    let seqs = events.iter().map(|(seq, _)| *seq).collect();
    let texts = events
        .iter()
        .map(|(seq, e)| serde_json::from_str::<serde_json::Value>(&e.to_json(*seq)).unwrap())
        .filter(|e| e["type"] == "message")
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    (texts, seqs)
}

fn send(text: &str, client_id: &str) -> Command {
    Command::Send {
        room: "lobby".into(),
        text: text.into(),
        client_id: client_id.into(),
    }
}

fn join() -> Command {
    Command::Join {
        room: "lobby".into(),
    }
}

#[tokio::test]
async fn replicas_apply_the_log_as_it_comes_and_a_reply_can_wait_for_its_entry() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    let (a, b) = (
        Hub::new(HubConfig::default()),
        Hub::new(HubConfig::default()),
    );
    let (on_a, on_b) = (replica(&redis, &a, "A"), replica(&redis, &b, "B"));
    for (session, name) in [("s0", "ann"), ("s1", "bob")] {
        let created = sequencer.create(session, name, None).await.unwrap();
        within("A to apply the create", on_a.caught_up(created))
            .await
            .unwrap();
        assert!(
            a.session(session).is_ok(),
            "{session} exists on A once applied"
        );
        decided(&sequencer, &on_a, session, join()).await;
    }
    for n in 0..3 {
        decided(
            &sequencer,
            &on_a,
            "s1",
            send(&format!("m{n}"), &format!("c{n}")),
        )
        .await;
        // Read your writes: once the reply's entry is applied, the node has the message.
        let (texts, _) = messages(&a, "s0");
        assert_eq!(texts.len(), n + 1, "{texts:?}");
    }
    within("B to catch up", on_b.caught_up(on_a.applied()))
        .await
        .unwrap();
    assert_eq!(
        messages(&b, "s0"),
        messages(&a, "s0"),
        "the same events, seq for seq"
    );
    assert_eq!(
        (on_a.health(), on_b.health()),
        (Health::Applying, Health::Applying)
    );
}

#[tokio::test]
async fn a_replica_goes_on_across_a_redis_restart_and_ends_every_session_when_redis_lost_the_log() {
    let mut redis = RedisServer::persistent().await;
    let sequencer = sequencer(&redis).await;
    let hub = Hub::new(HubConfig::default());
    let on_hub = replica(&redis, &hub, "A");
    sequencer.create("s0", "ann", None).await.unwrap();
    decided(&sequencer, &on_hub, "s0", join()).await;
    decided(&sequencer, &on_hub, "s0", send("before", "c1")).await;

    redis.kill().await;
    within("the replica to see Redis gone", async {
        while !matches!(on_hub.health(), Health::Unreachable(_)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    redis.restart().await;
    let after = within("a send once Redis is back", async {
        loop {
            match sequencer.execute("s0", &send("after", "c2")).await {
                Ok(decision) => return decision,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    within(
        "the replica to apply it",
        on_hub.caught_up(after.entry.unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(on_hub.health(), Health::Applying);
    assert_eq!(messages(&hub, "s0").0, ["before", "after"]);

    // Redis loses everything: the next entry starts a new log. The sessions went with the
    // data: each ends, as after a server's restart (never a silent gap), and the replica
    // goes on with the new log.
    let attachment = hub.attach("s0", TransportKind::Sse, 0).expect("attach");
    redis::cmd("FLUSHALL")
        .query::<()>(&mut redis.connection())
        .unwrap();
    // A node that starts alone meanwhile starts a new cluster, before the running nodes
    // could restore the state (tests/cluster.rs has them restore it).
    sequencer.start("alone").await.unwrap();
    let created = sequencer.create("s9", "new", None).await.unwrap();
    within(
        "the replica to go on with the new log",
        on_hub.caught_up(created),
    )
    .await
    .unwrap();
    assert_eq!(on_hub.health(), Health::Applying);
    assert!(
        hub.session("s0").is_err(),
        "the sessions Redis lost have ended, as after a restart"
    );
    assert_eq!(
        *attachment.close_signal().borrow(),
        Some(CloseReason::Expired),
        "its transport is told"
    );
    assert!(hub.session("s9").is_ok(), "the new log's session");
}

/// A history store whose reads fail, as one whose backend is down.
#[derive(Debug)]
struct Unreadable;

impl switchyard::hub::HistoryStore for Unreadable {
    fn last_id(&self) -> u64 {
        0
    }
    fn reserved_ids(&self) -> u64 {
        u64::MAX
    }
    fn reserve_ids(&self, up_to: u64) -> switchyard::hub::history::Reply<u64> {
        switchyard::hub::history::ready(Ok(up_to))
    }
    fn append(
        &self,
        _message: std::sync::Arc<switchyard::protocol::Message>,
        _then: Option<switchyard::hub::history::Then>,
    ) -> Result<(), switchyard::hub::history::StoreError> {
        Ok(())
    }
    fn recent(
        &self,
        _room: &str,
        _limit: usize,
    ) -> switchyard::hub::history::Reply<Vec<std::sync::Arc<switchyard::protocol::Message>>> {
        switchyard::hub::history::ready(Err(down()))
    }
    fn page(
        &self,
        _room: &str,
        _before: Option<u64>,
        _limit: usize,
    ) -> switchyard::hub::history::Reply<switchyard::hub::history::Page> {
        switchyard::hub::history::ready(Err(down()))
    }
    fn forget(&self, _room: &str) {}
    fn close(&self, _last_used: u64) {}
}

fn down() -> switchyard::hub::history::StoreError {
    switchyard::hub::history::StoreError::Failed("the backend is down".into())
}

#[tokio::test]
async fn a_node_that_cannot_read_a_rooms_history_refuses_to_apply_the_join() {
    use switchyard::cluster::sequencer::Record;
    let hub = Hub::with_store(
        HubConfig::default(),
        std::sync::Arc::new(Unreadable),
        switchyard::metrics::Metrics::new(),
    );
    let create = Record::Create {
        session: "s0".into(),
        name: "ann".into(),
        user: None,
        rules: None,
        expires: None,
    };
    hub.replicate(create, "A")
        .await
        .expect("a create reads nothing");
    let join = Record::Join {
        session: "s0".into(),
        room: "lobby".into(),
        ts: 0,
        last: 7,
    };
    let refused = within("the join to give up", hub.replicate(join, "A")).await;
    let cause = refused.expect_err("no history, no join");
    assert!(cause.contains("lobby") && cause.contains("down"), "{cause}");
    assert!(
        hub.describe("s0").unwrap().rooms.is_empty(),
        "nothing applied"
    );
}
