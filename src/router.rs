//! Matches `(method, path)` to a handler: the one file that knows every endpoint.
//!
//! It also applies the checks every endpoint shares: the origin check (same-origin and
//! non-browser clients are allowed; cross-origin only from `--allowed-origins`), CORS
//! preflight, disabled transports and the `405` for a known path with the wrong method.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ALLOW, AUTHORIZATION, CONTENT_TYPE, HOST,
    ORIGIN, VARY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::connection::ConnectionWatch;
use crate::demo;
use crate::metrics::{Http, NO_TRANSPORT};
use crate::protocol::{ErrorBody, ErrorCode, TransportKind};
use crate::proxy::Client;
use crate::server::{App, Peer};
use crate::transport::{
    commands, error_response, full, json_response, long_poll, query_param, resume_point,
    short_poll, sse, wait_param, websocket, Body,
};

/// The endpoints, each with the methods it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint<'a> {
    Asset(&'static demo::Asset),
    Health,
    Ready,
    Metrics,
    OpenApi,
    Sessions,
    Session(&'a str),
    WebSocket(&'a str),
    Sse(&'a str),
    Poll(&'a str),
    Commands(&'a str),
}

impl<'a> Endpoint<'a> {
    fn resolve(path: &'a str) -> Option<Self> {
        if let Some(asset) = demo::asset(path) {
            return Some(Endpoint::Asset(asset));
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match segments.as_slice() {
            ["healthz"] => Endpoint::Health,
            ["readyz"] => Endpoint::Ready,
            ["metrics"] => Endpoint::Metrics,
            ["openapi.yaml"] => Endpoint::OpenApi,
            ["v1", "sessions"] => Endpoint::Sessions,
            ["v1", "sessions", id] if !id.is_empty() => Endpoint::Session(id),
            ["v1", "sessions", id, "ws"] => Endpoint::WebSocket(id),
            ["v1", "sessions", id, "sse"] => Endpoint::Sse(id),
            ["v1", "sessions", id, "poll"] => Endpoint::Poll(id),
            ["v1", "sessions", id, "commands"] => Endpoint::Commands(id),
            _ => return None,
        })
    }

    fn allowed(self) -> &'static [Method] {
        match self {
            Endpoint::Asset(_)
            | Endpoint::Health
            | Endpoint::Ready
            | Endpoint::Metrics
            | Endpoint::OpenApi
            | Endpoint::Sse(_)
            | Endpoint::Poll(_) => &[Method::GET],
            // CONNECT: a WebSocket over HTTP/2 (RFC 8441).
            Endpoint::WebSocket(_) => &[Method::GET, Method::CONNECT],
            Endpoint::Sessions | Endpoint::Commands(_) => &[Method::POST],
            Endpoint::Session(_) => &[Method::GET, Method::DELETE],
        }
    }

    /// The path as docs/openapi.yaml names it (`None` for the demo's pages, which are not
    /// part of the API).
    fn template(self) -> Option<&'static str> {
        Some(match self {
            Endpoint::Asset(_) => return None,
            Endpoint::Health => "/healthz",
            Endpoint::Ready => "/readyz",
            Endpoint::Metrics => "/metrics",
            Endpoint::OpenApi => "/openapi.yaml",
            Endpoint::Sessions => "/v1/sessions",
            Endpoint::Session(_) => "/v1/sessions/{id}",
            Endpoint::WebSocket(_) => "/v1/sessions/{id}/ws",
            Endpoint::Sse(_) => "/v1/sessions/{id}/sse",
            Endpoint::Poll(_) => "/v1/sessions/{id}/poll",
            Endpoint::Commands(_) => "/v1/sessions/{id}/commands",
        })
    }
}

/// The HTTP API's OpenAPI document, served at `GET /openapi.yaml`.
pub const OPENAPI: &str = include_str!("../docs/openapi.yaml");

/// Every API route the router answers, as `(method, path template)`, from probing
/// [`Endpoint::resolve`] with one path per endpoint: what docs/openapi.yaml must list.
pub fn api_routes() -> Vec<(String, &'static str)> {
    let probes = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.yaml",
        "/v1/sessions",
        "/v1/sessions/x",
        "/v1/sessions/x/ws",
        "/v1/sessions/x/sse",
        "/v1/sessions/x/poll",
        "/v1/sessions/x/commands",
    ];
    let mut routes = Vec::new();
    for probe in probes {
        let endpoint = Endpoint::resolve(probe).expect("every probe is an endpoint");
        let template = endpoint.template().expect("an API endpoint");
        // OpenAPI cannot describe CONNECT; the WebSocket's entry says it.
        for method in endpoint.allowed().iter().filter(|m| **m != Method::CONNECT) {
            routes.push((method.as_str().to_ascii_lowercase(), template));
        }
    }
    routes
}

/// Answers one request.
pub async fn route(request: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let transport = transport_label(&request);
    let fail = |error: ErrorBody| {
        app.hub.metrics().error(transport, error.code);
        error_response(error)
    };
    let client = request
        .extensions()
        .get::<Peer>()
        .map(|Peer(peer)| app.config.trusted_proxies.client(*peer, request.headers()));
    let checked = {
        // The host a trusted proxy forwards, else the `Host` header, else (HTTP/2) the
        // request's authority.
        let host = client.as_ref().and_then(|c| c.host.as_deref()).or_else(|| {
            match request.headers().get(HOST) {
                Some(value) => Some(value.to_str().unwrap_or("")),
                None => request.uri().authority().map(|a| a.as_str()),
            }
        });
        let scheme = client.as_ref().and_then(|c| c.proto.as_deref());
        check_host(host, &app.config)
            .and_then(|()| check_origin(request.headers().get(ORIGIN), host, scheme, &app.config))
    };
    let mut request = request;
    if let Some(client) = client {
        request.extensions_mut().insert(client);
    }
    let mut response = match checked {
        Ok(cors) => {
            // An allowed origin gets the CORS headers on every answer, errors included, so a
            // page sees `unknown_session` rather than an opaque network error.
            let mut response = dispatch(request, &app).await.unwrap_or_else(fail);
            if let Some(origin) = cors {
                let headers = response.headers_mut();
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                headers.append(VARY, HeaderValue::from_static("origin"));
            }
            response
        }
        Err(error) => fail(error),
    };
    response
        .headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// A header's value as text (a value that is not visible ASCII reads as empty).
fn header_text(request: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<String> {
    request
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or("").to_owned())
}

/// Refuses a `Host` the server does not answer to, against DNS rebinding: a page on a name
/// that resolves to this server would otherwise pass as same-origin. IP literals and
/// `localhost` are always answered (a rebinding needs a name); other names only if listed in
/// `--allowed-hosts`, with or without a port. Behind a trusted proxy the host checked is the
/// one it forwards.
pub fn check_host(host: Option<&str>, config: &Config) -> Result<(), ErrorBody> {
    let Some(host) = host else {
        return Ok(());
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let literal = name.parse::<std::net::IpAddr>().is_ok();
    let listed = config
        .allowed_hosts
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(host) || allowed.eq_ignore_ascii_case(name));
    if literal || name.eq_ignore_ascii_case("localhost") || listed {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::ForbiddenHost,
            format!("this server does not answer to host {host:?} (see --allowed-hosts)"),
        ))
    }
}

/// The transport a request is for, to label its errors in the metrics.
fn transport_label(request: &Request<Incoming>) -> &'static str {
    let path = request.uri().path();
    let kind = if path.ends_with("/ws") {
        TransportKind::WebSocket
    } else if path.ends_with("/sse") {
        TransportKind::Sse
    } else if path.ends_with("/poll") {
        match query_param(request.uri().query(), "wait") {
            Some("0") => TransportKind::ShortPolling,
            _ => TransportKind::LongPolling,
        }
    } else {
        return NO_TRANSPORT;
    };
    kind.as_str()
}

