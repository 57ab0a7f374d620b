//! A sync whose live weights are packed, tensor-parallel parameters (vLLM's layout, two ranks,
//! held in host memory here), read as HF tensors through the layout map.

use apollo_checkpoint::live::layout::{LayoutMap, LiveParam, PackedPart};
use apollo_checkpoint::live::source::{HostParams, LayoutSource};
use apollo_checkpoint::synthetic::Rng;
use safetensors::Dtype;

use crate::util::{T, checkpoint, write_model};

/// HF tensors: q/k/v and gate/up (packed by the engine), o_proj (row-parallel), embed
/// (column-parallel), a norm (replicated).
fn hf_tensors(rng: &mut Rng) -> Vec<T> {
    let l = "model.language_model.layers.3";
    vec![
        T::random(
            &format!("{l}.self_attn.q_proj.weight"),
            Dtype::BF16,
            &[64, 96],
            rng,
        ),
        T::random(
            &format!("{l}.self_attn.k_proj.weight"),
            Dtype::BF16,
            &[16, 96],
            rng,
        ),
        T::random(
            &format!("{l}.self_attn.v_proj.weight"),
            Dtype::BF16,
            &[16, 96],
            rng,
        ),
        T::random(
            &format!("{l}.self_attn.o_proj.weight"),
            Dtype::BF16,
            &[96, 32],
            rng,
        ),
        T::random(
            &format!("{l}.mlp.gate_proj.weight"),
            Dtype::BF16,
            &[128, 96],
            rng,
        ),
        T::random(
            &format!("{l}.mlp.up_proj.weight"),
            Dtype::BF16,
            &[128, 96],
            rng,
        ),
        T::random(
            "model.language_model.embed_tokens.weight",
            Dtype::BF16,
            &[256, 96],
            rng,
        ),
        T::random(
            &format!("{l}.input_layernorm.weight"),
            Dtype::BF16,
            &[96],
            rng,
        ),
    ]
}

fn rows(t: &T, a: usize, b: usize) -> Vec<u8> {
    let row = t.data.len() / t.shape[0];
    t.data[a * row..b * row].to_vec()
}

/// Packs the HF tensors the way the engine holds them on each of `tp` ranks.
fn pack(hf: &[T], tp: usize) -> (Vec<LiveParam>, HostParams) {
    let by = |suffix: &str| hf.iter().find(|t| t.name.ends_with(suffix)).unwrap();
    let mut params = Vec::new();
    let mut data = Vec::new();
    for r in 0..tp {
        let base = LiveParam {
            name: String::new(),
            dtype: Dtype::BF16,
            shape: vec![],
            tp_rank: r as u64,
            tp_size: tp as u64,
            shard_dim: Some(0),
            parts: vec![],
            hf_name: String::new(),
        };
        let mut packed = |names: &[&str], engine: &str| {
            let mut bytes = Vec::new();
            let mut parts = Vec::new();
            for n in names {
                let t = by(n);
                let per = t.shape[0] / tp;
                bytes.extend(rows(t, r * per, (r + 1) * per));
                parts.push(PackedPart {
                    hf_name: t.name.clone(),
                    rows: t.shape[0] as u64,
                    local_rows: per as u64,
                    first_row: (r * per) as u64,
                });
            }
            let local: u64 = parts.iter().map(|p| p.local_rows).sum();
            params.push(LiveParam {
                name: engine.into(),
                shape: vec![local, 96],
                parts,
                ..base.clone()
            });
            data.push(bytes);
        };
        packed(
            &["q_proj.weight", "k_proj.weight", "v_proj.weight"],
            "qkv_proj",
        );
        packed(&["gate_proj.weight", "up_proj.weight"], "gate_up_proj");
        let o = by("o_proj.weight");
        let piece: Vec<u8> = (0..96)
            .flat_map(|row| rows(o, row, row + 1)[r * 64 / tp..(r + 1) * 64 / tp].to_vec())
            .collect();
        params.push(LiveParam {
            name: "o_proj".into(),
            shape: vec![96, 32 / tp as u64],
            shard_dim: Some(1),
            hf_name: o.name.clone(),
            ..base.clone()
        });
        data.push(piece);
        let e = by("embed_tokens.weight");
        let vocab = e.shape[0];
        params.push(LiveParam {
            name: "embed".into(),
            shape: vec![(vocab / tp) as u64, 96],
            hf_name: e.name.clone(),
            ..base.clone()
        });
        data.push(rows(e, r * vocab / tp, (r + 1) * vocab / tp));
        let n = by("input_layernorm.weight");
        params.push(LiveParam {
            name: "norm".into(),
            shape: vec![96],
            shard_dim: None,
            hf_name: n.name.clone(),
            ..base
        });
        data.push(n.data.clone());
    }
    (params, HostParams(data))
}

