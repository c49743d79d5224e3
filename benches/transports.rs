//! The side-by-side picture under `cargo bench`: a short `switchyard bench --spawn` of all
//! four transports and the bare WebSocket baseline (100 subscribers each, 20 msg/s, 5 s),
//! printed as the bench's table. For the full runs see docs/benchmarks.md.

use std::path::PathBuf;
use std::time::Duration;

use switchyard::bench::{run, BenchArgs};
use switchyard::protocol::TransportKind;

fn main() {
    // `cargo test --benches` runs this binary too; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("transports: skipped (run with `cargo bench --bench transports`)");
        return;
    }
    let args = BenchArgs {
        url: None,
        spawn: true,
        clients: 100,
        rate: 20.0,
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        payload_bytes: 64,
        short_poll_ms: 250,
        transports: TransportKind::ALL.to_vec(),
        concurrent: false,
        baseline: true,
        idle: None,
        pin: false,
        source_addrs: 16,
        json: None,
        svg: None,
        quiet: true,
        server_args: Vec::new(),
        server_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))),
        tls_cert: None,
        tls_key: None,
        http: "1.1".into(),
        resume: false,
        kill_pid: None,
        kill_after: Duration::ZERO,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("transports bench failed: {e}");
        std::process::exit(1);
    }
}