async fn dispatch(request: Request<Incoming>, app: &App) -> Result<Response<Body>, ErrorBody> {
    let path = request.uri().path().to_owned();
    let Some(endpoint) = Endpoint::resolve(&path) else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no endpoint at {path}"),
        ));
    };
    let allowed = endpoint.allowed();
    if request.method() == Method::OPTIONS {
        return Ok(preflight(allowed));
    }
    if !allowed.contains(request.method()) {
        let mut response = error_response(ErrorBody::new(
            ErrorCode::MethodNotAllowed,
            format!("{} does not answer {}", path, request.method()),
        ));
        response.headers_mut().insert(ALLOW, allow_header(allowed));
        return Ok(response);
    }
    let hub = &app.hub;
    let config = &app.config;
    let query = request.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let after = || resume_point(None, query_param(query, "after"));
    let http = Http::of(request.version());
    match endpoint {
        Endpoint::Asset(asset) => Ok(asset.response(config.demo_dir.as_deref())),
        Endpoint::Health => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"ok": true}),
        )),
        Endpoint::Ready => Ok(match hub.readiness().await {
            Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"ok": true})),
            Err(error) => error_response(error),
        }),
        Endpoint::OpenApi => {
            let mut response = Response::new(full(OPENAPI));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
            Ok(response)
        }
        Endpoint::Metrics => {
            let mut response = Response::new(full(hub.metrics().encode()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(response)
        }
        // The branches that await are boxed: this future is as large as its largest branch,
        // and a held long poll keeps it alive (~11 KiB per idle long poll unboxed).
        Endpoint::Sessions => Box::pin(create_session(request, app)).await,
        Endpoint::Session(id) if request.method() == Method::GET => Ok(json_response(
            StatusCode::OK,
            &hub.describe_session(id).await?,
        )),
        Endpoint::Session(id) => {
            hub.close_session(id).await?;
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"ended": true}),
            ))
        }
        Endpoint::WebSocket(id) => {
            enabled(config, TransportKind::WebSocket)?;
            Box::pin(websocket::upgrade(app, id, after()?, request)).await
        }
        Endpoint::Sse(id) => {
            enabled(config, TransportKind::Sse)?;
            let last_event_id = request
                .headers()
                .get("last-event-id")
                .map(|v| v.to_str().unwrap_or("invalid"));
            let after = resume_point(last_event_id, query_param(query, "after"))?;
            let attachment = hub.attach_transport(id, TransportKind::Sse, after).await?;
            hub.metrics().attached_over(TransportKind::Sse, http);
            let watch = request.extensions().get::<Arc<ConnectionWatch>>().cloned();
            Ok(sse::stream(
                attachment,
                config.heartbeat,
                config.close_timeout,
                watch,
                http,
            ))
        }
        Endpoint::Poll(id) => {
            let wait = wait_param(query_param(query, "wait"), config.long_poll)?;
            if wait.is_zero() {
                enabled(config, TransportKind::ShortPolling)?;
                Box::pin(short_poll::poll(hub, id, after()?, http)).await
            } else {
                enabled(config, TransportKind::LongPolling)?;
                let after = after()?;
                // Not kept for the length of the poll.
                drop(request);
                Box::pin(long_poll::poll(
                    hub,
                    id,
                    after,
                    wait.min(config.max_long_poll),
                    http,
                ))
                .await
            }
        }
        Endpoint::Commands(id) => Box::pin(commands::post(hub, config, id, request)).await,
    }
}