#[test]
fn a_model_syncs_from_packed_tensor_parallel_live_weights() {
    let mut rng = Rng::new(90);
    let mut hf = hf_tensors(&mut rng);
    let tmp = tempfile::tempdir().unwrap();
    let (model, expected) = (tmp.path().join("model"), tmp.path().join("expected"));
    write_model(&model, &hf, 2);
    checkpoint(&model).init(4096).unwrap();
    for round in 0..3 {
        // A training step on the HF view, then the engine's packed TP=2 layout of it.
        for t in &mut hf {
            for b in t.data.iter_mut().step_by(97 + round) {
                *b = b.wrapping_add(1);
            }
        }
        let (params, live) = pack(&hf, 2);
        let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), live);
        let r = checkpoint(&model).sync(&source).unwrap();
        assert!(r.changed && r.blocks_changed > 0, "round {round}: {r:?}");
        write_model(&expected, &hf, 2);
        crate::util::assert_same_tensors(&model, &expected);
    }
    assert!(checkpoint(&model).verify(false).unwrap().clean);
}

/// A serving engine does not load every tensor of the checkpoint (`mtp.*`): such tensors are
/// left untouched and listed, while the rest syncs.
#[test]
fn tensors_the_engine_does_not_hold_are_left_untouched_and_listed() {
    let mut rng = Rng::new(91);
    let mut hf = hf_tensors(&mut rng);
    let mtp = T::random(
        "mtp.layers.0.mlp.up_proj.weight",
        Dtype::BF16,
        &[8, 96],
        &mut rng,
    );
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let mut on_disk = hf.clone();
    on_disk.push(mtp.clone());
    write_model(&model, &on_disk, 1);
    checkpoint(&model).init(4096).unwrap();
    for t in &mut hf {
        if let Some(b) = t.data.first_mut() {
            *b ^= 1;
        }
    }
    let (params, live) = pack(&hf, 1);
    let r = checkpoint(&model)
        .sync(&LayoutSource::new(LayoutMap::build(&params).unwrap(), live))
        .unwrap();
    assert_eq!(r.untouched, vec![mtp.name.clone()]);
    assert_eq!(r.tensors, hf.len());
    let mut expected = hf.clone();
    expected.push(mtp);
    let exp_dir = tmp.path().join("expected");
    write_model(&exp_dir, &expected, 1);
    crate::util::assert_same_tensors(&model, &exp_dir);
}

/// Hashing and capturing "where the weights live" (the device path, host memory standing in
/// for a GPU) gives exactly what copying every byte to the host and hashing there gives, for
/// every block size, including blocks that span ranks (row-parallel rows, a column-parallel
/// boundary inside a block), which take the host path.
#[test]
fn in_place_hashing_and_capture_equal_the_host_path_for_any_layout() {
    use apollo_checkpoint::WeightSource;
    use apollo_checkpoint::source::BlockRun;
    let mut rng = Rng::new(92);
    let hf = hf_tensors(&mut rng);
    for tp in [1, 2, 4, 8] {
        let (params, live) = pack(&hf, tp);
        let map = LayoutMap::build(&params).unwrap();
        let device = LayoutSource::new(map.clone(), live.clone());
        let host = LayoutSource::new(map, live).with_hashing_in_place(false);
        assert!(device.hashes_in_place() && !host.hashes_in_place());
        for bs in [1024u64, 4096, 8192] {
            // Every block of every tensor, and a scattered subset.
            let all: Vec<BlockRun> = (0..device.tensors().len())
                .map(|t| BlockRun {
                    tensor: t,
                    first: 0,
                    count: device.tensors()[t].len.div_ceil(bs),
                })
                .collect();
            let some: Vec<BlockRun> = all
                .iter()
                .filter(|r| r.count > 1)
                .map(|r| BlockRun {
                    first: 1,
                    count: r.count - 1,
                    ..*r
                })
                .collect();
            for runs in [&all, &some] {
                let n: usize = runs.iter().map(|r| r.count as usize).sum();
                let bytes: usize = runs
                    .iter()
                    .map(|r| r.span(bs, device.tensors()[r.tensor].len).1 as usize)
                    .sum();
                let (mut a, mut b) = (vec![[0u8; 32]; n], vec![[0u8; 32]; n]);
                device.hash_blocks(runs, bs, &mut a).unwrap();
                host.hash_blocks(runs, bs, &mut b).unwrap();
                assert!(a == b, "hashes differ at tp {tp}, block size {bs}");
                let (mut ca, mut cb) = (vec![0u8; bytes], vec![0u8; bytes]);
                device.capture(runs, bs, &mut ca, &mut a).unwrap();
                host.capture(runs, bs, &mut cb, &mut b).unwrap();
                assert!(
                    ca == cb && a == b,
                    "captures differ at tp {tp}, block size {bs}"
                );
            }
        }
    }
}

