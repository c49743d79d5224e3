//! Write deadlines for one HTTP connection.
//!
//! hyper bounds the time to read a request's headers but not the time to write a response: a
//! client that stops reading would hold its connection, and an SSE stream its session's
//! attachment, for as long as it liked. [`DeadlineIo`] wraps the TCP stream a connection is
//! served on, so that a write waiting for the client longer than the connection's write
//! timeout fails and hyper drops the connection. [`ConnectionWatch`] is the half shared with
//! the request handlers (through the request's extensions): an SSE stream sets the timeout to
//! two heartbeats, and once the hub closes the stream it calls
//! [`ConnectionWatch::end_within`], so the connection is gone within the close timeout even if
//! the client never reads the last frames.
//!
//! A write that waits is not proof that the client stopped reading: the kernel wakes a
//! writer only once a good part of its send buffer is free, so a client that reads slowly but
//! steadily can keep a write waiting for longer than the timeout. When a deadline comes, the
//! kernel is asked how many bytes the client has acknowledged ([`SendProgress`]): if that grew,
//! the client is reading and the write gets a new deadline; only a client that acknowledged
//! nothing is cut. The end set by [`ConnectionWatch::end_within`] is never extended.
//!
//! Nothing here knows what is written; it only sees bytes wait.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The deadlines of one connection, shared between its IO and its request handlers.
#[derive(Debug)]
pub struct ConnectionWatch {
    state: Mutex<WatchState>,
    /// Set once [`ConnectionWatch::end_within`] was called: every write checks the deadline.
    ending: AtomicBool,
    /// Set when a deadline cut the connection.
    timed_out: AtomicBool,
}

#[derive(Debug)]
struct WatchState {
    write_timeout: Duration,
    /// The connection must be gone by then (a stream the server closed).
    end_by: Option<Instant>,
    /// The connection task, registered while a write waits, so a new `end_by` takes effect at
    /// once.
    waker: Option<Waker>,
}

impl ConnectionWatch {
    /// A watch whose writes may wait `write_timeout` each.
    pub fn new(write_timeout: Duration) -> Arc<Self> {
        Arc::new(ConnectionWatch {
            state: Mutex::new(WatchState {
                write_timeout,
                end_by: None,
                waker: None,
            }),
            ending: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes how long one write may wait (from the next wait on).
    pub fn set_write_timeout(&self, timeout: Duration) {
        self.lock().write_timeout = timeout;
    }

    /// The connection must be gone within `limit`: a write still waiting then fails.
    pub fn end_within(&self, limit: Duration) {
        let mut state = self.lock();
        let by = Instant::now() + limit;
        state.end_by = Some(state.end_by.map_or(by, |earlier| earlier.min(by)));
        self.ending.store(true, Ordering::Release);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// Whether a deadline cut the connection.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Acquire)
    }

    /// When a write waiting since `since` must give up, and whether that is the connection's
    /// end (which progress does not extend). Registers the task to be woken if the deadline
    /// moves.
    fn deadline(&self, since: Instant, waker: &Waker) -> (Instant, bool) {
        let mut state = self.lock();
        if !state.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.waker = Some(waker.clone());
        }
        let deadline = since + state.write_timeout;
        match state.end_by {
            Some(by) if by <= deadline => (by, true),
            _ => (deadline, false),
        }
    }

    fn past_end(&self) -> bool {
        self.ending.load(Ordering::Acquire)
            && self.lock().end_by.is_some_and(|by| Instant::now() >= by)
    }

    fn cut(&self) -> io::Error {
        self.timed_out.store(true, Ordering::Release);
        io::Error::new(io::ErrorKind::TimedOut, "write deadline passed")
    }
}

/// How far the kernel got with a connection's outgoing bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendProgress {
    /// Bytes the client has acknowledged since the connection opened (it only grows).
    pub acked: u64,
    /// Bytes written but not yet acknowledged, still in the kernel's send buffer.
    pub queued: u64,
}

/// An IO the kernel can report [`SendProgress`] for.
pub trait ReportsProgress {
    /// The kernel's figures, or `None` where it does not give them.
    fn send_progress(&self) -> Option<SendProgress>;
}

impl ReportsProgress for TcpStream {
    fn send_progress(&self) -> Option<SendProgress> {
        send_progress(self)
    }
}

impl ReportsProgress for tokio_rustls::server::TlsStream<TcpStream> {
    fn send_progress(&self) -> Option<SendProgress> {
        send_progress(self.get_ref().0)
    }
}

/// [`SendProgress`] of a TCP socket: Linux's `tcpi_bytes_acked` (`TCP_INFO`) and `SIOCOUTQ`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn send_progress(socket: &impl AsRawFd) -> Option<SendProgress> {
    let fd = socket.as_raw_fd();
    // SAFETY: both calls write at most the size they are given into memory we own, and the
    // length check below ensures the field read was filled in by the kernel.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        let filled = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
        if rc != 0 || (len as usize) < filled {
            return None;
        }
        let mut queued: libc::c_int = 0;
        if libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) != 0 {
            return None;
        }
        Some(SendProgress {
            acked: info.tcpi_bytes_acked,
            queued: queued.max(0) as u64,
        })
    }
}

