//! `rollback`: earlier generations come back byte for byte from the undo data, the history
//! stays consistent, retention limits what can be reached.

use std::collections::BTreeMap;

use apollo_checkpoint::index::GenerationKind;
use apollo_checkpoint::synthetic::Rng;
use apollo_checkpoint::{Error, SafetensorsSource};

use crate::util::{
    T, checkpoint, mixed_tensors, model_files, pair, run, s, stderr, stdout_json, write_model,
};

/// Syncs `rounds` different changes; returns the model files at every generation.
fn history(
    p: &crate::util::Pair,
    tensors: &mut [T],
    rounds: u64,
) -> Vec<BTreeMap<String, Vec<u8>>> {
    let mut states = vec![model_files(&p.model)];
    let mut rng = Rng::new(77);
    for round in 0..rounds {
        match round % 3 {
            0 => {
                for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
                    let i = rng.below(t.data.len() as u64) as usize;
                    t.data[i] ^= 0x42;
                }
            }
            1 => {
                for t in tensors.iter_mut() {
                    for b in t.data.iter_mut().step_by(50) {
                        *b = b.wrapping_add(1);
                    }
                }
            }
            _ => rng.fill(&mut tensors[0].data),
        }
        write_model(&p.source, tensors, 1);
        let r = checkpoint(&p.model)
            .sync(&SafetensorsSource::open(&p.source).unwrap())
            .unwrap();
        assert_eq!(r.generation, round + 1);
        states.push(model_files(&p.model));
    }
    states
}