fn enabled(config: &Config, kind: TransportKind) -> Result<(), ErrorBody> {
    if config.enabled(kind) {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::TransportDisabled,
            format!("the {kind} transport is disabled on this server"),
        ))
    }
}

#[derive(Deserialize)]
struct CreateSession {
    /// The user name; with authentication on, the token's name is used instead.
    #[serde(default)]
    name: Option<String>,
    /// The identity token, when not in an `Authorization: Bearer` header.
    #[serde(default)]
    token: Option<String>,
}

/// The `201` reply to `POST /v1/sessions`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionCreated {
    /// Session id.
    pub session: String,
    /// The user name.
    pub name: String,
    /// The authenticated user (the token's `sub`), when authentication is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// When the session ends unless refreshed (the token's `exp`, ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Enabled transports, in preferred order.
    pub transports: Vec<String>,
    /// WebSocket ping and visible heartbeat interval (WebSocket frames, SSE events).
    pub heartbeat_ms: u64,
    /// Default long-poll wait.
    pub long_poll_ms: u64,
    /// Suggested short-poll interval.
    pub short_poll_ms: u64,
    /// How long presence and typing changes may be held to coalesce them.
    pub presence_interval_ms: u64,
    /// Events kept for resume.
    pub replay_window: usize,
    /// Largest command frame or body.
    pub max_message_bytes: usize,
    /// Sustained commands per second per session.
    pub rate_limit_per_sec: f64,
    /// Commands a session may send at once.
    pub rate_limit_burst: f64,
}

