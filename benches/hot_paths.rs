//! Criterion benchmarks of the server's hot paths: encoding an event for each transport,
//! fanning one message out to 1, 100 and 10,000 sessions in the hub, and the replay buffer's
//! append and resume.
//!
//! `cargo bench --bench hot_paths`. Each measurement is kept short (about 2 s) so the whole
//! `cargo bench` stays within a few minutes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard::hub::{Delivery, Hub};
use switchyard::protocol::{Command, EncodedEvent, Event, Message, TransportKind};
use switchyard::transport::ws_writer::Head;
use switchyard::transport::{poll_body, sse, WRITE_BATCH};
use switchyard::Config;

fn message_event(text_len: usize) -> EncodedEvent {
    let message = Message {
        room: "lobby".into(),
        id: 123_456,
        from: "alice".into(),
        text: "x".repeat(text_len),
        ts: 1_700_000_000_000_000,
        client_id: "c-123456".into(),
    };
    Event::Message(&message).encode()
}

fn encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let message = Message {
        room: "lobby".into(),
        id: 123_456,
        from: "alice".into(),
        text: "x".repeat(64),
        ts: 1_700_000_000_000_000,
        client_id: "c-123456".into(),
    };
    group.bench_function("shared body (once per broadcast)", |b| {
        b.iter(|| Event::Message(black_box(&message)).encode())
    });
    let event = message_event(64);
    group.bench_function(
        "websocket frame head (header + seq; the body is shared)",
        |b| {
            b.iter(|| {
                Head::for_event(black_box(42), black_box(&event).body.len())
                    .as_slice()
                    .len()
            })
        },
    );
    group.bench_function("sse event", |b| {
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            sse::write_event(black_box(42), black_box(&event), &mut out);
            out.len()
        })
    });
    let one = [(42, event.clone())];
    group.bench_function("poll reply (long and short polling)", |b| {
        b.iter(|| poll_body(black_box(&one), None))
    });
    group.finish();
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

/// Runs `hub.execute` to completion (with the memory store it never waits).
fn execute(
    hub: &Hub,
    session: &std::sync::Arc<switchyard::hub::Session>,
    commands: Vec<Result<Command, switchyard::protocol::ErrorBody>>,
) -> Vec<switchyard::hub::CommandResult> {
    RUNTIME.with(|runtime| runtime.block_on(hub.execute(session, commands)))
}

/// A hub with `members` sessions in one room; returns the hub and the sender.
fn room_of(members: usize) -> (Hub, std::sync::Arc<switchyard::hub::Session>) {
    let hub = Hub::new(Config::default().with_rate_limit(1e12).hub_config());
    let mut sender = None;
    for i in 0..members {
        let session = hub.create_session(&format!("u{i}")).expect("session");
        let joined = execute(
            &hub,
            &session,
            vec![Ok(Command::Join {
                room: "lobby".into(),
            })],
        );
        assert!(joined[0].ok);
        sender.get_or_insert(session);
    }
    (hub, sender.expect("at least one member"))
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan-out one message");
    for members in [1usize, 100, 10_000] {
        let (hub, sender) = room_of(members);
        let mut n = 0u64;
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter(|| {
                n += 1;
                let send = Command::Send {
                    room: "lobby".into(),
                    text: "hello everyone, this is a chat message".into(),
                    client_id: format!("c{n}"),
                };
                execute(&hub, &sender, vec![Ok(send)])
            })
        });
    }
    group.finish();
}

/// A cluster node's hub holding `members` sessions in one room (applied from the log, as a
/// node keeps the sessions it does not serve), and a function applying one more record.
fn replica_of(members: usize) -> (Hub, impl Fn(switchyard::cluster::sequencer::Record)) {
    use switchyard::cluster::sequencer::Record;
    let hub = Hub::new(Config::default().hub_config());
    let apply = {
        let hub = hub.clone();
        move |record: Record| {
            RUNTIME
                .with(|runtime| runtime.block_on(hub.replicate(record, "A")))
                .expect("applied");
        }
    };
    for i in 0..members {
        let session = format!("s{i}");
        apply(Record::Create {
            session: session.clone(),
            name: format!("u{i}"),
            user: None,
            rules: None,
            expires: None,
        });
        apply(Record::Join {
            session,
            room: "lobby".into(),
            ts: 0,
            last: 0,
        });
    }
    (hub, apply)
}

