//! Durable room history: real server processes on 127.0.0.1 port 0 over temp data directories,
//! restarted gracefully and killed; scrollback on every transport; the bounds; the refusals at
//! start; and the `history` command's validation.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::*;
use switchyard::protocol::TransportKind;

/// A data directory in a fresh temp directory, and the flags that use it.
fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp directory")
}

fn flags<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--data-dir",
        dir.to_str().expect("utf-8 temp path"),
        "--rate-limit",
        "100000",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// Sends `count` messages to `room` in batches of 100; returns their ids.
async fn send_many(client: &TestServer, session: &str, room: &str, count: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for start in (0..count).step_by(100) {
        let batch: Vec<Value> = (start..(start + 100).min(count))
            .map(|i| send(room, &format!("{room} #{i}"), &format!("{room}-{i}")))
            .collect();
        let reply = client.ok(session, Value::Array(batch)).await;
        for result in reply["results"].as_array().expect("results") {
            ids.push(result["id"].as_u64().expect("an id"));
        }
    }
    ids
}

fn message_ids(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect()
}

/// Pages back through a room with `history` commands from `before` (none: the newest),
/// reading each `history_page` from `events`; returns every id, oldest first.
async fn scroll_back(
    client: &TestServer,
    events: &mut Client,
    room: &str,
    mut before: Option<u64>,
    limit: usize,
) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        let mut command = json!({"type": "history", "room": room, "limit": limit});
        if let Some(before) = before {
            command["before"] = json!(before);
        }
        client.ok(&events.session, command).await;
        let page = events.next_of("history_page").await;
        assert_eq!(page["room"], room, "{page}");
        assert_eq!(page["before"], json!(before), "{page}");
        let mut older = message_ids(&page["messages"]);
        assert!(older.len() <= limit, "{page}");
        assert!(
            older.windows(2).all(|w| w[0] < w[1]),
            "oldest first: {page}"
        );
        let more = page["more"].as_bool().expect("more");
        if let Some(first) = older.first() {
            before = Some(*first);
        }
        older.extend(ids);
        ids = older;
        if !more {
            return ids;
        }
    }
}

#[tokio::test]
async fn history_survives_a_graceful_restart_and_scrollback_pages_through_it_on_every_transport() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &[])).await;
    let client = server.client();
    let ann = client.session("ann").await;
    client.ok(&ann, json!([join("one"), join("two")])).await;
    let one = send_many(&client, &ann, "one", 200).await;
    let two = send_many(&client, &ann, "two", 200).await;
    server.stop().await;

    let server = ServerProcess::start(&flags(dir.path(), &[])).await;
    let client = server.client();
    for kind in TransportKind::ALL {
        let session = client.session("bob").await;
        let mut events = client.attach(kind, &session, 0).await;
        for (room, sent) in [("one", &one), ("two", &two)] {
            client.ok(&session, join(room)).await;
            let history = events.next_of("history").await;
            assert_eq!(
                message_ids(&history["messages"]),
                sent[150..],
                "{kind}: join returns the last 50"
            );
            let paged = scroll_back(&client, &mut events, room, Some(sent[150]), 60).await;
            assert_eq!(
                paged,
                sent[..150],
                "{kind}: scrollback, no gap and no repeat"
            );
            let all = scroll_back(&client, &mut events, room, None, 200).await;
            assert_eq!(&all, sent, "{kind}: one page of the newest 200");
        }
    }
    let next = client
        .ok(&ann_again(&client).await, send("one", "after", "after"))
        .await;
    assert_eq!(
        next["results"][0]["id"].as_u64(),
        Some(two[199] + 1),
        "after a graceful stop the ids continue with the next one"
    );
    server.stop().await;
}

/// A fresh session in room `one`.
async fn ann_again(client: &TestServer) -> String {
    let ann = client.session("ann").await;
    client.ok(&ann, join("one")).await;
    ann
}

