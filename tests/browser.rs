//! The demo page and its client library in real headless Chromium, driven through
//! chromium-driver (WebDriver), against a real server on 127.0.0.1 port 0.
//!
//! Needs Debian's `chromium` and `chromium-driver`; `scripts/test` installs them. Without them
//! these tests fail with a message naming the missing package: they are never skipped.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use support::{join, send, TestServer};
use switchyard::protocol::{CloseReason, TransportKind};
use switchyard::Config;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Browser waits are longer than the other tests': starting Chromium on a loaded 2-core
/// machine can take many seconds.
const BROWSER_WAIT: Duration = Duration::from_secs(30);
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process on a free loopback port. It leads its own process group, and the
/// whole group (chromedriver and every Chromium it started) is killed on drop, so a failing
/// test leaves no browser behind.
struct Driver {
    url: String,
    child: tokio::process::Child,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// Whether chromedriver itself answers on `port`: its `/status` says `ready`. A bare connect
/// could reach another process that took the port before chromedriver (which then exits).
async fn chromedriver_answers(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    // Read until the answer says so: chromedriver may keep the connection open.
    let asked = async {
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            reply.extend_from_slice(&chunk[..n]);
            if n == 0 || String::from_utf8_lossy(&reply).contains("\"ready\":true") {
                return Ok::<_, std::io::Error>(n > 0);
            }
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), asked).await,
        Ok(Ok(true))
    )
}

impl Driver {
    async fn start() -> Driver {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "the browser tests need Debian's `{package}` package ({path} is missing): \
                 run scripts/test, which installs it, or apt-get install chromium chromium-driver"
            );
        }
        // The port is picked free and then handed over, so another process may take it in
        // between: chromedriver then exits at once, and we try again on another port.
        let mut said = String::new();
        for _ in 0..5 {
            // Its output goes to a file, read back if it exits.
            let mut log = tempfile::tempfile().expect("a temporary file");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = tokio::process::Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(log.try_clone().expect("the log file"))
                .stderr(log.try_clone().expect("the log file"))
                .kill_on_drop(true)
                .process_group(0)
                .spawn()
                .expect("start chromedriver");
            let listening = browser_within(
                "chromedriver to listen",
                support::until_ready(&mut child, || chromedriver_answers(port)),
            )
            .await;
            if listening {
                return Driver {
                    url: format!("http://127.0.0.1:{port}"),
                    child,
                };
            }
            // It exited: keep what it said, for the failure message.
            use std::io::{Read, Seek};
            said.clear();
            let _ = log.rewind().and_then(|()| log.read_to_string(&mut said));
        }
        panic!("chromedriver exited at start five times in a row; the last time it said: {said}");
    }

    /// A new headless browser session.
    async fn browser(&self) -> Client {
        self.browser_with(false).await
    }

    /// A new headless browser session that accepts the test's self-signed certificates.
    async fn https_browser(&self) -> Client {
        self.browser_with(true).await
    }

    async fn browser_with(&self, accept_insecure_certs: bool) -> Client {
        let capabilities = json!({
            "acceptInsecureCerts": accept_insecure_certs,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,860",
                ],
            }
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        // Starting Chromium on a loaded machine occasionally fails once; a second try is
        // a new browser, not a retried assertion.
        let mut last_error = None;
        for _ in 0..3 {
            let connected = browser_within(
                "a Chromium session",
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities.clone())
                    .connect(&self.url),
            )
            .await;
            match connected {
                Ok(client) => return client,
                Err(e) => last_error = Some(e),
            }
        }
        panic!("cannot start a Chromium session through chromedriver: {last_error:?}")
    }
}

/// Awaits `future`, failing the test with `what` after [`BROWSER_WAIT`].
async fn browser_within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BROWSER_WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timeout after {BROWSER_WAIT:?}: {what}"))
}

/// Evaluates a JS expression in the page.
async fn eval(browser: &Client, expression: &str) -> Value {
    browser_within(
        &format!("evaluating {expression}"),
        browser.execute(&format!("return ({expression});"), vec![]),
    )
    .await
    .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"))
}

/// Loads a page.
async fn goto(browser: &Client, url: &str) {
    browser_within(&format!("loading {url}"), browser.goto(url))
        .await
        .unwrap_or_else(|e| panic!("loading {url}: {e}"));
}

