//! The README's code is compiled code: each example below is checked to be, line for line, a
//! doc test or an example program that `cargo test` / CI compiles, so the README cannot drift
//! from what builds. (The "Build logs" example, whose doc test hides lines, is checked in
//! tests/process.rs.)

use std::fs;

/// The first ```` ```rust ```` block after `heading` in README.md, without its fences.
fn readme_block(heading: &str) -> String {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find(heading).unwrap_or_else(|| panic!("{heading}"))..];
    let fence = section.find("```rust").expect("a rust block");
    let body = &section[fence..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").expect("a closing fence")].to_owned()
}

/// The doc comments (`marker`: `///` or `//!`) of a source file, as rustdoc reads them.
#[cfg(any(feature = "metrics", feature = "tls"))]
fn doc_text(path: &str, marker: &str) -> String {
    let source = fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    source
        .lines()
        .map(str::trim_start)
        .filter_map(|line| line.strip_prefix(marker))
        .map(|line| format!("{}\n", line.strip_prefix(' ').unwrap_or(line)))
        .collect()
}

/// "Metrics" is `Hub::metrics`'s doc test, which is compiled and run.
#[cfg(feature = "metrics")]
#[test]
fn the_metrics_example_is_the_doc_test() {
    let example = readme_block("### Metrics");
    assert!(
        doc_text("src/metrics.rs", "///").contains(&format!("```\n{example}```\n")),
        "README.md's Metrics example must be Hub::metrics's doc test:\n{example}"
    );
}

/// "TLS" is the `wshub::tls` module's doc test, which is compiled.
#[cfg(feature = "tls")]
#[test]
fn the_tls_example_is_the_doc_test() {
    let example = readme_block("### TLS");
    assert!(
        doc_text("src/http/tls.rs", "//!").contains(&format!("```no_run\n{example}```\n")),
        "README.md's TLS example must be the wshub::tls module's doc test:\n{example}"
    );
}

/// "tracing" is the subscriber set-up of `examples/server.rs`, which CI builds.
#[test]
fn the_tracing_example_is_the_servers() {
    let example = readme_block("### tracing");
    let server =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/server.rs")).unwrap();
    // The example's lines, indented as they are in `main`.
    let indented: String = example
        .lines()
        .map(|line| format!("    {line}\n"))
        .collect();
    assert!(
        server.contains(&indented),
        "README.md's tracing example must be examples/server.rs's set-up:\n{example}"
    );
}