async fn create_session(
    request: Request<Incoming>,
    app: &App,
) -> Result<Response<Body>, ErrorBody> {
    let config = &app.config;
    let client = request.extensions().get::<Client>().map(|c| c.addr);
    if let Some(client) = client {
        if let Err(wait) = app.session_limiter.admit(client) {
            return Err(ErrorBody::new(
                ErrorCode::RateLimited,
                format!("too many sessions created from {client}; retry later"),
            )
            .retry_after(wait));
        }
    }
    // The scheme name is case-insensitive (RFC 9110).
    let bearer = header_text(&request, AUTHORIZATION).and_then(|value| {
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned())
    });
    let body = commands::read_body(request, config.max_message_bytes, config.body_timeout).await?;
    // An object: serde would also read the struct from an array (`["bob"]`).
    let create: CreateSession = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .filter(serde_json::Value::is_object)
        .ok_or_else(|| "the body is not a JSON object".to_owned())
        .and_then(|value| serde_json::from_value(value).map_err(|e| e.to_string()))
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::BadRequest,
                format!("expected {{\"name\": string}} (or {{\"token\": string}}): {e}"),
            )
        })?;
    let (session, expires_at) = match &config.auth {
        Some(verifier) => {
            let token = bearer.or(create.token).ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::TokenMissing,
                    "this server needs an identity token: an Authorization: Bearer header or a \"token\" field",
                )
            })?;
            let identity = verifier.verify(&token)?;
            let expires_at = identity.expires_at;
            let name = identity.name.clone();
            (
                app.hub.open_session(&name, Some(identity)).await?,
                Some(expires_at),
            )
        }
        None => {
            let name = create.name.ok_or_else(|| {
                ErrorBody::new(ErrorCode::BadRequest, "expected {\"name\": string}")
            })?;
            (app.hub.open_session(&name, None).await?, None)
        }
    };
    if let Some(client) = client {
        tracing::debug!(session = %session.id, %client, "session created");
    }
    Ok(json_response(
        StatusCode::CREATED,
        &SessionCreated {
            session: session.id.clone(),
            name: session.name.to_string(),
            user: session.user.as_deref().map(str::to_owned),
            expires_at_ms: expires_at.and_then(|at| {
                at.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64)
            }),
            transports: config
                .transports
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
            heartbeat_ms: config.heartbeat.as_millis() as u64,
            long_poll_ms: config.long_poll.as_millis() as u64,
            short_poll_ms: config.short_poll.as_millis() as u64,
            presence_interval_ms: config.presence_interval.as_millis() as u64,
            replay_window: config.replay_window,
            max_message_bytes: config.max_message_bytes,
            rate_limit_per_sec: config.rate_limit_per_sec,
            rate_limit_burst: config.rate_limit_burst,
        },
    ))
}

/// Decides whether a request's origin may use the API: same-origin when it is `http://` or
/// `https://` followed by `host` (the `Host`, or the host a trusted proxy forwards), with the
/// scheme a trusted proxy forwards, if any. Returns the origin to echo in CORS headers for an
/// allowed cross-origin request.
pub fn check_origin(
    origin: Option<&HeaderValue>,
    host: Option<&str>,
    scheme: Option<&str>,
    config: &Config,
) -> Result<Option<HeaderValue>, ErrorBody> {
    let Some(origin) = origin else {
        return Ok(None);
    };
    let origin_str = origin.to_str().unwrap_or("");
    let same_origin = host.is_some_and(|host| {
        origin_str.split_once("://").is_some_and(|(used, rest)| {
            let scheme_ok = match scheme {
                Some(forwarded) => used == forwarded,
                None => matches!(used, "http" | "https"),
            };
            scheme_ok && rest == host
        })
    });
    if same_origin {
        return Ok(None);
    }
    if config
        .allowed_origins
        .iter()
        .any(|allowed| allowed == "*" || allowed == origin_str)
    {
        return Ok(Some(origin.clone()));
    }
    Err(ErrorBody::new(
        ErrorCode::ForbiddenOrigin,
        format!("origin {origin_str:?} is not allowed (see --allowed-origins)"),
    ))
}

/// `GET, DELETE`: the methods an endpoint answers, for `Allow` and CORS preflight.
fn allow_header(allowed: &[Method]) -> HeaderValue {
    let methods: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    HeaderValue::from_str(&methods.join(", ")).expect("method names are valid headers")
}

fn preflight(allowed: &[Method]) -> Response<Body> {
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(ACCESS_CONTROL_ALLOW_METHODS, allow_header(allowed));
    headers.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, last-event-id, authorization"),
    );
    headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
