//! The built binary: output, JSON, exit codes.

use crate::util::{
    mixed_tensors, pair, release_after, run, s, snapshot, stderr, stdout_json, sync_from,
    write_model,
};
use std::path::Path;

#[test]
fn help_lists_every_command() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in ["init", "sync", "status", "verify"] {
        assert!(text.contains(cmd), "{cmd} missing from --help:\n{text}");
    }
    let o = run(&["sync", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--from"));
    let o = run(&["sync", "--model-dir", "x"]);
    assert_eq!(o.status.code(), Some(2), "missing --from is a usage error");
}

#[test]
fn init_sync_status_verify_round_trip_with_json() {
    let mut tensors = mixed_tensors(3);
    let p = pair(&tensors, 2, 1);
    let (m, src) = (s(&p.model), s(&p.source));

    let o = run(&["init", "--model-dir", m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    assert_eq!(j["generation"], 0);
    assert_eq!(j["tensors"], 9);
    assert_eq!(j["block_size"], 4096);

    let o = run(&["init", "--model-dir", m]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("already initialized"), "{}", stderr(&o));

    tensors[0].data[100] ^= 1;
    write_model(&p.source, &tensors, 1);
    let o = run(&["sync", "--model-dir", m, "--from", src, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    for key in [
        "generation",
        "tensors",
        "bytes_compared",
        "blocks_changed",
        "bytes_changed",
        "seconds",
    ] {
        assert!(j.get(key).is_some(), "{key} missing from {j}");
    }
    assert_eq!(
        (
            j["generation"].as_u64(),
            j["blocks_changed"].as_u64(),
            j["bytes_changed"].as_u64()
        ),
        (Some(1), Some(1), Some(4096))
    );
    assert!(
        o.stderr.is_empty(),
        "--json prints nothing else: {}",
        stderr(&o)
    );

    let o = run(&["sync", "--model-dir", m, "--from", src]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("no change"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());

    let o = run(&["status", "--model-dir", m, "--json"]);
    let j = stdout_json(&o);
    assert_eq!(j["generation"], 1);
    assert_eq!(j["files"].as_array().unwrap().len(), 2);
    assert_eq!(j["last_sync"]["blocks_changed"], 0);
    assert!(j["pending"].as_array().unwrap().is_empty());
    let o = run(&["status", "--model-dir", m]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("generation:  1 (sync") && text.contains("pending:     nothing"),
        "{text}"
    );

    // For monitoring: a file changed behind the index (a sync would refuse) or an interrupted
    // write makes status exit 78, saying why on stderr (and in `attention` with --json).
    let shard = std::fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes).unwrap();
    let o = run(&["status", "--model-dir", m, "--json"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let j = stdout_json(&o);
    let attention = j["attention"].as_array().unwrap();
    assert!(
        attention.len() == 1 && attention[0].as_str().unwrap().contains("sync will refuse"),
        "{j}"
    );
    assert!(stderr(&o).contains("verify --repair"), "{}", stderr(&o));
    let o = run(&["verify", "--model-dir", m, "--repair"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["status", "--model-dir", m]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(Path::new(m).join(".apollo-checkpoint/journal"), b"APJRNL01").unwrap();
    let o = run(&["status", "--model-dir", m]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted write"), "{}", stderr(&o));
    std::fs::remove_file(Path::new(m).join(".apollo-checkpoint/journal")).unwrap();

    let o = run(&["verify", "--model-dir", m, "--json"]);
    assert!(o.status.success());
    assert_eq!(stdout_json(&o)["clean"], true);
}

#[test]
fn sync_without_an_index_indexes_first_and_says_so() {
    let mut tensors = mixed_tensors(8);
    let p = pair(&tensors, 1, 3);
    tensors[1].data[0] ^= 1;
    write_model(&p.source, &tensors, 3);
    let o = run(&["sync", "--model-dir", s(&p.model), "--from", s(&p.source)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("indexing it first") && err.contains("generation 1"),
        "{err}"
    );
    let o = run(&["verify", "--model-dir", s(&p.model)]);
    assert!(o.status.success());
}

#[test]
fn verify_exits_1_naming_tensor_and_block_and_repair_fixes_it() {
    let p = pair(&mixed_tensors(9), 1, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    let f = p.model.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1; // the last byte of the last tensor in the file
    bytes[last] ^= 1;
    std::fs::write(&f, &bytes).unwrap();
    let o = run(&["verify", "--model-dir", m]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("mismatch: model.safetensors tensor ") && err.contains(" block "),
        "{err}"
    );
    assert!(err.contains("verify --repair"), "{err}");

    let o = run(&["sync", "--model-dir", m, "--from", s(&p.source)]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("verify --repair"));

    let o = run(&["verify", "--model-dir", m, "--repair", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)["repaired"], true);
    let o = run(&["sync", "--model-dir", m, "--from", s(&p.source), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)["blocks_changed"], 1);
}

#[test]
fn exit_codes_and_messages_for_common_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    // status_on_a_directory_that_is_not_a_model_exits_66: it exited 0 saying "not initialized".
    for cmd in ["status", "verify"] {
        for dir in [tmp.path().to_path_buf(), tmp.path().join("nope")] {
            let o = run(&[cmd, "--model-dir", s(&dir)]);
            assert_eq!(o.status.code(), Some(66), "{cmd}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("no model.safetensors"),
                "{}",
                stderr(&o)
            );
        }
    }
    // A model without an index yet.
    let fresh = tmp.path().join("fresh");
    write_model(&fresh, &mixed_tensors(3), 1);
    let o = run(&["status", "--model-dir", s(&fresh)]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("not initialized: run `apollo-checkpoint init")
    );
    assert!(
        stderr(&o).contains("status: not initialized"),
        "{}",
        stderr(&o)
    );
    let o = run(&["verify", "--model-dir", s(&fresh)]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("no index yet"), "{}", stderr(&o));

    // A mistyped model directory: refused, and no state is created inside it.
    let nope = tmp.path().join("nope");
    for cmd in ["init", "recover", "rollback"] {
        let o = run(&[cmd, "--model-dir", s(&nope)]);
        assert_eq!(o.status.code(), Some(66), "{cmd}: {}", stderr(&o));
        assert!(!nope.exists(), "{cmd} created {}", nope.display());
    }
    // An existing directory that is not a model: init fails and leaves no state (not even the
    // lock file) behind.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = run(&["init", "--model-dir", s(&empty)]);
    assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
    assert!(!empty.join(".apollo-checkpoint").exists());

    let p = pair(&mixed_tensors(1), 1, 1);
    let mut other = mixed_tensors(1);
    other.pop();
    write_model(&p.source, &other, 1);
    let before = snapshot(&p.model);
    let o = run(&["sync", "--model-dir", s(&p.model), "--from", s(&p.source)]);
    assert_eq!(o.status.code(), Some(65));
    assert!(
        stderr(&o).contains("lm_head.weight: in the model but not in the source"),
        "{}",
        stderr(&o)
    );
    // The model files are untouched (sync indexed first, which writes only the state dir).
    let after = snapshot(&p.model);
    assert_eq!(before, after);

    let o = run(&[
        "init",
        "--model-dir",
        s(&p.model),
        "--block-size",
        "1000",
        "--state-dir",
        s(&tmp.path().join("st")),
    ]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("power of two"));
}

#[test]
fn a_separate_state_dir_is_honoured() {
    let p = pair(&mixed_tensors(2), 1, 1);
    let state = p.tmp.path().join("state");
    let o = run(&["init", "--model-dir", s(&p.model), "--state-dir", s(&state)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(state.join("index.db").exists());
    assert!(!p.model.join(".apollo-checkpoint").exists());
    let o = run(&[
        "status",
        "--model-dir",
        s(&p.model),
        "--state-dir",
        s(&state),
        "--json",
    ]);
    assert_eq!(stdout_json(&o)["generation"], 0);
}

/// The commands error messages tell the user to run name the state directory too when it is
/// not the default (they dropped it, so running them as told found no index), quoted for the
/// shell when the path needs it.
#[test]
fn fix_it_messages_keep_the_state_dir() {
    let p = pair(&mixed_tensors(2), 1, 1);
    let state = p.tmp.path().join("my state");
    let (m, st) = (s(&p.model), s(&state));
    assert!(
        run(&["init", "--model-dir", m, "--state-dir", st])
            .status
            .success()
    );
    // A file changed behind the index.
    let f = p.model.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f, &bytes).unwrap();
    let want = format!("verify --repair --model-dir {m} --state-dir '{st}'");
    let o = sync_from(&p.model, &p.source, &["--state-dir", st]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    let o = run(&["status", "--model-dir", m, "--state-dir", st, "--json"]);
    assert!(
        stdout_json(&o)["pending"][0]
            .as_str()
            .unwrap()
            .contains(&want),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run(&["verify", "--model-dir", m, "--state-dir", st]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
}

#[test]
fn a_second_writer_fails_at_once_with_75_or_waits() {
    use apollo_checkpoint::lock::{LockKind, StateLock};
    let p = pair(&mixed_tensors(3), 1, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    let state = p.model.join(".apollo-checkpoint");
    let held = StateLock::acquire(&state, LockKind::Exclusive, std::time::Duration::ZERO).unwrap();
    let o = run(&["sync", "--model-dir", m, "--from", s(&p.source)]);
    assert_eq!(o.status.code(), Some(75));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("pid {}", std::process::id())) && err.contains("--wait"),
        "{err}"
    );
    // (Readers during a write: tests/integration/readers.rs.)
    // With --wait, the second writer runs once the first is done.
    let release = release_after(held, 300);
    let o = sync_from(&p.model, &p.source, &["--wait", "20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    release.join().unwrap();
}

#[test]
fn an_unwritable_state_dir_is_a_clear_error_and_the_model_is_untouched() {
    let p = pair(&mixed_tensors(4), 1, 1);
    let not_a_dir = p.tmp.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let before = snapshot(&p.model);
    let state = not_a_dir.join("state");
    let o = run(&[
        "sync",
        "--model-dir",
        s(&p.model),
        "--from",
        s(&p.source),
        "--state-dir",
        s(&state),
    ]);
    assert_eq!(o.status.code(), Some(74), "{}", stderr(&o));
    assert!(stderr(&o).contains("plain-file/state"), "{}", stderr(&o));
    assert_eq!(before, snapshot(&p.model));
}

/// status_json_phases: `status --json` reported every phase of the last changed sync as 0.0
/// (the stats were stored before the phases were filled in).
#[test]
fn status_json_shows_the_phases_of_the_last_sync() {
    let mut tensors = mixed_tensors(5);
    let p = pair(&tensors, 1, 1);
    let m = s(&p.model);
    for t in &mut tensors {
        if let Some(b) = t.data.first_mut() {
            *b ^= 1;
        }
    }
    write_model(&p.source, &tensors, 1);
    let o = run(&["sync", "--model-dir", m, "--from", s(&p.source), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let synced = stdout_json(&o);
    let o = run(&["status", "--model-dir", m, "--json"]);
    let last = &stdout_json(&o)["last_sync"];
    assert_eq!(last["generation"], synced["generation"]);
    for phase in ["check", "plan", "journal", "apply", "commit", "retire"] {
        let v = last["phases"][phase].as_f64().unwrap();
        assert!(v > 0.0, "phase {phase} is {v} in {last}");
    }
    assert!(last["at_ms"].as_i64().unwrap() > 0);
}

/// CLI conventions: options from the environment, sizes and durations with units, -q/-v,
/// completions and a man page generated from the same definitions as --help.
#[test]
fn environment_units_verbosity_completions_and_man_page() {
    let bin = env!("CARGO_BIN_EXE_apollo-checkpoint");
    let mut tensors = mixed_tensors(8);
    let p = pair(&tensors, 1, 1);
    let (m, src) = (s(&p.model), s(&p.source));
    let with_env = |args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(bin)
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let o = with_env(
        &["init", "--block-size", "4KiB", "--json"],
        &[("APOLLO_MODEL_DIR", m)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)["block_size"], 4096);
    let o = run(&["retention", "--model-dir", m, "--bytes", "20GiB", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)["bytes"], 20u64 << 30);
    for bad in [["--bytes", "20 parsecs"], ["--wait", "5 fortnights!"]] {
        let o = run(&["retention", "--model-dir", m, bad[0], bad[1]]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        assert!(stderr(&o).contains("is not a"), "{}", stderr(&o));
    }
    // A duration, from the environment.
    let o = with_env(&["status", "--model-dir", m], &[("APOLLO_WAIT", "1m 30s")]);
    assert!(o.status.success(), "{}", stderr(&o));

    // -q: no summary; -vv: the timings of each step; neither writes escape codes into a pipe.
    tensors[1].data[0] ^= 1;
    write_model(&p.source, &tensors, 1);
    let o = with_env(&["sync", "--model-dir", m, "--from", src, "-q"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "-q printed: {}", stderr(&o));
    tensors[1].data[0] ^= 1;
    write_model(&p.source, &tensors, 1);
    let o = with_env(&["sync", "--model-dir", m, "--from", src, "-vv"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("DEBUG") && err.contains("sync phases"),
        "{err}"
    );
    assert!(err.contains("generation 2:"), "the summary stays: {err}");
    assert!(!err.contains('\u{1b}'), "escape codes in a pipe: {err:?}");
    let o = with_env(
        &["sync", "--model-dir", m, "--from", src],
        &[("RUST_LOG", "apollo_checkpoint=debug")],
    );
    assert!(stderr(&o).contains("stored hashes read"), "{}", stderr(&o));

    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell]);
        assert!(o.status.success());
        let script = String::from_utf8_lossy(&o.stdout);
        for word in ["export-delta", "model-dir", "hash-on"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let o = run(&["man"]);
    assert!(o.status.success());
    let page = String::from_utf8_lossy(&o.stdout);
    assert!(
        page.starts_with(".ie") && page.contains(".TH apollo-checkpoint 1"),
        "{page}"
    );
    assert!(
        page.contains("APOLLO_MODEL_DIR") || page.contains("Examples"),
        "{page}"
    );
    let o = run(&["--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Examples:"));
}

/// `--ignore GLOB`: a trainer that does not save the MTP head (`mtp.*`) syncs the rest; the
/// ignored tensors keep their bytes and are listed; without it the sync is refused.
#[test]
fn ignore_leaves_matching_tensors_untouched_and_lists_them() {
    use apollo_checkpoint::synthetic::Rng;
    use safetensors::Dtype;
    let mut rng = Rng::new(9);
    let mut all = mixed_tensors(9);
    all.push(crate::util::T::random(
        "mtp.fc.weight",
        Dtype::BF16,
        &[64, 64],
        &mut rng,
    ));
    all.push(crate::util::T::random(
        "mtp.norm.weight",
        Dtype::F32,
        &[64],
        &mut rng,
    ));
    let p = pair(&all, 2, 1);
    let (m, src) = (s(&p.model), s(&p.source));
    assert!(run(&["init", "--model-dir", m]).status.success());
    let mtp_before: Vec<u8> = all[all.len() - 2].data.clone();
    // The trainer's save: every tensor changed, without mtp.*.
    let mut saved: Vec<crate::util::T> = all
        .iter()
        .filter(|t| !t.name.starts_with("mtp."))
        .map(|t| crate::util::T {
            data: t.data.iter().map(|b| b ^ 0x5a).collect(),
            ..t.clone()
        })
        .collect();
    write_model(&p.source, &saved, 1);
    let o = run(&["sync", "--model-dir", m, "--from", src]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("mtp.fc.weight: in the model but not in the source"));

    let sync = |extra: &[&str]| sync_from(&p.model, &p.source, extra);
    let o = sync(&["--ignore", "mtp.*", "--ignore", "vision.*", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    let mut untouched: Vec<&str> = j["untouched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    untouched.sort_unstable();
    assert_eq!(untouched, ["mtp.fc.weight", "mtp.norm.weight"]);
    assert!(j["changed"].as_bool().unwrap());
    assert!(
        stderr(&o).contains("\"vision.*\" matches no tensor"),
        "{}",
        stderr(&o)
    );
    // The ignored tensor's bytes are as they were; the others are the trainer's.
    let model = safetensors_bytes(&p.model, "mtp.fc.weight");
    assert_eq!(model, mtp_before);
    assert_eq!(safetensors_bytes(&p.model, &saved[0].name), saved[0].data);
    // An ignored tensor the source does hold is not written either.
    saved.push(crate::util::T {
        data: vec![0; mtp_before.len()],
        ..all[all.len() - 2].clone()
    });
    write_model(&p.source, &saved, 1);
    let o = sync(&["--ignore", "mtp.*"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(safetensors_bytes(&p.model, "mtp.fc.weight"), mtp_before);
    assert!(run(&["verify", "--model-dir", m]).status.success());
    let o = sync(&["--ignore", "mtp.[", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// The bytes of tensor `name` in the model directory `dir`.
fn safetensors_bytes(dir: &Path, name: &str) -> Vec<u8> {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            if let Ok(t) = st.tensor(name) {
                return t.data().to_vec();
            }
        }
    }
    panic!("{name} not in {}", dir.display())
}

/// `sync --tag` is stored with the generation and shown by `log`, `status`, `rollback` (whose
/// generation carries the restored one's tags) and the export manifest.
#[test]
fn tags_are_kept_with_their_generation_and_log_lists_history() {
    let mut tensors = mixed_tensors(12);
    let p = pair(&tensors, 1, 1);
    let (m, src) = (s(&p.model), s(&p.source));
    assert!(run(&["init", "--model-dir", m]).status.success());
    for step in ["41200", "41300"] {
        tensors[0].data[1] ^= 1;
        write_model(&p.source, &tensors, 1);
        let o = sync_from(
            &p.model,
            &p.source,
            &["--tag", &format!("step={step}"), "--tag", "run=r7"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = run(&["log", "--model-dir", m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    let gens = j["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 3);
    assert_eq!(gens[0]["generation"], 2);
    assert_eq!(
        gens[0]["tags"],
        serde_json::json!({"step": "41300", "run": "r7"})
    );
    assert_eq!(gens[1]["tags"]["step"], "41200");
    assert_eq!(gens[2]["kind"], "init");
    assert_eq!(gens[2]["tags"], serde_json::json!({}));
    let o = run(&["log", "--model-dir", m, "--limit", "1"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("[run=r7 step=41300]"), "{text}");
    let o = run(&["status", "--model-dir", m]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("step=41300"));

    let o = run(&["rollback", "--model-dir", m, "--to", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("generation 1 [run=r7 step=41200]"),
        "{}",
        stderr(&o)
    );
    let j = stdout_json(&run(&["log", "--model-dir", m, "--json", "--limit", "1"]));
    assert_eq!(j["generations"][0]["kind"], "rollback");
    assert_eq!(j["generations"][0]["tags"]["step"], "41200");

    let outbox = p.tmp.path().join("outbox");
    let o = run(&[
        "export-delta",
        "--model-dir",
        m,
        "--out",
        s(&outbox),
        "--full",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(stdout_json(&o)["manifest"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["tags"]["2"]["step"], "41300");
    assert_eq!(manifest["tags"]["3"]["step"], "41200");

    for bad in ["step", "=1", "st ep=1"] {
        let o = run(&["sync", "--model-dir", m, "--from", src, "--tag", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
    }
    let fresh = p.tmp.path().join("fresh");
    write_model(&fresh, &tensors, 1);
    let o = run(&["log", "--model-dir", s(&fresh)]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
}

/// `--metrics-file`: the Prometheus text format, read back with a parser of that format, after
/// a sync that changed something and after one that failed.
#[test]
fn metrics_file_is_prometheus_text_for_the_textfile_collector() {
    let mut tensors = mixed_tensors(14);
    let p = pair(&tensors, 1, 1);
    let m = s(&p.model);
    let dir = p.tmp.path().join("textfile");
    std::fs::create_dir_all(&dir).unwrap();
    let prom = dir.join("apollo_sync.prom");
    let scrape = || {
        let text = std::fs::read_to_string(&prom).unwrap();
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str, label: Option<(&str, &str)>| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                    ref other => panic!("{name}: {other:?}"),
                })
        };
        let phases = parsed
            .samples
            .iter()
            .filter(|s| s.metric == "apollo_checkpoint_sync_phase_seconds")
            .count();
        (
            value(
                "apollo_checkpoint_last_run_exit_code",
                Some(("command", "sync")),
            ),
            value("apollo_checkpoint_generation", None),
            value("apollo_checkpoint_sync_blocks_changed", None),
            phases,
        )
    };
    assert!(run(&["init", "--model-dir", m]).status.success());
    tensors[2].data[5] ^= 1;
    write_model(&p.source, &tensors, 1);
    let o = sync_from(&p.model, &p.source, &["--metrics-file", s(&prom)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(scrape(), (Some(0.0), Some(1.0), Some(1.0), 10));
    let nowhere = p.tmp.path().join("nowhere");
    let o = sync_from(&p.model, &nowhere, &["--metrics-file", s(&prom)]);
    assert_eq!(o.status.code(), Some(66));
    assert_eq!(scrape(), (Some(66.0), Some(1.0), None, 0));
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("apollo_sync.prom")]);
}

/// `--gpu-memory`: sizes with units, refused below what the GPU path needs (a bad command line,
/// before anything is opened).
#[test]
fn gpu_memory_below_the_least_needed_is_a_usage_error() {
    let o = run(&[
        "sync",
        "--model-dir",
        "/nonexistent",
        "--handles",
        "/nonexistent",
        "--gpu-memory",
        "32MiB",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("36 MiB"), "{}", stderr(&o));
    let o = run(&["sync", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("[default: 144MiB]"));
}