/// Host memory that counts the reads it is asked for: one per strided run, or one per piece.
struct CountingReader {
    live: HostParams,
    strided: std::sync::atomic::AtomicUsize,
    pieces: std::sync::atomic::AtomicUsize,
}

impl apollo_checkpoint::live::source::ParamReader for CountingReader {
    fn read_param(
        &self,
        param: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), apollo_checkpoint::source::SourceError> {
        self.pieces
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live.read_param(param, offset, buf)
    }

    fn read_param_2d(
        &self,
        param: usize,
        copy: apollo_checkpoint::live::source::Strided,
        buf: &mut [u8],
    ) -> Result<(), apollo_checkpoint::source::SourceError> {
        self.strided
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.live.read_param_2d(param, copy, buf)
    }

    fn describe(&self) -> String {
        "counting".into()
    }

    fn device(&self) -> Option<&dyn apollo_checkpoint::live::source::DeviceReader> {
        Some(&self.live)
    }
}

/// A row-parallel tensor over 8 ranks: every 4 KiB block spans ranks, so it takes the host
/// path; its rows are read with one strided copy per rank (a 2D copy on the GPU), never one
/// copy per block or per row piece, and hash to the HF bytes' block hashes.
#[test]
fn row_parallel_blocks_are_read_with_one_strided_copy_per_rank() {
    use apollo_checkpoint::WeightSource;
    use apollo_checkpoint::source::BlockRun;
    use std::sync::atomic::Ordering::Relaxed;
    let (rows_n, cols, tp) = (512usize, 2048usize, 8usize);
    let mut rng = Rng::new(31);
    let o = T::random("o_proj.weight", Dtype::BF16, &[rows_n, cols], &mut rng);
    let w = cols / tp;
    let mut params = Vec::new();
    let mut data = Vec::new();
    for r in 0..tp {
        params.push(LiveParam {
            name: "o_proj".into(),
            dtype: Dtype::BF16,
            shape: vec![rows_n as u64, w as u64],
            tp_rank: r as u64,
            tp_size: tp as u64,
            shard_dim: Some(1),
            parts: vec![],
            hf_name: o.name.clone(),
        });
        data.push(
            (0..rows_n)
                .flat_map(|row| rows(&o, row, row + 1)[2 * r * w..2 * (r + 1) * w].to_vec())
                .collect(),
        );
    }
    let reader = CountingReader {
        live: HostParams(data),
        strided: 0.into(),
        pieces: 0.into(),
    };
    let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), reader);
    let bs = 4096u64;
    let count = (o.data.len() as u64).div_ceil(bs);
    let mut cvs = vec![[0u8; 32]; count as usize];
    let mut bytes = vec![0u8; o.data.len()];
    source
        .capture(
            &[BlockRun {
                tensor: 0,
                first: 0,
                count,
            }],
            bs,
            &mut bytes,
            &mut cvs,
        )
        .unwrap();
    assert!(bytes == o.data, "the HF bytes");
    let mut want = vec![[0u8; 32]; count as usize];
    apollo_checkpoint::blockhash::hash_units(0, bs, &o.data, &mut want);
    assert!(cvs == want, "the HF bytes' block hashes");
    let reader = source.reader();
    // 2 MiB in one host chunk: one strided copy per rank. The pieces read are the host
    // memory's own loop inside each (not calls into the reader).
    assert_eq!(
        reader.strided.load(Relaxed),
        tp,
        "one strided copy per rank"
    );
    assert_eq!(reader.pieces.load(Relaxed), 0, "no copy per piece");
    // A block range cut mid-row still reads each rank's rows in one run (plus the cut pieces).
    reader.strided.store(0, Relaxed);
    let mut part = vec![0u8; 10_000];
    source.read(0, 12_345, &mut part).unwrap();
    assert!(part == o.data[12_345..22_345]);
    assert!(
        reader.strided.load(Relaxed) <= 3 * tp,
        "{}",
        reader.strided.load(Relaxed)
    );
    // Any range, cut anywhere (mid-piece, mid-row, one byte, the tail), reads the HF bytes.
    let mut pick = Rng::new(77);
    let total = o.data.len() as u64;
    for _ in 0..300 {
        let offset = pick.below(total);
        let most = if pick.below(2) == 0 { 64 } else { 1 << 20 };
        let len = 1 + pick.below((total - offset).min(most));
        let mut got = vec![0u8; len as usize];
        source.read(0, offset, &mut got).unwrap();
        assert!(
            got == o.data[offset as usize..(offset + len) as usize],
            "bytes {offset}..{}",
            offset + len
        );
    }
}

