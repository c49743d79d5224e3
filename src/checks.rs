//! What must hold for any input a client controls: the checks the fuzz targets (`fuzz/`, run
//! with `scripts/fuzz` on nightly) and the stable corpus replay (`tests/fuzz_corpus.rs`) run
//! on arbitrary bytes. Each panics when an invariant breaks, which is what a fuzzer reports.
//!
//! - [`commands`]: a frame or body of commands. No panic; a command that parses serializes
//!   back to JSON that parses to the same command; every refusal carries a documented code.
//! - [`request`]: the query and headers of every endpoint (`after`, `wait`, `Last-Event-ID`,
//!   `Host`, `Origin`, the forwarding headers). No panic; refusals documented.
//! - [`websocket_read`]: bytes arriving on an upgraded WebSocket, read by tungstenite with
//!   the server's settings. No panic; a read error maps to one of the server's close codes;
//!   every text message goes through [`commands`].

use std::io::{Cursor, Read, Write};
use std::net::SocketAddr;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Config;
use crate::protocol::{parse_commands, Command, ErrorBody};
use crate::proxy::parse_trusted;
use crate::router::{check_host, check_origin};
use crate::transport::{query_param, resume_point, wait_param};

/// The protocol document, whose error-code table every refusal must appear in.
const PROTOCOL_DOC: &str = include_str!("../docs/protocol.md");

/// Panics unless `error`'s code is a row of docs/protocol.md's error-code table.
pub fn documented(error: &ErrorBody) {
    let row = format!("| `{}` |", error.code.as_str());
    assert!(
        PROTOCOL_DOC.contains(&row),
        "error code {:?} is not in docs/protocol.md: {error:?}",
        error.code
    );
}

/// A frame or body of commands.
pub fn commands(input: &[u8]) {
    let parsed = match parse_commands(input) {
        Ok(parsed) => parsed,
        Err(error) => return documented(&error),
    };
    assert_eq!(parsed.commands.len(), parsed.client_ids.len());
    for command in parsed.commands {
        match command {
            Ok(command) => round_trips(&command),
            Err(error) => documented(&error),
        }
    }
}

fn round_trips(command: &Command) {
    let json = serde_json::to_vec(command).expect("a command serializes");
    let again = parse_commands(&json).expect("a serialized command parses");
    assert_eq!(
        again.commands.len(),
        1,
        "{}",
        String::from_utf8_lossy(&json)
    );
    match &again.commands[0] {
        Ok(back) => assert_eq!(back, command, "{}", String::from_utf8_lossy(&json)),
        Err(error) => panic!(
            "{command:?} serialized as {} is refused: {error:?}",
            String::from_utf8_lossy(&json)
        ),
    }
}

/// Splits input into newline-separated fields (missing ones are absent).
fn fields(input: &[u8]) -> Vec<Option<String>> {
    String::from_utf8_lossy(input)
        .split('\n')
        .map(|field| Some(field.to_owned()))
        .chain(std::iter::repeat(None))
        .take(7)
        .collect()
}

/// The query and headers of a request: fields are the query, `Last-Event-ID`, `Host`,
/// `Origin`, `Forwarded`, `X-Forwarded-For` and `X-Forwarded-Proto`, one per line.
pub fn request(input: &[u8]) {
    let f = fields(input);
    let query = f[0].as_deref();
    for name in ["after", "wait", "flag", ""] {
        if let Some(value) = query_param(query, name) {
            assert!(query.unwrap_or("").contains(value));
        }
    }
    if let Err(error) = resume_point(f[1].as_deref(), query_param(query, "after")) {
        documented(&error);
    }
    if let Err(error) = wait_param(query_param(query, "wait"), std::time::Duration::ZERO) {
        documented(&error);
    }
    let mut headers = HeaderMap::new();
    let named = [
        ("forwarded", f[4].as_deref()),
        ("x-forwarded-for", f[5].as_deref()),
        ("x-forwarded-proto", f[6].as_deref()),
    ];
    for (name, value) in named {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let trusted = parse_trusted("127.0.0.0/8, ::1").expect("valid blocks");
    let peer: SocketAddr = "127.0.0.1:4000".parse().expect("an address");
    let client = trusted.client(peer, &headers);
    if let Some(proto) = &client.proto {
        assert!(proto == "http" || proto == "https", "{proto:?}");
    }
    let config = Config {
        allowed_hosts: vec!["chat.example".into()],
        allowed_origins: vec!["https://other.example".into()],
        ..Config::default()
    };
    let host = client.host.as_deref().or(f[2].as_deref());
    if let Err(error) = check_host(host, &config) {
        documented(&error);
    }
    let origin = f[3].as_deref().and_then(|o| HeaderValue::from_str(o).ok());
    match check_origin(origin.as_ref(), host, client.proto.as_deref(), &config) {
        Ok(Some(allowed)) => assert_eq!(Some(&allowed), origin.as_ref()),
        Ok(None) => {}
        Err(error) => documented(&error),
    }
}

/// A socket whose reads come from the input and whose writes are kept.
struct Replay<'a> {
    input: Cursor<&'a [u8]>,
    output: Vec<u8>,
}

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes arriving on an upgraded WebSocket, with the server's frame limits for 4 KiB
/// commands.
pub fn websocket_read(input: &[u8]) {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    use tokio_tungstenite::tungstenite::Message;
    let config = crate::transport::websocket::read_config(4096, 1024);
    let mut socket = WebSocket::from_raw_socket(
        Replay {
            input: Cursor::new(input),
            output: Vec::new(),
        },
        Role::Server,
        Some(config),
    );
    // Every frame is at least two bytes: the loop ends.
    for _ in 0..=input.len() {
        match socket.read() {
            Ok(Message::Text(text)) => commands(text.as_bytes()),
            Ok(_) => {}
            Err(error) => {
                let code = crate::transport::websocket::close_code_for(&error);
                assert!(
                    matches!(code, None | Some(1002 | 1007 | 1009)),
                    "{error:?} -> {code:?}"
                );
                return;
            }
        }
    }
}
