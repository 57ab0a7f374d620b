//! Manifests as the export hook writes them from vLLM's modules: packed pieces grouped into HF
//! tensors by the files' shapes, vocabulary padding, parameters without layout facts, and
//! manifests of another model.

use apollo_checkpoint::WeightSource;
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

use crate::util::{T, assert_reads_as, checkpoint, run, s, stderr, write_model};

const L: &str = "model.language_model.layers.0.linear_attn";
const HIDDEN: usize = 32;
/// Qwen3.5-shaped GDN sizes (small): key_dim, value_dim, value heads, conv kernel.
const KEY: usize = 16;
const VALUE: usize = 32;
const HEADS: usize = 4;
const KERNEL: usize = 4;

#[allow(clippy::needless_pass_by_value)] // callers build the facts in place
fn entry(name: &str, dtype: &str, shape: &[usize], layout: serde_json::Value) -> ManifestTensor {
    serde_json::from_value(json!({
        "name": name, "dtype": dtype, "shape": shape, "strides": [], "nbytes": 0, "device": 0,
        "device_uuid": "GPU-0", "ipc_handle": "ab".repeat(64), "offset": 0, "allocation_bytes": 0,
        "pid": 1, "layout": layout,
    }))
    .unwrap()
}

fn rows(t: &T, a: usize, b: usize) -> Vec<u8> {
    let row = t.data.len() / t.shape[0];
    t.data[a * row..b * row].to_vec()
}

fn hf_tensors(rng: &mut Rng) -> Vec<T> {
    vec![
        T::random(
            &format!("{L}.in_proj_qkv.weight"),
            Dtype::BF16,
            &[2 * KEY + VALUE, HIDDEN],
            rng,
        ),
        T::random(
            &format!("{L}.in_proj_z.weight"),
            Dtype::BF16,
            &[VALUE, HIDDEN],
            rng,
        ),
        T::random(
            &format!("{L}.in_proj_b.weight"),
            Dtype::BF16,
            &[HEADS, HIDDEN],
            rng,
        ),
        T::random(
            &format!("{L}.in_proj_a.weight"),
            Dtype::BF16,
            &[HEADS, HIDDEN],
            rng,
        ),
        T::random(
            &format!("{L}.conv1d.weight"),
            Dtype::BF16,
            &[2 * KEY + VALUE, 1, KERNEL],
            rng,
        ),
        T::random(&format!("{L}.A_log"), Dtype::F32, &[HEADS], rng),
        // 250 rows: vLLM pads the vocabulary to 256, 128 rows per rank at TP=2.
        T::random(
            "model.language_model.embed_tokens.weight",
            Dtype::BF16,
            &[250, HIDDEN],
            rng,
        ),
    ]
}

