//! `Hub::stream_process` over real loopback sockets: a child's stdout and stderr line by line
//! (each stream in order), bytes that are not UTF-8 replaced, an overlong line split between
//! characters, the status when it exits, when a signal ends it and when it cannot start; one
//! run per id; a subscriber that comes after the run gets it all from the history.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{next_json, subscribe_since, wait_until, within, Server};
use tokio::process::Command;
use wshub::{HistoryPolicy, HubConfig, ProcessExit, PROCESS_LINE_LIMIT};

fn config_with_history() -> HubConfig {
    HubConfig::builder()
        .prefix_history(
            "process:",
            HistoryPolicy::new(10_000, Duration::from_secs(3600)).unwrap(),
        )
        .build()
        .unwrap()
}

fn sh(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

/// `a` then `é` (2 bytes) 10,000 times: 20,001 bytes, a character starting at every odd
/// byte, so that a cut at the limit (even) would split one.
fn long_line() -> String {
    format!("a{}", "é".repeat(10_000))
}

/// Reads `process_output` messages until the `process_status`; returns them all.
async fn read_run(ws: &mut support::Ws) -> Vec<Value> {
    let mut messages = Vec::new();
    loop {
        let message = next_json(ws).await;
        let kind = message["type"].as_str().unwrap_or_default().to_owned();
        assert!(
            kind == "process_output" || kind == "process_status",
            "unexpected {message}"
        );
        messages.push(message);
        if kind == "process_status" {
            return messages;
        }
    }
}

/// Checks one run's messages: channel, processId, offsets 1.. without gaps, each stream's
/// lines in order, the replaced bytes, the split line, and the status last.
fn check_run(messages: &[Value]) {
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(message["channel"], "process:build-1", "{message}");
        assert_eq!(message["processId"], "build-1", "{message}");
        assert_eq!(message["offset"], i as u64 + 1, "{message}");
    }
    let (status, lines) = messages.split_last().unwrap();
    assert_eq!(status["type"], "process_status");
    assert_eq!(status["data"], json!({"status": "exited", "exitCode": 3}));
    let lines: Vec<&str> = lines.iter().map(|m| m["data"].as_str().unwrap()).collect();
    let stderr: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("err "))
        .collect();
    let stdout: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("err "))
        .collect();
    assert_eq!(stderr, ["err 1", "err 2"]);
    let long = long_line();
    // The line is cut before the character that straddles the limit.
    let cut = PROCESS_LINE_LIMIT - 1;
    assert_eq!(
        stdout,
        [
            "out 1",
            "out 2",
            "bad \u{FFFD}\u{FFFD} end",
            &long[..cut],
            &long[cut..],
            "",
            "out 3 without newline",
        ]
    );
}

#[tokio::test]
async fn a_run_streams_every_line_then_its_exit_code() {
    let server = Server::start(config_with_history()).await;
    let mut early = server.connect().await;
    let ack = subscribe_since(&mut early, "process:build-1", None).await;
    assert_eq!(ack["data"]["offset"], 0, "{ack}");

    let script = r#"
        printf 'out 1\nout 2\n'
        printf 'err 1\n' >&2
        printf 'bad \377\376 end\n'
        printf 'err 2\n' >&2
        printf '%s\n\n' "$LONG"
        printf 'out 3 without newline'
        exit 3
    "#;
    let mut command = sh(script);
    command.env("LONG", long_line());
    let run = server.hub.stream_process("build-1", command).unwrap();
    assert_eq!(run.channel(), "process:build-1");
    assert_eq!(run.id(), "build-1");
    assert!(run.pid().is_some());
    let exit = within("the run", run.wait()).await.unwrap();
    assert_eq!(exit, ProcessExit::Exited(3));
    assert_eq!((exit.status(), exit.exit_code()), ("exited", 3));

    let live = read_run(&mut early).await;
    check_run(&live);

    // A page opened after the run: `since: {offset: 0}` without an epoch gets all of it.
    let mut late = server.connect().await;
    let ack = subscribe_since(&mut late, "process:build-1", Some((0, None))).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(ack["data"]["offset"], live.len() as u64, "{ack}");
    let replayed = read_run(&mut late).await;
    assert_eq!(replayed, live);
}

/// The last message of `channel`'s history, once there is a `process_status`.
async fn final_status(server: &Server, channel: &str) -> Value {
    let mut status = Value::Null;
    wait_until("the process_status in the history", || {
        let page = server.hub.history(channel, 0, 10_000).unwrap();
        let Some(last) = page.publications.last() else {
            return false;
        };
        status = serde_json::from_slice(&last.message).unwrap();
        status["type"] == "process_status"
    })
    .await;
    status
}

