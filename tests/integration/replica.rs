//! `export-delta` and `apply-delta`: the replica follows the model byte for byte; every refusal
//! leaves it untouched.

use std::path::PathBuf;

use apollo_checkpoint::checkpoint::ApplyOutcome;
use apollo_checkpoint::delta::{Delta, DeltaFile, DeltaHeader, DeltaWriter};
use apollo_checkpoint::io::RealIo;
use apollo_checkpoint::synthetic::Rng;
use apollo_checkpoint::{Error, SafetensorsSource};

use crate::util::{
    Pair, T, checkpoint, deltas_in, mixed_tensors, model_files, pair, run, s, stderr, stdout_json,
    write_model,
};

/// A random training-like change of `tensors`.
fn change(tensors: &mut [T], rng: &mut Rng) {
    match rng.below(3) {
        0 => {
            for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
                let i = rng.below(t.data.len() as u64) as usize;
                t.data[i] ^= 0x21;
            }
        }
        1 => {
            for t in tensors.iter_mut() {
                for b in t.data.iter_mut().step_by(37) {
                    *b = b.wrapping_add(3);
                }
            }
        }
        _ => {
            let nonempty: Vec<usize> = (0..tensors.len())
                .filter(|&i| !tensors[i].data.is_empty())
                .collect();
            let i = nonempty[rng.below(nonempty.len() as u64) as usize];
            let mut d = std::mem::take(&mut tensors[i].data);
            rng.fill(&mut d);
            tensors[i].data = d;
        }
    }
}

/// Indexes `p.model`, exports it whole into `<tmp>/outbox` and applies that to a new replica
/// at `<tmp>/replica`, which then equals the model: (outbox, replica).
fn bootstrapped(p: &Pair) -> (PathBuf, PathBuf) {
    let (outbox, replica) = (p.tmp.path().join("outbox"), p.tmp.path().join("replica"));
    checkpoint(&p.model).init(4096).unwrap();
    let full = checkpoint(&p.model)
        .export_delta(&outbox, None, true)
        .unwrap();
    assert!(full.exported);
    checkpoint(&replica)
        .apply_delta(&deltas_in(&outbox))
        .unwrap();
    assert_eq!(model_files(&replica), model_files(&p.model));
    (outbox, replica)
}

fn sync(p: &Pair, tensors: &[T]) {
    write_model(&p.source, tensors, 1);
    checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
}

#[test]
fn after_many_random_syncs_and_exports_the_replica_equals_the_model() {
    let mut tensors = mixed_tensors(60);
    let p = pair(&tensors, 3, 1);
    let (outbox, replica) = bootstrapped(&p);
    let mut rng = Rng::new(61);
    for night in 0..6 {
        for _ in 0..=rng.below(3) {
            change(&mut tensors, &mut rng);
            sync(&p, &tensors);
        }
        let r = checkpoint(&p.model)
            .export_delta(&outbox, None, false)
            .unwrap();
        assert!(r.exported, "night {night}");
        // Some nights the backup host is down: deltas pile up and are applied together, in
        // whatever order the shell lists them.
        if rng.below(3) > 0 {
            let mut files = deltas_in(&outbox);
            files.reverse();
            let a = checkpoint(&replica).apply_delta(&files).unwrap();
            assert_eq!(a.generation, r.target_generation);
            assert_eq!(
                model_files(&replica),
                model_files(&p.model),
                "night {night}"
            );
        }
    }
    let files = deltas_in(&outbox);
    checkpoint(&replica).apply_delta(&files).unwrap();
    assert_eq!(model_files(&replica), model_files(&p.model));
    assert!(checkpoint(&replica).verify(false).unwrap().clean);
    // Re-applying everything is a no-op that says so.
    let again = checkpoint(&replica).apply_delta(&files).unwrap();
    assert!(
        again
            .deltas
            .iter()
            .all(|d| d.outcome == ApplyOutcome::AlreadyApplied),
        "{:?}",
        again.deltas
    );
}

