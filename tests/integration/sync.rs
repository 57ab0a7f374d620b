//! `sync --from` on real safetensors files: correctness, what it reads, what it refuses.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use apollo_checkpoint::index::GenerationKind;
use apollo_checkpoint::synthetic::Rng;
use apollo_checkpoint::{Checkpoint, Error, SafetensorsSource};
use safetensors::Dtype;

use crate::util::{
    CountingIo, T, assert_same_tensors, checkpoint, mixed_tensors, pair, snapshot, write_model,
};

fn sync_from(
    model: &std::path::Path,
    source: &std::path::Path,
) -> Result<apollo_checkpoint::SyncReport, Error> {
    checkpoint(model).sync(&SafetensorsSource::open(source)?)
}

/// Flips one byte in about `fraction` of the 4 KiB blocks of every tensor.
fn sparse_change(tensors: &mut [T], fraction: f64, rng: &mut Rng) -> usize {
    let mut changed = 0;
    for t in tensors.iter_mut() {
        for start in (0..t.data.len()).step_by(4096) {
            if (rng.next_u64() as f64 / u64::MAX as f64) < fraction {
                let end = (start + 4096).min(t.data.len());
                let i = start + rng.below((end - start) as u64) as usize;
                t.data[i] ^= 0x5a;
                changed += 1;
            }
        }
    }
    changed
}

/// Changes about 1% of the bytes of every tensor.
fn dense_change(tensors: &mut [T], rng: &mut Rng) {
    for t in tensors.iter_mut() {
        for b in &mut t.data {
            if rng.below(100) == 0 {
                *b = b.wrapping_add(1);
            }
        }
    }
}

#[test]
fn sparse_dense_and_whole_tensor_changes_reach_the_files_byte_for_byte() {
    for (model_shards, source_shards) in [(3, 2), (1, 1), (1, 4)] {
        let mut tensors = mixed_tensors(7);
        let p = pair(&tensors, model_shards, source_shards);
        checkpoint(&p.model).init(4096).unwrap();
        let mut rng = Rng::new(99);
        let mut generation = 0;

        let changed = sparse_change(&mut tensors, 0.2, &mut rng);
        assert!(changed > 0);
        write_model(&p.source, &tensors, source_shards);
        let r = sync_from(&p.model, &p.source).unwrap();
        generation += 1;
        assert!(r.changed && r.generation == generation);
        assert_eq!(
            r.blocks_changed, changed as u64,
            "one changed block per flipped byte"
        );
        assert_eq!(r.bytes_differing, changed as u64);
        assert_same_tensors(&p.model, &p.source);

        dense_change(&mut tensors, &mut rng);
        write_model(&p.source, &tensors, source_shards);
        let r = sync_from(&p.model, &p.source).unwrap();
        generation += 1;
        assert_eq!(r.generation, generation);
        assert_same_tensors(&p.model, &p.source);

        let mut fresh = Rng::new(5);
        fresh.fill(&mut tensors[0].data);
        write_model(&p.source, &tensors, source_shards);
        let r = sync_from(&p.model, &p.source).unwrap();
        generation += 1;
        assert_eq!(r.tensors_changed, 1);
        assert_eq!(r.bytes_changed, tensors[0].data.len() as u64);
        assert_same_tensors(&p.model, &p.source);

        let v = checkpoint(&p.model).verify(false).unwrap();
        assert!(v.clean, "{v:?}");
        // A second sync of the same weights changes nothing and adds no generation.
        let before = snapshot(&p.model);
        let again = sync_from(&p.model, &p.source).unwrap();
        assert!(!again.changed);
        assert_eq!((again.blocks_changed, again.generation), (0, generation));
        assert_eq!(before, snapshot(&p.model));
    }
}

/// Every length around the block and group boundaries, changed in its first and last byte.
#[test]
fn boundary_lengths_change_in_their_first_and_last_bytes() {
    let mut rng = Rng::new(3);
    let lens = [
        1usize,
        2,
        1023,
        1024,
        1025,
        4095,
        4096,
        4097,
        8191,
        65535,
        65536,
        65537,
        3 * 65536 + 4095,
    ];
    let mut tensors: Vec<T> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| T::random(&format!("t{i}"), Dtype::U8, &[n], &mut rng))
        .collect();
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    for t in &mut tensors {
        let last = t.data.len() - 1;
        t.data[last] ^= 1;
        if last > 0 {
            t.data[0] ^= 1;
        }
    }
    write_model(&p.source, &tensors, 1);
    let r = sync_from(&p.model, &p.source).unwrap();
    let expected: u64 = lens.iter().map(|&n| if n > 4096 { 2 } else { 1 }).sum();
    assert_eq!(r.blocks_changed, expected);
    assert_same_tensors(&p.model, &p.source);
    assert!(checkpoint(&p.model).verify(false).unwrap().clean);
}

