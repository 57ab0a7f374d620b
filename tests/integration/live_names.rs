//! Live weights in the shapes real deployments hold them, read back byte for byte as the files'
//! tensors: fused-MoE experts (tensor- and expert-parallel, either checkpoint naming), a fused
//! tensor that older layout facts split, and tied embeddings.

use std::collections::HashMap;
use std::path::Path;

use apollo_checkpoint::io::RealIo;
use apollo_checkpoint::live::handles::{ManifestTensor, Manifests};
use apollo_checkpoint::live::layout::LayoutMap;
use apollo_checkpoint::live::open_live;
use apollo_checkpoint::live::params::live_params;
use apollo_checkpoint::live::source::{HostParams, LayoutSource};
use apollo_checkpoint::model::ModelLayout;
use apollo_checkpoint::synthetic::Rng;
use safetensors::Dtype;
use serde_json::json;

use crate::util::{T, assert_reads_as, checkpoint, run, s, stdout_json, write_model};

const E: usize = 4;
const I: usize = 8;
const H: usize = 16;
const MLP: &str = "model.layers.0.mlp.experts";

/// A manifest entry whose bytes are `key`'s (the handle names which buffer of the test holds
/// them).
fn entry(name: &str, shape: &[usize], key: u8, layout: &serde_json::Value) -> ManifestTensor {
    serde_json::from_value(json!({
        "name": name, "dtype": "BF16", "shape": shape, "strides": [],
        "nbytes": shape.iter().product::<usize>() * 2, "device": 0, "device_uuid": "GPU-0",
        "ipc_handle": format!("{key:02x}").repeat(64), "offset": 0, "allocation_bytes": 0,
        "pid": 1, "layout": layout,
    }))
    .unwrap()
}

/// Rows `a..b` of a row-major tensor with `cols` bf16 columns; columns `c..d` of each row.
fn block(t: &T, rows: (usize, usize), cols: (usize, usize)) -> Vec<u8> {
    let width = t.shape[1];
    (rows.0..rows.1)
        .flat_map(|r| t.data[(r * width + cols.0) * 2..(r * width + cols.1) * 2].to_vec())
        .collect()
}

/// The bytes each tensor a reader opens would read: a view of a buffer at its offset.
fn view_data(tensors: &[ManifestTensor], buffers: &HashMap<String, Vec<u8>>) -> Vec<Vec<u8>> {
    tensors
        .iter()
        .map(|t| {
            let b = &buffers[&t.ipc_handle];
            b[t.offset as usize..(t.offset + t.nbytes) as usize].to_vec()
        })
        .collect()
}

fn experts_hf(naming: [&str; 3], rng: &mut Rng) -> Vec<T> {
    let mut hf = Vec::new();
    for e in 0..E {
        for (n, shape) in [
            (naming[0], [I, H]),
            (naming[1], [I, H]),
            (naming[2], [H, I]),
        ] {
            hf.push(T::random(
                &format!("{MLP}.{e}.{n}.weight"),
                Dtype::BF16,
                &shape,
                rng,
            ));
        }
    }
    hf
}