/// Rank `r` of `tp`: the engine's parameters (vLLM's layout) and the facts the hook writes for
/// them, as it reads them from the modules (`output_sizes` pieces, loader shard specs, the
/// embedding's shard indices).
fn rank(hf: &[T], r: usize, tp: usize) -> (Vec<ManifestTensor>, Vec<Vec<u8>>) {
    let by = |suffix: &str| hf.iter().find(|t| t.name.ends_with(suffix)).unwrap();
    let (qkv, z) = (by("in_proj_qkv.weight"), by("in_proj_z.weight"));
    let tp_facts = |dim: Option<usize>| json!({ "tp_rank": r, "tp_size": tp, "shard_dim": dim });
    let piece =
        |size: usize| json!({ "rows": size, "local_rows": size / tp, "first_row": r * size / tp });
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    // in_proj_qkvz: pieces q, k, v, z (output_sizes), names in_proj_qkv, in_proj_z.
    let mut bytes = Vec::new();
    for (t, start, size) in [
        (qkv, 0, KEY),
        (qkv, KEY, KEY),
        (qkv, 2 * KEY, VALUE),
        (z, 0, VALUE),
    ] {
        let per = size / tp;
        bytes.extend(rows(t, start + r * per, start + (r + 1) * per));
    }
    let mut f = tp_facts(Some(0));
    f["packed"] = "in_proj_qkvz".into();
    f["names"] = json!(["in_proj_qkv", "in_proj_z"]);
    f["pieces"] = json!([piece(KEY), piece(KEY), piece(VALUE), piece(VALUE)]);
    tensors.push(entry(
        "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight",
        "BF16",
        &[(2 * KEY + 2 * VALUE) / tp, HIDDEN],
        f,
    ));
    data.push(bytes);
    // in_proj_ba: as many pieces as names.
    let (b, a) = (by("in_proj_b.weight"), by("in_proj_a.weight"));
    let per = HEADS / tp;
    let mut bytes = rows(b, r * per, (r + 1) * per);
    bytes.extend(rows(a, r * per, (r + 1) * per));
    let mut f = tp_facts(Some(0));
    f["packed"] = "in_proj_ba".into();
    f["names"] = json!(["in_proj_b", "in_proj_a"]);
    f["pieces"] = json!([piece(HEADS), piece(HEADS)]);
    tensors.push(entry(
        "language_model.model.layers.0.linear_attn.in_proj_ba.weight",
        "BF16",
        &[2 * per, HIDDEN],
        f,
    ));
    data.push(bytes);
    // conv1d: one HF tensor whose q, k, v row blocks are sharded separately.
    let conv = by("conv1d.weight");
    let mut bytes = Vec::new();
    for (start, size) in [(0, KEY), (KEY, KEY), (2 * KEY, VALUE)] {
        let per = size / tp;
        bytes.extend(rows(conv, start + r * per, start + (r + 1) * per));
    }
    let mut f = tp_facts(Some(0));
    f["packed"] = "conv1d".into();
    f["names"] = json!(["conv1d"]);
    f["pieces"] = json!([piece(KEY), piece(KEY), piece(VALUE)]);
    tensors.push(entry(
        "language_model.model.layers.0.linear_attn.conv1d.weight",
        "BF16",
        &[(2 * KEY + VALUE) / tp, 1, KERNEL],
        f,
    ));
    data.push(bytes);
    // A_log: split along dim 0 (sharded_weight_loader(0)).
    let alog = by("A_log");
    tensors.push(entry(
        "language_model.model.layers.0.linear_attn.A_log",
        "F32",
        &[HEADS / tp],
        tp_facts(Some(0)),
    ));
    data.push(rows(alog, r * HEADS / tp, (r + 1) * HEADS / tp));
    // The embedding: 256 / tp rows per rank, the real ones first, then padding.
    let e = by("embed_tokens.weight");
    let per = 256 / tp;
    let (start, end) = (r * per, ((r + 1) * per).min(250));
    let mut bytes = rows(e, start, end);
    bytes.resize(per * HIDDEN * 2, 0);
    let mut f = tp_facts(Some(0));
    f["packed"] = "embed_tokens".into();
    f["parts"] = json!([
        { "name": "embed_tokens", "rows": 250, "local_rows": end - start, "first_row": start },
        { "name": "", "rows": per - (end - start), "local_rows": per - (end - start), "first_row": 0 },
    ]);
    tensors.push(entry(
        "language_model.model.embed_tokens.weight",
        "BF16",
        &[per, HIDDEN],
        f,
    ));
    data.push(bytes);
    (tensors, data)
}

#[test]
fn pieces_group_into_hf_tensors_by_the_files_rows_and_padding_is_never_read() {
    let mut rng = Rng::new(70);
    let hf = hf_tensors(&mut rng);
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_model(&model_dir, &hf, 1);
    let model = ModelLayout::open(&model_dir, &RealIo::new()).unwrap();
    for tp in [1, 2] {
        let mut manifests = Manifests::default();
        let mut data = Vec::new();
        for r in 0..tp {
            let (t, d) = rank(&hf, r, tp);
            manifests.tensors.extend(t);
            data.extend(d);
        }
        let params = live_params(&manifests, Some(&model)).unwrap().params;
        let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), HostParams(data));
        assert_reads_as(&source, &hf);
        // Without the files, four pieces cannot be told apart into two tensors.
        let e = live_params(&manifests, None).unwrap_err().to_string();
        assert!(
            e.contains("in_proj_qkvz") && e.contains("files hold no"),
            "{e}"
        );
    }
    // And a sync through it writes the new bytes.
    checkpoint(&model_dir).init(4096).unwrap();
    let mut new = hf.clone();
    for t in &mut new {
        for b in t.data.iter_mut().step_by(13) {
            *b ^= 0x5a;
        }
    }
    let mut manifests = Manifests::default();
    let mut data = Vec::new();
    for r in 0..2 {
        let (t, d) = rank(&new, r, 2);
        manifests.tensors.extend(t);
        data.extend(d);
    }
    let params = live_params(&manifests, Some(&model)).unwrap().params;
    let source = LayoutSource::new(LayoutMap::build(&params).unwrap(), HostParams(data));
    let report = checkpoint(&model_dir).sync(&source).unwrap();
    assert!(report.changed && report.untouched.is_empty(), "{report:?}");
    let expected = tmp.path().join("expected");
    write_model(&expected, &new, 1);
    crate::util::assert_same_tensors(&model_dir, &expected);
}

