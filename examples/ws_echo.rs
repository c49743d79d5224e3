//! A WebSocket echo server on switchyard's own WebSocket path (see `transport::ws_echo`),
//! for Autobahn|Testsuite: `cargo run --release --example ws_echo -- 127.0.0.1:9001`.

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_string());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!(
        "echoing WebSocket messages on ws://{}",
        listener.local_addr()?
    );
    switchyard::transport::ws_echo::serve(listener).await
}
