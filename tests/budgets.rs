//! Memory bounded in bytes: write batches, the replay buffer's byte budget, and a WebSocket
//! client that floods pings without reading.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{join, within, TestServer};
use switchyard::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn generous() -> Config {
    Config {
        presence_interval: Duration::ZERO,
        ..Config::default().with_rate_limit(100_000.0)
    }
}

#[tokio::test]
async fn a_poll_reply_holds_at_most_256_kib_and_the_rest_follows() {
    let server = TestServer::with_config(generous()).await;
    let reader = server.session("reader").await;
    server.ok(&reader, join("r")).await;
    server.publish_big(200).await;
    server.wait_for_seq(&reader, 204).await;
    let mut after = 0;
    let mut messages = 0;
    let mut replies = 0;
    while messages < 200 {
        let (_, _, body) = server
            .request(
                hyper::Method::GET,
                &format!("/v1/sessions/{reader}/poll?after={after}&wait=0"),
                &[],
                "",
            )
            .await;
        assert!(
            body.len() <= 256 * 1024 + 8 * 1024,
            "a reply of {} bytes",
            body.len()
        );
        let reply: Value = serde_json::from_slice(&body).unwrap();
        let events = reply["events"].as_array().unwrap();
        assert!(!events.is_empty(), "the rest follows");
        for event in events {
            assert_eq!(event["seq"].as_u64().unwrap(), after + 1, "contiguous");
            after += 1;
            messages += usize::from(event["type"] == "message");
        }
        replies += 1;
    }
    assert!(replies >= 4, "800 KB of messages took {replies} replies");
}

#[tokio::test]
async fn a_session_keeps_at_most_its_replay_bytes_and_an_older_resume_gets_a_reset() {
    let server = TestServer::with_config(Config {
        replay_bytes: 64 * 1024,
        outbox_bytes: 32 * 1024,
        history_len: 5,
        ..generous()
    })
    .await;
    let reader = server.session("reader").await;
    server.ok(&reader, join("r")).await;
    server.publish_big(100).await;
    // History, presence, two diffs and the 100 messages.
    server.wait_for_seq(&reader, 104).await;
    // 400 KB went by; the buffer kept about 64 KB, so a resume from the start is too old.
    let (_, reply) = server.poll(&reader, 0, 0).await;
    let events = reply["events"].as_array().unwrap();
    assert_eq!(events[0]["type"], "reset", "{}", events[0]);
    let info = server
        .json(hyper::Method::GET, &format!("/v1/sessions/{reader}"), None)
        .await
        .1;
    let last = info["last_seq"].as_u64().unwrap();
    // The newest ~15 events (4 KB each) are still there.
    let (_, reply) = server.poll(&reader, last - 12, 0).await;
    assert_eq!(reply["events"].as_array().unwrap().len(), 12, "{reply}");
}

#[tokio::test]
async fn a_client_that_floods_pings_and_never_reads_is_closed_not_buffered() {
    let server = TestServer::with_config(Config {
        heartbeat: Duration::from_millis(250),
        close_timeout: Duration::from_millis(500),
        socket_send_buffer: Some(16 * 1024),
        ..generous()
    })
    .await;
    let session = server.session("flooder").await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut raw = within("connect", socket.connect(server.addr))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/sessions/{session}/ws?after=0 HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n\
         connection: upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    // Masked pings with 100-byte payloads, as fast as the server reads them; never a read.
    let mut ping = vec![0x89, 0x80 | 100, 1, 2, 3, 4];
    ping.extend_from_slice(&[b'p' ^ 1; 100]);
    let flood: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    let (mut read, mut write) = raw.into_split();
    let flooder = tokio::spawn(async move {
        let mut sent = 0usize;
        while write.write_all(&flood).await.is_ok() {
            sent += 1000;
        }
        sent
    });
    // The server stops the flood: its writes stall, and the socket is closed and dropped.
    let pings = within("the flooded socket to be closed", flooder)
        .await
        .unwrap();
    assert!(pings > 1000, "the server read the pings: {pings}");
    let mut answered = Vec::new();
    let _ = within(
        "the rest of the connection",
        read.read_to_end(&mut answered),
    )
    .await;
    assert!(
        answered.len() < 256 * 1024,
        "pongs were coalesced, not queued one per ping: {} bytes",
        answered.len()
    );
}