#[test]
fn a_block_changed_in_three_syncs_ships_once() {
    let mut tensors = mixed_tensors(62);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let outbox = p.tmp.path().join("outbox");
    checkpoint(&p.model)
        .export_delta(&outbox, Some(0), false)
        .unwrap();
    for round in 0..3u8 {
        tensors[0].data[10] = round.wrapping_mul(7).wrapping_add(1);
        tensors[0].data[5000 + usize::from(round)] ^= 0xff;
        sync(&p, &tensors);
    }
    let r = checkpoint(&p.model)
        .export_delta(&outbox, Some(0), false)
        .unwrap();
    // Block 0 (byte 10) changed three times, block 1 (bytes 5000..5002) three times: two records.
    assert_eq!(
        (r.base_generation, r.target_generation, r.records),
        (Some(0), 3, 2)
    );
    assert_eq!(r.full_blocks, 0);
}

#[test]
fn a_copied_replica_is_adopted_when_it_matches_and_refused_untouched_otherwise() {
    let mut tensors = mixed_tensors(63);
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let mut rng = Rng::new(64);
    change(&mut tensors, &mut rng);
    sync(&p, &tensors);
    // The operator copies the model at generation 1.
    let replica = p.tmp.path().join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    for (name, bytes) in model_files(&p.model) {
        std::fs::write(replica.join(name), bytes).unwrap();
    }
    let bad = p.tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for (name, mut bytes) in model_files(&p.model) {
        if name == "model-00002-of-00002.safetensors" {
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
        }
        std::fs::write(bad.join(name), bytes).unwrap();
    }
    change(&mut tensors, &mut rng);
    sync(&p, &tensors);
    let outbox = p.tmp.path().join("outbox");
    let r = checkpoint(&p.model)
        .export_delta(&outbox, Some(1), false)
        .unwrap();
    assert_eq!(r.target_generation, 2);

    let before = model_files(&bad);
    let e = checkpoint(&bad)
        .apply_delta(&deltas_in(&outbox))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("model-00002-of-00002.safetensors is not the model's file at generation 1"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 78);
    assert_eq!(model_files(&bad), before);
    assert!(
        !bad.join(".apollo-checkpoint").exists(),
        "a refused adoption leaves no state behind"
    );

    let a = checkpoint(&replica)
        .apply_delta(&deltas_in(&outbox))
        .unwrap();
    assert_eq!(a.deltas[0].outcome, ApplyOutcome::AdoptedAndApplied);
    assert_eq!(model_files(&replica), model_files(&p.model));
}

