//! The demo page and browser client library, embedded in the binary so that `cargo run`
//! serves them from any directory.

use std::path::Path;

use hyper::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_FRAME_OPTIONS,
};

/// The content security policy of the demo pages.
pub const PAGE_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";
use hyper::Response;

use crate::transport::{full, Body};

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// URL path it is served at.
    pub path: &'static str,
    /// File name under `demo/`.
    pub file: &'static str,
    /// Its `content-type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $type:literal) => {
        Asset {
            path: $path,
            file: $file,
            content_type: $type,
            body: include_bytes!(concat!("../demo/", $file)),
        }
    };
}

static ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/compare", "compare.html", "text/html; charset=utf-8"),
    asset!(
        "/switchyard.js",
        "switchyard.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("/chat.js", "chat.js", "text/javascript; charset=utf-8"),
    asset!(
        "/compare.js",
        "compare.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("/style.css", "style.css", "text/css; charset=utf-8"),
];

/// The asset served at `path`, if any.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

impl Asset {
    /// A `200` with the file: the embedded copy, or with `demo_dir` (`--demo-dir`, for
    /// editing the page without rebuilding) the file on disk.
    pub fn response(&self, demo_dir: Option<&Path>) -> Response<Body> {
        let body = match demo_dir.map(|dir| std::fs::read(dir.join(self.file))) {
            Some(Ok(bytes)) => full(bytes),
            Some(Err(e)) => {
                tracing::warn!(file = self.file, error = %e, "cannot read from --demo-dir; serving the embedded copy");
                full(self.body)
            }
            None => full(self.body),
        };
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if self.content_type.starts_with("text/html") {
            // The pages load only their own scripts and styles, talk only to this server and
            // may not be framed.
            headers.insert(
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(PAGE_POLICY),
            );
            headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        }
        response
    }
}
