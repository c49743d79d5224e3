//! The bench's side of the socket: TCP connections with TCP_NODELAY from spread source
//! addresses, a byte-counting wrapper, TLS when asked, and a minimal HTTP/1.1 or HTTP/2
//! client over it (WebSockets by upgrade, or by extended CONNECT over HTTP/2).
//!
//! Everything the bench's clients send or receive goes through [`Counted`], under TLS if
//! any, so bytes on the wire (headers, framing and TLS records included, TCP/IP headers not)
//! are measured at the client socket.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// What the bench speaks to the server: TLS or not, HTTP/1.1 or HTTP/2.
#[derive(Clone, Default)]
pub struct Protocol {
    /// TLS, trusting the server's certificate.
    tls: Option<TlsConnector>,
    /// HTTP/2 (by ALPN under TLS, else with prior knowledge); WebSockets by extended CONNECT.
    http2: bool,
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl Protocol {
    /// Plain, or TLS trusting the certificate (PEM) in `cert`; HTTP/2 or HTTP/1.1.
    pub fn new(cert: Option<&Path>, http2: bool) -> Result<Protocol, String> {
        let Some(cert) = cert else {
            return Ok(Protocol { tls: None, http2 });
        };
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        {
            let der = der.map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
            roots
                .add(der)
                .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up failed: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let alpn: &[u8] = if http2 { b"h2" } else { b"http/1.1" };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Protocol {
            tls: Some(TlsConnector::from(Arc::new(config))),
            http2,
        })
    }

    /// How it reads in a report.
    pub fn describe(&self) -> &'static str {
        match (self.tls.is_some(), self.http2) {
            (false, false) => "HTTP/1.1",
            (false, true) => "HTTP/2 (h2c)",
            (true, false) => "HTTPS, HTTP/1.1",
            (true, true) => "HTTPS, HTTP/2",
        }
    }

    fn scheme(&self, websocket: bool) -> &'static str {
        match (self.tls.is_some(), websocket) {
            (false, false) => "http",
            (false, true) => "ws",
            (true, false) => "https",
            (true, true) => "wss",
        }
    }
}

/// A stream to the server: counted TCP, inside TLS when the protocol says so.
#[derive(Debug)]
pub enum Wire {
    /// Plain TCP.
    Plain(Counted<TcpStream>),
    /// TLS over counted TCP (the bytes counted are the encrypted ones).
    Tls(Box<TlsStream<Counted<TcpStream>>>),
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Wire::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Wire::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Wire::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Wire::Plain(s) => s.is_write_vectored(),
            Wire::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_flush(cx),
            Wire::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Wire::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Any stream a bench WebSocket runs on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A bench WebSocket, whatever carries it.
pub type Socket = WebSocketStream<Box<dyn Io>>;

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
/// With several targets (a cluster's nodes), each new socket goes to the next target, and
/// each [`Http`] holds a connection to every target and sends each request to the next.
#[derive(Debug)]
pub struct Connector {
    targets: Vec<SocketAddr>,
    sources: u8,
    next: AtomicUsize,
    next_target: AtomicUsize,
    protocol: Protocol,
}

impl Connector {
    /// Plain HTTP/1.1 connections to `targets` (at least one), spread over source addresses
    /// 127.0.0.1 ..= 127.0.0.`sources`.
    pub fn new(targets: &[SocketAddr], sources: u8) -> Self {
        assert!(!targets.is_empty(), "a connector needs a target");
        Connector {
            targets: targets.to_vec(),
            sources: sources.max(1),
            next: AtomicUsize::new(0),
            next_target: AtomicUsize::new(0),
            protocol: Protocol::default(),
        }
    }

    /// The same, speaking `protocol`.
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// How many servers (a cluster's nodes) it connects to.
    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    /// The (first) server's address.
    pub fn target(&self) -> SocketAddr {
        self.targets[0]
    }