/// Layer 1's q (4 gated heads of 8), k and v (2 heads of 8) projections, in HF layout.
fn qkv_tensors(rng: &mut Rng) -> Vec<T> {
    let a = "model.language_model.layers.1.self_attn";
    [("q_proj", 64), ("k_proj", 16), ("v_proj", 16)]
        .iter()
        .map(|(n, rows)| {
            T::random(
                &format!("{a}.{n}.weight"),
                Dtype::BF16,
                &[*rows, HIDDEN],
                rng,
            )
        })
        .collect()
}

/// Manifests converted from the prototype's handles file carry no layout facts: packed
/// parameters are unpacked by the names of the tensors the files hold, with their rows.
#[test]
fn parameters_without_layout_facts_are_unpacked_by_the_files() {
    let mut rng = Rng::new(71);
    let mut hf = qkv_tensors(&mut rng);
    hf.push(T::random(
        "model.language_model.layers.1.self_attn.o_proj.weight",
        Dtype::BF16,
        &[HIDDEN, 64],
        &mut rng,
    ));
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_model(&model_dir, &hf, 1);
    let model = ModelLayout::open(&model_dir, &RealIo::new()).unwrap();
    let e = "language_model.model.layers.1.self_attn";
    let manifests = Manifests {
        tensors: vec![
            entry(
                &format!("{e}.qkv_proj.weight"),
                "BF16",
                &[96, HIDDEN],
                serde_json::Value::Null,
            ),
            entry(
                &format!("{e}.o_proj.weight"),
                "BF16",
                &[HIDDEN, 64],
                serde_json::Value::Null,
            ),
        ],
        metas: Vec::new(),
    };
    let qkv = [&hf[0].data[..], &hf[1].data, &hf[2].data].concat();
    let params = live_params(&manifests, Some(&model)).unwrap().params;
    let source = LayoutSource::new(
        LayoutMap::build(&params).unwrap(),
        HostParams(vec![qkv, hf[3].data.clone()]),
    );
    assert_reads_as(&source, &hf);
}