/// [`SendProgress`] of a TCP socket: not available on this platform.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn send_progress(_socket: &impl AsRawFd) -> Option<SendProgress> {
    None
}

/// An IO whose writes fail once they wait past the [`ConnectionWatch`]'s deadline, unless the
/// client acknowledged bytes meanwhile.
#[derive(Debug)]
pub struct DeadlineIo<T> {
    io: T,
    watch: Arc<ConnectionWatch>,
    /// When the current write started waiting for the socket (or last saw progress).
    waiting_since: Option<Instant>,
    /// Bytes acknowledged by the client at `waiting_since`.
    acked_then: Option<u64>,
    /// Allocated on the first wait: most connections never wait.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> DeadlineIo<T> {
    /// Wraps `io`.
    pub fn new(io: T, watch: Arc<ConnectionWatch>) -> Self {
        DeadlineIo {
            io,
            watch,
            waiting_since: None,
            acked_then: None,
            timer: None,
        }
    }

    /// The wrapped IO (for an upgraded WebSocket, which keeps deadlines of its own).
    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: ReportsProgress> DeadlineIo<T> {
    /// Whether the client acknowledged bytes since the wait began (or since the last time
    /// this said yes).
    fn client_progressed(&mut self) -> bool {
        let acked = self.io.send_progress().map(|p| p.acked);
        let progressed = matches!((acked, self.acked_then), (Some(now), Some(then)) if now > then);
        self.acked_then = acked;
        progressed
    }

    /// Applies the deadlines to a write's outcome.
    fn check(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(result) = poll {
            self.waiting_since = None;
            if self.watch.past_end() {
                return Poll::Ready(Err(self.watch.cut()));
            }
            return Poll::Ready(result);
        }
        loop {
            let now = Instant::now();
            let since = match self.waiting_since {
                Some(since) => since,
                None => {
                    self.waiting_since = Some(now);
                    self.acked_then = self.io.send_progress().map(|p| p.acked);
                    now
                }
            };
            let (deadline, end) = self.watch.deadline(since, cx.waker());
            if now < deadline {
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                timer.as_mut().reset(deadline);
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                continue;
            }
            if !end && self.client_progressed() {
                // Slow, not stalled: a new deadline from now.
                self.waiting_since = Some(now);
                continue;
            }
            return Poll::Ready(Err(self.watch.cut()));
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + ReportsProgress + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A writer that never takes a byte.
    struct Stuck;

    impl ReportsProgress for Stuck {
        fn send_progress(&self) -> Option<SendProgress> {
            None
        }
    }

    impl ReportsProgress for Vec<u8> {
        fn send_progress(&self) -> Option<SendProgress> {
            None
        }
    }

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_timeout_fails() {
        let watch = ConnectionWatch::new(Duration::from_secs(10));
        let mut io = DeadlineIo::new(Stuck, watch.clone());
        let started = Instant::now();
        let error = io.write_all(b"x").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(watch.timed_out());
    }

    #[tokio::test(start_paused = true)]
    async fn ending_the_connection_cuts_a_waiting_write_at_the_new_deadline() {
        let watch = ConnectionWatch::new(Duration::from_secs(30));
        let mut io = DeadlineIo::new(Stuck, watch.clone());
        let started = Instant::now();
        let write = tokio::spawn(async move { io.write_all(b"x").await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        watch.end_within(Duration::from_secs(2));
        let error = write.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_progress_are_never_cut_until_the_end() {
        let watch = ConnectionWatch::new(Duration::from_millis(100));
        let mut io = DeadlineIo::new(Vec::new(), watch.clone());
        for _ in 0..10 {
            io.write_all(b"steady").await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        watch.end_within(Duration::from_millis(50));
        io.write_all(b"in time").await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(io.write_all(b"too late").await.is_err());
    }
}