/// Summaries (one hash per 16 blocks) let a sync from live weights read 1/16 of the stored
/// hashes when nothing changed and the hashes of only the differing summaries' blocks otherwise;
/// they stay true to the block hashes through sparse and dense syncs, are forgotten by a commit
/// that does not recompute them (rollback) and learned again by the next sync, which then still
/// finds every change (a stale summary would hide it).
#[test]
fn syncs_compare_summaries_first_and_keep_them_true() {
    use apollo_checkpoint::blockhash::BlockLayout;
    use apollo_checkpoint::index::BlockIndex;
    let mut rng = Rng::new(93);
    let mut hf = hf_tensors(&mut rng);
    // A larger embedding: 24 summaries of 16 KiB at 1 KiB blocks.
    let e = embed(&mut hf);
    *e = T::random(&e.name.clone(), Dtype::BF16, &[2048, 96], &mut rng);
    let tmp = tempfile::tempdir().unwrap();
    let (model, expected) = (tmp.path().join("model"), tmp.path().join("expected"));
    write_model(&model, &hf, 2);
    checkpoint(&model).init(1024).unwrap();
    let layout = BlockLayout::new(1024).unwrap();
    let len = |t: &T| t.data.len() as u64;
    let summary_bytes: u64 = hf.iter().map(|t| layout.summaries(len(t)) * 32).sum();
    let blocks: u64 = hf.iter().map(|t| layout.blocks(len(t))).sum();
    let sync = |hf: &[T]| {
        let (params, live) = pack(hf, 2);
        let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), live);
        let r = checkpoint(&model).sync(&source).unwrap();
        write_model(&expected, hf, 2);
        crate::util::assert_same_tensors(&model, &expected);
        r
    };
    let state = checkpoint(&model).state_dir().to_path_buf();
    let summaries_true = |all_known: bool| {
        let index = BlockIndex::open_read_only(&state).unwrap();
        assert!(index.stale_summaries(layout).unwrap().is_empty());
        let tensors = index.tensors().unwrap();
        let rows: Vec<_> = tensors.iter().collect();
        let known = index.tensors_summaries(&rows, layout).unwrap();
        known.iter().all(Option::is_some) == all_known
    };
    assert!(summaries_true(true), "init writes every summary");

    let r = sync(&hf);
    assert!(!r.changed);
    assert_eq!(
        r.index_bytes_read, summary_bytes,
        "nothing changed: summaries only"
    );

    // One element near the end of the embedding: one summary differs (one in 24: only its
    // blocks' hashes are read), one block changes.
    let e = embed(&mut hf);
    let at = e.data.len() - 5;
    e.data[at] ^= 0x40;
    let r = sync(&hf);
    assert_eq!(r.blocks_changed, 1);
    assert_eq!(r.index_bytes_read, summary_bytes + 16 * 32);
    assert!(summaries_true(true));
    // The same block again: its stored hash is the one the last sync logged (the old bytes are
    // checked against it before anything is written).
    embed(&mut hf).data[at] ^= 0x01;
    let r = sync(&hf);
    assert_eq!(
        (r.blocks_changed, r.index_bytes_read),
        (1, summary_bytes + 16 * 32)
    );
    assert!(summaries_true(true));

    // A training step: every block of every tensor.
    for t in &mut hf {
        for b in t.data.iter_mut().step_by(512) {
            *b = b.wrapping_add(1);
        }
    }
    let r = sync(&hf);
    assert_eq!(r.blocks_changed, blocks);
    assert!(summaries_true(true));
    let r = sync(&hf);
    assert!(!r.changed);
    assert_eq!(r.index_bytes_read, summary_bytes);

    // Rollback restores the hashes of generation 1 without recomputing summaries: they are
    // forgotten, and the same live weights sync again in full.
    checkpoint(&model).rollback(Some(1)).unwrap();
    assert!(summaries_true(false));
    let r = sync(&hf);
    assert_eq!(r.blocks_changed, blocks);
    assert!(summaries_true(true));
    let r = sync(&hf);
    assert!(!r.changed && r.index_bytes_read == summary_bytes);
    assert!(checkpoint(&model).verify(false).unwrap().clean);
}

