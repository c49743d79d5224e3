//! Replays the committed fuzz corpus (fuzz/corpus/<target>/) through the same checks the fuzz
//! targets run (src/checks.rs), on stable, so CI holds every input a fuzzer ever found or was
//! seeded with. `scripts/fuzz` runs the fuzzers themselves (nightly).

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a corpus entry").path();
        let input = std::fs::read(&path).expect("a corpus file");
        let outcome = std::panic::catch_unwind(|| check(&input));
        assert!(
            outcome.is_ok(),
            "{target}: {} fails its check",
            path.display()
        );
        inputs += 1;
    }
    assert!(inputs > 0, "{} holds no inputs", dir.display());
}

#[test]
fn the_commands_corpus_holds() {
    replay("commands", switchyard::checks::commands);
}

#[test]
fn the_request_corpus_holds() {
    replay("request", switchyard::checks::request);
}

#[test]
fn the_websocket_read_corpus_holds() {
    replay("websocket_read", switchyard::checks::websocket_read);
}
