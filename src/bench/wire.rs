//! The bench's side of the socket: TCP connections with TCP_NODELAY from spread source
//! addresses, a byte-counting wrapper, and a minimal HTTP/1 client over it.
//!
//! Everything the bench's clients send or receive goes through [`Counted`], so bytes on the
//! wire (headers and framing included, TCP/IP headers not) are measured at the client socket.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// Bytes read and written by a group of sockets (one transport's clients).
#[derive(Debug, Default)]
pub struct WireCounters {
    /// Bytes received from the server.
    pub read: AtomicU64,
    /// Bytes sent to the server.
    pub written: AtomicU64,
}

impl WireCounters {
    /// Bytes in both directions so far.
    pub fn total(&self) -> u64 {
        self.read.load(Ordering::Relaxed) + self.written.load(Ordering::Relaxed)
    }
}

/// A stream that counts the bytes passing through it.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counters: Arc<WireCounters>,
}

impl<S> Counted<S> {
    /// Wraps `inner`, adding to `counters`.
    pub fn new(inner: S, counters: Arc<WireCounters>) -> Self {
        Counted { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters.read.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects to 127.0.0.x targets from a rotating set of loopback source addresses, so that
/// tens of thousands of connections do not run out of ephemeral ports on one address pair.
#[derive(Debug)]
pub struct Connector {
    target: SocketAddr,
    sources: u8,
    next: AtomicUsize,
}

impl Connector {
    /// Connections to `target`, spread over source addresses 127.0.0.1 ..= 127.0.0.`sources`.
    pub fn new(target: SocketAddr, sources: u8) -> Self {
        Connector {
            target,
            sources: sources.max(1),
            next: AtomicUsize::new(0),
        }
    }

    /// The server's address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// A new connection with TCP_NODELAY, counted into `counters`.
    pub async fn connect(&self, counters: &Arc<WireCounters>) -> io::Result<Counted<TcpStream>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let stream = match self.target {
            SocketAddr::V4(target) if target.ip().is_loopback() => {
                let source = Ipv4Addr::new(127, 0, 0, 1 + (n % self.sources as usize) as u8);
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
                socket.connect(SocketAddr::V4(target)).await?
            }
            target => TcpStream::connect(target).await?,
        };
        stream.set_nodelay(true)?;
        Ok(Counted::new(stream, counters.clone()))
    }

    /// A keep-alive HTTP/1 connection.
    pub async fn http(&self, counters: &Arc<WireCounters>) -> io::Result<Http> {
        let stream = self.connect(counters).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Http {
            sender,
            host: self.target.to_string(),
        })
    }
}

/// One keep-alive HTTP/1 connection: requests go one at a time.
#[derive(Debug)]
pub struct Http {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Http {
    /// Sends a request and returns the response with its body unread.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> io::Result<Response<Incoming>> {
        self.sender.ready().await.map_err(io::Error::other)?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .map_err(io::Error::other)?;
        self.sender
            .send_request(request)
            .await
            .map_err(io::Error::other)
    }

    /// Sends a request and reads the whole reply.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> io::Result<(StatusCode, Bytes)> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok((status, body))
    }
}