#[test]
fn deltas_that_do_not_fit_are_refused_and_the_replica_left_untouched() {
    let mut tensors = mixed_tensors(65);
    let p = pair(&tensors, 1, 1);
    let (outbox, replica) = bootstrapped(&p);
    let mut rng = Rng::new(66);
    let mut exported = Vec::new();
    for _ in 0..3 {
        change(&mut tensors, &mut rng);
        sync(&p, &tensors);
        exported.push(
            checkpoint(&p.model)
                .export_delta(&outbox, None, false)
                .unwrap()
                .file
                .unwrap(),
        );
    }
    let before = model_files(&replica);
    // A gap: generation 2..3 while the replica is at 0.
    let e = checkpoint(&replica)
        .apply_delta(&exported[2..])
        .unwrap_err();
    assert!(
        e.to_string().contains("apply the deltas from 0 first"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 78);
    assert_eq!(model_files(&replica), before);
    // A set with a gap after deltas that fit is refused whole, before any is applied (the
    // first used to be applied, then the gap found).
    let e = checkpoint(&replica)
        .apply_delta(&[exported[0].clone(), exported[2].clone()])
        .unwrap_err();
    assert!(
        e.to_string().contains("apply the deltas from 1 first")
            && e.to_string().contains("nothing was applied"),
        "{e}"
    );
    assert_eq!(model_files(&replica), before);
    assert_eq!(checkpoint(&replica).status().unwrap().generation, Some(0));

    // Corrupted and truncated deltas.
    let bytes = std::fs::read(&exported[0]).unwrap();
    let damaged = p.tmp.path().join("damaged.apd");
    let mut b = bytes.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    std::fs::write(&damaged, &b).unwrap();
    let e = checkpoint(&replica)
        .apply_delta(std::slice::from_ref(&damaged))
        .unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    assert_eq!(e.exit_code(), 65);
    std::fs::write(&damaged, &bytes[..bytes.len() - 7]).unwrap();
    let e = checkpoint(&replica)
        .apply_delta(std::slice::from_ref(&damaged))
        .unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(model_files(&replica), before);

    // A delta of another model.
    let other = pair(&mixed_tensors(67), 1, 1);
    checkpoint(&other.model).init(4096).unwrap();
    let other_out = other.tmp.path().join("outbox");
    let mut t2 = mixed_tensors(67);
    change(&mut t2, &mut rng);
    sync(&other, &t2);
    let o = checkpoint(&other.model)
        .export_delta(&other_out, Some(0), false)
        .unwrap();
    let e = checkpoint(&replica)
        .apply_delta(&[o.file.unwrap()])
        .unwrap_err();
    assert!(e.to_string().contains("it is for model"), "{e}");

    // A replica block changed by something that kept size and mtime: the base check refuses
    // before writing.
    let f = replica.join("model.safetensors");
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    let mtime = handle.metadata().unwrap().modified().unwrap();
    let mut rb = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(rb[..8].try_into().unwrap()) as usize;
    for b in &mut rb[8 + n..] {
        *b ^= 0x01;
    }
    std::os::unix::fs::FileExt::write_all_at(&handle, &rb, 0).unwrap();
    handle.set_modified(mtime).unwrap();
    drop(handle);
    let before = model_files(&replica);
    // Its ctime gives it away at once;
    let e = checkpoint(&replica)
        .apply_delta(&exported[..1])
        .unwrap_err();
    assert!(e.to_string().contains("changed in place"), "{e}");
    assert_eq!(model_files(&replica), before);
    // where no ctime was recorded (an older index), the base check refuses before writing.
    let db = rusqlite::Connection::open(replica.join(".apollo-checkpoint/index.db")).unwrap();
    db.execute("UPDATE files SET ctime_ns = 0", []).unwrap();
    drop(db);
    let e = checkpoint(&replica)
        .apply_delta(&exported[..1])
        .unwrap_err();
    assert!(e.to_string().contains("not the delta's base"), "{e}");
    assert_eq!(model_files(&replica), before);
    assert!(!replica.join(".apollo-checkpoint/journal").exists());
}

#[test]
fn names_that_escape_the_replica_and_symlinks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let io = RealIo::new();
    for name in ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"] {
        let header = DeltaHeader {
            model_id: "00112233445566778899aabbccddeeff".into(),
            base_generation: 0,
            target_generation: 1,
            block_size: 4096,
            full: false,
            created_ms: 0,
            files: vec![DeltaFile {
                name: name.into(),
                size: 10,
                base_root: [1; 32],
                target_root: [2; 32],
            }],
        };
        let path = tmp.path().join("evil.apd");
        let w = DeltaWriter::create(&io, &path, &header).unwrap();
        w.finish(&io).unwrap();
        let e = checkpoint(&tmp.path().join("replica"))
            .apply_delta(std::slice::from_ref(&path))
            .unwrap_err();
        assert!(
            e.to_string().contains("not a plain file name"),
            "{name}: {e}"
        );
        assert!(matches!(
            Delta::open(&io, &path),
            Err(apollo_checkpoint::delta::DeltaError::UnsafePath { .. })
        ));
    }
    // A replica whose model file is a symlink (to somewhere outside) is refused.
    let tensors = mixed_tensors(68);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let outbox = p.tmp.path().join("outbox");
    checkpoint(&p.model)
        .export_delta(&outbox, None, true)
        .unwrap();
    let replica = p.tmp.path().join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    std::os::unix::fs::symlink(
        p.source.join("model.safetensors"),
        replica.join("model.safetensors"),
    )
    .unwrap();
    let e = checkpoint(&replica)
        .apply_delta(&deltas_in(&outbox))
        .unwrap_err();
    assert!(matches!(e, Error::Delta(_)), "{e}");
    assert_eq!(
        std::fs::read(p.source.join("model.safetensors")).unwrap(),
        std::fs::read(p.model.join("model.safetensors")).unwrap()
    );
}

