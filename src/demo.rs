//! The demo page and browser client library, embedded in the binary so that `cargo run`
//! serves them from any directory.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

use crate::transport::{full, Body};

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// URL path it is served at.
    pub path: &'static str,
    /// Its `content-type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

static ASSETS: &[Asset] = &[Asset {
    path: "/",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../demo/index.html"),
}];

/// The asset served at `path`, if any.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

impl Asset {
    /// A `200` with the file.
    pub fn response(&self) -> Response<Body> {
        let mut response = Response::new(full(self.body));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}
