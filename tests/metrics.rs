//! `GET /metrics`: the counters move with real traffic on every transport.

mod support;

use hyper::{Method, StatusCode};
use support::{join, send, TestServer};
use switchyard::protocol::TransportKind;

/// The value of one sample line, e.g. `switchyard_events_delivered_total{transport="sse"}`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

async fn scrape(server: &TestServer) -> String {
    let (status, headers, body) = server
        .request(Method::GET, "/metrics", &[], Vec::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    String::from_utf8(body.to_vec()).expect("UTF-8")
}

#[tokio::test]
async fn counts_move_with_traffic_on_every_transport() {
    let server = TestServer::start().await;
    let before = scrape(&server).await;
    for kind in TransportKind::ALL {
        let series = format!("switchyard_events_delivered_total{{transport=\"{kind}\"}}");
        assert_eq!(sample(&before, &series), 0.0);
    }

    for kind in TransportKind::ALL {
        let session = server.session(&format!("m-{kind}")).await;
        let mut client = server.attach(kind, &session, 0).await;
        server.ok(&session, join("metrics-room")).await;
        client.next_of("history").await;
        server
            .ok(
                &session,
                send("metrics-room", "counted", &format!("c-{kind}")),
            )
            .await;
        client.next_of("message").await;
    }
    // A bad command on HTTP is counted as an error.
    let session = server.session("bad").await;
    let (status, _) = server.commands(&session, send("nowhere", "x", "b1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let after = scrape(&server).await;
    for kind in TransportKind::ALL {
        let label = format!("{{transport=\"{kind}\"}}");
        let delivered = sample(&after, &format!("switchyard_events_delivered_total{label}"));
        assert!(delivered >= 2.0, "{kind}: {delivered} delivered");
        let bytes = sample(&after, &format!("switchyard_bytes_written_total{label}"));
        assert!(bytes > 100.0, "{kind}: {bytes} bytes");
        let latencies = sample(
            &after,
            &format!("switchyard_delivery_latency_seconds_count{label}"),
        );
        assert_eq!(latencies, delivered, "{kind}: one latency per delivery");
    }
    // Sessions that attached a transport had their commands counted under it.
    let ws_commands = sample(
        &after,
        "switchyard_commands_received_total{transport=\"websocket\"}",
    );
    assert_eq!(ws_commands, 2.0);
    let not_in_room = sample(
        &after,
        "switchyard_errors_total{transport=\"none\",code=\"not_in_room\"}",
    );
    assert_eq!(not_in_room, 1.0);
}

#[tokio::test]
async fn attached_gauge_and_supersede_count() {
    let server = TestServer::start().await;
    let session = server.session("hopper").await;
    let first = server.attach(TransportKind::Sse, &session, 0).await;
    let text = scrape(&server).await;
    assert_eq!(
        sample(&text, "switchyard_sessions_attached{transport=\"sse\"}"),
        1.0
    );
    let _second = server.attach(TransportKind::WebSocket, &session, 0).await;
    drop(first);
    // The SSE stream ends when the hub supersedes it; its attachment is dropped just after.
    let mut text = scrape(&server).await;
    for _ in 0..100 {
        if text.contains(
            "switchyard_transport_closes_total{transport=\"sse\",reason=\"superseded\"} 1",
        ) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        text = scrape(&server).await;
    }
    assert_eq!(
        sample(
            &text,
            "switchyard_transport_closes_total{transport=\"sse\",reason=\"superseded\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "switchyard_sessions_attached{transport=\"sse\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            "switchyard_sessions_attached{transport=\"websocket\"}"
        ),
        1.0
    );
}
