//! A real `redis-server` (Debian's package) for the tests, on a free loopback port in a temp
//! directory of its own, killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{until_ready, within};

const REDIS: &str = "/usr/bin/redis-server";

/// A `redis-server` child process.
pub struct RedisServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its extra arguments, kept for restarts.
    args: Vec<String>,
    child: Option<tokio::process::Child>,
    /// Its working directory: the append-only file lives here across restarts.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A Redis that keeps nothing on disk.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// A Redis that writes every change to its append-only file, so a restart keeps its data.
    pub async fn persistent() -> RedisServer {
        RedisServer::start_with(&[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .await
    }

    async fn start_with(args: &[&str]) -> RedisServer {
        assert!(
            Path::new(REDIS).exists(),
            "the Redis tests need Debian's `redis-server` package ({REDIS} is missing): run \
             scripts/test, which installs it, or apt-get install redis-server"
        );
        let dir = tempfile::tempdir().expect("a temp directory");
        let mut redis = RedisServer {
            addr: "127.0.0.1:0".parse().expect("an address"),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            dir,
        };
        // The port is picked free and then handed over, so another process may take it in
        // between: Redis then exits, and we try again on another port.
        for _ in 0..5 {
            redis.addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            if redis.run().await {
                return redis;
            }
        }
        panic!("redis-server exited at start five times in a row");
    }

    /// Starts the process on `addr` and waits until it answers PING; `false` if it exited.
    async fn run(&mut self) -> bool {
        let mut child = tokio::process::Command::new(REDIS)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {REDIS}: {e}"));
        let addr = self.addr;
        let up = within(
            "redis-server to answer PING",
            until_ready(&mut child, || ping(addr)),
        )
        .await;
        if up {
            self.child = Some(child);
        } else {
            let output = child.wait_with_output().await.expect("redis output");
            eprintln!(
                "redis-server exited at start: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        up
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// A connection for checking what the server wrote.
    pub fn connection(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connect to the test redis")
    }

    /// A sequencer on this Redis deciding by `config`, with a cluster's state started (as a
    /// first node's start does, without counting a node as running).
    pub async fn sequencer(
        &self,
        config: &switchyard::hub::HubConfig,
    ) -> switchyard::cluster::sequencer::Sequencer {
        use switchyard::cluster::sequencer::Sequencer;
        let sequencer = within(
            "the sequencer to connect",
            Sequencer::connect(&self.url(), config),
        )
        .await
        .expect("connect to the test redis");
        let started = async {
            sequencer.start("tests").await?;
            sequencer.leave("tests").await
        };
        within("a cluster's state to start", started)
            .await
            .expect("the test redis answers");
        sequencer
    }

    /// SIGKILL: Redis dies at once; the port is free again.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL redis");
            within("redis-server to die", child.wait())
                .await
                .expect("wait");
        }
    }

    /// Starts it again on the same port, over the same directory (and so the same data when
    /// it is persistent).
    pub async fn restart(&mut self) {
        assert!(self.run().await, "redis-server restarts on {}", self.addr);
    }
}

/// Whether a Redis at `addr` answers PING (not while it loads its data).
async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).await.is_ok() && &reply == b"+PONG\r\n"
}