#[test]
fn manifests_of_another_model_or_of_two_engines_are_refused() {
    let mut rng = Rng::new(72);
    let hf = vec![T::random(
        "lm_head.weight",
        Dtype::BF16,
        &[8, HIDDEN],
        &mut rng,
    )];
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_model(&model_dir, &hf, 1);
    std::fs::write(
        model_dir.join("config.json"),
        json!({ "architectures": ["Qwen3_5ForConditionalGeneration"],
                "text_config": { "hidden_size": HIDDEN, "num_hidden_layers": 2 } })
        .to_string(),
    )
    .unwrap();
    let handles = tmp.path().join("handles");
    std::fs::create_dir_all(&handles).unwrap();
    let write = |r: usize, config: serde_json::Value| {
        let t = entry(
            "language_model.lm_head.weight",
            "BF16",
            &[8 / 2, HIDDEN],
            json!({ "tp_rank": r, "tp_size": 2, "shard_dim": 0 }),
        );
        let doc = json!({ "format": "apollo-checkpoint-handles", "version": 1,
            "meta": { "tp_rank": r, "config": config }, "tensors": [t] });
        std::fs::write(
            handles.join(format!("handles-rank{r}.json")),
            doc.to_string(),
        )
        .unwrap();
    };
    let good = json!({ "architectures": ["Qwen3_5ForConditionalGeneration"], "hidden_size": HIDDEN, "num_hidden_layers": 2 });
    write(0, good.clone());
    write(1, good.clone());
    let model = ModelLayout::open(&model_dir, &RealIo::new()).unwrap();
    let live = open_live(&handles, &model_dir, &model).unwrap();
    assert_eq!(
        (live.map.tensors.len(), live.tensors.len(), live.manifests),
        (1, 2, 2)
    );

    // `command` refuses the manifests (exit 65), its message naming every one of `needles`.
    let refused = |command: &str, needles: &[&str]| {
        let o = run(&[
            command,
            "--model-dir",
            s(&model_dir),
            "--handles",
            s(&handles),
        ]);
        assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(needles.iter().all(|n| e.contains(n)), "{e}");
    };

    // The engine serves a model with other dimensions.
    write(
        1,
        json!({ "architectures": ["Qwen3_5ForConditionalGeneration"], "hidden_size": 64, "num_hidden_layers": 2 }),
    );
    refused("diagnose", &["hidden_size", "two engines"]);
    let other = json!({ "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "num_hidden_layers": 2 });
    write(0, other.clone());
    write(1, other);
    refused("sync", &["not the model in", "architectures"]);
    assert!(!model_dir.join(".apollo-checkpoint").exists());

    // Two manifests claiming one rank.
    write(0, good.clone());
    std::fs::copy(
        handles.join("handles-rank0.json"),
        handles.join("old-rank0.json"),
    )
    .unwrap();
    refused("diagnose", &["both hold pp rank 0 tp rank 0"]);
}

/// Fact-less parameters are split by config.json where it describes the packing: checked
/// against the files' rows where the files hold the parts, the only guide where they do not, and
/// a packed module the files hold under its own name (Qwen3-Next's `in_proj_qkvz`) is taken whole.
#[test]
fn parameters_without_layout_facts_are_split_by_config_json() {
    let mut rng = Rng::new(73);
    let mut hf = qkv_tensors(&mut rng);
    hf.push(T::random(
        "model.language_model.layers.0.linear_attn.in_proj_qkvz.weight",
        Dtype::BF16,
        &[48, HIDDEN],
        &mut rng,
    ));
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_model(&model_dir, &hf, 1);
    let model = ModelLayout::open(&model_dir, &RealIo::new()).unwrap();
    let config = |heads: u64, kv: u64| {
        // 4 heads of 8 with the gated query: q 64 rows, k and v 2 × 8; GDN keys make
        // in_proj_qkvz [2·2·4 + 2·8, 2·8] = [32, 16]; the MLP's intermediate size is 24.
        json!({ "architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {
            "hidden_size": HIDDEN, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": 8, "intermediate_size": 24, "linear_num_key_heads": 2,
            "linear_key_head_dim": 4, "linear_num_value_heads": 2, "linear_value_head_dim": 8 } })
        .to_string()
    };
    std::fs::write(model_dir.join("config.json"), config(4, 2)).unwrap();
    let e = "language_model.model.layers";
    let manifests = Manifests {
        tensors: vec![
            entry(
                &format!("{e}.1.self_attn.qkv_proj.weight"),
                "BF16",
                &[96, HIDDEN],
                json!(null),
            ),
            entry(
                &format!("{e}.0.linear_attn.in_proj_qkvz.weight"),
                "BF16",
                &[48, HIDDEN],
                json!(null),
            ),
            entry(
                &format!("{e}.0.mlp.gate_up_proj.weight"),
                "BF16",
                &[48, HIDDEN],
                json!(null),
            ),
        ],
        metas: Vec::new(),
    };
    let params = live_params(&manifests, Some(&model)).unwrap().params;
    let map = LayoutMap::build(&params).unwrap();
    // The files hold no gate_proj/up_proj: the config alone splits gate_up_proj.
    let l0 = "model.language_model.layers.0";
    for part in ["gate_proj", "up_proj"] {
        assert_eq!(
            map.tensors[&format!("{l0}.mlp.{part}.weight")].shape,
            vec![24, HIDDEN as u64]
        );
    }
    let qkv = [&hf[0].data[..], &hf[1].data, &hf[2].data].concat();
    let gate_up = vec![0u8; 48 * HIDDEN * 2];
    let source = LayoutSource::new(map, HostParams(vec![qkv, hf[3].data.clone(), gate_up]));
    let names: Vec<String> = source.tensors().iter().map(|t| t.name.clone()).collect();
    let on_disk: Vec<T> = hf
        .iter()
        .filter(|t| names.contains(&t.name))
        .cloned()
        .collect();
    assert_eq!(
        on_disk.len(),
        4,
        "qkv split in three, in_proj_qkvz whole: {names:?}"
    );
    for (i, st) in source.tensors().iter().enumerate() {
        if let Some(t) = on_disk.iter().find(|t| t.name == st.name) {
            let mut buf = vec![0u8; t.data.len()];
            source.read(i, 0, &mut buf).unwrap();
            assert!(buf == t.data, "{} differs", t.name);
        }
    }
    // 5 gated heads and 1 KV head add up to the live 96 rows too, but not as the files split
    // them: refused, naming config.json and both splits.
    std::fs::write(model_dir.join("config.json"), config(5, 1)).unwrap();
    let e = live_params(&manifests, Some(&model))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("[80, 8, 8]") && e.contains("[64, 16, 16]"),
        "{e}"
    );
    // A config.json that is not JSON is named as such.
    std::fs::write(model_dir.join("config.json"), "{").unwrap();
    let e = live_params(&manifests, Some(&model))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("not JSON"), "{e}");
}

