//! The cluster's sequencer (src/cluster/sequencer.rs) on a real `redis-server`: its scripts
//! decide every command exactly as the hub decides it on one node (random command sequences
//! run against both, every result compared), append exactly one log entry per command that
//! changes what a session sees, and keep the room's history where the Redis history store
//! reads it.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use redis::streams::StreamRangeReply;
use support::redis::RedisServer;
use support::within;
use switchyard::cluster::log::LogId;
use switchyard::cluster::log::LOG;
use switchyard::cluster::sequencer::{
    Attach, Decision, Ending, Offer, Record, Renewal, Seed, Sequencer, Unavailable, NODE_SILENCE,
    OFFER_AT_LEAST,
};
use switchyard::hub::{BatchLimit, CommandResult, Delivery, Hub, HubConfig, Identity, Session};
use switchyard::protocol::{Command, ErrorCode, Message, TransportKind};

/// Limits small enough for a short sequence to reach each of them, with rates so slow that
/// no token comes back during a test: every refusal is the same on both sides.
fn config() -> HubConfig {
    HubConfig {
        rate_limit_per_sec: 1e-6,
        rate_limit_burst: 25.0,
        room_rate_limit: Some((1e-6, 10.0)),
        max_rooms_per_session: 2,
        dedup_window: 3,
        history_len: 4,
        ..HubConfig::default()
    }
}

const ROOMS: [&str; 4] = ["a1", "a2", "b", "c"];
/// Session 2 may join these only.
const RULES: [&str; 2] = ["a*", "b"];

fn identity(user: &str) -> Identity {
    Identity {
        user: Arc::from(user),
        name: user.to_owned(),
        rooms: Some(Arc::from(RULES.map(String::from))),
        expires_at: SystemTime::now() + Duration::from_secs(3600),
    }
}

#[derive(Debug, Clone)]
enum Step {
    Command(usize, Command),
    End(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let who = 0..3usize;
    let room = proptest::sample::select(ROOMS.to_vec()).prop_map(String::from);
    let client_id = proptest::sample::select(vec!["x", "y", "z", "u", "v"]).prop_map(String::from);
    let command = prop_oneof![
        4 => room.clone().prop_map(|room| Command::Join { room }),
        1 => room.clone().prop_map(|room| Command::Leave { room }),
        6 => (room.clone(), client_id).prop_map(|(room, client_id)| Command::Send {
            room,
            text: "hi".into(),
            client_id,
        }),
        1 => room.clone().prop_map(|room| Command::Typing { room }),
        1 => (room, proptest::option::of(1..20u64), proptest::option::of(1..5usize))
            .prop_map(|(room, before, limit)| Command::History { room, before, limit }),
    ];
    prop_oneof![
        60 => (who.clone(), command).prop_map(|(s, c)| Step::Command(s, c)),
        1 => who.prop_map(Step::End),
    ]
}

/// What must be equal between the hub's result and the sequencer's: all but the wait a
/// `rate_limited` names, which depends on when each side looked at its clock.
fn comparable(result: &CommandResult) -> CommandResult {
    let mut result = result.clone();
    if let Some(error) = &mut result.error {
        error.retry_after_ms = error.retry_after_ms.map(|_| 0);
    }
    result
}

fn log_records(redis: &RedisServer) -> Vec<Record> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(LOG)
        .arg("-")
        .arg("+")
        .query(&mut redis.connection())
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let body: String = entry.get("e").expect("an entry has a body");
            Record::parse(&body).expect("the sequencer writes records")
        })
        .collect()
}

async fn sequencer(redis: &RedisServer) -> Sequencer {
    redis.sequencer(&config()).await
}

/// Runs `steps` against a fresh hub and the sequencer on an empty Redis, comparing each
/// result.
async fn same_decisions(redis: &RedisServer, steps: &[Step]) -> Result<(), TestCaseError> {
    redis::cmd("FLUSHALL")
        .query::<()>(&mut redis.connection())
        .expect("FLUSHALL");
    let hub = Hub::new(config());
    let sequencer = sequencer(redis).await;
    let sessions: Vec<Arc<Session>> = vec![
        hub.create_session("ann").unwrap(),
        hub.create_session("bob").unwrap(),
        hub.create_session_for(identity("cat")).unwrap(),
    ];
    for (i, session) in sessions.iter().enumerate() {
        let identity = (i == 2).then(|| identity("cat"));
        sequencer
            .create(&session.id, &session.name, identity.as_ref())
            .await
            .expect("create");
    }
    let mut sent = Vec::new();
    let mut appended = sessions.len();
    for (at, step) in steps.iter().enumerate() {
        match step {
            Step::Command(who, command) => {
                let session = &sessions[*who];
                let expected = hub.execute(session, vec![Ok(command.clone())]).await;
                let decided = sequencer
                    .execute(&session.id, command)
                    .await
                    .expect("redis answers");
                prop_assert_eq!(
                    comparable(&decided.result),
                    comparable(&expected[0]),
                    "step {}: {:?} of session {}",
                    at,
                    command,
                    who
                );
                prop_assert_eq!(decided.entry.is_some(), decided.result.ok, "step {}", at);
                appended += usize::from(decided.entry.is_some());
                if decided.result.duplicate == Some(false) {
                    sent.push(decided.result.id.unwrap());
                }
            }
            Step::End(who) => {
                let session = &sessions[*who];
                let expected = hub.end_session(&session.id);
                let decided = sequencer.end(&session.id).await.expect("redis answers");
                prop_assert_eq!(decided.result.ok, expected.is_ok(), "step {}: end", at);
                prop_assert_eq!(decided.entry.is_some(), decided.result.ok, "step {}", at);
                appended += usize::from(decided.entry.is_some());
            }
        }
    }
    let records = log_records(redis);
    prop_assert_eq!(
        records.len(),
        appended,
        "one entry per command that changed something"
    );
    let sends: Vec<u64> = records
        .iter()
        .filter_map(|r| match r {
            Record::Send { message, .. } => Some(message.id),
            _ => None,
        })
        .collect();
    prop_assert_eq!(
        &sends,
        &sent,
        "the log's sends are the accepted ones, in order"
    );
    prop_assert!(sends.iter().copied().eq(1..=sends.len() as u64));
    Ok(())
}

