//! `sync --every`: a resident process syncing when asked (SIGUSR1), carrying on after a
//! temporary failure, stopping cleanly on SIGTERM and at once on any other failure.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use apollo_checkpoint::lock::{LockKind, StateLock};

use crate::util::*;

/// The resident process and its JSON lines.
struct Resident {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Resident {
    fn start(p: &Pair, extra: &[&str]) -> Resident {
        let mut child = Command::new(env!("CARGO_BIN_EXE_apollo-checkpoint"))
            .args(["sync", "--model-dir", s(&p.model), "--from", s(&p.source)])
            .args(["--every", "1h", "--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap());
        Resident { child, lines }
    }

    /// The JSON object of the next sync.
    fn next(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        assert_output_schema(&v);
        v
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// Waits for the process to end: (exit code, stderr).
    fn end(mut self) -> (Option<i32>, String) {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.lines, &mut rest).unwrap();
        assert!(
            rest.trim().is_empty(),
            "more output after the last sync: {rest}"
        );
        let out = self.child.wait_with_output().unwrap();
        (out.status.code(), stderr(&out))
    }
}

#[test]
fn a_resident_sync_syncs_when_asked_survives_a_busy_lock_and_stops_on_sigterm() {
    let mut tensors = mixed_tensors(71);
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let metrics = p.tmp.path().join("sync.prom");
    let mut r = Resident::start(&p, &["--metrics-file", s(&metrics)]);

    // The first sync runs at once.
    let first = r.next();
    assert_eq!(first["changed"], false, "{first}");
    assert_eq!(first["generation"], 0);

    // A change, then SIGUSR1: synced at once (not in an hour).
    tensors[0].data[100] ^= 0x40;
    tensors[8].data[70_000] ^= 1;
    write_model(&p.source, &tensors, 1);
    r.signal("USR1");
    let second = r.next();
    assert_eq!(second["generation"], 1, "{second}");
    assert_eq!(second["blocks_changed"], 2);
    assert_same_tensors(&p.model, &p.source);
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("apollo_checkpoint_generation 1"),
        "metrics after each sync: {prom}"
    );

    // Another writer holds the lock: that sync fails with 75 and the process carries on.
    let state = p.model.join(".apollo-checkpoint");
    let lock = StateLock::acquire(&state, LockKind::Exclusive, std::time::Duration::ZERO).unwrap();
    tensors[2].data[7] ^= 2;
    write_model(&p.source, &tensors, 1);
    r.signal("USR1");
    let busy = r.next();
    assert_eq!(busy["exit_code"], 75, "{busy}");
    assert_eq!(busy["kind"], "busy");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("apollo_checkpoint_last_run_exit_code{command=\"sync\"} 75"),
        "{prom}"
    );
    drop(lock);
    r.signal("USR1");
    let third = r.next();
    assert_eq!(third["generation"], 2, "{third}");
    assert_eq!(third["blocks_changed"], 1);
    assert_same_tensors(&p.model, &p.source);

    // SIGTERM: a clean stop, exit 0, the model as the last sync left it.
    r.signal("TERM");
    let (code, err) = r.end();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopped by a signal"), "{err}");
    assert!(
        err.contains("locked by"),
        "the busy sync is reported: {err}"
    );
    let out = run(&["verify", "--model-dir", s(&p.model)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_resident_sync_ends_with_the_exit_code_of_a_failure_that_is_not_temporary() {
    let tensors = mixed_tensors(72);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    // The model file cut short behind the index's back: bad data (65), not worth retrying.
    let file = p.model.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let metrics = p.tmp.path().join("sync.prom");
    let mut r = Resident::start(&p, &["--metrics-file", s(&metrics)]);
    let failed = r.next();
    assert_eq!(failed["exit_code"], 65, "{failed}");
    let (code, err) = r.end();
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("apollo_checkpoint_last_run_exit_code{command=\"sync\"} 65"),
        "{prom}"
    );
}

#[test]
fn every_needs_an_interval_of_at_least_a_second() {
    let p = pair(&mixed_tensors(73), 1, 1);
    for bad in ["0", "0.5", "soon", "-3"] {
        let out = sync_from(&p.model, &p.source, &[&format!("--every={bad}")]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--every {bad}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("interval"), "{}", stderr(&out));
    }
}
