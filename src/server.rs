//! The accept loop: a connection cap, TCP_NODELAY, TLS when configured, one hyper connection
//! per socket speaking HTTP/1.1 or HTTP/2 (by ALPN under TLS; without TLS, HTTP/2 with prior
//! knowledge is recognised by peeking at its preface), with upgrades for WebSockets (HTTP/1.1
//! `Upgrade` and HTTP/2 extended `CONNECT`), its deadlines (headers and the TLS handshake by
//! the header timeout, writes by [`DeadlineIo`], HTTP/2 keep-alive pings) and graceful
//! shutdown. Each connection runs hyper's own HTTP/1.1 or HTTP/2 server, not hyper-util's
//! auto builder: an HTTP/1.1 connection (an idle SSE stream) then costs no more than before
//! HTTP/2 existed.
//!
//! Shutdown is a parameter of [`run`], so tests pass their own signal. On shutdown the
//! listener closes, the hub closes every attached transport with `shutdown` (WebSocket close
//! 4002, SSE `close` event, long poll `closed`), open HTTP connections finish their current
//! response, and `run` returns once every connection and WebSocket task is done or the grace
//! period is over. hyper-util's graceful helper would not see upgraded sockets, so every task
//! is tracked here.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AddressLimiter;
use crate::cluster::sequencer::Sequencer;
use crate::config::Config;
use crate::connection::{ConnectionWatch, DeadlineIo, ReportsProgress};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{ErrorBody, ErrorCode};
use crate::router;
use crate::transport::error_response;

/// What every request handler shares.
#[derive(Debug)]
pub struct App {
    /// The server's settings.
    pub config: Config,
    /// The session core.
    pub hub: Hub,
    /// Every connection and WebSocket task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// One permit per open TCP connection. An upgraded WebSocket takes its own permit: hyper
    /// ends the HTTP connection (and drops its permit) at the upgrade.
    pub connections: Arc<Semaphore>,
    /// Session creations per client address.
    pub session_limiter: AddressLimiter,
}

/// The client address of a request's connection, in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Serves on `listener` until `shutdown` completes, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let hub = build_hub(&config).await.map_err(std::io::Error::other)?;
    serve(listener, config, hub, shutdown).await
}

/// The session core for `config`, with the history store it asks for opened, and on a
/// cluster node its link to Redis. `Err` is a one-line message (a data directory that cannot
/// be used, a locked or unreadable database, a Redis that cannot be reached).
pub async fn build_hub(config: &Config) -> Result<Hub, String> {
    let metrics = Metrics::new();
    let store = crate::store::open(config, &metrics)?;
    let Some(cluster) = &config.cluster else {
        return Ok(Hub::with_store(config.hub_config(), store, metrics));
    };
    let hub_config = config.hub_config();
    let in_redis = |e: String| format!("{}: {e}", cluster.redis);
    let client =
        redis::Client::open(cluster.redis.as_str()).map_err(|e| in_redis(e.to_string()))?;
    let sequencer = Sequencer::connect(&cluster.redis, &hub_config)
        .await
        .map_err(|e| in_redis(e.0))?
        .keeping(config.history_keep)
        .counting(metrics.cluster().redis_calls.clone());
    Hub::clustered(hub_config, store, metrics, sequencer, client, &cluster.node)
        .await
        .map_err(in_redis)
}

/// Like [`run`], with a hub (from [`build_hub`], or `Hub::new(config.hub_config())`) the
/// caller keeps a handle to (tests, embedding). The hub's history store is closed on return.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    hub: Hub,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let grace = config.shutdown_grace;
    let cap = config.connection_cap();
    tracing::debug!(cap, "connection cap");
    let connections = Arc::new(Semaphore::new(cap));
    let timers = hub.spawn_timers();
    let session_limiter = AddressLimiter::new(
        config.session_rate_limit,
        config.session_rate_limit_loopback,
    );
    let app = Arc::new(App {
        config,
        hub,
        tracker: TaskTracker::new(),
        connections: connections.clone(),
        session_limiter,
    });
    let closing = CancellationToken::new();
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app_for_conn = app.clone();
        let closing = closing.clone();
        app.tracker.spawn(async move {
            serve_connection(stream, peer, app_for_conn, closing).await;
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("shutting down");
    app.hub.shutdown();
    closing.cancel();
    app.tracker.close();
    if tokio::time::timeout(grace, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = app.tracker.len(),
            "connections still open after the grace period; closing them"
        );
    }
    timers.abort();
    app.hub.leave_cluster().await;
    // Everything queued is written and the last message id recorded before `run` returns.
    let hub = app.hub.clone();
    let _ = tokio::task::spawn_blocking(move || hub.close_store()).await;
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    closing: CancellationToken,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "set_nodelay failed");
    }
    let config = &app.config;
    if let Some(bytes) = config.socket_send_buffer {
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes) {
            tracing::debug!(%peer, error = %e, "setting SO_SNDBUF failed");
        }
    }
    let watch = ConnectionWatch::new(config.write_timeout);
    let connection = Connection {
        watch: watch.clone(),
        peer,
        app: app.clone(),
        closing,
    };
    match &config.tls {
        None => {
            let http2 =
                match tokio::time::timeout(config.header_timeout, starts_http2(&stream)).await {
                    Ok(Ok(http2)) => http2,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "connection failed"),
                    Err(_) => return tracing::debug!(%peer, "no request within the header timeout"),
                };
            connection
                .serve(DeadlineIo::new(stream, watch), http2)
                .await
        }
        // Boxed: a plain connection's task need not be as large as a TLS one.
        Some(tls) => Box::pin(connection.serve_tls(tls, stream)).await,
    }
}

