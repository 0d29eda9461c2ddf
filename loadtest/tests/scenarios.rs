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

/// Runs the loadtest binary, one run at a time in this test binary: each run measures a hub
/// (embedded, or one the test started) and judges what it measured, so two runs sharing the
/// machine's two cores would judge each other's load. (CI saw `sweep_losses_past_the_knee_
/// do_not_fail` find its clients keeping up, so nothing dropped, while another run took a core.)
fn loadtest(args: &[&str]) -> Output {
    static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--no-progress")
        .output()
        .expect("the loadtest binary runs")
}

/// The exit statuses `loadtest --help` documents.
const EXIT_CLEAN: i32 = 0;
const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_LOST: i32 = 3;

/// Runs loadtest with `--json`, expects a clean run (exit status 0), returns the parsed report.
fn run_json(args: &[&str]) -> Value {
    let (out, v) = run_json_status(args);
    assert_eq!(
        out.status.code(),
        Some(EXIT_CLEAN),
        "{}",
        describe(args, &out)
    );
    assert_eq!(v["verdict"]["exit_code"], EXIT_CLEAN);
    v
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "loadtest {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs loadtest with `--json` whatever its exit status, returns it and the parsed report.
fn run_json_status(args: &[&str]) -> (Output, Value) {
    let path = temp("json");
    let p = path.to_string_lossy().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", &p]);
    let out = loadtest(&all);
    let Ok(text) = std::fs::read_to_string(&path) else {
        panic!("no JSON report: {}", describe(args, &out));
    };
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
        "verdict",
    ] {
        assert!(v.get(key).is_some(), "no {key} in the report");
    }
    assert!(v["git_revision"].is_string() && v["cpu_model"].is_string());
    // The JSON's verdict is what the process exited with.
    assert_eq!(
        out.status.code().map(i64::from),
        v["verdict"]["exit_code"].as_i64(),
        "{}",
        describe(args, &out)
    );
    (out, v)
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

/// `--tls`: the embedded hub serves wss:// and every connection is TLS; the report adds up
/// as over plain TCP.
#[test]
fn fanout_over_tls_adds_up() {
    let v = run_json(&["fanout", "--tls", "-n", "20", "-w", "4", "-d", "1.5"]);
    let url = v["node_urls"][0].as_str().unwrap_or_default();
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let s = &v["steps"][0];
    check_step(s, 20);
    assert_eq!(u(&s["lost"]), 0);
    assert_eq!(u(&s["connections_held"]), 20);
    assert_eq!(u(&s["hub"]["published"]), u(&s["published"]));
}

#[test]
fn a_clean_run_exits_0() {
    let args = ["fanout", "-n", "5", "-r", "100", "-d", "1"];
    let (out, v) = run_json_status(&args);
    assert_eq!(
        out.status.code(),
        Some(EXIT_CLEAN),
        "{}",
        describe(&args, &out)
    );
    assert_eq!(u(&v["verdict"]["lost"]), 0);
    assert_eq!(u(&v["verdict"]["duplicated"]), 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("verdict: clean"), "{stdout}");
}

/// Measured subscribers that really lose messages: an embedded hub with 1 KiB outbound queues
/// that drops the oldest frames, and 20 kB messages to 50 subscribers with 4 KiB receive
/// buffers (`--rcvbuf`), so that no message can be written at once and the next ones find
/// its client behind. The report counts the losses, the hub's own counter shows it dropped
/// frames, and the exit status says so. (Without `--rcvbuf` the losses came only from a
/// generator slower than the hub, and a busy machine once made the hub the slower one: the
/// clients kept up and lost nothing.)
#[test]
fn measured_losses_exit_3() {
    let args = [
        "fanout",
        "-n",
        "50",
        "-r",
        "3000",
        "-p",
        "20000",
        "-d",
        "1",
        "--drain-ms",
        "300",
        "--rcvbuf",
        "4096",
        "--hub-queue-bytes",
        "1024",
        "--hub-slow-consumer",
        "drop-oldest",
    ];
    let (out, v) = run_json_status(&args);
    assert_eq!(
        out.status.code(),
        Some(EXIT_LOST),
        "{}",
        describe(&args, &out)
    );
    assert_eq!(v["config"]["hub_slow_consumer"], "drop-oldest");
    let s = &v["steps"][0];
    check_step(s, 50);
    let lost = u(&s["lost"]);
    assert!(lost > 0, "nothing lost: {}", describe(&args, &out));
    assert!(
        u(&s["hub"]["dropped"]) > 0,
        "the hub dropped nothing: {}",
        s["hub"]
    );
    // Drop-oldest keeps the clients: they lose messages without being told.
    assert_eq!(u(&s["hub"]["slow_consumer_disconnects"]), 0);
    assert_eq!(u(&s["connections_held"]), 50);
    assert_eq!(u(&v["verdict"]["lost"]), lost);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("verdict: measured subscribers lost"),
        "{stdout}"
    );
}

