//! How many messages per second one room sustains with each history store, and the CPU each
//! message costs: in process, through `Hub::execute`, no network. 64 senders send to one room
//! of 10 members as fast as their replies come back (with full durability a reply waits for
//! the write, so the senders' writes share commits).
//!
//! The Redis store runs against a `redis-server` (Debian's package) this bench starts on a free
//! loopback port, with `appendonly yes` and `appendfsync everysec`; its line adds the CPU that
//! Redis itself spent per message. Without `/usr/bin/redis-server` those lines are skipped.
//!
//! `cargo bench --bench history [-- SECONDS]` prints one line per store; docs/benchmarks.md
//! quotes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::hub::{Durability, HistoryStore, Hub, HubConfig, MemoryStore};
use switchyard::metrics::Metrics;
use switchyard::protocol::Command;
use switchyard::store::redis::{self as redis_store, RedisStore};
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

/// User plus system CPU time of process `pid`, from /proc.
fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// A `redis-server` on a free loopback port in a temp directory, killed when dropped.
struct Redis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Option<Redis> {
        if !std::path::Path::new("/usr/bin/redis-server").exists() {
            println!("redis                  skipped: /usr/bin/redis-server is not installed");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new("/usr/bin/redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen in 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn measure(
    name: &str,
    durability: Durability,
    store: Arc<dyn HistoryStore>,
    run: Duration,
    other: Option<u32>,
) {
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
    let other_cpu = other.map(cpu_time_of);
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
    let other_cpu = other
        .zip(other_cpu)
        .map(|(pid, before)| cpu_time_of(pid) - before);
    hub.close_store();
    let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / sent as f64;
    let redis = other_cpu
        .map(|cpu| format!(", Redis {:.2} µs CPU/msg", per_message(cpu)))
        .unwrap_or_default();
    println!(
        "{name:<22} {:>9.0} msg/s {:>8.2} µs CPU/msg ({sent} messages in {:.1} s{redis})",
        sent as f64 / elapsed.as_secs_f64(),
        per_message(cpu),
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
        measure("memory", Durability::Normal, memory, run, None).await;
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
            measure(&name, durability, Arc::new(store), run, None).await;
        }
        for durability in [Durability::Normal, Durability::Full] {
            let Some(redis) = Redis::start() else { break };
            let settings = redis_store::Settings {
                keep: 10_000,
                max_age: Duration::from_secs(86_400),
            };
            let metrics = Metrics::new();
            let store = RedisStore::open(&redis.url, settings, metrics.history().clone())
                .expect("open the Redis store");
            let name = format!("redis, {durability:?}").to_lowercase();
            measure(
                &name,
                durability,
                Arc::new(store),
                run,
                Some(redis.child.id()),
            )
            .await;
        }
    });
}
