//! The baseline: a bare tokio-tungstenite broadcast server, the loop most WebSocket chat
//! servers start as. Every text frame a client sends is relayed verbatim to every connected
//! client (the sender included) through a `tokio::sync::broadcast` channel: one task per
//! connection, woken once per message, writing one frame.
//!
//! It has no sessions, seq, replay or rooms, so it does less than switchyard; it is the yard
//! stick for the cost of a delivery (`switchyard bench --baseline`). A receiver that lags the
//! channel skips what it missed, as such loops do; the bench counts that as loss.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Messages a connection may fall behind before it skips.
const CHANNEL_CAPACITY: usize = 1024;

/// Serves the baseline on `listener` until the process ends.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let (tx, _) = broadcast::channel::<Utf8Bytes>(CHANNEL_CAPACITY);
    loop {
        let (stream, peer) = listener.accept().await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(stream, tx).await {
                tracing::debug!(%peer, error = %e, "baseline connection ended");
            }
        });
    }
}

async fn relay(
    stream: TcpStream,
    tx: broadcast::Sender<Utf8Bytes>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let socket = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    let (mut sink, mut stream) = socket.split();
    let mut rx = tx.subscribe();
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let _ = tx.send(text);
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
            },
            relayed = rx.recv() => match relayed {
                Ok(text) => sink.send(Message::Text(text)).await?,
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::warn!(skipped, "baseline receiver lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

/// Binds `addr`, prints `baseline listening on http://ADDR/` (the bench reads it) and serves.
pub async fn main(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("baseline listening on http://{}/", listener.local_addr()?);
    serve(listener).await
}
