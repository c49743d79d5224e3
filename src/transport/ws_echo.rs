//! An echo server on switchyard's own WebSocket path, for Autobahn|Testsuite
//! (`examples/ws_echo.rs`, `scripts/autobahn`).
//!
//! It is `/ws` with the session swapped for an echo: the same handshake check, the same
//! socket taken back from hyper, the same tungstenite reader and limits, the same
//! write-through [`SocketWriter`] (here framing whole text and binary messages) and the same
//! loop and close handshake. Only the handler differs: each message comes back as one frame.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::hub::Budget;
use crate::metrics::Metrics;
use crate::protocol::CloseReason;
use crate::transport::error_response;

use super::websocket::{
    check_handshake, read_config, serve_upgrade, switching_protocols, Handler, Limits,
    SocketSettings,
};
use super::ws_writer::SocketWriter;
use super::Body;

/// The largest message echoed: 16 MiB, so Autobahn's section 9 (up to 16 MiB) can run too.
pub const MAX_MESSAGE: usize = 16 << 20;

/// The echo's settings: a heartbeat long enough that no ping falls inside a test case, and an
/// outbox of 1,024 frames or 64 MiB.
fn settings() -> SocketSettings {
    SocketSettings {
        read: read_config(MAX_MESSAGE / 4, 64 * 1024),
        limits: Limits {
            heartbeat: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
        },
        outbox: Budget {
            events: 1024,
            bytes: 64 << 20,
        },
        metrics: Metrics::new(),
    }
}

/// Each message comes back whole, as one frame of its kind.
struct Echo(Arc<SocketWriter>);

impl Handler for Echo {
    async fn message(&self, message: Message) {
        match message {
            Message::Text(text) => self.0.write_message(true, &Bytes::from(text)),
            Message::Binary(data) => self.0.write_message(false, &data),
            _ => {}
        }
    }

    fn finish(self, _closing: Option<CloseReason>) {}
}

/// Answers a handshake on any path with `101` and echoes on the socket.
async fn upgrade(mut request: Request<Incoming>) -> Response<Body> {
    let accept = match check_handshake(&request) {
        Ok(accept) => accept,
        Err(error) => return error_response(error),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        // The echo is never closed by the server for a reason of its own.
        let (_keep, close) = watch::channel(None);
        serve_upgrade(on_upgrade, settings(), close, |writer| Ok(Echo(writer))).await;
    });
    switching_protocols(&accept)
}

/// Serves the echo on `listener` forever.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service =
                service_fn(|request| async { Ok::<_, Infallible>(upgrade(request).await) });
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "echo connection ended with an error");
            }
        });
    }
}
