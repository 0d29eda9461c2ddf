//! Runs the built `loadtest` binary through every scenario, briefly and with few connections,
//! and checks that its JSON report adds up. Nothing here asserts speed: the machine is shared.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

static N: AtomicUsize = AtomicUsize::new(0);

fn temp(ext: &str) -> PathBuf {
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("loadtest-test-{}-{n}.{ext}", std::process::id()))
}

fn loadtest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--no-progress")
        .output()
        .expect("the loadtest binary runs")
}

/// Runs loadtest with `--json`, expects success, returns the parsed report.
fn run_json(args: &[&str]) -> Value {
    let path = temp("json");
    let p = path.to_string_lossy().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", &p]);
    let out = loadtest(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadtest {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let text = std::fs::read_to_string(&path).expect("the JSON report is written");
    let _ = std::fs::remove_file(&path);
    let v: Value = serde_json::from_str(&text).expect("the JSON report is valid JSON");
    for key in [
        "scenario",
        "mode",
        "config",
        "git_revision",
        "cpu_model",
        "steps",
        "summary",
    ] {
        assert!(v.get(key).is_some(), "no {key} in the report");
    }
    assert!(v["git_revision"].is_string() && v["cpu_model"].is_string());
    v
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The checks every measured step must pass; all subscribers on one channel.
fn check_step(s: &Value, subscribers: u64) {
    check_channels_step(s, subscribers, subscribers);
}

/// The checks every measured step must pass, with `per_channel` subscribers on each channel.
fn check_channels_step(s: &Value, subscribers: u64, per_channel: u64) {
    let published = u(&s["published"]);
    let delivered = u(&s["delivered"]);
    let lost = u(&s["lost"]);
    assert_eq!(u(&s["subscribers"]), subscribers);
    assert!(published > 0, "nothing published: {s}");
    // Every delivery is either received or counted lost (duplicates are not deliveries).
    assert_eq!(
        delivered + lost,
        u(&s["expected_deliveries"]),
        "delivered + lost != expected"
    );
    if lost == 0 {
        assert_eq!(
            delivered,
            published * per_channel,
            "delivered != published x subscribers"
        );
    }
    assert_eq!(u(&s["duplicated"]), 0);
    // The latency histogram holds one value per delivery.
    assert_eq!(u(&s["latency"]["count"]), delivered);
    assert_eq!(u(&s["histogram"]["total_count"]), delivered);
    let buckets: u64 = s["histogram"]["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| u(&b[1]))
        .sum();
    assert_eq!(buckets, delivered);
    let l = &s["latency"];
    let p = |k: &str| l[k].as_f64().expect("a percentile");
    assert!(
        p("p50_us") > 0.0
            && p("p50_us") <= p("p90_us")
            && p("p90_us") <= p("p99_us")
            && p("p99_us") <= p("p999_us")
            && p("p999_us") <= p("max_us")
    );
    assert!(!s["intervals"].as_array().expect("intervals").is_empty());
    assert!(s["generator_cpu_seconds"].as_f64().is_some());
}

#[test]
fn fanout_closed_loop_adds_up() {
    let v = run_json(&[
        "fanout",
        "-n",
        "20",
        "-w",
        "4",
        "-d",
        "1.5",
        "--interval-ms",
        "500",
    ]);
    assert_eq!(v["mode"], "embedded");
    let s = &v["steps"][0];
    check_step(s, 20);
    assert_eq!(u(&s["lost"]), 0);
    assert_eq!(u(&s["connections_held"]), 20);
    assert!(u(&s["rounds"]) > 0);
    // The hub saw the same publishes, and its CPU and the process memory are reported.
    assert_eq!(u(&s["hub"]["published"]), u(&s["published"]));
    assert!(s["hub_cpu_seconds"].as_f64().is_some());
    assert!(u(&s["rss_bytes"]) > 0);
}

#[test]
fn fanout_open_loop_adds_up() {
    let v = run_json(&["fanout", "-n", "10", "-r", "200", "-d", "1.5"]);
    let s = &v["steps"][0];
    check_step(s, 10);
    assert_eq!(s["load"]["mode"], "open");
    assert_eq!(u(&s["lost"]), 0);
}

#[test]
fn channels_adds_up() {
    let v = run_json(&[
        "channels",
        "--channels",
        "4",
        "--per-channel",
        "3",
        "-d",
        "1.5",
    ]);
    let s = &v["steps"][0];
    check_channels_step(s, 12, 3);
    assert_eq!(u(&s["lost"]), 0);
}

#[test]
fn broadcast_adds_up() {
    let v = run_json(&["broadcast", "-n", "15", "-w", "2", "-d", "1"]);
    check_step(&v["steps"][0], 15);
    assert_eq!(u(&v["steps"][0]["lost"]), 0);
}

#[test]
fn churn_reports_both_halves() {
    let v = run_json(&[
        "churn",
        "-n",
        "10",
        "-d",
        "3",
        "--churn-connects",
        "20",
        "--churn-hold-ms",
        "300",
        "--churn-togglers",
        "3",
        "--churn-toggles",
        "40",
    ]);
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for s in steps {
        check_step(s, 10);
        assert_eq!(
            u(&s["lost"]),
            0,
            "churn must not cost the steady subscribers messages"
        );
    }
    let c = &steps[1]["churn"];
    assert!(
        u(&c["connects"]) > 0 && u(&c["subscribes"]) > 0,
        "no churn happened: {c}"
    );
    assert!(v["summary"]["p99_ratio"].as_f64().is_some());
}

#[test]
fn slow_clients_are_counted() {
    let v = run_json(&[
        "slow",
        "-n",
        "20",
        "--slow-share",
        "0.25",
        "-d",
        "6",
        "-p",
        "4000",
    ]);
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    check_step(&steps[0], 15);
    check_step(&steps[1], 15);
    let slow = &steps[1]["slow"];
    assert_eq!(u(&slow["clients"]), 5);
    // The slow clients did not get everything: the hub dropped or disconnected them.
    assert!(u(&slow["lost"]) > 0, "slow clients lost nothing: {slow}");
    let hub = &steps[1]["hub"];
    assert!(
        u(&hub["dropped"]) + u(&hub["slow_consumer_disconnects"]) > 0,
        "the hub did nothing to them: {hub}"
    );
    assert_eq!(
        u(&slow["lost"]),
        u(&steps[1]["published"]) * 5 - u(&slow["received"])
    );
}

#[test]
fn idle_reports_memory() {
    let v = run_json(&["idle", "-n", "50", "-d", "1"]);
    assert_eq!(u(&v["steps"][0]["connections_held"]), 50);
    assert!(v["summary"]["bytes_per_connection"].as_f64().is_some());
}

#[test]
fn ramp_reaches_its_target() {
    let v = run_json(&["ramp", "--ramp-to", "100", "--ramp-rate", "500"]);
    assert_eq!(u(&v["summary"]["reached"]), 100, "{}", v["summary"]);
    assert_eq!(u(&v["summary"]["handshake"]["count"]), 100);
}

#[test]
fn sweep_writes_the_plot() {
    let svg = temp("svg");
    let s = svg.to_string_lossy().to_string();
    let v = run_json(&[
        "sweep",
        "--sweep-subs",
        "5,10",
        "--sweep-rates",
        "50,100",
        "--step-seconds",
        "1",
        "--plot",
        &s,
    ]);
    let text = std::fs::read_to_string(&svg).expect("the SVG is written");
    let _ = std::fs::remove_file(&svg);
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    let points = v["summary"]["points"].as_array().expect("points");
    assert!(points.len() >= 2);
    for s in v["steps"].as_array().expect("steps") {
        check_step(s, u(&s["subscribers"]));
    }
}

/// A server that sends no acknowledgements (go-ws mode) on its own port, driven with --target.
#[test]
fn target_mode_needs_no_acks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let addr = rt.block_on(async {
        let config = wshub::HubConfig::builder()
            .publish_policy(wshub::PublishPolicy::AllowAll)
            .strict_go_ws(true)
            .build()
            .expect("config");
        let hub = wshub::Hub::with_config(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(wshub::serve(listener, hub, async move {
            let _ = rx.await;
        }));
        addr
    });
    let url = format!("ws://{addr}/ws");
    let v = run_json(&[
        "fanout",
        "--target",
        &url,
        "-n",
        "10",
        "-w",
        "2",
        "-d",
        "1",
        "--pid",
        &std::process::id().to_string(),
    ]);
    assert_eq!(v["mode"], "target");
    let s = &v["steps"][0];
    check_step(s, 10);
    assert_eq!(u(&s["lost"]), 0);
    assert!(
        s["hub_cpu_seconds"].as_f64().is_some(),
        "--pid gives the server's CPU"
    );
    let _ = tx.send(());
}

#[test]
fn refused_publishing_fails_clearly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let addr = rt.block_on(async {
        let hub = wshub::Hub::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(wshub::serve(listener, hub, async move {
            let _ = rx.await;
        }));
        addr
    });
    let out = loadtest(&[
        "--target",
        &format!("ws://{addr}/ws"),
        "-n",
        "3",
        "-d",
        "1",
        "--live-timeout",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("became live"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = tx.send(());
}

#[test]
fn bad_arguments_exit_without_panic() {
    let cases: &[&[&str]] = &[
        &["nosuch"],
        &["--window", "0"],
        &["--duration", "-1"],
        &["--target", "http://127.0.0.1:1/ws"],
        &["--slow-share", "2", "slow"],
        &["--sweep-rates", "3,2", "sweep"],
        &["--plot", "x.svg"],
        &["--client-cpus", "zz"],
        &["-n", "nope"],
    ];
    for args in cases {
        let out = loadtest(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} said nothing");
    }
}

#[test]
fn too_many_connections_are_refused_before_connecting() {
    let out = loadtest(&[
        "--target",
        "ws://127.0.0.1:1/ws",
        "-n",
        "100000000",
        "-d",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("file descriptors") || stderr.contains("local ports"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("connect refused"),
        "it tried to connect: {stderr}"
    );
}

#[test]
fn connection_failures_are_reported() {
    // Port 1 on loopback: nothing listens there.
    let out = loadtest(&["--target", "ws://127.0.0.1:1/ws", "-n", "2", "-d", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("connect refused"), "{stderr}");
}
