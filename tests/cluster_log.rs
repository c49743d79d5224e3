//! The cluster's log (src/cluster/log.rs) on a real `redis-server`: every reader sees every
//! entry once, in one order; a reader goes on across a Redis restart that kept the data, and
//! reports `Lost` (never a silent gap) when Redis lost entries or trimmed them before it read
//! them.

mod support;

use std::time::Duration;

use support::redis::RedisServer;
use support::within;
use switchyard::cluster::log::{self, Entry, LogId, Read, Reader};
use tokio::sync::mpsc;

const KEEP: Duration = Duration::from_secs(3600);

fn client(redis: &RedisServer) -> redis::Client {
    redis::Client::open(redis.url()).expect("a Redis URL")
}

fn append(conn: &mut redis::Connection, body: &str) -> LogId {
    log::append(conn, body.as_bytes(), KEEP).expect("append")
}

fn reader(redis: &RedisServer, after: LogId) -> (Reader, mpsc::Receiver<Read>) {
    let (tx, rx) = mpsc::channel(16);
    let reader = Reader::spawn(client(redis), after, tx).expect("spawn the reader");
    (reader, rx)
}

/// The next report, within the tests' wait.
async fn next(reports: &mut mpsc::Receiver<Read>) -> Read {
    within("the log reader's next report", reports.recv())
        .await
        .expect("the reader is running")
}

/// Reads `count` entries, failing on anything but entries.
async fn entries(reports: &mut mpsc::Receiver<Read>, count: usize) -> Vec<Entry> {
    let mut got = Vec::new();
    while got.len() < count {
        match next(reports).await {
            Read::Entries(entries) => got.extend(entries),
            other => panic!("expected entries, got {other:?}"),
        }
    }
    assert_eq!(got.len(), count, "no more than were appended");
    got
}

fn bodies(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8(e.body.clone()).expect("utf-8"))
        .collect()
}

