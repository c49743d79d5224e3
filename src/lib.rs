//! switchyard: one chat event stream (rooms, messages, presence, typing, history) over
//! WebSocket, Server-Sent Events, long polling and short polling, behind one session core.
//!
//! A client creates a session, attaches any transport to it, and may drop that transport and
//! resume on any other with `after=<last seq>`: every event has a per-session seq and the
//! session keeps a replay buffer, so nothing is lost or repeated.
//!
//! # Layout
//!
//! - [`protocol`]: the wire contract: commands, events, transport names, error codes.
//! - [`hub`]: the session core (sessions, replay buffers, rooms); knows nothing of HTTP. It
//!   owns the [`HistoryStore`](hub::HistoryStore) seam.
//! - [`store`]: the history backends behind that seam (the embedded SQLite store).
//! - [`transport`]: one module per transport adapting a session to HTTP, plus `/commands`.
//! - [`router`]: `(method, path)` to handler; origin checks and CORS.
//! - [`server`]: accept loop, connection cap, HTTP/1.1 and HTTP/2, graceful shutdown.
//! - [`tls`]: certificates from PEM files, ALPN, reload on SIGHUP.
//! - [`connection`]: one connection's write deadlines.
//! - [`admission`]: the per-address rate limit on session creation.
//! - [`auth`]: identity tokens (JWT) verified for session creation and `refresh`.
//! - [`proxy`]: `--trusted-proxies` and the client address, host and scheme they forward.
//! - [`config`]: every limit with its default; [`error`]: error code to HTTP status.
//! - [`checks`]: what must hold for any client input; run by the fuzz targets and the corpus
//!   replay test.
//! - [`metrics`]: counters and latency histograms per transport, served on `GET /metrics`.
//! - [`demo`]: the embedded demo page and browser client.
//! - [`bench`](mod@bench): `switchyard bench`, the load generator comparing the transports; it talks to
//!   a server over HTTP like any client.

#![deny(missing_docs)]

pub mod admission;
pub mod auth;
pub mod bench;
pub mod checks;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod demo;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod router;
pub mod server;
pub mod store;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use server::run;