/// Runs `cases` random cases of `strategy` (or `PROPTEST_CASES`) through `case`, on one
/// `redis-server`; a failure is shrunk to a short sequence and reported.
fn run_cases<T: std::fmt::Debug>(
    strategy: impl Strategy<Value = T>,
    cases: u32,
    case: impl Fn(&tokio::runtime::Runtime, &RedisServer, T) -> Result<(), TestCaseError>,
) {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let redis = runtime.block_on(RedisServer::start());
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    if let Err(failure) = runner.run(&strategy, |value| case(&runtime, &redis, value)) {
        panic!("{failure}");
    }
}

#[test]
fn the_scripts_decide_every_command_as_the_hub_does() {
    let steps = proptest::collection::vec(step(), 1..80);
    run_cases(steps, 48, |runtime, redis, steps| {
        runtime.block_on(same_decisions(redis, &steps))
    });
}

fn send(room: &str, text: &str, client_id: &str) -> Command {
    Command::Send {
        room: room.into(),
        text: text.into(),
        client_id: client_id.into(),
    }
}

fn join(room: &str) -> Command {
    Command::Join { room: room.into() }
}

async fn ok(sequencer: &Sequencer, session: &str, command: Command) -> Decision {
    let decided = sequencer
        .execute(session, &command)
        .await
        .expect("redis answers");
    assert!(decided.result.ok, "{command:?}: {decided:?}");
    decided
}

#[tokio::test]
async fn entries_carry_what_replicas_need_and_history_is_where_the_store_reads_it() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    sequencer.create("s1", "ann", None).await.unwrap();
    ok(&sequencer, "s1", join("lobby")).await;
    // Text a script must escape, and ids a double would round.
    let text = "quotes \" back\\slash / tab\t é 日本 😀 \u{1}";
    for n in 0..6 {
        ok(
            &sequencer,
            "s1",
            send("lobby", &format!("{text}{n}"), &format!("c{n}")),
        )
        .await;
    }
    let retry = ok(&sequencer, "s1", send("lobby", "ignored", "c5")).await;
    assert_eq!(
        (retry.result.id, retry.result.duplicate),
        (Some(6), Some(true))
    );
    let page = Command::History {
        room: "lobby".into(),
        before: Some(6),
        limit: Some(2),
    };
    ok(&sequencer, "s1", page).await;
    ok(
        &sequencer,
        "s1",
        Command::Typing {
            room: "lobby".into(),
        },
    )
    .await;
    ok(
        &sequencer,
        "s1",
        Command::Leave {
            room: "lobby".into(),
        },
    )
    .await;
    ok(&sequencer, "s1", join("lobby")).await;
    ok(&sequencer, "s1", join("other")).await;
    let end = sequencer.end("s1").await.unwrap();
    assert!(end.result.ok && end.entry.is_some(), "{end:?}");

    let records = log_records(&redis);
    assert_eq!(records.len(), 15, "{records:#?}");
    assert_eq!(
        records[0],
        Record::Create {
            session: "s1".into(),
            name: "ann".into(),
            user: None,
            rules: None,
            expires: None,
        }
    );
    let records = &records[1..];
    let Record::Join { ts, .. } = &records[0] else {
        panic!("first a join: {:?}", records[0]);
    };
    let Record::Send { session, message } = &records[6] else {
        panic!("the sixth send: {:?}", records[6]);
    };
    assert_eq!(session, "s1");
    assert_eq!(message.text, format!("{text}5"));
    assert_eq!((message.id, message.from.as_str()), (6, "ann"));
    assert!(
        message.ts >= *ts,
        "a message's ts is Redis's clock, after the join's"
    );
    let Record::Retry {
        message: original, ..
    } = &records[7]
    else {
        panic!("a retry: {:?}", records[7]);
    };
    assert_eq!(original, message, "a retry carries the original message");
    let Record::Page {
        before,
        more,
        messages,
        ..
    } = &records[8]
    else {
        panic!("a page: {:?}", records[8]);
    };
    // history_len 4 keeps ids 3-6; below 6, at most 2: 4 and 5, and 3 is left.
    let ids: Vec<u64> = messages.iter().map(|m| m.id).collect();
    assert_eq!((*before, *more, ids), (Some(6), true, vec![4, 5]));
    assert!(matches!(&records[9], Record::Typing { room, .. } if room == "lobby"));
    assert!(matches!(&records[10], Record::Leave { room, .. } if room == "lobby"));
    let Record::Join { last, .. } = &records[11] else {
        panic!("a join: {:?}", records[11]);
    };
    assert_eq!(*last, 6, "the room's history stood at message 6");
    let Record::End {
        session,
        why,
        rooms,
        ts: ended,
    } = &records[13]
    else {
        panic!("an end: {:?}", records[13]);
    };
    assert_eq!((session.as_str(), *why), ("s1", Ending::Deleted));
    assert_eq!(rooms, &["lobby", "other"]);
    assert!(ended >= &message.ts);

    // The Redis history store reads what the script wrote, byte for byte.
    let stored: Vec<String> = redis::cmd("ZRANGE")
        .arg("switchyard:room:lobby")
        .arg(0)
        .arg(-1)
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(stored.len(), 4, "trimmed to history_len");
    let newest: switchyard::protocol::Message = serde_json::from_str(&stored[3]).unwrap();
    assert_eq!(&newest, message);

    // An ended session is gone, keys and all.
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("switchyard:c:session:*")
        .query(&mut redis.connection())
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    let after = sequencer.execute("s1", &join("lobby")).await.unwrap();
    assert_eq!(
        after.result.error.map(|e| e.code),
        Some(ErrorCode::UnknownSession)
    );
}