#[test]
fn rollback_restores_earlier_generations_and_can_itself_be_undone() {
    let mut tensors = mixed_tensors(12);
    let p = pair(&tensors, 3, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let states = history(&p, &mut tensors, 4);

    let r = checkpoint(&p.model).rollback(Some(1)).unwrap();
    assert_eq!(
        (r.from_generation, r.restored_generation, r.generation),
        (4, 1, 5)
    );
    assert_eq!(model_files(&p.model), states[1]);
    assert!(checkpoint(&p.model).verify(false).unwrap().clean);
    let index =
        apollo_checkpoint::index::BlockIndex::open(&p.model.join(".apollo-checkpoint")).unwrap();
    let g = index.generation_record(5).unwrap().unwrap();
    assert_eq!(g.kind, GenerationKind::Rollback);
    assert!(g.source.contains("to generation 1"), "{}", g.source);
    drop(index);

    // The rollback is a generation with undo data: rolling back to 4 undoes it.
    let r = checkpoint(&p.model).rollback(None).unwrap();
    assert_eq!((r.restored_generation, r.generation), (4, 6));
    assert_eq!(model_files(&p.model), states[4]);
    // All the way back to what init indexed.
    checkpoint(&p.model).rollback(Some(0)).unwrap();
    assert_eq!(model_files(&p.model), states[0]);
    assert!(checkpoint(&p.model).verify(false).unwrap().clean);
    // And the next sync brings the live weights back.
    let r = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
    assert_eq!(r.generation, 8);
    assert_eq!(model_files(&p.model), states[4]);
}

#[test]
fn retention_limits_how_far_back_rollback_reaches() {
    let mut tensors = mixed_tensors(13);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let r = checkpoint(&p.model).retention(Some(2), None).unwrap();
    assert_eq!(r.generations, 2);
    let states = history(&p, &mut tensors, 5);
    let status = checkpoint(&p.model).status().unwrap();
    assert_eq!(status.undo_generations, 2);
    let before = model_files(&p.model);
    let err = checkpoint(&p.model).rollback(Some(1)).unwrap_err();
    assert!(matches!(err, Error::NoUndo { earliest: 3, .. }), "{err}");
    assert!(err.to_string().contains("retention"), "{err}");
    assert_eq!(err.exit_code(), 78);
    assert_eq!(model_files(&p.model), before);
    checkpoint(&p.model).rollback(Some(3)).unwrap();
    assert_eq!(model_files(&p.model), states[3]);
    let e = checkpoint(&p.model).rollback(Some(9)).unwrap_err();
    assert!(matches!(e, Error::RollbackTarget { .. }), "{e}");
}

#[test]
fn rollback_cannot_cross_a_reindex() {
    let mut tensors = mixed_tensors(14);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    history(&p, &mut tensors, 1);
    // Something else edits the file; the operator re-indexes it.
    let f = p.model.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    checkpoint(&p.model).verify(true).unwrap();
    let e = checkpoint(&p.model)
        .rollback(Some(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("re-indexed"), "{e}");
}

#[test]
fn rollback_and_retention_from_the_command_line() {
    let mut tensors = mixed_tensors(15);
    let p = pair(&tensors, 2, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    let states = history(&p, &mut tensors, 2);
    let o = run(&[
        "retention",
        "--model-dir",
        m,
        "--generations",
        "5",
        "--bytes",
        "1000000",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)["generations"], 5);
    let o = run(&["rollback", "--model-dir", m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    assert_eq!(
        (j["restored_generation"].as_u64(), j["generation"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(model_files(&p.model), states[1]);
    let o = run(&["rollback", "--model-dir", m, "--to", "7"]);
    assert_eq!(o.status.code(), Some(78));
    let o = run(&["status", "--model-dir", m]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("undo data:   3 generations"), "{text}");
}

/// The undo data's file names: (generation files, discarded files).
fn undo_dir(model: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(model.join(".apollo-checkpoint/undo"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().partition(|n| !n.ends_with(".discard"))
}

#[test]
fn deferred_undo_removal_prunes_by_renaming_and_removes_later() {
    let mut tensors = mixed_tensors(16);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    checkpoint(&p.model).retention(Some(1), None).unwrap();
    let deferred = || checkpoint(&p.model).with_deferred_undo_removal(true);
    let mut rng = Rng::new(5);
    let mut sync = |cp: apollo_checkpoint::Checkpoint| {
        rng.fill(&mut tensors[0].data);
        write_model(&p.source, &tensors, 1);
        cp.sync(&SafetensorsSource::open(&p.source).unwrap())
            .unwrap();
        model_files(&p.model)
    };
    sync(deferred());
    let (kept, discarded) = undo_dir(&p.model);
    assert_eq!((kept.len(), discarded.len()), (1, 0));
    let two = sync(deferred());
    // Generation 1's undo data is pruned, not removed: renamed out of the undo data.
    let (kept, discarded) = undo_dir(&p.model);
    assert_eq!(kept, vec!["00000000000000000002.apj".to_string()]);
    assert_eq!(
        discarded,
        vec!["00000000000000000001.apj.discard".to_string()]
    );
    let status = checkpoint(&p.model).status().unwrap();
    assert_eq!(status.undo_generations, 1);
    // Nothing uses the discarded file: rollback to generation 0 is refused as pruned.
    let err = checkpoint(&p.model).rollback(Some(0)).unwrap_err();
    assert!(matches!(err, Error::NoUndo { earliest: 1, .. }), "{err}");
    assert_eq!(model_files(&p.model), two);
    let (files, bytes) = deferred().remove_discarded().unwrap();
    assert_eq!(files, 1);
    assert!(bytes > 0);
    assert_eq!(undo_dir(&p.model).1, Vec::<String>::new());
    assert_eq!(deferred().remove_discarded().unwrap(), (0, 0));
    // Without deferral, pruning removes at once.
    sync(checkpoint(&p.model));
    assert_eq!(
        undo_dir(&p.model),
        (vec!["00000000000000000003.apj".to_string()], vec![])
    );
    checkpoint(&p.model).rollback(Some(2)).unwrap();
    assert_eq!(model_files(&p.model), two);
}

#[test]
fn the_sync_command_removes_the_undo_data_it_pruned() {
    let mut tensors = mixed_tensors(17);
    let p = pair(&tensors, 1, 1);
    let m = s(&p.model);
    assert!(run(&["init", "--model-dir", m]).status.success());
    let o = run(&["retention", "--model-dir", m, "--generations", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut rng = Rng::new(6);
    for generation in 1..=3u64 {
        // A discarded file a killed sync left behind goes too.
        std::fs::write(
            p.model
                .join(".apollo-checkpoint/undo/00000000000000000000.apj.discard"),
            b"left by a killed sync",
        )
        .ok();
        rng.fill(&mut tensors[1].data);
        write_model(&p.source, &tensors, 1);
        let o = run(&["sync", "--model-dir", m, "--from", s(&p.source), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout_json(&o)["generation"], generation);
        assert_eq!(
            undo_dir(&p.model),
            (vec![format!("{generation:020}.apj")], vec![])
        );
    }
}