/// Message `id` of the bench's room, as a `send` record.
fn send_record(id: u64) -> switchyard::cluster::sequencer::Record {
    switchyard::cluster::sequencer::Record::Send {
        session: "s0".into(),
        message: switchyard::protocol::Message {
            room: "lobby".into(),
            id,
            from: "u0".into(),
            text: "hello everyone, this is a chat message".into(),
            ts: 1_700_000_000_000_000 + id,
            client_id: format!("c{id}"),
        },
    }
}

/// A cluster node applying a room message for `members` sessions it keeps but does not serve
/// (docs/cluster.md, section 3): the cost every node pays for every session.
fn replicate(c: &mut Criterion) {
    let mut group = c.benchmark_group("replicate one send record");
    for members in [1usize, 100, 10_000] {
        let (_hub, apply) = replica_of(members);
        let mut id = 0u64;
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter(|| {
                id += 1;
                apply(send_record(id))
            })
        });
    }
    group.finish();
}

/// A snapshot for a starting node (docs/cluster.md, section 3), taken and restored: 10,000
/// sessions in one room, each keeping its joins' presence and 200 messages. The node asked
/// applies no log entry while it captures one (`capture`); `take` adds the encoding.
fn snapshot(c: &mut Criterion) {
    let (hub, apply) = replica_of(10_000);
    for id in 1..=200 {
        apply(send_record(id));
    }
    hub.settle();
    let taken = hub.snapshot();
    eprintln!(
        "snapshot of 10,000 sessions x 200 messages: {} bytes",
        taken.len()
    );
    let mut group = c.benchmark_group("snapshot of 10,000 sessions");
    group.sample_size(10);
    group.bench_function("take", |b| b.iter(|| hub.snapshot()));
    // The part the asked node's replica waits for; the encoding runs off its way.
    group.bench_function("capture", |b| b.iter(|| hub.capture()));
    group.bench_function("restore", |b| {
        b.iter(|| {
            let fresh = Hub::new(Config::default().hub_config());
            fresh.restore(&taken).expect("restored");
            fresh
        })
    });
    group.finish();
}

fn replay(c: &mut Criterion) {
    // Through the public API: the replay buffer is the hub's own.
    let mut group = c.benchmark_group("replay buffer");
    let (hub, session) = room_of(1);
    let mut n = 0u64;
    let mut send = move || {
        n += 1;
        Command::Send {
            room: "lobby".into(),
            text: "hello everyone, this is a chat message".into(),
            client_id: format!("r{n}"),
        }
    };
    for _ in 0..1100 {
        execute(&hub, &session, vec![Ok(send())]);
    }
    group.bench_function(
        "append (full buffer, drops the oldest): a send to a room of one",
        |b| b.iter(|| execute(&hub, &session, vec![Ok(send())])),
    );
    let last = hub.describe(&session.id).expect("session").last_seq;
    for behind in [1u64, 256] {
        group.throughput(Throughput::Elements(behind));
        group.bench_with_input(
            BenchmarkId::new("attach and read, events behind", behind),
            &behind,
            |b, &behind| {
                b.iter(|| {
                    let mut poll = hub
                        .attach(&session.id, TransportKind::ShortPolling, last - behind)
                        .expect("attach");
                    match poll.ready(WRITE_BATCH) {
                        Delivery::Events(events) => events.len(),
                        Delivery::Closed(_) => 0,
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = encoding, fan_out, replicate, snapshot, replay
}
criterion_main!(benches);