/// Fanout with --history: the same run on a history channel (frames with offset and epoch at
/// their end) adds up the same way.
#[test]
fn fanout_with_history_adds_up() {
    let v = run_json(&["fanout", "-n", "20", "-w", "4", "-d", "1", "--history"]);
    assert_eq!(v["config"]["history"], true);
    check_step(&v["steps"][0], 20);
}

/// A recover run's summary `s`: its subscribers reconnected, and all `subscribers` of them
/// ended with every offset they should have, once and in order.
fn assert_every_resume_complete(s: &Value, subscribers: u64) {
    assert!(u(&s["reconnects"]) > 0, "no reconnects: {s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["duplicated"]), 0, "{s}");
    assert_eq!(u(&s["out_of_order"]), 0, "{s}");
    assert_eq!(u(&s["complete_subscribers"]), subscribers, "{s}");
}

/// Recover, briefly: subscribers drop (reset and clean close) and resume with `since` while a
/// publisher streams; nothing lost or duplicated, and they did reconnect.
#[test]
fn recover_loses_nothing() {
    let v = run_json(&[
        "recover",
        "-n",
        "6",
        "-d",
        "1.5",
        "--drop-every",
        "150ms",
        "--rate",
        "500",
    ]);
    let s = &v["summary"];
    assert_eq!(u(&s["subscribers"]), 6);
    assert!(u(&s["published"]) > 0, "nothing published: {s}");
    assert_every_resume_complete(s, 6);
    assert_eq!(u(&s["not_recovered"]), 0, "{s}");
    let reconnects = u(&s["reconnects"]);
    assert!(u(&s["abrupt_drops"]) > 0 && u(&s["clean_drops"]) > 0, "{s}");
    assert_eq!(
        u(&s["abrupt_drops"]) + u(&s["clean_drops"]) + u(&s["server_closes"]),
        reconnects
    );
    assert!(u(&s["recovery"]["count"]) > 0, "no recovery timed: {s}");
    // Every subscriber got every publication at least once.
    assert!(u(&s["received"]) >= 6 * (u(&s["last_offset"]) - u(&s["first_offset"])));
}

/// Recover across two embedded nodes joined by Redis (whose history they share): every
/// resume is answered by the other node than the one the subscriber left, and nothing is
/// lost, duplicated or out of order.
#[test]
fn recover_across_two_nodes_loses_nothing() {
    let v = run_json(&[
        "recover",
        "--nodes",
        "2",
        "-n",
        "6",
        "-d",
        "1.5",
        "--drop-every",
        "150ms",
        "--rate",
        "500",
    ]);
    let s = &v["summary"];
    assert!(u(&s["published"]) > 0, "nothing published: {s}");
    assert_every_resume_complete(s, 6);
    assert_eq!(u(&s["not_recovered"]), 0, "{s}");
}

/// Recover across two nodes with the run's redis-server killed mid-run and started again,
/// empty: the channel moves to a new epoch, which every subscriber reaches (a resume answered
/// `recovered: false`, or live), and within each epoch nothing is lost, duplicated or out of
/// order; publications refused while Redis was away are counted apart, and the run is clean.
#[test]
fn recover_across_a_redis_restart_loses_nothing_within_each_epoch() {
    require_redis_server();
    let v = run_json(&[
        "recover",
        "--nodes",
        "2",
        "-n",
        "6",
        "-d",
        "2.5",
        "--drop-every",
        "150ms",
        "--rate",
        "500",
        "--restart-redis-at",
        "1",
        "--restart-redis-pause",
        "300ms",
    ]);
    let s = &v["summary"];
    assert_eq!(s["redis_restarts"].as_array().map(Vec::len), Some(1), "{s}");
    assert_every_resume_complete(s, 6);
    // Two epochs, the second with publications of its own from offset 1.
    let epochs = s["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 2, "{s}");
    assert_ne!(epochs[0]["epoch"], epochs[1]["epoch"]);
    assert_eq!(u(&epochs[1]["first"]), 1, "{s}");
    assert_eq!(u(&s["last_offset"]), u(&epochs[1]["last"]), "{s}");
    // Every subscriber moved to the new epoch once, no more.
    assert_eq!(u(&s["epoch_changes"]), 6, "{s}");
    assert_eq!(u(&s["unexpected_epoch_changes"]), 0, "{s}");
    // While Redis was away the publisher was told (`history unavailable`), and it kept
    // publishing once Redis was back.
    assert!(u(&s["refused_while_away"]) > 0, "{s}");
    assert!(u(&epochs[1]["last"]) >= 50, "{s}");
}

/// Recover with a history too short for the drops: the resumes are answered
/// `recovered: false`, the offsets they miss are counted lost, and the exit status says so.
#[test]
fn recover_counts_what_a_short_history_loses() {
    let args = [
        "recover",
        "-n",
        "6",
        "-d",
        "1.5",
        "--drop-every",
        "100ms",
        "--rate",
        "3000",
        "--history-size",
        "5",
    ];
    let (out, v) = run_json_status(&args);
    assert_eq!(
        out.status.code(),
        Some(EXIT_LOST),
        "{}",
        describe(&args, &out)
    );
    let s = &v["summary"];
    assert!(u(&s["lost"]) > 0 && u(&s["not_recovered"]) > 0, "{s}");
    assert_eq!(u(&v["verdict"]["lost"]), u(&s["lost"]));
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

/// The clients that never read are cut or dropped from once their queue passes 64 KiB: with
/// the hub's default 16 MiB, the generator had to publish some 1,400 messages a second for
/// the 3 s step to get there, which a busy machine's debug build might not.
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
        "--hub-queue-bytes",
        "65536",
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

/// The capacity scenario at small scale: every broadcast reaches every connection, and each
/// one's last-receiver time is reported, with the connect time and the memory per connection.
#[test]
fn capacity_times_every_broadcast_to_its_last_receiver() {
    let v = run_json(&["capacity", "-n", "200", "--broadcasts", "3", "-d", "0.5"]);
    let sum = &v["summary"];
    assert_eq!(u(&sum["connections"]), 200, "{sum}");
    assert!(
        sum["connect_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{sum}"
    );
    assert!(sum["bytes_per_connection"].as_f64().is_some(), "{sum}");
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "a hold and the broadcasts");
    assert_eq!(steps[0]["load"]["mode"], "idle");
    assert_eq!(u(&steps[0]["connections_held"]), 200);
    let s = &steps[1];
    assert_eq!(s["load"]["mode"], "broadcasts");
    check_step(s, 200);
    // Every broadcast reached every connection: 3 publishes, 600 deliveries, nothing lost.
    assert_eq!(u(&s["published"]), 3, "{s}");
    assert_eq!(u(&s["delivered"]), 600);
    assert_eq!(u(&s["lost"]), 0);
    let b = &sum["broadcasts"];
    assert_eq!(u(&b["asked"]), 3, "{b}");
    assert_eq!(u(&b["received_by_all"]), 3, "{b}");
    let last: Vec<f64> = b["last_receiver_us"]
        .as_array()
        .expect("one time per broadcast")
        .iter()
        .map(|t| t.as_f64().expect("microseconds"))
        .collect();
    assert_eq!(last.len(), 3, "{b}");
    assert!(last.windows(2).all(|w| w[0] <= w[1]), "fastest first: {b}");
    // Each is its broadcast's slowest delivery, so no delivery was slower than the largest,
    // and it is at least the median delivery (the histogram's resolution aside).
    let f = |k: &str| b[k].as_f64().expect("a percentile");
    assert!(f("p50_us") > 0.0 && f("p50_us") <= f("p99_us") && f("p99_us") <= f("max_us"));
    assert_eq!(f("max_us"), last[2]);
    let lat = &s["latency"];
    assert!(
        lat["max_us"].as_f64().expect("max") <= f("max_us") * 1.001 + 1.0,
        "{lat} {b}"
    );
    assert!(
        f("max_us") * 1.001 + 1.0 >= lat["p50_us"].as_f64().expect("p50"),
        "{lat} {b}"
    );
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

/// The step past the knee loses messages on purpose (the same bursts as
/// measured_losses_exit_3); the knee's own step is clean, so the run is.
/// The knee's step sends a 20 kB message every 500 ms through 4 kB receive
/// windows: on a busy machine its p99 reached 58 ms over a 50 ms bound. The
/// bound here is 1 s, so the step is judged by its losses: a client 500 ms
/// behind would already have lost a message to drop-oldest.
#[test]
fn sweep_losses_past_the_knee_do_not_fail() {
    let (out, v) = run_json_status(&[
        "sweep",
        "--sweep-subs",
        "50",
        "--sweep-rates",
        "2,3000",
        "--p99-ms",
        "1000",
        "-p",
        "20000",
        "--step-seconds",
        "1",
        "--drain-ms",
        "300",
        "--rcvbuf",
        "4096",
        "--hub-queue-bytes",
        "1024",
        "--hub-slow-consumer",
        "drop-oldest",
    ]);
    let points = v["summary"]["points"].as_array().expect("points");
    assert_eq!(points.len(), 2, "{}", v["summary"]);
    assert_eq!(
        points[0]["ok"], true,
        "the first step is not the knee: {}",
        v["summary"]
    );
    assert!(
        u(&points[1]["lost"]) > 0,
        "nothing lost past the knee: {}",
        v["summary"]
    );
    assert_eq!(out.status.code(), Some(EXIT_CLEAN), "{}", v["verdict"]);
    assert_eq!(
        v["verdict"]["uncounted_steps"].as_array().map(Vec::len),
        Some(1)
    );
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
        &["--nodes", "3"],
        &["--nodes", "2", "ramp"],
        &["--hub-queue-bytes", "10"],
        &["--redis-url", "redis://127.0.0.1:1/"],
        &[
            "--target",
            "ws://127.0.0.1:1/ws",
            "--hub-queue-bytes",
            "100000",
        ],
        &["--hub-slow-consumer", "sometimes"],
        &["--drop-every", "0ms", "recover"],
        &["--target", "ws://127.0.0.1:1/ws", "--history"],
        &[
            "--target",
            "ws://127.0.0.1:1/ws",
            "--hub-slow-consumer",
            "drop-oldest",
        ],
    ];
    for args in cases {
        let out = loadtest(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{args:?}: {stderr}");
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

/// More connections than the hard file descriptor limit allows: refused before connecting,
/// with the limit named and the most that would fit.
#[test]
fn capacity_beyond_the_hard_fd_limit_is_refused() {
    let out = loadtest(&[
        "capacity",
        "--target",
        "ws://127.0.0.1:1/ws",
        "-n",
        "100000000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_FAILED), "{stderr}");
    assert!(stderr.contains("hard limit"), "{stderr}");
    assert!(stderr.contains("ask for at most"), "{stderr}");
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
    assert_eq!(out.status.code(), Some(EXIT_FAILED), "{stderr}");
    assert!(stderr.contains("connect refused"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Two nodes joined by Redis
// ---------------------------------------------------------------------------------------------

/// Fails the test unless `redis-server` can be run here. A test that skipped itself would pass
/// in CI without having run, hiding a broken two-node path; CI installs Redis
/// (.ci/install-redis.sh), and so must anyone running these tests.
fn require_redis_server() {
    match Command::new("redis-server").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`redis-server --version` failed ({}): the two-node tests need a working redis-server \
             (install it with .ci/install-redis.sh)",
            o.status
        ),
        Err(e) => panic!(
            "redis-server cannot be run ({e}): the two-node tests need it on the PATH \
             (install it with .ci/install-redis.sh)"
        ),
    }
}

/// The loadtest's own `redis-server` starter (`src/redis_server.rs`), for the tests that give
/// the loadtest a Redis of their own: free port, retried if taken, ready once it answers PING.
#[path = "../src/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;
use redis_server::RedisServer;

/// A `redis-server` of the test's own on a free loopback port, killed when dropped.
fn start_redis_server() -> RedisServer {
    RedisServer::start().unwrap_or_else(|why| panic!("{why}"))
}

/// The checks of a two-node step: each node's subscribers got everything, and what crossed
/// Redis is what node A published.
fn check_two_nodes(s: &Value, subscribers: u64, embedded: bool) {
    check_step(s, subscribers);
    let published = u(&s["published"]);
    assert_eq!(u(&s["lost"]), 0, "lost across nodes: {s}");
    assert_eq!(u(&s["delivered"]), published * subscribers);
    let nodes = s["nodes"].as_array().expect("a report per node");
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["role"], "local");
    assert_eq!(nodes[1]["role"], "cross-node");
    let mut delivered = 0;
    for n in nodes {
        let subs = u(&n["subscribers"]);
        assert_eq!(subs, subscribers / 2, "subscribers not split evenly: {n}");
        assert_eq!(u(&n["lost"]), 0, "{n}");
        assert_eq!(u(&n["duplicated"]), 0, "{n}");
        assert_eq!(u(&n["delivered"]), published * subs, "{n}");
        assert_eq!(u(&n["expected_deliveries"]), published * subs);
        assert_eq!(u(&n["latency"]["count"]), u(&n["delivered"]));
        assert!(n["latency"]["p99_us"].as_f64().expect("p99") > 0.0);
        assert!(n["delivered_per_s"].as_f64().expect("rate") > 0.0);
        delivered += u(&n["delivered"]);
    }
    assert_eq!(delivered, u(&s["delivered"]));
    if embedded {
        let (a, b) = (&nodes[0]["hub"]["broker"], &nodes[1]["hub"]["broker"]);
        // Every publish of the step went to Redis once, and reached node B once.
        assert_eq!(u(&a["sent"]), published, "node A's broker: {a}");
        assert_eq!(u(&b["received"]), published, "node B's broker: {b}");
        assert_eq!(u(&a["send_dropped"]) + u(&b["send_dropped"]), 0);
        assert_eq!(u(&s["hub"]["published"]), published);
    }
}

#[test]
fn two_embedded_nodes_lose_nothing_across_redis() {
    require_redis_server();
    // loadtest starts and stops a redis-server of its own.
    let v = run_json(&[
        "fanout",
        "--nodes",
        "2",
        "-n",
        "20",
        "-w",
        "4",
        "-d",
        "3",
        "--interval-ms",
        "500",
    ]);
    assert_eq!(v["mode"], "embedded");
    assert_eq!(u(&v["nodes"]), 2);
    check_two_nodes(&v["steps"][0], 20, true);
    let nodes = v["summary"]["nodes"]
        .as_array()
        .expect("the summary per node");
    assert_eq!(nodes.len(), 2);
    assert!(nodes[1]["latency_p99_us"].as_f64().expect("p99") > 0.0);
}

#[test]
fn two_embedded_nodes_on_a_given_redis_open_loop() {
    require_redis_server();
    let redis = start_redis_server();
    let v = run_json(&[
        "fanout",
        "--nodes",
        "2",
        "--redis-url",
        &redis.url(),
        "-n",
        "10",
        "-r",
        "300",
        "-d",
        "2",
    ]);
    check_two_nodes(&v["steps"][0], 10, true);
}

/// Two hubs of the test's own, joined by Redis, driven with --target twice.
#[test]
fn two_targets_lose_nothing_across_redis() {
    require_redis_server();
    let redis = start_redis_server();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut stops = Vec::new();
    let mut urls = Vec::new();
    for id in ["test-a", "test-b"] {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let broker = wshub::RedisBroker::new(wshub::RedisConfig::new(redis.url()).node_id(id))
            .expect("broker");
        let config = wshub::HubConfig::builder()
            .publish_policy(wshub::PublishPolicy::AllowAll)
            .broker(broker)
            .build()
            .expect("config");
        let addr = rt.block_on(async {
            let hub = wshub::Hub::with_config(config);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            // Serving starts the hub, and with it the broker's connection.
            tokio::spawn(wshub::serve(listener, hub.clone(), async move {
                let _ = rx.await;
            }));
            // Bounded: 400 x 50 ms.
            let mut connected = false;
            for _ in 0..400 {
                connected = hub.stats().broker.is_some_and(|b| b.connected);
                if connected {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert!(
                connected,
                "hub {id}'s broker did not connect to Redis within 20 s"
            );
            addr
        });
        stops.push(tx);
        urls.push(format!("ws://{addr}/ws"));
    }
    let v = run_json(&[
        "fanout", "--target", &urls[0], "--target", &urls[1], "-n", "10", "-w", "2", "-d", "2",
    ]);
    assert_eq!(v["mode"], "target");
    assert_eq!(u(&v["nodes"]), 2);
    let s = &v["steps"][0];
    check_two_nodes(s, 10, false);
    assert_eq!(s["nodes"][1]["url"], urls[1].as_str());
    for tx in stops {
        let _ = tx.send(());
    }
}

#[test]
fn unreachable_redis_fails_clearly() {
    // Port 1 on loopback: nothing listens there.
    let out = loadtest(&[
        "--nodes",
        "2",
        "--redis-url",
        "redis://127.0.0.1:1/",
        "-n",
        "2",
        "-d",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("could not connect"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn hub_queue_bytes_reaches_the_hub() {
    // The same load as slow_clients_are_counted, for 1.5 s with the slow clients: a queue
    // larger than all it publishes keeps them, a 1 KiB one closes them as slow consumers.
    let run = |bytes: &str| {
        run_json(&[
            "slow",
            "-n",
            "8",
            "--slow-share",
            "0.25",
            "-d",
            "3",
            "-p",
            "4000",
            "--hub-queue-bytes",
            bytes,
        ])
    };
    let big = run("268435456");
    assert_eq!(u(&big["config"]["hub_queue_bytes"]), 256 << 20);
    let hub = &big["steps"][1]["hub"];
    assert!(
        u(&big["steps"][1]["published"]) * 4000 < 256 << 20,
        "published more than the queue holds"
    );
    assert_eq!(u(&hub["slow_consumer_disconnects"]), 0, "{hub}");
    assert_eq!(u(&hub["dropped"]), 0, "{hub}");
    let small = run("1024");
    let hub = &small["steps"][1]["hub"];
    assert!(
        u(&hub["slow_consumer_disconnects"]) + u(&hub["dropped"]) > 0,
        "a 1 KiB queue kept the slow clients: {hub}"
    );
}