/// Every rank's `w13_weight` and `w2_weight` as vLLM's FusedMoE holds them: with `ep` = 1 every
/// rank holds every expert's slice of the intermediate dimension; with `ep` = 2 the layer's tp is
/// 1 and rank r holds experts 2r and 2r + 1.
fn experts_live(hf: &[T], ranks: usize, ep: usize) -> (Manifests, HashMap<String, Vec<u8>>) {
    let t = |e: usize, k: usize| &hf[e * 3 + k];
    let tp = if ep > 1 { 1 } else { ranks };
    let mut manifests = Manifests::default();
    let mut buffers = HashMap::new();
    for r in 0..ranks {
        let experts: Vec<usize> = if ep > 1 {
            (r * E / ep..(r + 1) * E / ep).collect()
        } else {
            (0..E).collect()
        };
        let (tr, li) = (if ep > 1 { 0 } else { r }, I / tp);
        let mut w13 = Vec::new();
        let mut w2 = Vec::new();
        for &e in &experts {
            w13.extend(block(t(e, 0), (tr * li, (tr + 1) * li), (0, H)));
            w13.extend(block(t(e, 1), (tr * li, (tr + 1) * li), (0, H)));
            w2.extend(block(t(e, 2), (0, H), (tr * li, (tr + 1) * li)));
        }
        let facts = |kind: &str| {
            json!({ "tp_rank": tr, "tp_size": tp, "shard_dim": null,
                    "experts": { "kind": kind, "experts": experts, "num_experts": E } })
        };
        let (k13, k2) = (2 * r as u8, 2 * r as u8 + 1);
        manifests.tensors.push(entry(
            &format!("{MLP}.w13_weight"),
            &[experts.len(), 2 * li, H],
            k13,
            &facts("w13"),
        ));
        manifests.tensors.push(entry(
            &format!("{MLP}.w2_weight"),
            &[experts.len(), H, li],
            k2,
            &facts("w2"),
        ));
        buffers.insert(format!("{k13:02x}").repeat(64), w13);
        buffers.insert(format!("{k2:02x}").repeat(64), w2);
    }
    (manifests, buffers)
}

fn source_of(
    manifests: &Manifests,
    buffers: &HashMap<String, Vec<u8>>,
    model: &ModelLayout,
) -> LayoutSource<HostParams> {
    let live = live_params(manifests, Some(model)).unwrap();
    assert!(live.unmatched.is_empty(), "{:?}", live.unmatched);
    LayoutSource::new(
        LayoutMap::build(&live.params).unwrap(),
        HostParams(view_data(&live.tensors, buffers)),
    )
}

/// FusedMoE's stacked experts read back as the checkpoint's per-expert tensors: tensor-parallel
/// with `gate_proj`/`up_proj`/`down_proj` names, expert-parallel with Mixtral's `w1`/`w3`/`w2`;
/// then a sync through them writes every expert.
#[test]
fn fused_moe_experts_read_back_as_per_expert_tensors_under_tp_and_ep() {
    for (naming, ep) in [
        (["gate_proj", "up_proj", "down_proj"], 1),
        (["w1", "w3", "w2"], 2),
    ] {
        let mut rng = Rng::new(90 + ep as u64);
        let hf = experts_hf(naming, &mut rng);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        write_model(&dir, &hf, 2);
        let model = ModelLayout::open(&dir, &RealIo::new()).unwrap();
        let (manifests, buffers) = experts_live(&hf, 2, ep);
        assert_reads_as(&source_of(&manifests, &buffers, &model), &hf);

        // One element of every expert changes (a training step): the sync writes them all.
        checkpoint(&dir).init(4096).unwrap();
        let mut new = hf.clone();
        for t in &mut new {
            t.data[5] ^= 0x40;
        }
        let (manifests, buffers) = experts_live(&new, 2, ep);
        let report = checkpoint(&dir)
            .sync(&source_of(&manifests, &buffers, &model))
            .unwrap();
        assert_eq!(report.tensors_changed, 3 * E, "{report:?}");
        let expected = tmp.path().join("expected");
        write_model(&expected, &new, 2);
        crate::util::assert_same_tensors(&dir, &expected);

        // Without rank 1 half of the experts (or half of every expert) is on no rank.
        let (mut manifests, _) = experts_live(&hf, 2, ep);
        manifests.tensors.truncate(2);
        let e = live_params(&manifests, Some(&model))
            .and_then(|live| Ok(LayoutMap::build(&live.params)?))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("on no rank") || e.contains("held by no rank"),
            "{e}"
        );
    }
}

fn write_manifest(path: &Path, tensors: &[ManifestTensor], meta: &serde_json::Value) {
    let doc = json!({ "format": "apollo-checkpoint-handles", "version": 1, "meta": meta,
                      "tensors": tensors });
    std::fs::write(path, doc.to_string()).unwrap();
}