    /// Opens a connection with `open` to the next target in turn, passing a target that
    /// refuses over for the one after it, as a load balancer passes over a server that is
    /// down (nginx's `proxy_next_upstream error`); `Err` when every target refused.
    async fn next_taker<T, F>(
        &self,
        mut open: impl FnMut(SocketAddr) -> F,
    ) -> io::Result<(SocketAddr, T)>
    where
        F: std::future::Future<Output = io::Result<T>>,
    {
        let first = self.next_target.fetch_add(1, Ordering::Relaxed);
        let mut tries = 1;
        loop {
            let target = self.targets[(first + tries - 1) % self.targets.len()];
            match open(target).await {
                Ok(opened) => return Ok((target, opened)),
                Err(e) if tries < self.targets.len() => {
                    tracing::debug!(error = %e, %target, "a target refused: trying the next");
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A new TCP connection to the next target that takes it ([`Connector::next_taker`]),
    /// with TCP_NODELAY, counted into `counters` (never TLS).
    pub async fn connect(&self, counters: &Arc<WireCounters>) -> io::Result<Counted<TcpStream>> {
        let (_, stream) = self
            .next_taker(|target| self.connect_to(target, counters))
            .await?;
        Ok(stream)
    }

    async fn connect_to(
        &self,
        target: SocketAddr,
        counters: &Arc<WireCounters>,
    ) -> io::Result<Counted<TcpStream>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let stream = match target {
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

    /// A new connection to `target` in the protocol's TLS, if any.
    async fn wire(&self, target: SocketAddr, counters: &Arc<WireCounters>) -> io::Result<Wire> {
        let tcp = self.connect_to(target, counters).await?;
        match &self.protocol.tls {
            None => Ok(Wire::Plain(tcp)),
            Some(tls) => {
                let name = ServerName::IpAddress(target.ip().into());
                Ok(Wire::Tls(Box::new(tls.connect(name, tcp).await?)))
            }
        }
    }

    /// Keep-alive connections in the protocol's HTTP version, one to each target that
    /// answers (a cluster's node may be down); `Err` if none does.
    pub async fn http(&self, counters: &Arc<WireCounters>) -> io::Result<Http> {
        let mut conns = Vec::with_capacity(self.targets.len());
        // Starting at the next target, so one-shot requests spread too.
        let first = self.next_target.fetch_add(1, Ordering::Relaxed);
        let mut failure = None;
        for i in 0..self.targets.len() {
            let target = self.targets[(first + i) % self.targets.len()];
            match self.conn(target, counters).await {
                Ok(conn) => conns.push(conn),
                Err(e) => failure = Some(e),
            }
        }
        if let (true, Some(failure)) = (conns.is_empty(), failure) {
            return Err(failure);
        }
        Ok(Http {
            conns,
            next: 0,
            scheme: self.protocol.scheme(false),
        })
    }

    async fn conn(&self, target: SocketAddr, counters: &Arc<WireCounters>) -> io::Result<Conn> {
        let wire = TokioIo::new(self.wire(target, counters).await?);
        let sender = if self.protocol.http2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), wire)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(connection);
            Sender::H2(sender)
        } else {
            let (sender, connection) = http1::handshake(wire).await.map_err(io::Error::other)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Sender::H1(sender)
        };
        Ok(Conn {
            sender,
            host: target.to_string(),
        })
    }

    /// A WebSocket on `path`: its own connection over HTTP/1.1, a stream of a new connection
    /// over HTTP/2 (the connection is returned too: it lives as long as the socket).
    pub async fn websocket(
        &self,
        path: &str,
        counters: &Arc<WireCounters>,
    ) -> Result<(Socket, Option<Http>), Box<dyn std::error::Error + Send + Sync>> {
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        if !self.protocol.http2 {
            let (target, wire) = self
                .next_taker(|target| self.wire(target, counters))
                .await?;
            let wire: Box<dyn Io> = Box::new(wire);
            let url = format!("{}://{}{path}", self.protocol.scheme(true), target);
            let (socket, _) =
                tokio_tungstenite::client_async_with_config(url, wire, Some(config)).await?;
            return Ok((socket, None));
        }
        let (_, mut conn) = self
            .next_taker(|target| self.conn(target, counters))
            .await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!(
                "{}://{}{path}",
                self.protocol.scheme(false),
                conn.host
            ))
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(Full::new(Bytes::new()))?;
        let Sender::H2(sender) = &mut conn.sender else {
            unreachable!("an HTTP/2 connection")
        };
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(format!("WebSocket over HTTP/2 answered {}", response.status()).into());
        }
        let upgraded: Box<dyn Io> = Box::new(TokioIo::new(hyper::upgrade::on(response).await?));
        let socket = WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config)).await;
        let http = Http {
            conns: vec![conn],
            next: 0,
            scheme: self.protocol.scheme(false),
        };
        Ok((socket, Some(http)))
    }
}

#[derive(Debug)]
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One keep-alive connection to each target; each request goes to the next. Over HTTP/1.1
/// requests go one at a time.
#[derive(Debug)]
pub struct Http {
    conns: Vec<Conn>,
    next: usize,
    scheme: &'static str,
}

/// A keep-alive connection to one target.
#[derive(Debug)]
struct Conn {
    sender: Sender,
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
        let at = self.next % self.conns.len();
        self.next += 1;
        let conn = &mut self.conns[at];
        // The path over HTTP/1.1 (with a `Host` header), the absolute URI over HTTP/2.
        let mut request = Request::builder().header("content-type", "application/json");
        request = match conn.sender {
            Sender::H1(_) => request.uri(path).header("host", &conn.host),
            Sender::H2(_) => request.uri(format!("{}://{}{path}", self.scheme, conn.host)),
        };
        let request = request
            .method(method)
            .body(Full::new(body.into()))
            .map_err(io::Error::other)?;
        let response = match &mut conn.sender {
            Sender::H1(sender) => {
                sender.ready().await.map_err(io::Error::other)?;
                sender.send_request(request).await
            }
            Sender::H2(sender) => {
                sender.ready().await.map_err(io::Error::other)?;
                sender.send_request(request).await
            }
        };
        response.map_err(io::Error::other)
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
