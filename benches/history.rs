//! How many messages per second one room sustains with each history store, and the CPU each
//! message costs: in process, through `Hub::execute`, no network. 64 senders send to one room
//! of 10 members as fast as their replies come back (with full durability a reply waits for
//! the write, so the senders' writes share commits).
//!
//! `cargo bench --bench history [-- SECONDS]` prints one line per store; docs/benchmarks.md
//! quotes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::hub::{Durability, HistoryStore, Hub, HubConfig, MemoryStore};
use switchyard::metrics::Metrics;
use switchyard::protocol::Command;
use switchyard::store::sqlite::{Settings, SqliteStore};

const SENDERS: usize = 64;
const MEMBERS: usize = 10;

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

async fn measure(name: &str, durability: Durability, store: Arc<dyn HistoryStore>, run: Duration) {
    let config = HubConfig {
        durability,
        ..HubConfig::default().with_rate_limit(1e9)
    };
    let hub = Hub::with_store(config, store, Metrics::new());
    let join = || {
        vec![Ok(Command::Join {
            room: "bench".into(),
        })]
    };
    for i in 0..MEMBERS {
        let member = hub.create_session(&format!("m{i}")).expect("session");
        hub.execute(&member, join()).await;
    }
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let sender = hub.create_session(&format!("s{i}")).expect("session");
        hub.execute(&sender, join()).await;
        senders.push(sender);
    }
    let deadline = Instant::now() + run;
    let (started, cpu) = (Instant::now(), cpu_time());
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, sender)| {
            let hub = hub.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    let send = Command::Send {
                        room: "bench".into(),
                        text: "a chat message of about sixty-four bytes, as in the latency runs"
                            .into(),
                        client_id: format!("{i}-{sent}"),
                    };
                    let result = hub.execute(&sender, vec![Ok(send)]).await;
                    assert!(result[0].ok, "{:?}", result[0].error);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = 0;
    for task in tasks {
        sent += task.await.expect("sender");
    }
    let (elapsed, cpu) = (started.elapsed(), cpu_time() - cpu);
    hub.close_store();
    println!(
        "{name:<22} {:>9.0} msg/s {:>8.2} µs CPU/msg ({sent} messages in {:.1} s)",
        sent as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / sent as f64,
        elapsed.as_secs_f64()
    );
}

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let run = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!("one room of {MEMBERS} members, {SENDERS} senders, {seconds} s per store");
        let memory = Arc::new(MemoryStore::new(50, Duration::from_secs(86_400)));
        measure("memory", Durability::Normal, memory, run).await;
        for durability in [Durability::Normal, Durability::Full] {
            let dir = tempfile::tempdir().expect("temp dir");
            let settings = Settings {
                keep: 10_000,
                max_age: Duration::from_secs(86_400),
                durability,
            };
            let metrics = Metrics::new();
            let store = SqliteStore::open(dir.path(), settings, metrics.history().clone())
                .expect("open the store");
            let name = format!("sqlite, {durability:?}").to_lowercase();
            measure(&name, durability, Arc::new(store), run).await;
        }
    });
}
