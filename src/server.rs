//! The accept loop: a connection cap, TCP_NODELAY, one hyper HTTP/1 connection per socket
//! (with upgrades for WebSockets), its deadlines (headers by hyper, writes by
//! [`DeadlineIo`]) and graceful shutdown.
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
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::AddressLimiter;
use crate::config::Config;
use crate::connection::{ConnectionWatch, DeadlineIo};
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
    let hub = build_hub(&config).map_err(std::io::Error::other)?;
    serve(listener, config, hub, shutdown).await
}

/// The session core for `config`, with the history store it asks for opened. `Err` is a
/// one-line message (a data directory that cannot be used, a locked or unreadable database).
pub fn build_hub(config: &Config) -> Result<Hub, String> {
    let metrics = Metrics::new();
    let store = crate::store::open(config, &metrics)?;
    Ok(Hub::with_store(config.hub_config(), store, metrics))
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
    let header_timeout = config.header_timeout;
    let watch = ConnectionWatch::new(config.write_timeout);
    let io = DeadlineIo::new(stream, watch.clone());
    let service = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        request.extensions_mut().insert(watch.clone());
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
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
