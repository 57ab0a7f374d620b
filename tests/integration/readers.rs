//! Readers never fail because of other readers or a writer; odd arguments and closed pipes do
//! not panic.

use std::process::{Command, Stdio};
use std::time::Duration;

use apollo_checkpoint::lock::{LockKind, StateLock};
use safetensors::Dtype;

use apollo_checkpoint::synthetic::Rng;

use crate::util::{T, pair, release_after, run, s, stderr, stdout_json, sync_from, write_model};

const BIN: &str = env!("CARGO_BIN_EXE_apollo-checkpoint");

/// A few MiB in a handful of tensors: a sync of every block takes long enough for readers to
/// meet it.
fn tensors(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    (0..6)
        .map(|i| {
            T::random(
                &format!("model.layers.{i}.w"),
                Dtype::BF16,
                &[512, 1024],
                &mut rng,
            )
        })
        .collect()
}

#[test]
fn status_during_a_write_names_the_writer_and_verify_waits_for_it() {
    let p = pair(&tensors(1), 2, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    let state = p.model.join(".apollo-checkpoint");
    let held = StateLock::acquire(&state, LockKind::Exclusive, Duration::ZERO).unwrap();
    let o = run(&["status", "--model-dir", m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    let writer = j["writer"].as_str().unwrap();
    assert!(
        writer.contains(&format!("pid {}", std::process::id())),
        "{j}"
    );
    assert!(
        j["pending"][0].as_str().unwrap().contains("in progress"),
        "{j}"
    );
    assert_eq!(j["generation"], 0);
    // A reader that needs the files as the index says waits for the writer (not with --wait 0).
    assert_eq!(
        run(&["verify", "--model-dir", m, "--wait", "0"])
            .status
            .code(),
        Some(75)
    );
    let release = release_after(held, 300);
    let o = run(&["verify", "--model-dir", m]);
    assert!(o.status.success(), "{}", stderr(&o));
    release.join().unwrap();
}

#[test]
fn fifty_readers_during_syncs_all_succeed() {
    let a = tensors(2);
    let mut b = a.clone();
    for t in &mut b {
        for k in (0..t.data.len()).step_by(4096) {
            t.data[k] ^= 0x5a; // every block
        }
    }
    let p = pair(&a, 2, 1);
    let live_b = p.tmp.path().join("live-b");
    write_model(&live_b, &b, 1);
    let m = s(&p.model).to_string();
    assert!(run(&["init", "--model-dir", &m]).status.success());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (m, stop) = (m.clone(), stop.clone());
        let sources = [s(&live_b).to_string(), s(&p.source).to_string()];
        std::thread::spawn(move || {
            let mut syncs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || syncs < 2 {
                let from = &sources[syncs % 2];
                let o = run(&["sync", "--model-dir", &m, "--from", from, "--wait", "60"]);
                assert!(o.status.success(), "sync: {}", stderr(&o));
                syncs += 1;
            }
            syncs
        })
    };
    let readers: Vec<_> = (0..50)
        .map(|i| {
            let cmd = if i % 2 == 0 { "status" } else { "verify" };
            let child = Command::new(BIN)
                .args([cmd, "--model-dir", &m, "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (cmd, child)
        })
        .collect();
    for (cmd, child) in readers {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
        let j = stdout_json(&o);
        if cmd == "verify" {
            assert_eq!(j["clean"], true, "{j}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() >= 2);
}

#[test]
fn wait_takes_seconds_or_inf_and_refuses_the_rest() {
    let p = pair(&tensors(3), 1, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    for ok in ["0", "2.5", "inf"] {
        let o = run(&["status", "--model-dir", m, "--wait", ok]);
        assert!(o.status.success(), "--wait {ok}: {}", stderr(&o));
    }
    for bad in ["-1", "NaN", "soon"] {
        let o = run(&["status", "--model-dir", m, &format!("--wait={bad}")]);
        assert_eq!(o.status.code(), Some(2), "--wait {bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("not a wait"), "{}", stderr(&o));
    }
    // An infinite wait for a free lock is no wait at all (it used to panic on the deadline).
    let o = sync_from(&p.model, &p.source, &["--wait", "inf"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let p = pair(&tensors(4), 1, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    for args in [
        vec!["status", "--model-dir", m],
        vec!["status", "--model-dir", m, "--json"],
    ] {
        let mut child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader went away (`| head -0`)
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {:?} {}",
            o.status,
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

#[cfg(unix)]
#[test]
fn paths_that_are_not_utf8_work() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(OsStr::from_bytes(b"model-\xff\xfe"));
    let live = tmp.path().join(OsStr::from_bytes(b"live-\xff"));
    let t = tensors(5);
    write_model(&model, &t, 1);
    write_model(&live, &t, 1);
    for args in [
        vec![
            OsStr::new("init"),
            OsStr::new("--model-dir"),
            model.as_os_str(),
        ],
        vec![
            OsStr::new("sync"),
            OsStr::new("--model-dir"),
            model.as_os_str(),
            OsStr::new("--from"),
            live.as_os_str(),
        ],
        vec![
            OsStr::new("status"),
            OsStr::new("--model-dir"),
            model.as_os_str(),
        ],
        vec![
            OsStr::new("verify"),
            OsStr::new("--model-dir"),
            model.as_os_str(),
        ],
    ] {
        let o = Command::new(BIN).args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
}
