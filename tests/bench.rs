//! `switchyard bench` against a real server: every transport delivers every message once, in
//! order, and the bench's count matches the server's `/metrics`.

mod support;

use std::time::Duration;

use support::TestServer;
use switchyard::bench::{run, BenchArgs};
use switchyard::protocol::TransportKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_every_delivery_on_all_four_transports() {
    let server = TestServer::start().await;
    let args = BenchArgs {
        url: Some(format!("http://{}", server.addr)),
        spawn: false,
        clients: 4,
        rate: 20.0,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(200),
        payload_bytes: 40,
        short_poll_ms: 100,
        transports: TransportKind::ALL.to_vec(),
        concurrent: true,
        baseline: false,
        idle: None,
        pin: false,
        source_addrs: 4,
        json: None,
        svg: None,
        quiet: true,
        server_args: Vec::new(),
        server_exe: None,
    };
    let report = support::within("the bench run", run(args))
        .await
        .expect("bench ran");
    assert_eq!(report.transports.len(), 4);
    for row in &report.transports {
        assert_eq!(row.published, 20, "{}: {row:?}", row.transport);
        assert_eq!(row.delivered, 20 * 4, "{}: {row:?}", row.transport);
        assert!(!row.unhealthy(), "{}: {row:?}", row.transport);
        assert_eq!(
            row.server_events_delivered,
            Some(row.delivered),
            "{}: the server's /metrics agrees",
            row.transport
        );
        assert!(row.latency_ms.count > 0 && row.bytes_per_delivery > 0.0);
    }
}
