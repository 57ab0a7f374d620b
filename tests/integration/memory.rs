//! Bounded memory: a full delta several times larger than a memory budget is applied (and a
//! dense change of the replica synced and rolled back) by processes whose peak anonymous memory
//! stays under that budget.

use std::path::Path;
use std::process::{Command, Stdio};

use apollo_checkpoint::synthetic::{self, Change};

use crate::util::{deltas_in, s, stderr};

/// Peak anonymous memory allowed (bytes): well under the data each command handles.
const BUDGET: u64 = 192 << 20;
/// Model bytes: four times the budget.
const MODEL: u64 = 4 * BUDGET;

/// Runs the binary with `args`; returns its peak anonymous RSS (sampled from /proc).
fn peak_rss(args: &[&str]) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_apollo-checkpoint"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(text) = std::fs::read_to_string(&status) {
            for line in text.lines().filter(|l| l.starts_with("RssAnon:")) {
                let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                peak = peak.max(kb << 10);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    peak
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn a_delta_four_times_the_memory_budget_applies_within_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, replica, outbox) = (
        tmp.path().join("model"),
        tmp.path().join("replica"),
        tmp.path().join("outbox"),
    );
    let tensors = synthetic::qwen35_of_size(MODEL);
    synthetic::write_model(&model, &tensors, 64 << 20, 1).unwrap();
    let m = s(&model);
    assert!(
        Command::new(env!("CARGO_BIN_EXE_apollo-checkpoint"))
            .args(["init", "--model-dir", m])
            .output()
            .unwrap()
            .status
            .success()
    );
    let export = peak_rss(&[
        "export-delta",
        "--model-dir",
        m,
        "--out",
        s(&outbox),
        "--full",
    ]);
    let delta = deltas_in(&outbox).pop().unwrap();
    let delta_bytes = std::fs::metadata(&delta).unwrap().len();
    assert!(delta_bytes > 3 * BUDGET, "the delta is {delta_bytes} bytes");
    let apply = peak_rss(&["apply-delta", "--replica-dir", s(&replica), s(&delta)]);
    assert!(size_of(&replica) >= MODEL * 9 / 10);
    // A dense change of the replica (every block), synced, then rolled back.
    let live = tmp.path().join("live");
    synthetic::write_model(&live, &tensors, 64 << 20, 1).unwrap();
    synthetic::mutate(&live, Change::Dense { fraction: 0.01 }, 2).unwrap();
    let sync = peak_rss(&["sync", "--model-dir", s(&replica), "--from", s(&live)]);
    let rollback = peak_rss(&["rollback", "--model-dir", s(&replica)]);
    for (what, peak) in [
        ("export", export),
        ("apply", apply),
        ("sync", sync),
        ("rollback", rollback),
    ] {
        eprintln!("{what}: peak anonymous RSS {} MiB", peak >> 20);
        assert!(
            peak < BUDGET,
            "{what} peaked at {} MiB (budget {} MiB)",
            peak >> 20,
            BUDGET >> 20
        );
    }
}
