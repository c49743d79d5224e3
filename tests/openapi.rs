//! docs/openapi.yaml against the router: every route the router answers is in the document
//! and every route of the document is answered; the server serves the document.

mod support;

use std::collections::BTreeSet;

use hyper::{Method, StatusCode};
use support::TestServer;

/// `(method, path)` of every operation under `paths:` (paths indented 2, methods 4).
fn documented_routes(yaml: &str) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let Some(method) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            let methods = ["get", "post", "put", "delete", "patch", "options", "head"];
            if let (Some(path), true) = (&path, methods.contains(&method)) {
                routes.insert((method.to_owned(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn every_route_the_router_answers_is_documented_and_no_other() {
    let documented = documented_routes(switchyard::router::OPENAPI);
    let answered: BTreeSet<(String, String)> = switchyard::router::api_routes()
        .into_iter()
        .map(|(method, path)| (method, path.to_owned()))
        .collect();
    assert!(!answered.is_empty());
    assert_eq!(documented, answered, "docs/openapi.yaml vs the router");
}

#[tokio::test]
async fn the_server_serves_its_openapi_document() {
    let server = TestServer::start().await;
    let (status, headers, body) = server
        .request(Method::GET, "/openapi.yaml", &[], bytes::Bytes::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/yaml");
    assert_eq!(body, switchyard::router::OPENAPI.as_bytes());
    assert!(switchyard::router::OPENAPI.starts_with("openapi: 3.1"));
}
