//! `switchyard bench` against a real server: every transport delivers every message once, in
//! order, and the bench's count matches the server's `/metrics`; `--soak` under churn loses
//! and repeats nothing.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::TestServer;
use switchyard::bench::soak::{self, SoakArgs};
use switchyard::bench::{run, BenchArgs};

/// A short run of every transport at once against `url`; every delivery is counted once and
/// the server's `/metrics` agrees.
async fn bench_counts_every_delivery(url: String, tls_cert: Option<PathBuf>, http: &str) {
    let args = BenchArgs {
        tls_cert,
        http: http.into(),
        ..support::short_bench(url, 4)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_every_delivery_on_all_four_transports() {
    let server = TestServer::start().await;
    bench_counts_every_delivery(format!("http://{}", server.addr), None, "1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_every_delivery_over_https_and_http2() {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let server = TestServer::with_config(switchyard::Config {
        tls: Some(switchyard::tls::Tls::load(&cert, &key).unwrap()),
        ..switchyard::Config::default()
    })
    .await;
    bench_counts_every_delivery(format!("https://{}", server.addr), Some(cert), "2").await;
    let metrics = server.hub.as_ref().unwrap().metrics().encode();
    for transport in ["websocket", "sse", "long-polling", "short-polling"] {
        let sample =
            format!(r#"switchyard_attaches_by_http_total{{transport="{transport}",http="2"}}"#);
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&sample) && !l.ends_with(" 0")),
            "{sample}"
        );
    }
}

/// `switchyard bench --soak` on a spawned server, short and fast: a few hundred sessions
/// arriving and departing, dropping and resuming their transports on every kind, rooms
/// emptied and created, slow readers stalling; nothing is lost or repeated, and the server's
/// memory and open files are sampled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_loses_and_repeats_nothing_while_the_population_changes() {
    let out = tempfile::tempdir().expect("a temporary directory");
    let bench = BenchArgs {
        url: None,
        spawn: true,
        clients: 1,
        rate: 1.0,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        payload_bytes: 64,
        short_poll_ms: 200,
        concurrent: false,
        json: Some(out.path().join("soak.json")),
        svg: Some(out.path().join("soak.svg")),
        // A short heartbeat and small socket buffers, so stalled slow readers are closed
        // within the run.
        server_args: vec!["--heartbeat=1s".into(), "--socket-send-buffer=4096".into()],
        server_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))),
        ..support::short_bench(String::new(), 1)
    };
    let soak = SoakArgs {
        soak: Some(Duration::from_secs(8)),
        soak_sessions: 300,
        soak_rate: 50.0,
        soak_room_size: 30,
        soak_session_life: Duration::from_secs(10),
        soak_resume_every: Duration::from_secs(2),
        soak_room_life: Duration::from_secs(4),
        soak_slow_readers: 4,
        soak_ack: Duration::from_millis(500),
        soak_sample: Duration::from_secs(1),
    };
    let report = tokio::time::timeout(Duration::from_secs(60), soak::run(bench, soak))
        .await
        .expect("timeout after 60 s: the soak run")
        .expect("the soak ran");
    let c = &report.counts;
    assert!(report.verdict().is_ok(), "{c:?}\n{:?}", report.notes);
    assert_eq!((c.lost, c.duplicated, c.out_of_order), (0, 0, 0), "{c:?}");
    assert_eq!((c.unowed, c.seq_gaps, c.sessions_lost), (0, 0, 0), "{c:?}");
    assert!(c.delivered > 1000, "{c:?}");
    // The population changed in every way the soak has.
    assert!(
        c.departures_deleted + c.departures_expired + c.departures_abandoned > 50,
        "{c:?}"
    );
    assert!(c.resumes > 100 && c.kind_switches > 50, "{c:?}");
    // The streams acknowledged what they read, and lost nothing by it.
    assert!(c.acks > 100, "{c:?}");
    assert!(
        c.rooms_emptied > 0 && c.joins > 300 && c.leaves > 0,
        "{c:?}"
    );
    // Samples: the end of the ramp, one a second, the end; each with the server's readings.
    assert!(report.samples.len() >= 8, "{:?}", report.samples);
    assert!(report
        .samples
        .iter()
        .all(|s| s.server_rss_bytes.is_some() && s.server_fds.is_some()));
    // And the heap in use, from /metrics (glibc tells it).
    assert!(report.samples.iter().all(|s| s.server_heap_bytes.is_some()));
    let summary = &report.summary;
    assert!(summary.rss_ramp_end_bytes.is_some() && summary.rss_end_over_ramp.is_some());
    assert!(summary.fds_ramp_end.unwrap_or(0) >= 300, "{summary:?}");
    assert!(out.path().join("soak.json").exists() && out.path().join("soak.svg").exists());
}