#[tokio::test]
async fn a_kill_during_sends_keeps_a_prefix_of_what_was_broadcast_and_never_reuses_an_id() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &[])).await;
    let client = server.client();
    let (_reader, mut ws) = member_on_websocket(&client, "reader").await;
    let sender = client.session("sender").await;
    client.ok(&sender, join("r")).await;
    // Every id the server broadcast, as the sender's replies and the reader's stream show.
    let mut broadcast = BTreeSet::new();
    let addr = server.addr;
    let sending = tokio::spawn(async move {
        let client = TestServer::attached_to(addr);
        let mut ids = Vec::new();
        for i in 0.. {
            let path = format!("/v1/sessions/{sender}/commands");
            let body = json!([send("r", "x", &format!("k{i}"))]);
            match tokio::time::timeout(WAIT, client.try_json(Method::POST, &path, body)).await {
                Ok(Some((StatusCode::OK, reply))) => {
                    ids.push(reply["results"][0]["id"].as_u64().expect("id"))
                }
                _ => return ids,
            }
        }
        ids
    });
    let mut received = 0;
    while received < 300 {
        let event = ws_event(&mut ws).await;
        if event["type"] == "message" {
            broadcast.insert(event["id"].as_u64().expect("id"));
            received += 1;
        }
    }
    server.kill().await;
    broadcast.extend(
        within("the sender to notice", sending)
            .await
            .expect("sender"),
    );

    let server = ServerProcess::start(&flags(dir.path(), &[])).await;
    let client = server.client();
    let session = client.session("later").await;
    let mut events = client.attach(TransportKind::LongPolling, &session, 0).await;
    client.ok(&session, join("r")).await;
    let stored = scroll_back(&client, &mut events, "r", None, 200).await;
    let first = *broadcast.first().expect("something was broadcast");
    assert!(!stored.is_empty(), "the writes before the kill are kept");
    // One sender in one room: the broadcast ids are consecutive, so the stored history must be
    // the first ones of them, with no hole.
    let expected: Vec<u64> = (first..first + stored.len() as u64).collect();
    assert_eq!(stored, expected, "a prefix of what was broadcast, no gap");
    let highest = broadcast.last().copied().max(stored.last().copied());
    let next = client.ok(&session, send("r", "after", "after")).await;
    let next = next["results"][0]["id"].as_u64().expect("id");
    assert!(
        Some(next) > highest,
        "id {next} after a crash must be above every id broadcast ({highest:?})"
    );
    server.stop().await;
}

/// The highest message id the store reports written, from `/metrics`.
async fn written_id(client: &TestServer) -> u64 {
    metric(client, "switchyard_history_written_id").await as u64
}

#[tokio::test]
async fn with_full_durability_every_message_a_member_sees_is_already_written() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &["--history-durability", "full"])).await;
    let client = server.client();
    let (_reader, mut ws) = member_on_websocket(&client, "reader").await;
    let sender = client.session("sender").await;
    client.ok(&sender, join("r")).await;
    for round in 0..20 {
        let reply = client
            .ok(&sender, send("r", "durable", &format!("d{round}")))
            .await;
        let id = reply["results"][0]["id"].as_u64().expect("id");
        assert!(
            written_id(&client).await >= id,
            "the reply waits for the write"
        );
        let event = next_message(&mut ws).await;
        assert_eq!(event["id"].as_u64(), Some(id));
    }
    server.stop().await;
}

