//! Compute thread settings, from the command line and the environment to
//! `/metrics` and the log, on the real binary and the real default model.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

fn generate(srv: &Server) {
    let body = json!({ "model": "m", "max_tokens": 16, "ignore_eos": true,
                       "messages": [{ "role": "user", "content": "Count to ten." }] });
    let r = srv.post("/v1/chat/completions", &[], &body.to_string());
    assert_eq!(r.status, 200, "{r:?}");
}

fn cores() -> f64 {
    std::thread::available_parallelism().unwrap().get() as f64
}

#[test]
fn fixed_thread_counts_from_flags_and_environment_reach_metrics() {
    // Decode threads from the environment, prefill threads from a flag.
    let srv = Server::start(
        &["--threads-batch", "2", "--poll", "10"],
        &[("HEARTH_THREADS", "1")],
    );
    let before = srv.get("/metrics", &[]).body;
    assert_eq!(gauge(&before, "hearth_engine_decode_threads"), 1.0);
    assert_eq!(gauge(&before, "hearth_engine_batch_threads"), 2.0);
    assert_eq!(gauge(&before, "hearth_engine_decode_step_seconds"), 0.0);
    generate(&srv);
    let after = srv.get("/metrics", &[]).body;
    assert_eq!(gauge(&after, "hearth_engine_decode_threads"), 1.0);
    assert_eq!(gauge(&after, "hearth_engine_batch_threads"), 2.0);
    let step = gauge(&after, "hearth_engine_decode_step_seconds");
    assert!(step > 0.0 && step < 5.0, "decode step {step} s");
    let log = srv.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("compute threads"))
        .unwrap_or_else(|| panic!("no compute threads line:\n{log}"));
    assert!(
        line.contains("threads=1") && line.contains("threads_batch=2") && line.contains("poll=10"),
        "{line}"
    );

    // Flags win over the environment.
    let srv = Server::start(&["--threads", "2"], &[("HEARTH_THREADS", "1")]);
    generate(&srv);
    let m = srv.get("/metrics", &[]).body;
    assert_eq!(gauge(&m, "hearth_engine_decode_threads"), 2.0);
}

#[test]
fn default_threads_follow_the_machine() {
    let srv = Server::start(&[], &[]);
    generate(&srv);
    let m = srv.get("/metrics", &[]).body;
    let decode = gauge(&m, "hearth_engine_decode_threads");
    assert!(
        decode >= 1.0 && decode <= cores(),
        "decode threads {decode}"
    );
    let batch = gauge(&m, "hearth_engine_batch_threads");
    assert!(batch >= 1.0 && batch <= cores(), "batch threads {batch}");
    let others = gauge(&m, "hearth_machine_other_busy_cores");
    assert!(others >= 0.0, "{others}");
    assert!(gauge(&m, "hearth_engine_decode_step_seconds") > 0.0);
    let log = srv.log_text();
    assert!(
        log.contains("threads=from the machine's load") && log.contains("poll=0"),
        "{log}"
    );
}

#[test]
fn bad_thread_settings_are_refused_at_start() {
    for (args, env, needle) in [
        (vec!["--poll", "101"], vec![], "--poll"),
        (vec!["--threads=-1"], vec![], "--threads"),
        (
            vec![],
            vec![("HEARTH_THREADS_BATCH", "many")],
            "--threads-batch",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .arg("serve")
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(needle), "{args:?} {env:?}: {err}");
    }
}