#[tokio::test]
async fn two_readers_see_every_entry_of_two_writers_once_in_one_order() {
    let redis = RedisServer::start().await;
    let (_a, mut a) = reader(&redis, LogId::ZERO);
    let (_b, mut b) = reader(&redis, LogId::ZERO);
    let writers: Vec<_> = ["x", "y"]
        .into_iter()
        .map(|name| {
            let mut conn = redis.connection();
            std::thread::spawn(move || {
                (0..300)
                    .map(|i| append(&mut conn, &format!("{name}{i}")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<Vec<LogId>> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    let seen_a = entries(&mut a, 600).await;
    let seen_b = entries(&mut b, 600).await;
    assert_eq!(seen_a, seen_b, "one order for every reader");
    let order: Vec<LogId> = seen_a.iter().map(|e| e.id).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "ids increase");
    for (name, ids) in ["x", "y"].iter().zip(&ids) {
        let mine: Vec<String> = bodies(&seen_a)
            .into_iter()
            .filter(|b| b.starts_with(name))
            .collect();
        let expected: Vec<String> = (0..300).map(|i| format!("{name}{i}")).collect();
        assert_eq!(mine, expected, "each writer's entries once, in its order");
        let read: Vec<LogId> = seen_a
            .iter()
            .filter(|e| e.body.starts_with(name.as_bytes()))
            .map(|e| e.id)
            .collect();
        assert_eq!(&read, ids, "the ids the appends returned");
    }
    assert_eq!(
        log::tip(&mut redis.connection()).expect("tip"),
        *order.last().unwrap()
    );
}

#[tokio::test]
async fn a_reader_goes_on_where_it_was_after_redis_restarts_on_its_data() {
    let mut redis = RedisServer::persistent().await;
    let mut conn = redis.connection();
    let first = append(&mut conn, "before");
    let (_reader, mut reports) = reader(&redis, LogId::ZERO);
    assert_eq!(bodies(&entries(&mut reports, 1).await), ["before"]);

    redis.kill().await;
    assert!(
        matches!(next(&mut reports).await, Read::Unreachable(_)),
        "the outage is reported"
    );
    redis.restart().await;
    let mut conn = redis.connection();
    let second = append(&mut conn, "after");
    let got = entries(&mut reports, 1).await;
    assert_eq!(bodies(&got), ["after"], "nothing lost, nothing repeated");
    assert!(second > first);
}

#[tokio::test]
async fn a_reader_reports_lost_when_redis_lost_entries_it_had_not_read() {
    let mut redis = RedisServer::start().await;
    let mut conn = redis.connection();
    let read = append(&mut conn, "read");
    let (_reader, mut reports) = reader(&redis, LogId::ZERO);
    entries(&mut reports, 1).await;

    // Restarted without its data: the next entry follows nothing the reader read.
    redis.kill().await;
    redis.restart().await;
    let mut conn = redis.connection();
    append(&mut conn, "new");
    loop {
        match next(&mut reports).await {
            Read::Unreachable(_) => continue,
            Read::WentBack { after } => assert_eq!(after, read, "what the reader had"),
            Read::Lost { after, found, prev } => {
                assert_eq!(after, read, "what the reader had");
                assert_eq!(found.body, b"new");
                assert_eq!(prev, LogId::ZERO, "a new log");
                break;
            }
            other => panic!("expected Lost, got {other:?}"),
        }
    }
    append(&mut conn, "next");
    assert_eq!(
        bodies(&entries(&mut reports, 1).await),
        ["next"],
        "it goes on from the entry it found"
    );

    // FLUSHALL, with the reader connected all along.
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
    append(&mut conn, "after flush");
    loop {
        match next(&mut reports).await {
            Read::WentBack { .. } => continue,
            Read::Lost { found, prev, .. } => {
                assert_eq!(found.body, b"after flush");
                assert_eq!(prev, LogId::ZERO, "a new log");
                break;
            }
            other => panic!("expected Lost, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_reader_reports_went_back_when_redis_comes_back_with_an_older_copy() {
    let mut redis = RedisServer::start().await;
    let mut conn = redis.connection();
    append(&mut conn, "saved");
    let _: () = redis::cmd("SAVE").query(&mut conn).expect("SAVE");
    let unsaved = append(&mut conn, "unsaved");
    let (_reader, mut reports) = reader(&redis, LogId::ZERO);
    entries(&mut reports, 2).await;

    // Back on the copy saved before the last entry: the reader had read past the log's end.
    redis.kill().await;
    redis.restart().await;
    loop {
        match next(&mut reports).await {
            Read::Unreachable(_) => continue,
            // Back, with nothing new yet.
            Read::Entries(entries) if entries.is_empty() => continue,
            Read::WentBack { after } => {
                assert_eq!(after, unsaved, "what the reader had");
                break;
            }
            other => panic!("expected WentBack, got {other:?}"),
        }
    }
    // It reads the log again from its start, whose first entry follows nothing it read.
    match next(&mut reports).await {
        Read::Lost { found, prev, .. } => {
            assert_eq!(found.body, b"saved");
            assert_eq!(prev, LogId::ZERO);
        }
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reader_that_lags_past_the_retention_reports_lost() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection();
    for i in 0..3 {
        append(&mut conn, &format!("old{i}"));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Keeps 10 ms: the three older entries are trimmed.
    log::append(&mut conn, b"young", Duration::from_millis(10)).expect("append");
    let (_reader, mut reports) = reader(&redis, LogId::ZERO);
    match next(&mut reports).await {
        Read::Lost { after, found, prev } => {
            assert_eq!(after, LogId::ZERO);
            assert_eq!(found.body, b"young");
            assert_ne!(prev, LogId::ZERO, "trimmed, not a new log");
        }
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[test]
fn log_ids_parse_print_and_order() {
    let id: LogId = "1700000000000-3".parse().unwrap();
    assert_eq!(
        id,
        LogId {
            ms: 1_700_000_000_000,
            seq: 3
        }
    );
    assert_eq!(id.to_string(), "1700000000000-3");
    assert!(LogId::ZERO < id && id < "1700000000000-4".parse().unwrap());
    for bad in ["", "1", "1-", "-1", "a-1", "1-b", "1-2-3"] {
        assert!(bad.parse::<LogId>().is_err(), "{bad:?}");
    }
}