#[tokio::test]
async fn a_rooms_history_in_redis_keeps_what_scrollback_reaches_not_only_what_joins_show() {
    let redis = RedisServer::start().await;
    // Joins show the last 4 (`history_len`); Redis keeps the last 7.
    let sequencer = sequencer(&redis).await.keeping(7);
    sequencer.create("s1", "ann", None).await.unwrap();
    ok(&sequencer, "s1", join("lobby")).await;
    for n in 0..10 {
        ok(
            &sequencer,
            "s1",
            send("lobby", &format!("m{n}"), &format!("c{n}")),
        )
        .await;
    }
    let kept: Vec<String> = redis::cmd("ZRANGE")
        .arg("switchyard:room:lobby")
        .arg(0)
        .arg(-1)
        .query(&mut redis.connection())
        .unwrap();
    let texts: Vec<String> = kept
        .iter()
        .map(|m| serde_json::from_str::<serde_json::Value>(m).unwrap()["text"].to_string())
        .collect();
    let expected: Vec<String> = (3..10).map(|n| format!("\"m{n}\"")).collect();
    assert_eq!(texts, expected, "the last 7 messages");
}

#[tokio::test]
async fn a_refresh_takes_the_verified_identity_of_the_same_user_only() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    sequencer.create("plain", "ann", None).await.unwrap();
    sequencer
        .create("token", "cat", Some(&identity("cat")))
        .await
        .unwrap();
    let refused = |d: Decision| d.result.error.map(|e| (e.code, e.message));
    let no_token = sequencer.refresh("plain", &identity("cat")).await.unwrap();
    assert_eq!(
        refused(no_token).map(|e| e.0),
        Some(ErrorCode::Forbidden),
        "a session without a token has nothing to refresh"
    );
    let other = sequencer.refresh("token", &identity("dan")).await.unwrap();
    assert!(
        refused(other).is_some_and(
            |(code, message)| code == ErrorCode::Forbidden && message.contains("own user")
        ),
        "another user's token"
    );
    let before = sequencer.execute("token", &join("c")).await.unwrap();
    assert_eq!(
        before.result.error.map(|e| e.code),
        Some(ErrorCode::Forbidden)
    );
    let wider = Identity {
        rooms: None,
        ..identity("cat")
    };
    let refreshed = sequencer.refresh("token", &wider).await.unwrap();
    assert!(
        refreshed.result.ok && refreshed.entry.is_none(),
        "{refreshed:?}"
    );
    ok(&sequencer, "token", join("c")).await;
}