#[test]
fn other_block_sizes_work_and_bad_ones_are_refused() {
    for block in [1024, 65536, 1 << 20] {
        let mut tensors = mixed_tensors(11);
        let p = pair(&tensors, 2, 1);
        checkpoint(&p.model).init(block).unwrap();
        sparse_change(&mut tensors, 0.3, &mut Rng::new(block));
        write_model(&p.source, &tensors, 1);
        sync_from(&p.model, &p.source).unwrap();
        assert_same_tensors(&p.model, &p.source);
        assert!(checkpoint(&p.model).verify(false).unwrap().clean);
    }
    let p = pair(&mixed_tensors(1), 1, 1);
    for bad in [0, 1000, 512, 3 << 12] {
        let e = checkpoint(&p.model).init(bad).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
    }
    assert!(!p.model.join(".apollo-checkpoint").join("index.db").exists());
}

/// The point of the index: when nothing changed, sync reads no tensor byte of the model, and
/// when some blocks changed it reads exactly those blocks (plus the headers, every time).
#[test]
fn unchanged_blocks_cost_no_read_of_the_model_file() {
    let mut tensors = mixed_tensors(21);
    let p = pair(&tensors, 3, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let headers: u64 = snapshot(&p.model)
        .iter()
        .filter(|(n, _)| n.ends_with(".safetensors"))
        .map(|(_, b)| 8 + u64::from_le_bytes(b[..8].try_into().unwrap()))
        .sum();

    let io = CountingIo::default();
    let cp = Checkpoint::new(&p.model, None, Arc::new(io.clone()));
    let r = cp
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
    assert_eq!(r.blocks_changed, 0);
    assert_eq!(
        io.read.load(Ordering::Relaxed),
        headers,
        "only the headers were read"
    );
    assert_eq!(io.written.load(Ordering::Relaxed), 0);

    sparse_change(&mut tensors, 0.1, &mut Rng::new(4));
    write_model(&p.source, &tensors, 1);
    io.read.store(0, Ordering::Relaxed);
    let r = cp
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
    assert!(r.blocks_changed > 0);
    // The changed blocks are read twice: once to journal their old bytes, once when the journal
    // is rolled forward (which checks each block's hash before writing it).
    assert_eq!(
        io.read.load(Ordering::Relaxed),
        headers + 2 * r.bytes_changed,
        "headers plus the changed blocks"
    );
    assert_eq!(io.written.load(Ordering::Relaxed), r.bytes_changed);
    assert_eq!(r.model_bytes_read, headers + 2 * r.bytes_changed);
}

#[test]
fn names_dtypes_and_shapes_that_differ_are_listed_and_nothing_is_written() {
    let tensors = mixed_tensors(2);
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let mut live = tensors.clone();
    live[2].dtype = Dtype::BF16; // same bytes, other dtype
    live[1].shape = vec![160, 256]; // same bytes, other shape
    live[6].name = "model.renamed".into();
    let mut rng = Rng::new(8);
    live.push(T::random("model.extra", Dtype::F32, &[4], &mut rng));
    for t in &mut live {
        t.data.iter_mut().for_each(|b| *b ^= 0xff); // every block would change
    }
    write_model(&p.source, &live, 1);
    let before = snapshot(&p.model);
    let err = sync_from(&p.model, &p.source).unwrap_err();
    let msg = err.to_string();
    for needle in [
        "model.layers.0.self_attn.k_proj.weight: dtype F16 in the model, BF16 in the source",
        "model.layers.0.mlp.up_proj.weight: shape [256, 160] in the model, [160, 256] in the source",
        "model.vocab_mask: in the model but not in the source",
        "model.renamed: in the source but not in the model",
        "model.extra: in the source but not in the model",
        "nothing was written",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in:\n{msg}");
    }
    assert_eq!(err.exit_code(), 65);
    assert_eq!(before, snapshot(&p.model));
}

#[test]
fn generations_record_the_changed_ranges() {
    let mut tensors = mixed_tensors(31);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    // Change byte 5000 of lm_head (block 1) and the last byte of the vocab mask (block 17 of 18).
    let lm = tensors
        .iter()
        .position(|t| t.name == "lm_head.weight")
        .unwrap();
    let vm = tensors
        .iter()
        .position(|t| t.name == "model.vocab_mask")
        .unwrap();
    tensors[lm].data[5000] ^= 1;
    let last = tensors[vm].data.len() - 1;
    tensors[vm].data[last] ^= 1;
    write_model(&p.source, &tensors, 1);
    let r = sync_from(&p.model, &p.source).unwrap();
    assert_eq!((r.generation, r.blocks_changed), (1, 2));
    let bytes = std::fs::read(p.model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let data_start = 8 + st.0 as u64;
    let off = |name: &str| data_start + st.1.info(name).unwrap().data_offsets.0 as u64;
    let index =
        apollo_checkpoint::index::BlockIndex::open(&p.model.join(".apollo-checkpoint")).unwrap();
    let ranges = index.generation_ranges(1).unwrap();
    let mut expected = vec![
        (off("lm_head.weight") + 4096, 4096),
        (off("model.vocab_mask") + 17 * 4096, 70_001 - 17 * 4096),
    ];
    expected.sort_unstable();
    assert_eq!(ranges, vec![("model.safetensors".to_string(), expected)]);
    let g = index.generation_record(1).unwrap().unwrap();
    assert_eq!((g.kind, g.blocks_changed), (GenerationKind::Sync, 2));
    assert_eq!(
        index.generation_record(0).unwrap().unwrap().kind,
        GenerationKind::Init
    );
}

/// Random models, random changes, many syncs: the files always end up equal to the source.
#[test]
fn random_syncs_always_converge() {
    for seed in 0..6u64 {
        let mut rng = Rng::new(seed);
        let dtypes = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::I64, Dtype::U8];
        let mut tensors: Vec<T> = (0..=rng.below(8))
            .map(|i| {
                let dtype = dtypes[rng.below(5) as usize];
                let n = rng.below(40_000) as usize;
                T::random(&format!("w{i}"), dtype, &[n], &mut rng)
            })
            .collect();
        let shards = 1 + rng.below(tensors.len() as u64) as usize;
        let p = pair(&tensors, shards, 1);
        checkpoint(&p.model).init(1024 << rng.below(3)).unwrap();
        for round in 0..4 {
            match rng.below(3) {
                0 => {
                    sparse_change(&mut tensors, 0.05, &mut rng);
                }
                1 => dense_change(&mut tensors, &mut rng),
                _ => {
                    let i = rng.below(tensors.len() as u64) as usize;
                    let mut data = std::mem::take(&mut tensors[i].data);
                    rng.fill(&mut data);
                    tensors[i].data = data;
                }
            }
            write_model(&p.source, &tensors, 1 + (round % 2));
            sync_from(&p.model, &p.source).unwrap();
            assert_same_tensors(&p.model, &p.source);
        }
        assert!(
            checkpoint(&p.model).verify(false).unwrap().clean,
            "seed {seed}"
        );
    }
}

fn hash_log_rows(model: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(model.join(".apollo-checkpoint/index.db")).unwrap();
    db.query_row("SELECT count(*) FROM block_hash_log", [], |r| r.get(0))
        .unwrap()
}

/// Sparse syncs append their new block hashes to `block_hash_log` instead of rewriting the
/// hash BLOBs; once the log would pass its limit (1024 rows for a model this small) a sync folds
/// it in. Through all of it the stored hashes stay right: a no-change sync changes nothing,
/// `verify` is clean and a sync after reopening sees exactly the next change.
#[test]
fn sparse_syncs_log_their_hashes_and_fold_them_into_the_index_when_the_log_is_full() {
    let mut rng = Rng::new(17);
    let mut tensors = vec![
        T::random("a", Dtype::BF16, &[1024, 2048], &mut rng),
        T::random("b", Dtype::F32, &[512, 1024], &mut rng),
    ];
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let mut rows = Vec::new();
    for _ in 0..5 {
        let changed = sparse_change(&mut tensors, 0.2, &mut rng);
        write_model(&p.source, &tensors, 1);
        let r = sync_from(&p.model, &p.source).unwrap();
        assert_eq!(r.blocks_changed, changed as u64);
        assert_same_tensors(&p.model, &p.source);
        rows.push(hash_log_rows(&p.model));
        assert_eq!(sync_from(&p.model, &p.source).unwrap().blocks_changed, 0);
        assert!(checkpoint(&p.model).verify(false).unwrap().clean);
    }
    // About 300 changed blocks a sync: three fit in the log, the fourth folds it.
    assert!(
        rows[0] > 200 && rows[1] > rows[0] && rows[2] > rows[1],
        "{rows:?}"
    );
    assert!(rows.contains(&0), "never folded: {rows:?}");
    assert!(rows.iter().all(|&r| r <= 1024), "{rows:?}");
    assert!(rows[4] > 0, "{rows:?}");
}

/// A trainer re-saving its weights truncates the file a cron sync is reading: the sync stops
/// with a clear error (exit 65) and writes nothing. (The source was memory-mapped: the read
/// past the new end was SIGBUS, killing the process without a word.)
#[test]
fn a_source_truncated_while_it_is_read_is_an_error_and_nothing_is_written() {
    let tensors = mixed_tensors(21);
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let mut changed = tensors.clone();
    let mut rng = Rng::new(22);
    dense_change(&mut changed, &mut rng);
    write_model(&p.source, &changed, 1);
    let source = SafetensorsSource::open(&p.source).unwrap();
    let shard = p.source.join("model.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let before = snapshot(&p.model);
    let e = checkpoint(&p.model).sync(&source).unwrap_err();
    assert!(
        e.to_string().contains("shrank while this sync read it")
            && e.to_string().contains("model.safetensors"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 65);
    assert_eq!(before, snapshot(&p.model));
    assert!(!p.model.join(".apollo-checkpoint/journal").exists());
    // Once the source is whole again, the sync takes it.
    write_model(&p.source, &changed, 1);
    sync_from(&p.model, &p.source).unwrap();
    assert_same_tensors(&p.model, &p.source);
}
