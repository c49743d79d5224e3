//! Reverse proxies for the tests: `nginx` and `haproxy` processes (Debian's packages) on free
//! loopback ports, with configurations from docs/deploy.md or the test's own.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::net::TcpStream;

use super::{until_ready, within, TestServer};

const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";

/// The first fenced block of `lang` in docs/deploy.md, with its listen address and upstream
/// replaced by `listen` and `upstream`.
pub fn documented(lang: &str, listen: &str, upstream: SocketAddr) -> String {
    let block = block(lang);
    for placeholder in ["127.0.0.1:8080", listen.split_whitespace().next().unwrap()] {
        assert!(
            block.contains(placeholder),
            "{placeholder} in the {lang} block"
        );
    }
    block.replace("127.0.0.1:8080", &upstream.to_string())
}

/// The first fenced block whose info string is `lang` in docs/deploy.md, as it stands.
pub fn block(lang: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deploy.md"))
        .expect("docs/deploy.md");
    let start = doc
        .find(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("no {lang} block in docs/deploy.md"))
        + lang.len()
        + 4;
    let end = start + doc[start..].find("```").expect("the block ends");
    doc[start..end].to_owned()
}

/// A proxy process on a free loopback port, killed on drop.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    child: tokio::process::Child,
    /// Holds the config and the proxy's files until the proxy is gone.
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts `program` with the config `make_config(dir, listen address)` writes, and waits
    /// until it accepts connections.
    async fn start(
        program: &str,
        package: &str,
        make_config: impl Fn(&Path, SocketAddr) -> (String, Vec<String>),
    ) -> Proxy {
        assert!(
            Path::new(program).exists(),
            "the proxy tests need Debian's `{package}` package ({program} is missing): run \
             scripts/test, which installs it, or apt-get install {package}"
        );
        // The port is picked free and then handed over, so another process may take it in
        // between: the proxy then exits, and we try again on another port.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("a temp directory");
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let (config, args) = make_config(dir.path(), addr);
            std::fs::write(dir.path().join("proxy.conf"), config).expect("write the config");
            let mut child = tokio::process::Command::new(program)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("start {program}: {e}"));
            // Ready means a request through the proxy reached the server behind it: a proxy
            // that accepted a connection may still fail its start and reset what it accepted.
            let through = TestServer::attached_to(addr);
            let ready = within(
                &format!("{package} to carry GET /healthz"),
                until_ready(&mut child, || async {
                    matches!(
                        through.try_json(Method::GET, "/healthz", Value::Null).await,
                        Some((StatusCode::OK, _))
                    )
                }),
            )
            .await;
            if ready && child.try_wait().expect("the proxy's status").is_none() {
                return Proxy {
                    addr,
                    child,
                    _dir: dir,
                };
            }
            let _ = child.start_kill();
            let output = child.wait_with_output().await.expect("proxy output");
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            eprintln!(
                "{package} failed at start: {}{log}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        panic!("{package} failed at start five times in a row");
    }

    /// nginx running `server_block` (its upstream filled in; `listen 80;` is replaced by the
    /// free address) inside a minimal main configuration of its own.
    pub async fn nginx(server_block: String) -> Proxy {
        Proxy::start(NGINX, "nginx", |dir, addr| {
            let d = dir.display();
            let block = server_block.replace("listen 80;", &format!("listen {addr};"));
            let config = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    \
                 proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
                 uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n{block}\n}}\n"
            );
            let args = vec![
                "-p".into(),
                format!("{d}/"),
                "-e".into(),
                format!("{d}/error.log"),
                "-c".into(),
                format!("{d}/proxy.conf"),
            ];
            (config, args)
        })
        .await
    }

    /// HAProxy running `config` with `bind :80` replaced by the free address.
    pub async fn haproxy(config: String) -> Proxy {
        Proxy::start(HAPROXY, "haproxy", |dir, addr| {
            let config = config.replace("bind :80", &format!("bind {addr}"));
            let args = vec![
                "-db".into(),
                "-f".into(),
                format!("{}/proxy.conf", dir.display()),
            ];
            (config, args)
        })
        .await
    }

    /// A client handle that goes through the proxy.
    pub fn client(&self) -> TestServer {
        TestServer::attached_to(self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A TCP relay to `upstream` that can freeze every connection open so far: a frozen
/// connection stays open but carries nothing more either way (a proxy or NAT that lost its
/// state without telling anyone). Connections made after a freeze are relayed.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections with a number below this are frozen.
    frozen_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (frozen_below, next) = (frozen_below.clone(), next.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let number = next.fetch_add(1, Ordering::SeqCst);
                    let frozen_below = frozen_below.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let frozen = move || frozen_below.load(Ordering::SeqCst) > number;
                        let up = copy_until_frozen(client_read, server_write, frozen.clone());
                        let down = copy_until_frozen(server_read, client_write, frozen);
                        tokio::join!(up, down);
                    });
                }
            }
        });
        Relay {
            addr,
            frozen_below,
            next,
            task,
        }
    }

    /// Freezes every connection open now.
    pub fn freeze(&self) {
        use std::sync::atomic::Ordering;
        self.frozen_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies until EOF, or until `frozen()`: then holds both sockets open, silent, for good.
async fn copy_until_frozen(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen() {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