#[test]
fn when_the_backlog_overflows_export_ships_whole_blocks_and_says_so() {
    let mut tensors = mixed_tensors(69);
    let p = pair(&tensors, 1, 1);
    let (outbox, replica) = bootstrapped(&p);
    // Keep one generation of undo data and almost no backlog.
    checkpoint(&p.model).retention(Some(1), Some(1)).unwrap();
    let mut rng = Rng::new(70);
    for _ in 0..3 {
        change(&mut tensors, &mut rng);
        sync(&p, &tensors);
    }
    let st = checkpoint(&p.model).status().unwrap();
    assert_eq!(
        (st.exported_through, st.unexported_generations),
        (Some(0), 3)
    );
    let r = checkpoint(&p.model)
        .export_delta(&outbox, None, false)
        .unwrap();
    assert!(r.full_blocks > 0, "{r:?}");
    assert!(
        r.notes.iter().any(|n| n.contains("ship whole")),
        "{:?}",
        r.notes
    );
    checkpoint(&replica)
        .apply_delta(&deltas_in(&outbox))
        .unwrap();
    assert_eq!(model_files(&replica), model_files(&p.model));
}

#[test]
fn pruning_removes_confirmed_deltas_and_the_cli_round_trip_works() {
    let mut tensors = mixed_tensors(71);
    let p = pair(&tensors, 2, 1);
    let (outbox, replica) = (p.tmp.path().join("outbox"), p.tmp.path().join("replica"));
    let (m, o, r) = (s(&p.model), s(&outbox), s(&replica));
    assert!(run(&["init", "--model-dir", m]).status.success());
    let x = run(&["export-delta", "--model-dir", m, "--out", o]);
    assert_eq!(
        x.status.code(),
        Some(78),
        "no export yet and no --since: {}",
        stderr(&x)
    );
    assert!(stderr(&x).contains("--full"), "{}", stderr(&x));
    assert!(
        run(&["export-delta", "--model-dir", m, "--out", o, "--full"])
            .status
            .success()
    );
    let mut rng = Rng::new(72);
    change(&mut tensors, &mut rng);
    sync(&p, &tensors);
    let x = run(&["export-delta", "--model-dir", m, "--out", o, "--json"]);
    assert!(x.status.success(), "{}", stderr(&x));
    let j = stdout_json(&x);
    assert_eq!(j["target_generation"], 1);
    let changed = std::fs::read_to_string(outbox.join("changed-files.txt")).unwrap();
    assert!(
        changed.lines().all(|l| l.ends_with(".safetensors")) && !changed.is_empty(),
        "{changed}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outbox.join("delta-000000-000001.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["delta_bytes"], j["bytes"]);
    assert_eq!(manifest["delta_blake3"].as_str().unwrap().len(), 64);
    let prom = p.tmp.path().join("apollo_apply.prom");
    let mut args = vec![
        "apply-delta",
        "--replica-dir",
        r,
        "--json",
        "--metrics-file",
        s(&prom),
    ];
    let files: Vec<String> = deltas_in(&outbox)
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    args.extend(files.iter().map(String::as_str));
    let x = run(&args);
    assert!(x.status.success(), "{}", stderr(&x));
    assert_eq!(stdout_json(&x)["generation"], 1);
    assert_eq!(model_files(&replica), model_files(&p.model));
    // The backup host's metrics: the replica's generation and the run's exit code.
    let text = std::fs::read_to_string(&prom).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            })
    };
    assert_eq!(value("apollo_checkpoint_generation"), Some(1.0), "{text}");
    let exit = scrape
        .samples
        .iter()
        .find(|s| s.metric == "apollo_checkpoint_last_run_exit_code")
        .unwrap();
    assert_eq!(exit.labels.get("command"), Some("apply-delta"), "{text}");
    // Nothing new: exporting again writes nothing.
    let x = run(&["export-delta", "--model-dir", m, "--out", o]);
    assert!(stderr(&x).contains("nothing to export"), "{}", stderr(&x));
    let x = run(&[
        "export-delta",
        "--model-dir",
        m,
        "--out",
        o,
        "--prune-through",
        "1",
        "--json",
    ]);
    assert!(x.status.success(), "{}", stderr(&x));
    assert_eq!(stdout_json(&x)["pruned"].as_array().unwrap().len(), 2);
    assert!(deltas_in(&outbox).is_empty());
}