/// Whether a plain connection starts with HTTP/2's preface (prior knowledge, h2c); looks
/// without reading, so the HTTP/1.1 or HTTP/2 connection reads it all.
async fn starts_http2(stream: &TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut start = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut start).await?;
        if n == 0 || start[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface (it nearly always comes in one packet): a peek would return
        // the same bytes at once, so wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What serving one connection needs.
struct Connection {
    watch: Arc<ConnectionWatch>,
    peer: SocketAddr,
    app: Arc<App>,
    closing: CancellationToken,
}

impl Connection {
    /// The TLS handshake (within the header timeout), then HTTP/2 or HTTP/1.1 as ALPN chose.
    async fn serve_tls(self, tls: &crate::tls::Tls, stream: TcpStream) {
        let (peer, watch) = (self.peer, self.watch.clone());
        let handshake = tls.acceptor.accept(stream);
        match tokio::time::timeout(self.app.config.header_timeout, handshake).await {
            Ok(Ok(stream)) => {
                let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                self.serve(DeadlineIo::new(stream, watch), http2).await
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    /// Serves HTTP/1.1 (with upgrades) or HTTP/2 on `io` until the connection ends or
    /// shutdown closes it.
    async fn serve<I>(self, io: DeadlineIo<I>, http2: bool)
    where
        I: AsyncRead + AsyncWrite + ReportsProgress + Unpin + Send + 'static,
    {
        let config = &self.app.config;
        let io = TokioIo::new(io);
        let service = self.service();
        let result = if http2 {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .enable_connect_protocol()
                .max_concurrent_streams(config.max_h2_streams)
                // A connection whose client stopped answering pings is dropped, with its
                // streams.
                .keep_alive_interval(config.heartbeat)
                .keep_alive_timeout(config.heartbeat * 2);
            // Boxed: an HTTP/1.1 connection's task need not be as large as an HTTP/2 one.
            Box::pin(until_closing(
                builder.serve_connection(io, service),
                |c| c.graceful_shutdown(),
                &self.closing,
            ))
            .await
        } else {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_timeout)
                .serve_connection(io, service)
                .with_upgrades();
            until_closing(connection, |c| c.graceful_shutdown(), &self.closing).await
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }

    /// The service answering the connection's requests.
    fn service(
        &self,
    ) -> impl hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<crate::transport::Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<hyper::Response<crate::transport::Body>, Infallible>>
                     + Send,
    > + Clone {
        let config = &self.app.config;
        let stream_write_timeout = config.write_timeout.max(config.heartbeat * 2);
        let (app, watch, peer) = (self.app.clone(), self.watch.clone(), self.peer);
        service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let app = app.clone();
            // An HTTP/2 connection carries many requests: one stream may not change the
            // deadlines of the others, so only HTTP/1.1 requests see the connection's watch.
            // An HTTP/2 connection is likely to carry a stream (SSE, WebSocket), so its writes
            // may wait as long as a stream's: two heartbeats (or the write timeout, if longer).
            if request.version() == hyper::Version::HTTP_2 {
                watch.set_write_timeout(stream_write_timeout);
            } else {
                request.extensions_mut().insert(watch.clone());
            }
            request.extensions_mut().insert(Peer(peer));
            async move {
                // A bug must cost one request a 500, not the whole connection.
                let response = AssertUnwindSafe(router::route(request, app))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(%peer, "a request handler panicked");
                        let mut response = error_response(ErrorBody::new(
                            ErrorCode::Internal,
                            "internal error; it has been logged",
                        ));
                        response.headers_mut().insert(
                            hyper::header::X_CONTENT_TYPE_OPTIONS,
                            hyper::header::HeaderValue::from_static("nosniff"),
                        );
                        response
                    });
                Ok::<_, Infallible>(response)
            }
        })
    }
}

/// Runs a connection to its end; once `closing` fires, asks it to finish gracefully (its
/// current requests complete, no new one starts) and waits for that.
async fn until_closing<C>(
    connection: C,
    graceful_shutdown: fn(Pin<&mut C>),
    closing: &CancellationToken,
) -> C::Output
where
    C: Future,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = closing.cancelled() => {
            graceful_shutdown(connection.as_mut());
            connection.await
        }
    }
}