/// Manifests from an older hook split a vision tower's fused `attn.qkv` into q/k/v parts the
/// files do not hold; the files hold it fused, so it is read whole (every rank's q, k and v rows
/// in place), and `diagnose` says so.
#[test]
fn a_fused_tensor_the_facts_split_is_taken_whole_as_the_files_hold_it() {
    let mut rng = Rng::new(95);
    let qkv = T::random(
        "model.visual.blocks.0.attn.qkv.weight",
        Dtype::BF16,
        &[48, H],
        &mut rng,
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_model(&dir, std::slice::from_ref(&qkv), 1);
    let handles = tmp.path().join("handles");
    std::fs::create_dir_all(&handles).unwrap();
    let mut buffers = HashMap::new();
    for r in 0..2usize {
        let part = |n: &str| json!({ "name": n, "rows": 16, "local_rows": 8, "first_row": r * 8 });
        let facts = json!({ "tp_rank": r, "tp_size": 2, "shard_dim": 0, "packed": "qkv",
                            "parts": [part("q_proj"), part("k_proj"), part("v_proj")] });
        let t = entry("visual.blocks.0.attn.qkv.weight", &[24, H], r as u8, &facts);
        let bytes: Vec<u8> = [0, 16, 32]
            .iter()
            .flat_map(|start| block(&qkv, (start + r * 8, start + r * 8 + 8), (0, H)))
            .collect();
        buffers.insert(t.ipc_handle.clone(), bytes);
        write_manifest(
            &handles.join(format!("handles-pp0-tp{r}.json")),
            &[t],
            &json!({ "tp_rank": r, "tp_size": 2 }),
        );
    }
    let model = ModelLayout::open(&dir, &RealIo::new()).unwrap();
    let live = open_live(&handles, &dir, &model).unwrap();
    assert!(live.unmatched.is_empty(), "{:?}", live.unmatched);
    let source = LayoutSource::new(live.map, HostParams(view_data(&live.tensors, &buffers)));
    assert_reads_as(&source, std::slice::from_ref(&qkv));
    let o = run(&[
        "diagnose",
        "--model-dir",
        s(&dir),
        "--handles",
        s(&handles),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let d = stdout_json(&o);
    assert_eq!(d["ok"], true);
    let note = d["notes"][0].as_str().unwrap();
    assert!(note.contains("q_proj") && note.contains("fused"), "{note}");
}

/// A tied lm_head: the engine holds one parameter, the files two tensors. Both are read from the
/// live embedding, whether the hook said so (`meta.tied`) or only config.json does.
#[test]
fn a_tied_lm_head_in_the_files_is_read_from_the_live_embedding() {
    let mut rng = Rng::new(96);
    let embed = T::random("model.embed_tokens.weight", Dtype::BF16, &[20, H], &mut rng);
    let stale = T::random("lm_head.weight", Dtype::BF16, &[20, H], &mut rng);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_model(&dir, &[embed.clone(), stale], 1);
    let handles = tmp.path().join("handles");
    std::fs::create_dir_all(&handles).unwrap();
    let t = entry("model.embed_tokens.weight", &[20, H], 7, &json!(null));
    let buffers = HashMap::from([(t.ipc_handle.clone(), embed.data.clone())]);
    let model = ModelLayout::open(&dir, &RealIo::new()).unwrap();
    let mut want_lm = embed.clone();
    want_lm.name = "lm_head.weight".into();
    for (meta, config) in [
        (
            json!({ "tied": { "lm_head.weight": "model.embed_tokens.weight" } }),
            None,
        ),
        (json!({}), Some(json!({ "tie_word_embeddings": true }))),
    ] {
        write_manifest(
            &handles.join("handles-pp0-tp0.json"),
            std::slice::from_ref(&t),
            &meta,
        );
        if let Some(c) = config {
            std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        }
        let live = open_live(&handles, &dir, &model).unwrap();
        let source = LayoutSource::new(live.map, HostParams(view_data(&live.tensors, &buffers)));
        assert_reads_as(&source, &[embed.clone(), want_lm.clone()]);
    }
    // Untied (config says so, the hook says nothing): lm_head is not live, left untouched.
    std::fs::write(
        dir.join("config.json"),
        json!({ "tie_word_embeddings": false }).to_string(),
    )
    .unwrap();
    let live = open_live(&handles, &dir, &model).unwrap();
    assert!(!live.map.tensors.contains_key("lm_head.weight"));
}