/// A manifest of another format version is named as such — its version, the hook that wrote it,
/// the version this binary reads and what to install — before any field it may lack is read;
/// exit 78 (the two sides of one deployment come from different releases).
#[test]
fn manifests_of_another_format_version_are_refused_naming_both_releases() {
    use apollo_checkpoint::live::handles::MANIFEST_VERSION;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let mut rng = Rng::new(3);
    write_model(&model, &[T::random("w", Dtype::BF16, &[4, 4], &mut rng)], 1);
    let manifest = tmp.path().join("handles-pp0-tp0.json");
    let diagnose = |doc: &serde_json::Value| {
        std::fs::write(&manifest, doc.to_string()).unwrap();
        run(&[
            "diagnose",
            "--model-dir",
            s(&model),
            "--handles",
            s(&manifest),
        ])
    };
    // A newer hook, whose manifests no longer have `tensors`.
    let o = diagnose(&json!({
        "format": "apollo-checkpoint-handles", "version": MANIFEST_VERSION + 1,
        "writer": "apollo-checkpoint-hook 9.1.0", "weights": {},
    }));
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    for part in [
        &format!("manifest format version {}", MANIFEST_VERSION + 1),
        "written by apollo-checkpoint-hook 9.1.0",
        &format!(
            "this apollo-checkpoint (apollo-checkpoint {}) reads version {MANIFEST_VERSION}",
            env!("CARGO_PKG_VERSION")
        ),
        "The hook is newer",
        "pip install ./scripts",
    ] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
    // An older one that did not name itself.
    let o = diagnose(&json!({
        "format": "apollo-checkpoint-handles", "version": 0, "tensors": [],
    }));
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("a hook that does not name itself"), "{e}");
    assert!(e.contains("The hook is older"), "{e}");
    // Not a manifest at all: bad data.
    let o = diagnose(&json!({"format": "something-else", "version": 1, "tensors": []}));
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("its format is \"something-else\""));
}

/// The hook package (scripts/pyproject.toml) is the release of the binary it goes with, and
/// writes the manifest format the binary reads.
#[test]
fn the_hook_package_is_this_release_and_writes_the_format_it_reads() {
    let hook = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/vllm_export_hook.py"
    ))
    .unwrap();
    let value = |name: &str| {
        hook.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("no {name} in vllm_export_hook.py"))
            .trim_matches('"')
            .to_owned()
    };
    assert_eq!(value("__version__"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        value("MANIFEST_VERSION"),
        apollo_checkpoint::live::handles::MANIFEST_VERSION.to_string()
    );
    let pyproject = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/pyproject.toml"
    ))
    .unwrap();
    assert!(pyproject.contains("version = { attr = \"vllm_export_hook.__version__\" }"));
}