/// Clicks the element matching a CSS selector.
async fn click(browser: &Client, css: &str) {
    browser_within(&format!("clicking {css}"), async {
        browser.find(Locator::Css(css)).await?.click().await
    })
    .await
    .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// Ends the browser session.
async fn close(browser: Client) {
    browser_within("closing the browser", browser.close())
        .await
        .expect("close the browser");
}

/// Polls a JS expression until it is truthy; fails with `what` after the test timeout.
async fn wait_until(browser: &Client, what: &str, expression: &str) {
    let waited = tokio::time::timeout(BROWSER_WAIT, async {
        loop {
            let value = eval(browser, expression).await;
            if !matches!(value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if waited.is_err() {
        let transport = eval(browser, &testid_text("transport")).await;
        let fallbacks = eval(browser, &testid_text("fallbacks")).await;
        panic!(
            "timeout after {BROWSER_WAIT:?}: {what} (transport {transport}, fallbacks {fallbacks})"
        );
    }
}

/// JS for the text of the element with this `data-testid`.
fn testid_text(testid: &str) -> String {
    format!("((document.querySelector('[data-testid=\"{testid}\"]') || {{}}).textContent || '')")
}

async fn type_and_send(browser: &Client, text: &str) {
    browser_within("typing in the composer", async {
        browser
            .find(Locator::Css("[data-testid=composer]"))
            .await?
            .send_keys(text)
            .await
    })
    .await
    .expect("type in the composer");
    click(browser, "[data-testid=send]").await;
}

async fn screenshot(browser: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let png = browser_within("a screenshot", browser.screenshot())
        .await
        .expect("screenshot");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

async fn wait_for_transport(browser: &Client, kind: &str) {
    wait_until(
        browser,
        &format!("the page to connect over {kind}"),
        &format!("{} === '{kind}'", testid_text("transport")),
    )
    .await;
}

async fn wait_for_message(browser: &Client, text: &str) {
    wait_until(
        browser,
        &format!("{text:?} in the message list"),
        &format!("{}.includes({})", testid_text("messages"), json!(text)),
    )
    .await;
}

#[tokio::test]
async fn auto_mode_connects_over_websocket_and_shows_a_sent_message() {
    let server = TestServer::start().await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let base = format!("http://{}", server.addr);
    goto(&browser, &format!("{base}/?name=alice&room=auto")).await;
    wait_for_transport(&browser, "websocket").await;
    type_and_send(&browser, "hello from chromium").await;
    wait_for_message(&browser, "hello from chromium").await;
    assert_eq!(
        eval(&browser, &format!("{}.trim()", testid_text("composer"))).await,
        json!("")
    );

    // A second person and some history make the screenshot worth looking at.
    let bob = server.session("bob").await;
    server.ok(&bob, join("auto")).await;
    server
        .ok(
            &bob,
            send("auto", "hi alice, this is bob on the HTTP API", "b1"),
        )
        .await;
    wait_for_message(&browser, "this is bob").await;
    wait_until(
        &browser,
        "bob in presence",
        &format!("{}.includes('bob')", testid_text("presence")),
    )
    .await;
    screenshot(&browser, "chat.png").await;
    close(browser).await;
}

/// protocol.md 2.6: a cluster whose Redis lost its data restores it, and every session gets
/// a `reset` with reason `state_lost`. The client library takes it like any `reset`: the page
/// keeps its WebSocket and its session, shows the room's history again, and goes on.
#[tokio::test]
async fn after_a_clusters_redis_lost_its_data_the_page_takes_the_reset_and_goes_on() {
    let redis = support::redis::RedisServer::start().await;
    let url = redis.url();
    let node = support::ServerProcess::start(&["--redis", &url, "--node-id", "n1"]).await;
    let server = node.client();
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    goto(
        &browser,
        &format!("http://{}/?name=alice&room=lost", server.addr),
    )
    .await;
    wait_for_transport(&browser, "websocket").await;
    type_and_send(&browser, "before the loss").await;
    wait_for_message(&browser, "before the loss").await;
    let session = eval(&browser, "window.switchyardClient.sessionId").await;
    eval(
        &browser,
        "(window.resets = [], window.switchyardClient.on('reset', (e) => window.resets.push(e.reason)), true)",
    )
    .await;

    let _: () = ::redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .expect("FLUSHALL");
    wait_until(
        &browser,
        "a reset with reason state_lost",
        "window.resets.includes('state_lost')",
    )
    .await;
    // Its fresh history shows the message again; the session and the transport are the same.
    wait_for_message(&browser, "before the loss").await;
    assert_eq!(
        eval(&browser, "window.switchyardClient.sessionId").await,
        session
    );
    assert_eq!(eval(&browser, &testid_text("transport")).await, "websocket");
    let bob = server.session("bob").await;
    server.ok(&bob, join("lost")).await;
    server
        .ok(&bob, send("lost", "bob after the loss", "b1"))
        .await;
    wait_for_message(&browser, "bob after the loss").await;
    type_and_send(&browser, "alice after the loss").await;
    wait_for_message(&browser, "alice after the loss").await;
    assert_eq!(eval(&browser, "window.resets").await, json!(["state_lost"]));
    close(browser).await;
}

#[tokio::test]
async fn auto_mode_falls_back_to_sse_when_websocket_is_disabled() {
    let config = Config {
        transports: vec![
            TransportKind::Sse,
            TransportKind::LongPolling,
            TransportKind::ShortPolling,
        ],
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    goto(&browser, &format!("http://{}/?room=fallback", server.addr)).await;
    wait_for_transport(&browser, "sse").await;
    wait_until(
        &browser,
        "the fallback trail to name websocket",
        &format!("{}.includes('websocket')", testid_text("fallbacks")),
    )
    .await;
    let trail = eval(&browser, "window.switchyardClient.fallbacks").await;
    assert_eq!(trail[0]["transport"], "websocket", "{trail}");
    type_and_send(&browser, "over sse").await;
    wait_for_message(&browser, "over sse").await;
    close(browser).await;
}

#[tokio::test]
async fn each_forced_transport_sends_and_receives() {
    let server = TestServer::start().await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    for kind in TransportKind::ALL {
        goto(
            &browser,
            &format!(
                "http://{}/?transport={kind}&room=forced-{kind}&name=f-{kind}",
                server.addr
            ),
        )
        .await;
        wait_for_transport(&browser, kind.as_str()).await;
        let text = format!("sent over {kind}");
        type_and_send(&browser, &text).await;
        wait_for_message(&browser, &text).await;
    }
    close(browser).await;
}

/// protocol.md 2.2: on a WebSocket or SSE stream the client library acknowledges what it
/// processed (an `ack`: at once after 64 events, else `ackMs`, 10 s, after an event), so the
/// session forgets it: once the page has shown the messages, the server keeps none of its
/// events for resume. The WebSocket page gets 70 messages (the count), the SSE page one (the
/// timer).
#[tokio::test]
async fn on_a_stream_the_page_acknowledges_what_it_showed_and_the_server_forgets_it() {
    let server = TestServer::start().await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let senders = [server.session("bob").await, server.session("carol").await];
    for sender in &senders {
        server.ok(sender, join("acked")).await;
    }
    for (kind, messages) in [(TransportKind::WebSocket, 70), (TransportKind::Sse, 1)] {
        goto(
            &browser,
            &format!(
                "http://{}/?transport={kind}&room=acked&name=a-{kind}",
                server.addr
            ),
        )
        .await;
        wait_for_transport(&browser, kind.as_str()).await;
        for i in 0..messages {
            let sender = &senders[i % 2];
            let text = format!("{kind} message {i}");
            server
                .ok(sender, send("acked", &text, &format!("{kind}-{i}")))
                .await;
        }
        wait_for_message(&browser, &format!("{kind} message {}", messages - 1)).await;
        let session = eval(&browser, "window.switchyardClient.sessionId").await;
        let path = format!("/v1/sessions/{}", session.as_str().expect("a session id"));
        let described = browser_within(&format!("the {kind} page's ack"), async {
            loop {
                let (_, info) = server.json(hyper::Method::GET, &path, None).await;
                let last = info["last_seq"].as_u64().expect("last_seq");
                let oldest = info["oldest_seq"].as_u64().expect("oldest_seq");
                // The count acknowledges the first 64 events at once; the timer the rest.
                if kind == TransportKind::WebSocket && oldest > 64 || oldest == last + 1 {
                    break info;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(described["attached"], kind.as_str(), "{described}");
    }
    close(browser).await;
}

#[tokio::test]
async fn two_pages_on_different_transports_chat_and_see_each_other() {
    let server = TestServer::start().await;
    let driver = Driver::start().await;
    let ann = driver.browser().await;
    let bob = driver.browser().await;
    let base = format!("http://{}", server.addr);
    goto(
        &ann,
        &format!("{base}/?transport=websocket&name=ann&room=duo"),
    )
    .await;
    goto(
        &bob,
        &format!("{base}/?transport=long-polling&name=bob&room=duo"),
    )
    .await;
    wait_for_transport(&ann, "websocket").await;
    wait_for_transport(&bob, "long-polling").await;
    for page in [&ann, &bob] {
        wait_until(
            page,
            "presence to list ann and bob",
            &format!(
                "{0}.includes('ann') && {0}.includes('bob')",
                testid_text("presence")
            ),
        )
        .await;
    }
    type_and_send(&ann, "hi bob").await;
    wait_for_message(&bob, "hi bob").await;
    type_and_send(&bob, "hi ann").await;
    wait_for_message(&ann, "hi ann").await;
    close(ann).await;
    close(bob).await;
}

#[tokio::test]
async fn a_server_side_close_is_resumed_with_nothing_missing_or_repeated() {
    let server = TestServer::with_config(Config::default().with_rate_limit(1000.0)).await;
    let hub = server.hub.clone().expect("in-process hub");
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    for kind in [TransportKind::WebSocket, TransportKind::Sse] {
        let room = format!("drop-{kind}");
        goto(
            &browser,
            &format!(
                "http://{}/?transport={kind}&name=carol&room={room}",
                server.addr
            ),
        )
        .await;
        wait_for_transport(&browser, kind.as_str()).await;
        wait_until(
            &browser,
            "the page's session",
            "window.switchyardClient && window.switchyardClient.sessionId",
        )
        .await;
        let session = eval(&browser, "window.switchyardClient.sessionId").await;
        let session = session.as_str().expect("session id").to_owned();
        wait_until(
            &browser,
            "carol in presence",
            &format!("{}.includes('carol')", testid_text("presence")),
        )
        .await;

        let sender = server.session("dave").await;
        server.ok(&sender, join(&room)).await;
        for i in 0..30 {
            server
                .ok(
                    &sender,
                    send(&room, &format!("<m{i:02}>"), &format!("d{i}")),
                )
                .await;
            if i % 10 == 5 {
                // Cut the page's connection from the server side, mid-stream.
                hub.disconnect(&session, CloseReason::SlowConsumer)
                    .expect("session exists");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_for_message(&browser, "<m29>").await;
        let text = eval(&browser, &testid_text("messages")).await;
        let text = text.as_str().unwrap();
        let mut last = 0;
        for i in 0..30 {
            let marker = format!("<m{i:02}>");
            assert_eq!(
                text.matches(&marker).count(),
                1,
                "{marker} exactly once over {kind}: ...{}",
                &text[text.len().saturating_sub(400)..]
            );
            let at = text.find(&marker).unwrap();
            assert!(at >= last, "{marker} in order over {kind}");
            last = at;
        }
        wait_for_transport(&browser, kind.as_str()).await;
    }
    close(browser).await;
}

#[tokio::test]
async fn scrolling_to_the_top_loads_older_messages_until_the_beginning() {
    let dir = tempfile::tempdir().expect("a temp directory");
    let config = Config {
        history_store: switchyard::config::HistoryStoreKind::Sqlite,
        data_dir: dir.path().to_owned(),
        ..Config::default().with_rate_limit(10_000.0)
    };
    let server = TestServer::with_config(config).await;
    let bob = server.session("bob").await;
    server.ok(&bob, join("scroll")).await;
    let mut sent = Vec::new();
    for batch in 0..3 {
        let commands: Vec<Value> = (0..40)
            .map(|i| {
                send(
                    "scroll",
                    &format!("old {}", batch * 40 + i),
                    &format!("o{batch}-{i}"),
                )
            })
            .collect();
        let reply = server.ok(&bob, Value::Array(commands)).await;
        sent.extend(
            reply["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].clone()),
        );
    }
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    goto(
        &browser,
        &format!("http://{}/?name=alice&room=scroll", server.addr),
    )
    .await;
    wait_for_transport(&browser, "websocket").await;
    let shown = "document.querySelectorAll('#messages li[data-id]').length";
    wait_until(
        &browser,
        "the join's 50 messages",
        &format!("{shown} >= 50"),
    )
    .await;
    // Each scroll to the top loads one more page, until the beginning of the history.
    wait_until(
        &browser,
        "all 120 messages after scrolling up",
        &format!("(document.getElementById('messages-scroll').scrollTop = 0, {shown} === 120)"),
    )
    .await;
    wait_until(
        &browser,
        "the beginning-of-history marker",
        "document.getElementById('history-marker').dataset.state === 'start'",
    )
    .await;
    let ids = eval(
        &browser,
        "[...document.querySelectorAll('#messages li[data-id]')].map(li => Number(li.dataset.id))",
    )
    .await;
    assert_eq!(ids, Value::Array(sent), "every message once, in order");
    // A live message still arrives after the pages.
    server
        .ok(&bob, send("scroll", "new after scrolling", "n1"))
        .await;
    wait_for_message(&browser, "new after scrolling").await;
    close(browser).await;
}

/// An nginx set-up that breaks event streams: gzip on for every type, responses buffered
/// whatever the upstream asks (switchyard's `X-Accel-Buffering: no` ignored), and no
/// WebSocket upgrade passed on. (With the header honoured, nginx 1.22 flushes its gzip output
/// with every chunk and SSE works.)
const COMPRESSING_NGINX: &str = "
server {
    listen 80;
    gzip on;
    gzip_types *;
    gzip_min_length 0;
    proxy_ignore_headers X-Accel-Buffering;
    location / {
        proxy_pass http://127.0.0.1:8080;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
    }
}";

#[tokio::test]
async fn behind_an_nginx_that_compresses_event_streams_the_page_falls_back_to_polling() {
    let server = TestServer::start().await;
    let proxy = support::proxy::Proxy::nginx(
        COMPRESSING_NGINX.replace("127.0.0.1:8080", &server.addr.to_string()),
    )
    .await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let started = std::time::Instant::now();
    goto(
        &browser,
        &format!("http://{}/?name=carol&room=proxied", proxy.addr),
    )
    .await;
    wait_for_transport(&browser, "long-polling").await;
    // WebSocket fails at once (no upgrade); SSE gets no event within the 3 s open timeout.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "fell back in {took:?}");
    let trail = eval(&browser, "window.switchyardClient.fallbacks").await;
    let reasons: Vec<(&str, &str)> = trail
        .as_array()
        .expect("a fallback trail")
        .iter()
        .map(|f| {
            (
                f["transport"].as_str().unwrap(),
                f["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(reasons.first().map(|r| r.0), Some("websocket"), "{trail}");
    assert!(reasons.contains(&("sse", "no_data")), "{trail}");
    type_and_send(&browser, "through the proxy").await;
    wait_for_message(&browser, "through the proxy").await;
    let bob = server.session("bob").await;
    server.ok(&bob, join("proxied")).await;
    server.ok(&bob, send("proxied", "to carol", "b1")).await;
    wait_for_message(&browser, "to carol").await;
    close(browser).await;
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_given_up_after_two_heartbeats_and_resumed() {
    // A 1 s heartbeat: the page gives a silent stream up after 2 x 1 s + 1 s.
    let server = TestServer::with_config(Config {
        heartbeat: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let relay = support::proxy::Relay::start(server.addr).await;
    let driver = Driver::start().await;
    let bob = server.session("bob").await;
    for kind in ["websocket", "sse"] {
        let browser = driver.browser().await;
        let room = format!("silent-{kind}");
        goto(
            &browser,
            &format!(
                "http://{}/?transport={kind}&name=dana&room={room}",
                relay.addr
            ),
        )
        .await;
        wait_for_transport(&browser, kind).await;
        server.ok(&bob, join(&room)).await;
        server
            .ok(
                &bob,
                send(&room, "before the silence", &format!("{kind}-1")),
            )
            .await;
        wait_for_message(&browser, "before the silence").await;
        // The connection stays open but carries nothing: no close, no error, no heartbeat.
        relay.freeze();
        server
            .ok(
                &bob,
                send(&room, "during the silence", &format!("{kind}-2")),
            )
            .await;
        let frozen_at = std::time::Instant::now();
        wait_for_message(&browser, "during the silence").await;
        let took = frozen_at.elapsed();
        assert!(
            took >= Duration::from_secs(2),
            "{kind}: the message came through a frozen connection? ({took:?})"
        );
        let texts = eval(
            &browser,
            "[...document.querySelectorAll('#messages li[data-id]')].map(li => li.textContent)",
        )
        .await;
        let shown = texts.to_string();
        assert_eq!(
            shown.matches("during the silence").count(),
            1,
            "{kind}: exactly once: {shown}"
        );
        close(browser).await;
    }
}

#[tokio::test]
async fn a_token_in_the_page_url_names_the_user_until_it_expires() {
    let dir = tempfile::tempdir().expect("a temp directory");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a demo secret that is thirty-two bytes or more").unwrap();
    let verifier = switchyard::auth::Verifier::hmac_secret_file(&secret).unwrap();
    let server = TestServer::with_config(Config {
        auth: Some(std::sync::Arc::new(verifier)),
        ..Config::default()
    })
    .await;
    let token = switchyard::auth::mint(
        &secret,
        "alice",
        Some("Alice"),
        Some(vec!["tokens".into()]),
        Duration::from_secs(4),
    )
    .unwrap();
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    goto(
        &browser,
        &format!(
            "http://{}/?token={token}&room=tokens&transport=websocket",
            server.addr
        ),
    )
    .await;
    wait_for_transport(&browser, "websocket").await;
    assert_eq!(
        eval(&browser, &testid_text("identity-name")).await,
        json!("Alice")
    );
    assert_eq!(
        eval(&browser, &testid_text("identity-user")).await,
        json!("alice")
    );
    type_and_send(&browser, "signed in").await;
    wait_for_message(&browser, "signed in").await;
    wait_until(
        &browser,
        "the page to say the token expired",
        "window.switchyardClient.closeReason === 'token_expired' && \
         document.querySelector('[data-testid=banner]').dataset.code === 'token_expired'",
    )
    .await;
    close(browser).await;
}

#[tokio::test]
async fn message_text_is_shown_literally_and_never_run() {
    let server = TestServer::start().await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    goto(
        &browser,
        &format!("http://{}/?room=xss&name=mallory", server.addr),
    )
    .await;
    wait_for_transport(&browser, "websocket").await;
    let attack = "<img src=x onerror=alert(1)>";
    type_and_send(&browser, attack).await;
    wait_for_message(&browser, attack).await;
    // And from another client, with a marker the page would set if it ran.
    let eve = server.session("<b>eve</b>").await;
    server.ok(&eve, join("xss")).await;
    server
        .ok(
            &eve,
            send("xss", "<img src=y onerror=\"window.pwned=1\">", "x1"),
        )
        .await;
    wait_for_message(&browser, "window.pwned=1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        eval(&browser, "document.querySelectorAll('img').length").await,
        json!(0)
    );
    assert_eq!(
        eval(&browser, "window.pwned === undefined").await,
        json!(true)
    );
    let alert = browser_within("asking for an alert", browser.get_alert_text()).await;
    assert!(alert.is_err(), "no alert is open: {alert:?}");
    // Her name is markup too: it is shown as text and makes no element.
    assert_eq!(
        eval(&browser, "document.body.textContent.includes('<b>eve</b>')").await,
        json!(true)
    );
    assert_eq!(
        eval(
            &browser,
            "document.querySelectorAll('main b, aside b').length"
        )
        .await,
        json!(0)
    );
    close(browser).await;
}

#[tokio::test]
async fn the_compare_view_measures_a_burst_on_all_four_transports() {
    let server = TestServer::start().await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    goto(
        &browser,
        &format!("http://{}/compare?room=cmp", server.addr),
    )
    .await;
    wait_until(
        &browser,
        "the burst button to be enabled",
        "!document.querySelector('[data-testid=send-burst]').disabled",
    )
    .await;
    click(&browser, "[data-testid=send-burst]").await;
    for kind in TransportKind::ALL {
        let panel = format!("[data-testid=compare-{kind}]");
        let count =
            format!("(document.querySelector('{panel} [data-testid=count]') || {{}}).textContent");
        let p50 =
            format!("(document.querySelector('{panel} [data-testid=p50]') || {{}}).textContent");
        wait_until(
            &browser,
            &format!("{kind} to count 20"),
            &format!("{count} === '20'"),
        )
        .await;
        wait_until(
            &browser,
            &format!("{kind} to show a p50"),
            &format!("parseFloat({p50}) > 0"),
        )
        .await;
    }
    screenshot(&browser, "compare.png").await;
    close(browser).await;
}

/// A server speaking HTTPS with a certificate made for the test.
async fn https_server() -> (TestServer, tempfile::TempDir) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen makes a certificate");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let tls = switchyard::tls::Tls::load(&cert, &key).expect("the certificate loads");
    let server = TestServer::with_config(Config {
        tls: Some(tls),
        ..Config::default()
    })
    .await;
    (server, dir)
}

/// A counter of the server's metrics, read from the hub (the server speaks only HTTPS).
fn hub_metric(server: &TestServer, sample: &str) -> f64 {
    let text = server
        .hub
        .as_ref()
        .expect("an in-process server")
        .metrics()
        .encode();
    text.lines()
        .find_map(|line| line.strip_prefix(sample))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in the metrics"))
}

#[tokio::test]
async fn over_https_every_transport_travels_on_http2() {
    let (server, _certs) = https_server().await;
    let driver = Driver::start().await;
    let browser = driver.https_browser().await;
    for kind in TransportKind::ALL {
        goto(
            &browser,
            &format!(
                "https://{}/?transport={kind}&room=h2-{kind}&name=h2-{kind}",
                server.addr
            ),
        )
        .await;
        wait_for_transport(&browser, kind.as_str()).await;
        let text = format!("sent over {kind} on HTTPS");
        type_and_send(&browser, &text).await;
        wait_for_message(&browser, &text).await;
        // The page's own record of its HTTP requests (session, commands, polls): HTTP/2.
        let protocols = eval(
            &browser,
            "[...new Set(performance.getEntriesByType('resource')\
               .filter(e => e.name.includes('/v1/')).map(e => e.nextHopProtocol))]",
        )
        .await;
        assert_eq!(protocols, json!(["h2"]), "{kind}: {protocols}");
        // The server's record of the transport itself.
        let sample = format!(r#"switchyard_attaches_by_http_total{{transport="{kind}",http="2"}}"#);
        assert!(hub_metric(&server, &sample) >= 1.0, "{sample}");
    }
    close(browser).await;
}

#[tokio::test]
async fn ten_sse_tabs_of_one_origin_all_receive_messages_over_http2() {
    let (server, _certs) = https_server().await;
    let driver = Driver::start().await;
    let browser = driver.https_browser().await;
    let url = format!("https://{}/?transport=sse&room=tabs", server.addr);
    // Over HTTP/1.1 a browser opens at most six connections per origin: the seventh stream
    // would wait for one of them. Over HTTP/2 the ten streams share one connection.
    let mut tabs = Vec::new();
    for i in 0..10 {
        if i > 0 {
            let tab = browser_within("a new tab", browser.new_window(true))
                .await
                .expect("open a tab");
            browser_within(
                "switching tabs",
                browser.switch_to_window(tab.handle.clone()),
            )
            .await
            .expect("switch tab");
        }
        goto(&browser, &format!("{url}&name=tab{i}")).await;
        wait_for_transport(&browser, "sse").await;
        tabs.push(
            browser_within("the tab's handle", browser.window())
                .await
                .unwrap(),
        );
    }
    let sample = r#"switchyard_sessions_attached{transport="sse"}"#;
    assert_eq!(
        hub_metric(&server, sample),
        10.0,
        "ten streams open at once"
    );
    // A message from the last tab reaches every tab.
    type_and_send(&browser, "to every tab").await;
    for tab in tabs {
        browser_within("switching tabs", browser.switch_to_window(tab))
            .await
            .expect("switch tab");
        wait_for_message(&browser, "to every tab").await;
    }
    close(browser).await;
}