/// Rows of a room in the database file, read with SQLite while the server runs.
fn rows_on_disk(dir: &Path, room: &str) -> i64 {
    let db = rusqlite::Connection::open_with_flags(
        dir.join("history.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database read-only");
    db.query_row(
        "SELECT count(*) FROM messages WHERE room = ?1",
        [room],
        |r| r.get(0),
    )
    .expect("count rows")
}

/// Small bounds, for [`check_bounds`].
const BOUNDS: [&str; 6] = [
    "--history-keep",
    "30",
    "--history-len",
    "10",
    "--history-max-age",
    "2s",
];

/// On a server started with [`BOUNDS`]: of 50 messages the newest 30 are served, and `stored`
/// (what the store holds of the room) says 30; past the max age none is served.
async fn check_bounds(server: &ServerProcess, stored: impl Fn() -> u64) {
    let client = server.client();
    let ann = client.session("ann").await;
    let mut events = client.attach(TransportKind::Sse, &ann, 0).await;
    client.ok(&ann, join("r")).await;
    let sent = send_many(&client, &ann, "r", 50).await;
    let kept = scroll_back(&client, &mut events, "r", None, 7).await;
    assert_eq!(kept, sent[20..], "the newest 30, and no more after them");
    assert_eq!(stored(), 30, "older messages are deleted from the store");

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let bob = client.session("bob").await;
    let mut bobs = client.attach(TransportKind::ShortPolling, &bob, 0).await;
    client.ok(&bob, join("r")).await;
    let history = bobs.next_of("history").await;
    assert_eq!(history["messages"], json!([]), "past max age: {history}");
    assert!(scroll_back(&client, &mut bobs, "r", None, 50)
        .await
        .is_empty());
}

#[tokio::test]
async fn history_keep_and_max_age_bound_what_is_kept_and_served() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &BOUNDS)).await;
    check_bounds(&server, || rows_on_disk(dir.path(), "r") as u64).await;
    server.stop().await;

    let server = ServerProcess::start(&flags(dir.path(), &BOUNDS)).await;
    assert_eq!(
        rows_on_disk(dir.path(), "r"),
        0,
        "the start sweeps messages past max age"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_second_server_on_the_same_directory_stops_at_start_with_one_line() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &[])).await;
    let stderr = failing_start(&flags(dir.path(), &[])).await;
    let shown = dir.path().display().to_string();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains(&shown),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unusable_directory_stops_the_server_at_start_naming_it() {
    let dir = data_dir();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"a file").unwrap();
    let stderr = failing_start(&flags(&file, &[])).await;
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("cannot create"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"a file", "left as it was");
}

#[tokio::test]
async fn a_corrupt_or_newer_database_stops_the_server_and_is_left_untouched() {
    let dir = data_dir();
    let db = dir.path().join("history.db");
    let garbage = b"this is not a database, it only has its name".repeat(100);
    std::fs::write(&db, &garbage).unwrap();
    let stderr = failing_start(&flags(dir.path(), &[])).await;
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&db.display().to_string()) && stderr.contains("not a database"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "the file is unchanged"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["history.db", "lock"], "no journal files appear");

    // A file written by a newer switchyard.
    std::fs::remove_file(&db).unwrap();
    let newer = rusqlite::Connection::open(&db).unwrap();
    newer
        .execute_batch(
            "PRAGMA application_id = 1398360132; PRAGMA user_version = 7; CREATE TABLE future (x);",
        )
        .unwrap();
    drop(newer);
    let stderr = failing_start(&flags(dir.path(), &[])).await;
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("schema version 7"), "{stderr}");
}