#[tokio::test]
async fn a_signal_ends_the_child() {
    let server = Server::start(config_with_history()).await;

    // The child signals itself.
    let run = server
        .hub
        .stream_process("term", sh("echo before; kill -TERM $$; sleep 5"))
        .unwrap();
    let exit = within("the run", run.wait()).await.unwrap();
    assert_eq!(exit, ProcessExit::Signaled(15));
    let status = final_status(&server, "process:term").await;
    assert_eq!(
        status["data"],
        json!({"status": "signaled", "exitCode": 143})
    );
    let page = server.hub.history("process:term", 0, 10).unwrap();
    let first: Value = serde_json::from_slice(&page.publications[0].message).unwrap();
    assert_eq!(first["data"], "before");

    // ProcessHandle::kill: SIGKILL.
    let run = server
        .hub
        .stream_process("killed", sh("echo started; exec sleep 30"))
        .unwrap();
    wait_until("the first line", || {
        server.hub.history("process:killed", 0, 1).unwrap().latest >= 1
    })
    .await;
    run.kill();
    let exit = within("the killed run", run.wait()).await.unwrap();
    assert_eq!(exit, ProcessExit::Signaled(9));
    let status = final_status(&server, "process:killed").await;
    assert_eq!(
        status["data"],
        json!({"status": "signaled", "exitCode": 137})
    );
}

#[tokio::test]
async fn one_run_per_id() {
    let server = Server::start(config_with_history()).await;
    let first = server
        .hub
        .stream_process("job", sh("exec sleep 30"))
        .unwrap();
    // A second run while the first one runs: refused, and nothing started.
    let err = server
        .hub
        .stream_process("job", sh("echo second"))
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    assert!(err.to_string().contains("already running"), "{err}");
    first.kill();
    within("the first run", first.wait()).await.unwrap();
    // Its history holds the first run: a later run of the same id is refused too.
    let err = server
        .hub
        .stream_process("job", sh("echo third"))
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    assert!(err.to_string().contains("was used before"), "{err}");
    // A new id per run is the way.
    let run = server.hub.stream_process("job#2", sh("echo fine")).unwrap();
    assert_eq!(run.channel(), "process:job#2");
    assert_eq!(
        within("job#2", run.wait()).await.unwrap(),
        ProcessExit::Exited(0)
    );

    // Without history, a run that has ended frees its id.
    let plain = Server::default_hub().await;
    for _ in 0..2 {
        let run = plain.hub.stream_process("again", sh("true")).unwrap();
        within("a run without history", run.wait()).await.unwrap();
    }
    assert!(plain.hub.stream_process("", sh("true")).is_err());
}

#[tokio::test]
async fn a_child_that_cannot_start_gets_the_status_failed() {
    let server = Server::start(config_with_history()).await;
    let err = server
        .hub
        .stream_process("missing", Command::new("/nonexistent/program"))
        .unwrap_err();
    assert!(err.is_spawn(), "{err}");
    let status = final_status(&server, "process:missing").await;
    assert_eq!(status["data"], json!({"status": "failed", "exitCode": -1}));
}

#[tokio::test]
async fn a_go_ws_subscriber_gets_plain_lines() {
    // No history, a plain subscribe: the messages are exactly go-ws's.
    let server = Server::default_hub().await;
    let mut ws = server.connect().await;
    support::subscribe(&mut ws, "process:plain").await;
    let run = server
        .hub
        .stream_process("plain", sh("echo one; echo two >&2; exit 0"))
        .unwrap();
    within("the run", run.wait()).await.unwrap();
    let mut lines = Vec::new();
    let status = loop {
        let message = next_json(&mut ws).await;
        assert!(message.get("offset").is_none(), "{message}");
        if message["type"] == "process_status" {
            break message;
        }
        lines.push(message["data"].as_str().unwrap().to_owned());
    };
    lines.sort();
    assert_eq!(lines, ["one", "two"]);
    assert_eq!(status["data"], json!({"status": "exited", "exitCode": 0}));
}

/// The code of README's "Build logs" is `stream_process`'s doc test (which is compiled)
/// without its hidden lines.
#[test]
fn the_readme_example_is_the_doc_test() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{dir}/README.md")).unwrap();
    let section = &readme[readme.find("### Build logs").expect("a Build logs section")..];
    let start = section.find("```rust").unwrap();
    let block = &section[start..];
    let block = &block[block.find('\n').unwrap() + 1..];
    let readme_lines: Vec<&str> = block[..block.find("```").unwrap()].lines().collect();

    let source = std::fs::read_to_string(format!("{dir}/src/process.rs")).unwrap();
    let doc = &source[source
        .find("pub fn stream_process")
        .map(|end| {
            source[..end]
                .rfind("/// ```no_run")
                .expect("the doc test of stream_process")
        })
        .unwrap()..];
    let doc_lines: Vec<&str> = doc
        .lines()
        .skip(1)
        .map(|line| {
            let line = line.trim_start().trim_start_matches("///");
            line.strip_prefix(' ').unwrap_or(line)
        })
        .take_while(|line| *line != "```")
        .filter(|line| !line.starts_with("# ") && *line != "#")
        .collect();
    assert_eq!(readme_lines, doc_lines);
}