/// A delta and its records.
fn read_delta(path: &std::path::Path) -> (Delta, Vec<apollo_checkpoint::record::Record>) {
    let delta = Delta::open(&RealIo::new(), path).unwrap();
    let mut records = Vec::new();
    delta
        .for_each_batch(1 << 20, |b| {
            records.extend(b);
            Ok::<_, apollo_checkpoint::delta::DeltaError>(())
        })
        .unwrap();
    (delta, records)
}

/// Writes a delta of `header` and `records` (with a correct checksum) to `path`.
fn write_delta(
    path: &std::path::Path,
    header: &DeltaHeader,
    records: &[apollo_checkpoint::record::Record],
) -> PathBuf {
    let mut w = DeltaWriter::create(&RealIo::new(), path, header).unwrap();
    for r in records {
        let mut e = Vec::new();
        r.encode(&mut e);
        w.append(&e, 1).unwrap();
    }
    w.finish(&RealIo::new()).unwrap();
    path.to_path_buf()
}

/// A delta whose checksum is right is still untrusted input (anyone can recompute an unkeyed
/// checksum): every record must be one block of a tensor of the replica whose bytes give its
/// target hash, the block size the replica's, the generations ones an export writes. Each
/// forgery is refused before anything is written (they used to overwrite a shard header, leave
/// files neither old nor new with `recover` failing forever, or panic).
#[test]
fn forged_deltas_are_refused_before_anything_is_written() {
    use apollo_checkpoint::record::Record;
    let mut tensors = mixed_tensors(71);
    let p = pair(&tensors, 1, 1);
    let (outbox, replica) = bootstrapped(&p);
    let mut rng = Rng::new(72);
    change(&mut tensors, &mut rng);
    for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
        t.data[0] ^= 0x40; // at least one block of every tensor
    }
    sync(&p, &tensors);
    let real = checkpoint(&p.model)
        .export_delta(&outbox, None, false)
        .unwrap()
        .file
        .unwrap();
    let (delta, records) = read_delta(&real);
    assert!(records.len() > 3 && records.iter().all(Record::is_xor));
    let forge = |name: &str, header: &DeltaHeader, records: &[Record]| {
        write_delta(
            &p.tmp.path().join(format!("forged-{name}.apd")),
            header,
            records,
        )
    };
    let with = |f: &dyn Fn(&mut Record)| {
        let mut rs = records.clone();
        f(&mut rs[1]);
        rs
    };
    let h = delta.header.clone();
    let cases: Vec<(&str, DeltaHeader, Vec<Record>, &str)> = vec![
        (
            "header",
            h.clone(),
            with(&|r| {
                r.tensor_offset = 0;
                r.offset = 0;
            }),
            "not a block of a tensor",
        ),
        (
            "unaligned",
            h.clone(),
            with(&|r| r.offset += 1),
            "not a block of a tensor",
        ),
        (
            "empty",
            h.clone(),
            with(&|r| r.len = 0),
            "not a block of a tensor",
        ),
        (
            "long",
            h.clone(),
            with(&|r| r.len += 1),
            "not a block of a tensor",
        ),
        (
            "target",
            h.clone(),
            with(&|r| r.new = [0xaa; 16]),
            "do not give its target hash",
        ),
        (
            "blocksize",
            DeltaHeader {
                block_size: 8192,
                ..h.clone()
            },
            records.clone(),
            "its blocks are 8192 bytes",
        ),
        (
            "generation",
            DeltaHeader {
                target_generation: u64::MAX - 1,
                ..h.clone()
            },
            records.clone(),
            "which no export writes",
        ),
        (
            "backwards",
            DeltaHeader {
                target_generation: h.base_generation,
                ..h.clone()
            },
            records.clone(),
            "which no export writes",
        ),
    ];
    let before = model_files(&replica);
    for (name, header, rs, says) in cases {
        let forged = forge(name, &header, &rs);
        let e = checkpoint(&replica)
            .apply_delta(std::slice::from_ref(&forged))
            .unwrap_err();
        assert!(e.to_string().contains(says), "{name}: {e}");
        assert!(matches!(e.exit_code(), 65 | 78), "{name}: {e}");
        assert_eq!(model_files(&replica), before, "{name}");
        assert!(
            !replica.join(".apollo-checkpoint/journal").exists(),
            "{name}"
        );
        let st = checkpoint(&replica).status().unwrap();
        assert_eq!(st.generation, Some(0), "{name}");
        assert!(st.pending.is_empty(), "{name}: {:?}", st.pending);
    }
    // The real one still applies.
    checkpoint(&replica)
        .apply_delta(std::slice::from_ref(&real))
        .unwrap();
    assert_eq!(model_files(&replica), model_files(&p.model));
}