/// `verify` reports summaries that disagree with the block hashes (an index changed behind our
/// back); a sync is not misled by them (a differing summary only costs reading its blocks'
/// hashes); `verify --repair` forgets them and the next sync learns them again.
#[test]
fn verify_reports_and_repair_forgets_damaged_summaries() {
    use apollo_checkpoint::blockhash::BlockLayout;
    let mut rng = Rng::new(94);
    let mut hf = hf_tensors(&mut rng);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_model(&model, &hf, 1);
    checkpoint(&model).init(1024).unwrap();
    let state = checkpoint(&model).state_dir().to_path_buf();
    edit_index(
        &state,
        "UPDATE summaries SET cvs = zeroblob(length(cvs))
         WHERE tensor_id = (SELECT id FROM tensors WHERE name LIKE '%embed_tokens%')",
    );
    let v = checkpoint(&model).verify(false).unwrap();
    assert!(!v.clean);
    assert!(
        v.file_problems
            .iter()
            .any(|p| p.contains("summaries") && p.contains("embed_tokens")),
        "{:?}",
        v.file_problems
    );
    let e = embed(&mut hf);
    e.data[7] ^= 1;
    let (params, live) = pack(&hf, 1);
    let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), live);
    let r = checkpoint(&model).sync(&source).unwrap();
    assert_eq!(r.blocks_changed, 1);
    let layout = BlockLayout::new(1024).unwrap();
    let n = layout.summaries(embed(&mut hf).data.len() as u64) * 32;
    assert!(
        r.index_bytes_read >= n * 16,
        "every damaged summary's blocks were read"
    );
    assert!(checkpoint(&model).verify(true).unwrap().repaired);
    assert!(checkpoint(&model).verify(false).unwrap().clean);
    let r = checkpoint(&model).sync(&source).unwrap();
    assert!(!r.changed);
    assert!(checkpoint(&model).verify(false).unwrap().clean);
}

/// The embedding of `hf`.
fn embed(hf: &mut [T]) -> &mut T {
    hf.iter_mut()
        .find(|t| t.name.ends_with("embed_tokens.weight"))
        .unwrap()
}

/// Runs `sql` on the index in `state` (an index changed behind the tool's back).
fn edit_index(state: &std::path::Path, sql: &str) {
    let conn = rusqlite::Connection::open(state.join(apollo_checkpoint::index::INDEX_DB)).unwrap();
    conn.execute(sql, []).unwrap();
}

/// An index from before summaries (schema 5: no summary known) is compared in full by the first
/// sync, which writes every summary even when nothing changed; the next sync reads only them.
#[test]
fn the_first_sync_after_the_upgrade_learns_every_summary() {
    use apollo_checkpoint::blockhash::BlockLayout;
    use apollo_checkpoint::index::BlockIndex;
    let mut rng = Rng::new(95);
    let hf = hf_tensors(&mut rng);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_model(&model, &hf, 1);
    checkpoint(&model).init(1024).unwrap();
    let state = checkpoint(&model).state_dir().to_path_buf();
    edit_index(&state, "DELETE FROM summaries");
    let layout = BlockLayout::new(1024).unwrap();
    let len = |t: &T| t.data.len() as u64;
    let blocks: u64 = hf.iter().map(|t| layout.blocks(len(t)) * 32).sum();
    let summaries: u64 = hf.iter().map(|t| layout.summaries(len(t)) * 32).sum();
    let sync = || {
        let (params, live) = pack(&hf, 1);
        let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), live);
        checkpoint(&model).sync(&source).unwrap()
    };
    let r = sync();
    assert!(!r.changed);
    assert_eq!(
        r.index_bytes_read, blocks,
        "no summary known: every block hash read"
    );
    let index = BlockIndex::open_read_only(&state).unwrap();
    let tensors = index.tensors().unwrap();
    let rows: Vec<_> = tensors.iter().collect();
    assert!(
        index
            .tensors_summaries(&rows, layout)
            .unwrap()
            .iter()
            .all(Option::is_some)
    );
    assert!(index.stale_summaries(layout).unwrap().is_empty());
    drop(index);
    let r = sync();
    assert_eq!((r.changed, r.index_bytes_read), (false, summaries));
    assert!(checkpoint(&model).verify(false).unwrap().clean);
}