#[tokio::test]
async fn while_redis_is_down_commands_fail_as_unavailable_and_work_again_after() {
    let mut redis = RedisServer::persistent().await;
    let sequencer = sequencer(&redis).await;
    sequencer.create("s1", "ann", None).await.unwrap();
    ok(&sequencer, "s1", join("lobby")).await;
    redis.kill().await;
    let down = within(
        "a command to fail while Redis is down",
        sequencer.execute("s1", &send("lobby", "lost?", "c1")),
    )
    .await;
    assert!(matches!(down, Err(Unavailable(_))), "{down:?}");
    redis.restart().await;
    // The connection comes back by itself; the session and its room were kept.
    let again = within("a command to succeed once Redis is back", async {
        loop {
            if let Ok(decided) = sequencer.execute("s1", &send("lobby", "back", "c2")).await {
                return decided;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(again.result.ok, "{again:?}");
    assert_eq!(again.result.id, Some(1), "the failed send took no id");
}

#[tokio::test]
async fn a_poll_past_the_held_polls_point_takes_its_lease_and_one_not_past_it_is_refused() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    sequencer.create("s1", "ann", None).await.unwrap();
    let create = log_records(&redis).len();
    let poll = |node: &'static str, attachment: &'static str, after| {
        let sequencer = sequencer.clone();
        async move {
            sequencer
                .attach("s1", node, attachment, TransportKind::LongPolling, after)
                .await
                .expect("redis answers")
        }
    };
    assert!(matches!(poll("A", "A:1", 4).await, Attach::Attached { .. }));
    for (attachment, after) in [("B:1", 4), ("B:2", 3)] {
        assert_eq!(
            poll("B", attachment, after).await,
            Attach::PollHeldBy("A:1".into()),
            "after={after}: A:1 (after=4) may still be waiting"
        );
    }
    // Resuming past 4: A:1's reply handed the client those seqs, so A:1 has ended.
    assert!(matches!(poll("B", "B:3", 7).await, Attach::Attached { .. }));
    assert_eq!(
        log_records(&redis).len(),
        create,
        "no entry: nothing runs to be closed"
    );
    let renewal = sequencer
        .renew("s1", "A", "A:1", TransportKind::LongPolling, false)
        .await
        .unwrap();
    assert_eq!(renewal, Renewal::Lost, "had A:1 still run, it learns here");
    assert_eq!(
        poll("C", "C:1", 7).await,
        Attach::PollHeldBy("B:3".into()),
        "B:3 holds it now"
    );
    // Node B beat, then stopped (it died): its poll is not waited for.
    let mut conn = redis.connection();
    let time: (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let silent = time.0 * 1000 - NODE_SILENCE.as_millis() as u64 - 500;
    redis::cmd("ZADD")
        .arg("switchyard:c:nodes")
        .arg(silent)
        .arg("B")
        .query::<()>(&mut conn)
        .unwrap();
    assert!(matches!(poll("C", "C:2", 7).await, Attach::Attached { .. }));
    assert_eq!(log_records(&redis).len(), create, "still no entry");
}

#[tokio::test]
async fn one_transport_at_a_time_and_one_poll_at_a_time_across_nodes() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    sequencer.create("s1", "ann", None).await.unwrap();
    let attach = |node: &'static str, attachment: &'static str, kind| {
        let sequencer = sequencer.clone();
        async move {
            sequencer
                .attach("s1", node, attachment, kind, 0)
                .await
                .expect("redis answers")
        }
    };
    let create = log_records(&redis).len();
    assert!(
        matches!(
            attach("A", "A:1", TransportKind::LongPolling).await,
            Attach::Attached { .. }
        ),
        "nothing to supersede"
    );
    assert_eq!(log_records(&redis).len(), create, "no entry");
    assert_eq!(
        attach("B", "B:1", TransportKind::ShortPolling).await,
        Attach::PollHeldBy("A:1".into()),
        "a second poll, on another node"
    );
    // A stream supersedes the poll: the entry tells node A to close A:1, and the node that
    // attaches applies the log up to it first.
    let Attach::Attached { last } = attach("B", "B:2", TransportKind::WebSocket).await else {
        panic!("a stream supersedes a poll");
    };
    assert_eq!(last, sequencer.tip().await.unwrap());
    assert_eq!(log_records(&redis).len(), create + 1);
    assert_eq!(
        log_records(&redis).last(),
        Some(&Record::Attach {
            session: "s1".into(),
            node: "B".into(),
            attachment: "B:2".into(),
            superseded: "A:1".into(),
        })
    );
    let renew = |node: &'static str, attachment: &'static str, kind, retake| {
        let sequencer = sequencer.clone();
        async move {
            sequencer
                .renew("s1", node, attachment, kind, retake)
                .await
                .expect("redis answers")
        }
    };
    assert_eq!(
        renew("A", "A:1", TransportKind::LongPolling, false).await,
        Renewal::Lost,
        "A:1 was superseded"
    );
    assert_eq!(
        renew("B", "B:2", TransportKind::WebSocket, false).await,
        Renewal::Renewed
    );
    // A poll supersedes a stream, as on one node.
    assert!(matches!(
        attach("C", "C:1", TransportKind::Sse).await,
        Attach::Attached { .. }
    ));
    assert_eq!(log_records(&redis).len(), create + 2, "C:1 superseded B:2");
    assert!(!sequencer.detach("s1", "B:2").await.unwrap());
    assert!(sequencer.detach("s1", "C:1").await.unwrap());
    // A lease that is gone (detached here; lapsed while Redis was away) is taken again only
    // when its node asks to, having checked its transport is still attached.
    assert_eq!(
        renew("C", "C:1", TransportKind::Sse, false).await,
        Renewal::Lapsed
    );
    assert_eq!(
        renew("C", "C:1", TransportKind::Sse, true).await,
        Renewal::Renewed
    );
    assert!(sequencer.detach("s1", "C:1").await.unwrap());
    assert!(matches!(
        attach("A", "A:2", TransportKind::LongPolling).await,
        Attach::Attached { .. }
    ));
    assert_eq!(
        log_records(&redis).len(),
        create + 2,
        "detached: nothing to supersede"
    );
    let unknown = sequencer
        .attach("nope", "A", "A:3", TransportKind::WebSocket, 0)
        .await
        .unwrap();
    assert_eq!(unknown, Attach::UnknownSession);
}

#[tokio::test]
async fn a_session_ends_once_when_idle_past_its_ttl_its_lease_lapsed_or_its_token_expired() {
    let redis = RedisServer::start().await;
    let config = HubConfig {
        session_ttl: Duration::from_secs(1),
        ..config()
    };
    let lease = Duration::from_millis(300);
    let sequencer = redis.sequencer(&config).await.with_lease(lease);
    let short_token = Identity {
        expires_at: SystemTime::now() + Duration::from_millis(600),
        ..identity("tok")
    };
    let started = std::time::Instant::now();
    for (session, identity) in [
        ("idle", None),
        ("dead", None),
        ("live", None),
        ("token", Some(&short_token)),
        ("refreshed", Some(&short_token)),
    ] {
        sequencer.create(session, session, identity).await.unwrap();
        ok(&sequencer, session, join("a1")).await;
    }
    // A refresh moves the token's expiry, and so the deadline.
    let refreshed = sequencer
        .refresh("refreshed", &identity("tok"))
        .await
        .unwrap();
    assert!(refreshed.result.ok, "{refreshed:?}");
    for session in ["dead", "live", "token", "refreshed"] {
        let attached = sequencer
            .attach(
                session,
                "A",
                &format!("A:{session}"),
                TransportKind::WebSocket,
                0,
            )
            .await
            .unwrap();
        assert!(matches!(attached, Attach::Attached { .. }), "{attached:?}");
    }
    assert_eq!(sequencer.expire().await.unwrap(), Vec::<String>::new());
    // "live", "token" and "refreshed" are renewed; "dead"'s node died; "idle" never attached.
    let mut ended = Vec::new();
    within("idle, dead and token to end", async {
        while ended.len() < 3 {
            for session in ["live", "token", "refreshed"] {
                sequencer
                    .renew(
                        session,
                        "A",
                        &format!("A:{session}"),
                        TransportKind::WebSocket,
                        false,
                    )
                    .await
                    .unwrap();
            }
            for session in sequencer.expire().await.unwrap() {
                ended.push((session, started.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let names: Vec<&str> = ended.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["token", "idle", "dead"], "{ended:?}");
    // Never before its bound (a little slack for two clocks read at different moments).
    let slack = Duration::from_millis(50);
    assert!(
        ended[0].1 + slack >= Duration::from_millis(600),
        "{ended:?}"
    );
    assert!(ended[1].1 + slack >= Duration::from_secs(1), "{ended:?}");
    assert!(
        ended[2].1 + slack >= lease + Duration::from_secs(1),
        "{ended:?}"
    );
    assert_eq!(
        sequencer
            .renew(
                "refreshed",
                "A",
                "A:refreshed",
                TransportKind::WebSocket,
                false
            )
            .await
            .unwrap(),
        Renewal::Renewed
    );
    let ends: Vec<(String, Ending, Vec<String>)> = log_records(&redis)
        .into_iter()
        .filter_map(|r| match r {
            Record::End {
                session,
                why,
                rooms,
                ..
            } => Some((session, why, rooms)),
            _ => None,
        })
        .collect();
    let lobby = vec!["a1".to_owned()];
    assert_eq!(
        ends,
        [
            ("token".into(), Ending::TokenExpired, lobby.clone()),
            ("idle".into(), Ending::Idle, lobby.clone()),
            ("dead".into(), Ending::Idle, lobby.clone()),
        ]
    );
    // Once ended, gone: a renewal fails, and commands are refused.
    assert_eq!(
        sequencer
            .renew("token", "A", "A:token", TransportKind::WebSocket, false)
            .await
            .unwrap(),
        Renewal::Lost
    );
    let gone = sequencer.execute("dead", &join("a1")).await.unwrap();
    assert_eq!(
        gone.result.error.map(|e| e.code),
        Some(ErrorCode::UnknownSession)
    );
    // "live" detaches, and ends a TTL later.
    assert!(sequencer.detach("live", "A:live").await.unwrap());
    let detached = std::time::Instant::now();
    let ended = within("live to end after its detach", async {
        loop {
            let ended = sequencer.expire().await.unwrap();
            if !ended.is_empty() {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(ended, ["live"]);
    assert!(detached.elapsed() + slack >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_refused_command_from_a_stream_is_an_error_entry_for_its_session() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    sequencer.create("s1", "ann", None).await.unwrap();
    let refused = sequencer
        .execute("s1", &send("nowhere", "hi", "c1"))
        .await
        .unwrap();
    let error = refused.result.error.expect("not in the room");
    assert!(
        refused.entry.is_none(),
        "a refusal appends nothing by itself"
    );
    sequencer
        .push_error("s1", &error, Some("c1"))
        .await
        .unwrap();
    assert_eq!(
        log_records(&redis).last(),
        Some(&Record::Error {
            session: "s1".into(),
            error,
            client_id: Some("c1".into()),
        })
    );
}

/// A hub's view of one session: a stream attached from the start, read after every step.
struct Reader {
    hub: Hub,
    attachment: Option<switchyard::hub::Attachment>,
}

impl Reader {
    fn new(hub: &Hub, id: &str) -> Reader {
        let attachment = hub
            .attach(id, TransportKind::Sse, 0)
            .expect("attach a stream");
        Reader {
            hub: hub.clone(),
            attachment: Some(attachment),
        }
    }

    /// The events since the last read, as JSON with their seq, without the times (each
    /// side's clock gives its own).
    fn read(&mut self) -> Vec<serde_json::Value> {
        self.hub.settle();
        let Some(attachment) = &mut self.attachment else {
            return Vec::new();
        };
        match attachment.ready(BatchLimit::events(100_000)) {
            Delivery::Events(events) => events
                .iter()
                .map(|(seq, event)| {
                    let mut json = serde_json::from_str(&event.to_json(*seq)).unwrap();
                    strip_times(&mut json);
                    json
                })
                .collect(),
            Delivery::Closed(_) => {
                self.attachment = None;
                Vec::new()
            }
        }
    }
}

fn strip_times(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(fields) => {
            fields.remove("ts");
            fields.values_mut().for_each(strip_times);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_times),
        _ => {}
    }
}

/// Applies what the log got since the last call to every node, in order.
struct Replay {
    applied: String,
}

impl Replay {
    fn new() -> Replay {
        Replay {
            applied: "0-0".into(),
        }
    }

    async fn catch_up(&mut self, redis: &RedisServer, nodes: &[(&str, Hub)]) {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(LOG)
            .arg(format!("({}", self.applied))
            .arg("+")
            .query(&mut redis.connection())
            .expect("XRANGE");
        for entry in &reply.ids {
            let body: String = entry.get("e").expect("a body");
            let record = Record::parse(&body).expect("a record");
            for (node, hub) in nodes {
                hub.replicate(record.clone(), node)
                    .await
                    .expect("the node applies the record");
            }
            self.applied = entry.id.clone();
        }
    }
}

/// Runs `steps` on one hub, and through the sequencer on two nodes applying the log after
/// every step: each session's events on each node must be the one hub's, seq for seq.
/// An empty Redis, two nodes of `config`, and a sequencer deciding by it.
async fn fresh_cluster(
    redis: &RedisServer,
    config: &HubConfig,
) -> ([(&'static str, Hub); 2], Sequencer) {
    redis::cmd("FLUSHALL")
        .query::<()>(&mut redis.connection())
        .expect("FLUSHALL");
    let nodes = [
        ("A", Hub::new(config.clone())),
        ("B", Hub::new(config.clone())),
    ];
    let sequencer = redis.sequencer(config).await;
    (nodes, sequencer)
}

async fn same_events(redis: &RedisServer, steps: &[Step]) -> Result<(), TestCaseError> {
    let config = HubConfig {
        presence_interval: Duration::ZERO,
        ..config()
    };
    let reference = Hub::new(config.clone());
    let (nodes, sequencer) = fresh_cluster(redis, &config).await;
    let mut sessions = Vec::new();
    let mut readers = Vec::new();
    for (i, name) in ["ann", "bob", "cat"].into_iter().enumerate() {
        let identity = (i == 2).then(|| identity(name));
        let expected = match &identity {
            Some(identity) => reference.create_session_for(identity.clone()),
            None => reference.create_session(name),
        }
        .unwrap();
        let id = format!("s{i}");
        sequencer
            .create(&id, name, identity.as_ref())
            .await
            .unwrap();
        sessions.push((expected, id));
    }
    // Every node keeps every session, from its `create` entry on.
    let mut replay = Replay::new();
    replay.catch_up(redis, &nodes).await;
    for (expected, id) in &sessions {
        let on_nodes = nodes.each_ref().map(|(_, node)| Reader::new(node, id));
        readers.push((Reader::new(&reference, &expected.id), on_nodes));
    }
    for (at, step) in steps.iter().enumerate() {
        match step {
            Step::Command(who, command) => {
                let (expected, id) = &sessions[*who];
                reference.execute(expected, vec![Ok(command.clone())]).await;
                sequencer.execute(id, command).await.expect("redis answers");
            }
            Step::End(who) => {
                let (expected, id) = &sessions[*who];
                let _ = reference.end_session(&expected.id);
                sequencer.end(id).await.expect("redis answers");
            }
        }
        replay.catch_up(redis, &nodes).await;
        for (i, (expected, on_nodes)) in readers.iter_mut().enumerate() {
            let expected = expected.read();
            for (node, got) in on_nodes.iter_mut().enumerate() {
                let got = got.read();
                prop_assert_eq!(
                    &got,
                    &expected,
                    "session {} on node {} after step {}: {:?}",
                    i,
                    node,
                    at,
                    step
                );
            }
        }
    }
    Ok(())
}

#[test]
fn replicas_give_each_session_the_events_one_hub_gives() {
    let steps = proptest::collection::vec(step(), 1..80);
    run_cases(steps, 48, |runtime, redis, steps| {
        runtime.block_on(same_events(redis, &steps))
    });
}

#[derive(Debug, Clone)]
enum Timed {
    Step(Step),
    /// Time passes (ms), then the ticker appends a flush.
    Wait(u64),
}

/// A session's reader on a node that fell behind, and how many events the first node had
/// given the session when that node started (`None`: the session had ended).
type Behind = Option<(Reader, usize)>;

/// With coalesced presence (a 20 ms interval) and rooms past the presence list limit at
/// three members, two nodes give every session the same events, byte for byte: quiet rooms
/// are judged on the log's clock and pending changes go out at the ticker's `flush` entries.
/// Halfway through, a third node starts from a snapshot of the first (as a node starting in a
/// running cluster does): it holds every event the first kept, and from then on gives every
/// session the same events too. A fourth starts from the same snapshot but applies nothing
/// more until three quarters through, when it takes a new snapshot of the first (as every
/// node does after Redis lost the cluster's state): its open transports get exactly the
/// events they lacked.
async fn replicas_agree(redis: &RedisServer, steps: &[Timed]) -> Result<(), TestCaseError> {
    let config = HubConfig {
        presence_interval: Duration::from_millis(20),
        presence_list_limit: 2,
        ..config()
    };
    let (nodes, sequencer) = fresh_cluster(redis, &config).await;
    let mut nodes = nodes.to_vec();
    let mut readers = Vec::new();
    for (i, name) in ["ann", "bob", "cat"].into_iter().enumerate() {
        let identity = (i == 2).then(|| identity(name));
        sequencer
            .create(&format!("s{i}"), name, identity.as_ref())
            .await
            .unwrap();
    }
    let mut replay = Replay::new();
    replay.catch_up(redis, &nodes).await;
    for i in 0..3 {
        readers.push(
            nodes
                .iter()
                .map(|(_, node)| Reader::new(node, &format!("s{i}")))
                .collect::<Vec<_>>(),
        );
    }
    // Every event each session got on the first node, for the node started from a snapshot.
    let mut seen: Vec<Vec<serde_json::Value>> = vec![Vec::new(); 3];
    let mut flushes = 0;
    let final_wait = [Timed::Wait(25)];
    let halfway = steps.len() / 2;
    let three_quarters = halfway + (steps.len() - halfway) / 2;
    // The fourth node, and for each session its reader there and how many events the first
    // node had given it when the fourth started.
    let mut lagging: Option<(Hub, Vec<Behind>)> = None;
    for (at, step) in steps.iter().chain(&final_wait).enumerate() {
        match step {
            Timed::Step(Step::Command(who, command)) => {
                sequencer
                    .execute(&format!("s{who}"), command)
                    .await
                    .expect("redis answers");
            }
            Timed::Step(Step::End(who)) => {
                sequencer
                    .end(&format!("s{who}"))
                    .await
                    .expect("redis answers");
            }
            Timed::Wait(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                flushes += usize::from(sequencer.tick("A").await.unwrap().is_some());
            }
        }
        replay.catch_up(redis, &nodes).await;
        for (i, on_nodes) in readers.iter_mut().enumerate() {
            let mut reads = on_nodes.iter_mut().map(Reader::read);
            let first = reads.next().expect("node A's read");
            for (node, got) in reads.enumerate() {
                prop_assert_eq!(
                    &got,
                    &first,
                    "session {} on node {} after step {}: {:?}",
                    i,
                    node + 1,
                    at,
                    step
                );
            }
            seen[i].extend(first);
        }
        if at == halfway {
            let late = Hub::new(config.clone());
            late.restore(&nodes[0].1.snapshot())
                .expect("a snapshot restores");
            for (i, on_nodes) in readers.iter_mut().enumerate() {
                let id = format!("s{i}");
                if late.session(&id).is_err() {
                    prop_assert!(on_nodes[0].attachment.is_none(), "{} ended on A", id);
                    continue;
                }
                let mut reader = Reader::new(&late, &id);
                prop_assert_eq!(
                    reader.read(),
                    seen[i].clone(),
                    "session {} from the snapshot after step {}",
                    i,
                    at
                );
                on_nodes.push(reader);
            }
            nodes.push(("C", late));
            let behind = Hub::new(config.clone());
            behind
                .restore(&nodes[0].1.snapshot())
                .expect("a snapshot restores");
            let readers = (0..3)
                .map(|i| {
                    let id = format!("s{i}");
                    let mut reader = behind
                        .session(&id)
                        .is_ok()
                        .then(|| Reader::new(&behind, &id))?;
                    reader.read();
                    Some((reader, seen[i].len()))
                })
                .collect();
            lagging = Some((behind, readers));
        }
        if at == three_quarters && at > halfway {
            let (behind, lag_readers) = lagging.take().expect("the fourth node started");
            behind
                .restore(&nodes[0].1.snapshot())
                .expect("a node behind takes a newer snapshot");
            for (i, lag_reader) in lag_readers.into_iter().enumerate() {
                let Some((mut reader, from)) = lag_reader else {
                    continue;
                };
                if nodes[0].1.session(&format!("s{i}")).is_err() {
                    continue;
                }
                prop_assert_eq!(
                    reader.read(),
                    seen[i][from..].to_vec(),
                    "session {} on the node behind, given what it lacked at step {}",
                    i,
                    at
                );
                readers[i].push(reader);
            }
            nodes.push(("D", behind));
        }
    }
    prop_assert!(flushes > 0, "the ticker appended flushes");
    Ok(())
}

#[test]
fn with_coalesced_presence_replicas_give_the_same_events() {
    let timed = prop_oneof![
        8 => step().prop_map(Timed::Step),
        1 => (0..30u64).prop_map(Timed::Wait),
    ];
    let steps = proptest::collection::vec(timed, 1..60);
    run_cases(steps, 16, |runtime, redis, steps| {
        runtime.block_on(replicas_agree(redis, &steps))
    });
}

#[tokio::test]
async fn one_node_at_a_time_holds_the_ticker_and_another_takes_it_when_it_lapses() {
    let redis = RedisServer::start().await;
    let lease = Duration::from_millis(300);
    let sequencer = sequencer(&redis).await.with_lease(lease);
    assert!(
        sequencer.tick("A").await.unwrap().is_some(),
        "free: A takes it"
    );
    assert!(sequencer.tick("B").await.unwrap().is_none(), "A holds it");
    assert!(sequencer.tick("A").await.unwrap().is_some(), "A renews it");
    let taken = within("B to take the ticker once A stops", async {
        loop {
            if let Some(entry) = sequencer.tick("B").await.unwrap() {
                return entry;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let flushes = log_records(&redis)
        .iter()
        .filter(|r| matches!(r, Record::Flush { .. }))
        .count();
    assert_eq!(flushes, 3, "each tick of the holder is one flush ({taken})");
    assert!(
        sequencer.tick("A").await.unwrap().is_none(),
        "B holds it now"
    );
}

/// The events of a session on `hub` after `after`, as JSON.
fn events_after(hub: &Hub, session: &str, after: u64) -> Vec<serde_json::Value> {
    hub.settle();
    let mut attachment = hub
        .attach(session, TransportKind::WebSocket, after)
        .expect("attach");
    match attachment.ready(BatchLimit::events(100_000)) {
        Delivery::Events(events) => events
            .iter()
            .map(|(seq, event)| serde_json::from_str(&event.to_json(*seq)).unwrap())
            .collect(),
        Delivery::Closed(reason) => panic!("closed: {reason:?}"),
    }
}

#[tokio::test]
async fn a_session_whose_node_died_resumes_on_another_with_every_event_once() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    let nodes = [("A", Hub::new(config())), ("B", Hub::new(config()))];
    let mut replay = Replay::new();
    for (id, name) in [("s0", "ann"), ("s1", "bob")] {
        sequencer.create(id, name, None).await.unwrap();
        ok(&sequencer, id, join("lobby")).await;
    }
    for n in 0..5 {
        ok(
            &sequencer,
            "s1",
            send("lobby", &format!("m{n}"), &format!("c{n}")),
        )
        .await;
    }
    replay.catch_up(&redis, &nodes).await;
    // s0's client read its first events from node A, then A died.
    let on_a = events_after(&nodes[0].1, "s0", 0);
    let [(_, a), (_, b)] = nodes;
    drop(a);
    let read = &on_a[..on_a.len() - 2];
    let last_seq = read.last().unwrap()["seq"].as_u64().unwrap();
    for n in 5..8 {
        ok(
            &sequencer,
            "s1",
            send("lobby", &format!("m{n}"), &format!("c{n}")),
        )
        .await;
    }
    let survivors = [("B", b)];
    replay.catch_up(&redis, &survivors).await;
    let on_b = events_after(&survivors[0].1, "s0", last_seq);
    assert_eq!(
        on_b[..2],
        on_a[on_a.len() - 2..],
        "what A had not delivered, as A had it"
    );
    let seqs: Vec<u64> = on_b.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs
        .iter()
        .copied()
        .eq(last_seq + 1..=last_seq + seqs.len() as u64));
    let texts: Vec<&str> = read
        .iter()
        .chain(&on_b)
        .filter(|e| e["type"] == "message")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
}

/// Redis lost the cluster's state: every script refuses until the running nodes restore it.
/// The running node that applied the most is elected (one that offered but does not run is
/// passed over), and what it writes back is what the scripts decide by: sessions, their
/// rooms and rules, room history and message ids, under a new log that starts with its
/// `reseed`.
#[tokio::test]
async fn after_redis_lost_the_state_the_running_node_that_applied_most_restores_it() {
    let redis = RedisServer::start().await;
    let sequencer = sequencer(&redis).await;
    redis::cmd("FLUSHALL")
        .query::<()>(&mut redis.connection())
        .unwrap();
    let refused = sequencer.create("s9", "new", None).await.unwrap_err();
    assert!(refused.lost_state(), "{refused}");
    let refused = sequencer
        .execute("s0", &Command::Leave { room: "a1".into() })
        .await
        .unwrap_err();
    assert!(
        refused.lost_state(),
        "no 404 for a session Redis forgot: {refused}"
    );

    sequencer.beat("A").await.unwrap();
    sequencer.beat("B").await.unwrap();
    let at = |ms: u64| LogId { ms, seq: 0 };
    assert_eq!(sequencer.offer("A", at(5)).await.unwrap(), Offer::Wait);
    // C applied more, but does not run (it offered, then died).
    assert_eq!(sequencer.offer("C", at(9)).await.unwrap(), Offer::Wait);
    tokio::time::sleep(OFFER_AT_LEAST).await;
    // B runs and has not offered yet: the election waits for it.
    assert_eq!(sequencer.offer("A", at(5)).await.unwrap(), Offer::Wait);
    let elected = Offer::Elected("B".into());
    assert_eq!(sequencer.offer("B", at(7)).await.unwrap(), elected);
    assert_eq!(sequencer.offer("A", at(5)).await.unwrap(), elected);

    let now_micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let message = |id: u64, room: &str| Message {
        room: room.into(),
        id,
        from: "ann".into(),
        text: format!("m{id}"),
        ts: now_micros,
        client_id: format!("c{id}"),
    };
    let seed = Seed {
        last_message_id: 41,
        sessions: vec![
            (
                "s0".into(),
                "ann".into(),
                None,
                vec!["a1".into(), "b".into()],
            ),
            (
                "s1".into(),
                "cat".into(),
                Some(identity("cat")),
                vec!["b".into()],
            ),
        ],
        rooms: vec![
            ("a1".into(), vec![message(40, "a1")]),
            ("b".into(), vec![message(41, "b")]),
        ],
    };
    assert_eq!(
        sequencer.reseed("A", &seed, b"{}".to_vec()).await.unwrap(),
        None,
        "only the node elected restores"
    );
    let entry = sequencer
        .reseed("B", &seed, b"{}".to_vec())
        .await
        .unwrap()
        .expect("B restores");
    assert_eq!(sequencer.offer("A", at(5)).await.unwrap(), Offer::Restored);
    let records = log_records(&redis);
    let [Record::Reseed { node, key, .. }] = records.as_slice() else {
        panic!("the new log starts with the reseed: {records:?}");
    };
    assert_eq!(node, "B");
    let snapshot = sequencer.read_snapshot(key).await.unwrap();
    assert_eq!(
        snapshot.as_deref(),
        Some(&b"{}"[..]),
        "the snapshot is left for every node"
    );
    assert!(entry > LogId::ZERO);

    // The sessions are back, in their rooms, with their rules; ids go on.
    let sent = sequencer
        .execute(
            "s0",
            &Command::Send {
                room: "a1".into(),
                text: "after".into(),
                client_id: "x1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(sent.result.id, Some(42), "{sent:?}");
    let left = sequencer
        .execute("s0", &Command::Leave { room: "b".into() })
        .await
        .unwrap();
    assert!(left.result.ok, "ann was in b: {left:?}");
    let forbidden = sequencer
        .execute("s1", &Command::Join { room: "c".into() })
        .await
        .unwrap();
    assert_eq!(
        forbidden.result.error.map(|e| e.code),
        Some(ErrorCode::Forbidden),
        "cat's rules came back"
    );
    let page = sequencer
        .execute(
            "s1",
            &Command::History {
                room: "b".into(),
                before: None,
                limit: Some(10),
            },
        )
        .await
        .unwrap();
    assert!(page.result.ok, "{page:?}");
    let Some(Record::Page { messages, .. }) = log_records(&redis).pop() else {
        panic!("a page entry");
    };
    assert_eq!(messages, [message(41, "b")], "room history came back");
}

/// A snapshot keeps each event body once, however many sessions were sent it: a room's
/// cached `history`, sent to every joiner, is reissued per join over the same bytes.
#[tokio::test]
async fn a_snapshot_keeps_a_history_sent_to_many_joiners_once() {
    let hub = Hub::new(config());
    let ann = hub.create_session("ann").unwrap();
    let send = Command::Send {
        room: "a1".into(),
        text: "x".repeat(500),
        client_id: "c1".into(),
    };
    let join = Command::Join { room: "a1".into() };
    hub.execute(&ann, vec![Ok(join.clone()), Ok(send)]).await;
    for i in 0..20 {
        let joiner = hub.create_session(&format!("u{i}")).unwrap();
        hub.execute(&joiner, vec![Ok(join.clone())]).await;
    }
    let image: serde_json::Value = serde_json::from_slice(&hub.snapshot()).unwrap();
    let histories = image["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|body| body.as_str().unwrap().starts_with("\"type\":\"history\""))
        .count();
    // ann's, before the message, and the one all 20 joiners got.
    assert_eq!(histories, 2, "one history body for 20 joiners");
}