#[tokio::test]
async fn invalid_history_commands_get_documented_errors() {
    let server = TestServer::start().await;
    let ann = server.session("ann").await;
    server.ok(&ann, join("r")).await;
    let cases = [
        (
            json!({"type": "history", "room": "r", "before": "ten"}),
            "bad_command",
        ),
        (
            json!({"type": "history", "room": "r", "before": 0}),
            "bad_command",
        ),
        (
            json!({"type": "history", "room": "r", "before": -3}),
            "bad_command",
        ),
        (
            json!({"type": "history", "room": "r", "limit": 0}),
            "bad_command",
        ),
        (
            json!({"type": "history", "room": "r", "limit": 201}),
            "bad_command",
        ),
        (
            json!({"type": "history", "room": "r", "limit": 2.5}),
            "bad_command",
        ),
        (
            json!({"type": "history", "room": "elsewhere"}),
            "not_in_room",
        ),
        (
            json!({"type": "history", "room": "no spaces"}),
            "invalid_room",
        ),
    ];
    for (command, code) in cases {
        let (status, reply) = server.commands(&ann, command.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{command} -> {reply}");
        assert_eq!(reply["error"]["code"], code, "{command} -> {reply}");
    }
    // Over a WebSocket the same refusal is an `error` event; a valid page follows it.
    let mut ws = server.websocket(&ann, 0).await;
    ws_send(
        &mut ws,
        json!({"type": "history", "room": "r", "limit": 500}),
    )
    .await;
    ws_send(&mut ws, send("r", "hello", "h1")).await;
    ws_send(
        &mut ws,
        json!({"type": "history", "room": "r", "limit": 200}),
    )
    .await;
    let mut seen = Vec::new();
    while !seen.contains(&"history_page".to_owned()) {
        let event = ws_event(&mut ws).await;
        let kind = event["type"].as_str().unwrap().to_owned();
        if kind == "error" {
            assert_eq!(event["code"], "bad_command", "{event}");
        }
        if kind == "history_page" {
            assert_eq!(message_ids(&event["messages"]), [1], "{event}");
            assert_eq!(event["more"], false);
        }
        seen.push(kind);
    }
    assert!(seen.contains(&"error".to_owned()), "{seen:?}");
}

/// The history store's failed writes, from `/metrics`.
async fn write_failures(client: &TestServer) -> u64 {
    metric(client, "switchyard_history_write_failures_total").await as u64
}

/// Holds the database's write lock from another connection, as someone writing with the
/// `sqlite3` tool would: the server's writes fail once its busy timeout passes.
fn lock_database(dir: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(dir.join("history.db")).expect("open the database");
    db.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    db
}

/// A new session `name` in room `r`, reading its events over a WebSocket.
async fn member_on_websocket(client: &TestServer, name: &str) -> (String, Ws) {
    let session = client.session(name).await;
    client.ok(&session, join("r")).await;
    let ws = client.websocket(&session, 0).await;
    (session, ws)
}

/// The next `message` event on a WebSocket.
async fn next_message(ws: &mut Ws) -> Value {
    loop {
        let event = ws_event(ws).await;
        if event["type"] == "message" {
            return event;
        }
    }
}

#[tokio::test]
async fn a_write_failing_at_run_time_is_counted_and_the_server_keeps_serving() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &[])).await;
    let client = server.client();
    let (ann, mut ws) = member_on_websocket(&client, "ann").await;
    let before = client.ok(&ann, send("r", "before", "b")).await;
    assert_eq!(next_message(&mut ws).await["text"], "before");
    // Written before the lock is taken (normal durability writes a moment after the reply).
    let before = before["results"][0]["id"].as_u64().unwrap();
    within("the first message to be written", async {
        while written_id(&client).await < before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let lock = lock_database(dir.path());
    let lost = client.ok(&ann, send("r", "lost", "l")).await;
    assert_eq!(
        next_message(&mut ws).await["text"],
        "lost",
        "normal durability broadcasts at once"
    );
    within("the failed write to be counted", async {
        while write_failures(&client).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(lock);

    let after = client.ok(&ann, send("r", "after", "a")).await;
    assert_eq!(next_message(&mut ws).await["text"], "after");
    let mut events = client.attach(TransportKind::LongPolling, &ann, 0).await;
    let kept = scroll_back(&client, &mut events, "r", None, 50).await;
    let id = |reply: &Value| reply["results"][0]["id"].as_u64().unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(kept[1], id(&after), "writes go on after the failure");
    assert!(
        !kept.contains(&id(&lost)),
        "the failed write is not in history"
    );
    server.stop().await;
}

#[tokio::test]
async fn with_full_durability_a_failed_write_fails_the_send_and_nobody_sees_it() {
    let dir = data_dir();
    let server = ServerProcess::start(&flags(dir.path(), &["--history-durability", "full"])).await;
    let client = server.client();
    let (_reader, mut ws) = member_on_websocket(&client, "reader").await;
    let ann = client.session("ann").await;
    client.ok(&ann, join("r")).await;
    client.ok(&ann, send("r", "first", "f")).await;
    assert_eq!(next_message(&mut ws).await["text"], "first");

    let lock = lock_database(dir.path());
    let (status, reply) = client.commands(&ann, send("r", "refused", "x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(reply["error"]["code"], "history_unavailable", "{reply}");
    drop(lock);

    // The retry is a new send, not a replay of the failed one; and since a room's messages
    // are broadcast in write order, the reader's next message shows the failed one never was.
    // Retried until it goes through, as a client would: /readyz answering 200 after the
    // store's first success does not promise that the next write succeeds.
    let retry = within("the send to go through once Redis is back", async {
        loop {
            match client.commands(&ann, send("r", "refused", "x")).await {
                (StatusCode::OK, reply) => return reply,
                (status, reply) => {
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
                    eprintln!("retrying the send: {reply}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(retry["results"][0]["duplicate"], false, "{retry}");
    let next = next_message(&mut ws).await;
    assert_eq!(next["text"], "refused");
    assert_eq!(next["id"], retry["results"][0]["id"]);
    server.stop().await;
}

/// The flags of a server keeping history in the Redis at `url`.
fn redis_flags<'a>(url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec!["--history-store", url, "--rate-limit", "100000"];
    flags.extend_from_slice(extra);
    flags
}

#[tokio::test]
async fn history_in_redis_survives_a_restart_and_a_kill_and_scrollback_pages_through_it() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let server = ServerProcess::start(&redis_flags(&url, &[])).await;
    let client = server.client();
    let ann = client.session("ann").await;
    client.ok(&ann, join("one")).await;
    let sent = send_many(&client, &ann, "one", 200).await;
    server.stop().await;

    let server = ServerProcess::start(&redis_flags(&url, &[])).await;
    let client = server.client();
    for kind in [TransportKind::WebSocket, TransportKind::LongPolling] {
        let bob = client.session("bob").await;
        let mut events = client.attach(kind, &bob, 0).await;
        client.ok(&bob, join("one")).await;
        let history = events.next_of("history").await;
        assert_eq!(
            message_ids(&history["messages"]),
            sent[150..],
            "{kind}: join returns the last 50"
        );
        let paged = scroll_back(&client, &mut events, "one", Some(sent[150]), 60).await;
        assert_eq!(
            paged,
            sent[..150],
            "{kind}: scrollback, no gap and no repeat"
        );
    }
    let next = client
        .ok(&ann_again(&client).await, send("one", "after", "after"))
        .await;
    let next = next["results"][0]["id"].as_u64().expect("id");
    assert_eq!(next, sent[199] + 1, "after a graceful stop the ids go on");

    // A killed server leaves its lease behind: the next one on this machine takes it over at
    // once, and hands out no id that may have been used. (Killed once its last message is
    // written: a kill may lose the last batch, protocol.md 4.3.)
    within("the last message to be written", async {
        while written_id(&client).await < next {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.kill().await;
    let server = ServerProcess::start(&redis_flags(&url, &[])).await;
    let client = server.client();
    let carol = ann_again(&client).await;
    let again = client.ok(&carol, send("one", "again", "again")).await;
    assert!(again["results"][0]["id"].as_u64().expect("id") > next);
    let mut events = client.attach(TransportKind::Sse, &carol, 0).await;
    let all = scroll_back(&client, &mut events, "one", None, 200).await;
    assert_eq!(all.len(), 202, "every message written is served");
    server.stop().await;
}

#[tokio::test]
async fn history_in_redis_keeps_its_bounds() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let server = ServerProcess::start(&redis_flags(&url, &BOUNDS)).await;
    let count = |command: &str| -> u64 {
        ::redis::cmd(command)
            .arg("switchyard:room:r")
            .query(&mut redis.connection())
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    };
    check_bounds(&server, || count("ZCARD")).await;
    assert_eq!(
        count("EXISTS"),
        0,
        "a room expires max age after its newest message"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_redis_database_in_use_foreign_or_unreachable_stops_the_server_at_start() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let server = ServerProcess::start(&redis_flags(&url, &[])).await;
    let stderr = failing_start(&redis_flags(&url, &[])).await;
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains(&url),
        "{stderr}"
    );
    server.stop().await;

    let mut conn = redis.connection();
    let set_meta = |conn: &mut ::redis::Connection, app: &str, version: u64| {
        ::redis::cmd("HSET")
            .arg("switchyard:meta")
            .arg("application")
            .arg(app)
            .arg("version")
            .arg(version)
            .query::<()>(conn)
            .expect("HSET");
    };
    set_meta(&mut conn, "switchyard-history", 7);
    let stderr = failing_start(&redis_flags(&url, &[])).await;
    assert!(stderr.contains("layout version 7"), "{stderr}");
    set_meta(&mut conn, "someone-else", 1);
    let stderr = failing_start(&redis_flags(&url, &[])).await;
    assert!(stderr.contains("not switchyard's"), "{stderr}");

    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let nowhere = format!("redis://{nowhere}");
    let stderr = failing_start(&redis_flags(&nowhere, &[])).await;
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&nowhere), "{stderr}");
    let stderr = failing_start(&redis_flags("redis://[oops", &[])).await;
    assert!(stderr.contains("not a Redis URL"), "{stderr}");
}

#[tokio::test]
async fn while_redis_is_down_sends_fail_clearly_and_history_goes_on_when_it_is_back() {
    let mut redis = RedisServer::persistent().await;
    let url = redis.url();
    let server = ServerProcess::start(&redis_flags(&url, &["--history-durability", "full"])).await;
    let client = server.client();
    let (_reader, mut ws) = member_on_websocket(&client, "reader").await;
    let ann = client.session("ann").await;
    client.ok(&ann, join("r")).await;
    let first = client.ok(&ann, send("r", "first", "f")).await;
    assert_eq!(next_message(&mut ws).await["text"], "first");
    let (status, reply) = client.json(Method::GET, "/readyz", None).await;
    assert_eq!((status, reply), (StatusCode::OK, json!({"ok": true})));

    redis.kill().await;
    let (status, reply) = client.commands(&ann, send("r", "refused", "x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(reply["error"]["code"], "history_unavailable", "{reply}");
    let (status, _, _) = client.request(Method::GET, "/healthz", &[], "").await;
    assert_eq!(status, StatusCode::OK, "the server itself stays up");
    let (status, reply) = client.json(Method::GET, "/readyz", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready: {reply}"
    );
    assert_eq!(reply["error"]["code"], "history_unavailable", "{reply}");

    redis.restart().await;
    within("/readyz to answer 200 once Redis is back", async {
        while client.json(Method::GET, "/readyz", None).await.0 != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let retry = client.ok(&ann, send("r", "refused", "x")).await;
    assert_eq!(retry["results"][0]["duplicate"], false, "{retry}");
    let next = next_message(&mut ws).await;
    assert_eq!(
        next["id"], retry["results"][0]["id"],
        "nobody saw the refused one"
    );
    let mut events = client.attach(TransportKind::LongPolling, &ann, 0).await;
    let kept = scroll_back(&client, &mut events, "r", None, 50).await;
    let id = |reply: &Value| reply["results"][0]["id"].as_u64().unwrap();
    assert_eq!(kept, [id(&first), id(&retry)], "Redis kept its data");
    server.stop().await;
}