/// A refused `--full` delta leaves the replica folder byte for byte as it was: the files are
/// staged, indexed and checked before any is moved into place (they used to be renamed into
/// place first, and a shipped `config.json` replaced), and the state this run made is removed.
#[test]
fn a_refused_full_delta_leaves_the_replica_folder_as_it_was() {
    let tensors = mixed_tensors(73);
    let p = pair(&tensors, 2, 1);
    let (_, full) = crate::util::full_export(&p);
    let (delta, records) = read_delta(&full);
    let rewrite = |name: &str, header: &DeltaHeader| {
        write_delta(&p.tmp.path().join(format!("{name}.apd")), header, &records)
    };
    let mut wrong_root = delta.header.clone();
    wrong_root.files[1].target_root = [7; 32];
    let mut config = delta.header.clone();
    config.files[0].name = "config.json".into();
    let replica = p.tmp.path().join("replica");
    std::fs::create_dir(&replica).unwrap();
    std::fs::write(replica.join("config.json"), b"{\"mine\": true}").unwrap();
    for (name, header, says) in [
        ("root", &wrong_root, "does not match the delta's target"),
        ("config", &config, "config.json"),
    ] {
        let forged = rewrite(name, header);
        let e = checkpoint(&replica)
            .apply_delta(std::slice::from_ref(&forged))
            .unwrap_err();
        assert!(e.to_string().contains(says), "{name}: {e}");
        let left: Vec<String> = std::fs::read_dir(&replica)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["config.json"], "{name}");
        assert_eq!(
            std::fs::read(replica.join("config.json")).unwrap(),
            b"{\"mine\": true}"
        );
    }
    // A replica folder that did not exist is not left behind either.
    let fresh = p.tmp.path().join("fresh-replica");
    let forged = rewrite("root2", &wrong_root);
    assert!(checkpoint(&fresh).apply_delta(&[forged]).is_err());
    assert!(!fresh.exists());
    // The real delta creates the replica.
    checkpoint(&replica).apply_delta(&[full]).unwrap();
    assert_eq!(model_files(&replica), model_files(&p.model));
    assert!(checkpoint(&replica).verify(false).unwrap().clean);
}
