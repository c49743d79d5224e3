//! Identity tokens against a real server: every refusal over HTTP and over the WebSocket
//! (`refresh`), the token's rooms, the session ending at `exp` on every transport, `refresh`
//! extending it, presence counting a user once, and `switchyard token`.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hyper::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{join, within, ws_close, ws_event, ws_send, TestServer};
use switchyard::auth::Verifier;
use switchyard::protocol::TransportKind;
use switchyard::Config;

const SECRET: &[u8] = b"a test secret of at least thirty-two bytes";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub`, valid for `ttl` seconds.
fn claims(sub: &str, ttl: i64) -> Value {
    json!({"sub": sub, "exp": now() as i64 + ttl})
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET).unwrap(),
        claims,
    )
}

/// A server that authenticates with `verifier`, presence told at once.
async fn server_with(verifier: Verifier) -> TestServer {
    TestServer::with_config(Config {
        auth: Some(Arc::new(verifier)),
        presence_interval: Duration::ZERO,
        ..Config::default()
    })
    .await
}

fn secret_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("secret");
    std::fs::write(&path, [SECRET, b"\n"].concat()).unwrap();
    path
}

async fn hs256_server(dir: &Path) -> TestServer {
    server_with(Verifier::hmac_secret_file(&secret_file(dir)).expect("the secret loads")).await
}

/// `POST /v1/sessions` with a bearer token (or none); the status and the reply.
async fn create(server: &TestServer, token: Option<&str>) -> (StatusCode, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let (status, _, body) = server
        .request(
            Method::POST,
            "/v1/sessions",
            &headers,
            r#"{"name":"ignored"}"#,
        )
        .await;
    (status, serde_json::from_slice(&body).expect("JSON"))
}

/// A token with a hand-written header and no signature check possible.
fn forged(header: Value, claims: &Value, signature: &str) -> String {
    let encode = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    format!("{}.{}.{signature}", encode(&header), encode(claims))
}

/// Every refused token and the code it gets.
fn refused_tokens() -> Vec<(&'static str, String, &'static str)> {
    let other_secret =
        EncodingKey::from_secret(b"another secret, also thirty-two bytes long").unwrap();
    vec![
        ("malformed", "not.a.token".to_owned(), "token_malformed"),
        ("garbage", "abc".to_owned(), "token_malformed"),
        (
            "bad signature",
            sign(Algorithm::HS256, &other_secret, &claims("ann", 600)),
            "token_bad_signature",
        ),
        (
            "alg none",
            forged(
                json!({"alg": "none", "typ": "JWT"}),
                &claims("ann", 600),
                "",
            ),
            "token_unsigned",
        ),
        (
            "another algorithm",
            sign(
                Algorithm::HS384,
                &EncodingKey::from_secret(SECRET).unwrap(),
                &claims("ann", 600),
            ),
            "token_wrong_algorithm",
        ),
        ("expired", hs256(&claims("ann", -120)), "token_expired"),
        (
            "expired within the clock leeway",
            hs256(&claims("ann", -2)),
            "token_expired",
        ),
        (
            "not yet valid",
            hs256(&json!({"sub": "ann", "exp": now() + 600, "nbf": now() + 300})),
            "token_not_yet_valid",
        ),
        (
            "no sub",
            hs256(&json!({"exp": now() + 600})),
            "token_malformed",
        ),
        ("no exp", hs256(&json!({"sub": "ann"})), "token_malformed"),
        (
            "a name breaking the rules",
            hs256(&json!({"sub": "ann", "name": "x".repeat(40), "exp": now() + 600})),
            "invalid_name",
        ),
    ]
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_own_code_over_http_and_on_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let server = hs256_server(dir.path()).await;
    let (status, reply) = create(&server, None).await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (StatusCode::UNAUTHORIZED, &json!("token_missing"))
    );
    let (_, headers, _) = server
        .request(Method::POST, "/v1/sessions", &[], "{}")
        .await;
    assert_eq!(
        headers["www-authenticate"], "Bearer",
        "a 401 names its scheme"
    );
    // An audience claim (most issuers set one) is not ours to check; the scheme name is
    // case-insensitive; the token may come in the body instead.
    let with_aud = hs256(&json!({"sub": "ann", "aud": "some-api", "exp": now() + 600}));
    let (_, _, body) = server
        .request(
            Method::POST,
            "/v1/sessions",
            &[("authorization", &format!("bearer {with_aud}"))],
            "{}",
        )
        .await;
    let created: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(created["user"], "ann", "{created}");
    let (status, created) = server
        .json(
            Method::POST,
            "/v1/sessions",
            Some(json!({"token": hs256(&claims("ann", 600))})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    for (case, token, code) in refused_tokens() {
        let (status, reply) = create(&server, Some(&token)).await;
        let expected = if code == "invalid_name" {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(status, expected, "{case}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{case}: {reply}");
    }

    // The same tokens, offered to refresh a live session over its WebSocket.
    let (status, created) = create(&server, Some(&hs256(&claims("ann", 600)))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        (&created["user"], &created["name"]),
        (&json!("ann"), &json!("ann"))
    );
    let session = created["session"].as_str().unwrap();
    let mut ws = server.websocket(session, 0).await;
    let mut cases = refused_tokens();
    cases.push(("another user", hs256(&claims("bob", 600)), "forbidden"));
    for (case, token, code) in cases {
        ws_send(&mut ws, json!({"type": "refresh", "token": token})).await;
        let event = ws_event(&mut ws).await;
        assert_eq!(
            (&event["type"], &event["code"]),
            (&json!("error"), &json!(code)),
            "{case}: {event}"
        );
    }
    // Refused over HTTP, a refresh answers like any 401.
    let (status, headers, _) = server
        .request(
            Method::POST,
            &format!("/v1/sessions/{session}/commands"),
            &[],
            json!({"type": "refresh", "token": "abc"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    // A good refresh is silent over the WebSocket and ok over HTTP.
    let reply = server
        .ok(
            session,
            json!({"type": "refresh", "token": hs256(&claims("ann", 900))}),
        )
        .await;
    assert_eq!(reply["results"][0]["ok"], true);
}

#[tokio::test]
async fn a_public_key_server_takes_its_algorithm_only() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("public.pem");
    std::fs::write(&public, pair.public_key_pem()).unwrap();
    let verifier = Verifier::public_key_file(&public).expect("the public key loads");
    assert_eq!(verifier.algorithm(), Algorithm::ES256);
    let server = server_with(verifier).await;
    let private = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let (status, reply) = create(
        &server,
        Some(&sign(Algorithm::ES256, &private, &claims("eve", 600))),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    // The classic confusion: HS256 "signed" with the public key as the secret.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(pair.public_key_pem().as_bytes()).unwrap(),
        &claims("eve", 600),
    );
    let (status, reply) = create(&server, Some(&confused)).await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (StatusCode::UNAUTHORIZED, &json!("token_wrong_algorithm"))
    );
    // A key file that is no key stops the server at start, naming the file.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a key").unwrap();
    let error = Verifier::public_key_file(&bad).unwrap_err();
    assert!(error.contains(&bad.display().to_string()), "{error}");
    let stderr = support::failing_start(&["--auth-public-key", bad.to_str().unwrap()]).await;
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad.pem"), "{stderr}");
}

#[tokio::test]
async fn a_token_limits_the_rooms_its_user_may_join() {
    let dir = tempfile::tempdir().unwrap();
    let server = hs256_server(dir.path()).await;
    let token = hs256(&json!({"sub": "sam", "exp": now() + 600, "rooms": ["lobby", "support.*"]}));
    let (_, created) = create(&server, Some(&token)).await;
    let session = created["session"].as_str().unwrap();
    server
        .ok(session, json!([join("lobby"), join("support.eu")]))
        .await;
    let (status, reply) = server.commands(session, join("random")).await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("forbidden"))
    );
}

#[tokio::test]
async fn at_exp_the_session_ends_token_expired_on_every_transport_unless_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let server = hs256_server(dir.path()).await;
    let short = |sub: &str| hs256(&claims(sub, 2));
    // One session per transport, and one that is refreshed in time.
    let mut ids = Vec::new();
    for kind in TransportKind::ALL {
        let (_, created) = create(&server, Some(&short(kind.as_str()))).await;
        ids.push((kind, created["session"].as_str().unwrap().to_owned()));
    }
    let (_, kept) = create(&server, Some(&short("kept"))).await;
    let kept = kept["session"].as_str().unwrap().to_owned();
    server
        .ok(
            &kept,
            json!({"type": "refresh", "token": hs256(&claims("kept", 600))}),
        )
        .await;

    let mut ws = server.websocket(&ids[0].1, 0).await;
    let mut sse = server.sse(&ids[1].1, "?after=0", &[]).await;
    assert_eq!(
        ws_close(&mut ws).await,
        (4005, "token_expired".to_owned()),
        "the WebSocket closes 4005"
    );
    let close = sse.next_event().await;
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.data, r#"{"reason":"token_expired"}"#);
    // The polled sessions are gone too.
    for (kind, id) in &ids[2..] {
        let (status, reply) = server.poll(id, 0, 0).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{kind}: {reply}");
        assert_eq!(reply["error"]["code"], "unknown_session");
    }
    // A long poll held at exp is answered closed token_expired.
    let (_, created) = create(&server, Some(&short("poller"))).await;
    let poller = created["session"].as_str().unwrap();
    let (status, reply) = within("the held poll", server.poll(poller, 0, 8000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["closed"], "token_expired", "{reply}");
    let (status, _) = server
        .json(Method::GET, &format!("/v1/sessions/{kept}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "the refreshed session lives on");
}

#[tokio::test]
async fn presence_counts_a_user_with_two_sessions_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = hs256_server(dir.path()).await;
    let (_, watcher) = create(&server, Some(&hs256(&claims("watcher", 600)))).await;
    let watcher = watcher["session"].as_str().unwrap();
    let mut events = server.attach(TransportKind::LongPolling, watcher, 0).await;
    server.ok(watcher, join("room")).await;
    let mut tabs = Vec::new();
    // Two tabs of one user, whose tokens happen to carry different names: presence names
    // the user once, as the first tab announced them.
    for name in ["Una", "Una B."] {
        let (_, tab) = create(
            &server,
            Some(&hs256(
                &json!({"sub": "u1", "name": name, "exp": now() + 600}),
            )),
        )
        .await;
        let tab = tab["session"].as_str().unwrap().to_owned();
        server.ok(&tab, join("room")).await;
        tabs.push(tab);
    }
    let leave = json!({"type": "leave", "room": "room"});
    server.ok(&tabs[0], leave.clone()).await;
    server.ok(&tabs[1], leave).await;
    // The watcher's own join, Una's first tab joining, Una's last tab leaving: nothing for
    // the second tab's join or the first tab's leave.
    let mut diffs = Vec::new();
    while diffs.len() < 3 {
        let event = events.next_of("presence_diff").await;
        diffs.push((
            event["joined"].clone(),
            event["left"].clone(),
            event["count"].clone(),
        ));
    }
    assert_eq!(
        diffs,
        [
            (json!(["watcher"]), json!([]), json!(1)),
            (json!(["Una"]), json!([]), json!(2)),
            (json!([]), json!(["Una"]), json!(1)),
        ]
    );
}

#[tokio::test]
async fn switchyard_token_mints_a_token_the_server_takes() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path());
    let output = within(
        "switchyard token",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["token", "--hmac-secret-file", secret.to_str().unwrap()])
            .args([
                "--sub",
                "alice",
                "--name",
                "Alice",
                "--rooms",
                "lobby,support.*",
                "--ttl",
                "10m",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let server = hs256_server(dir.path()).await;
    let (status, created) = create(&server, Some(&token)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        (&created["user"], &created["name"]),
        (&json!("alice"), &json!("Alice"))
    );
    let expires = created["expires_at_ms"].as_u64().unwrap() / 1000;
    assert!((now() + 590..=now() + 600).contains(&expires), "{created}");
    let session = created["session"].as_str().unwrap();
    let (status, _) = server.commands(session, join("elsewhere")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
