//! `diagnose`: the HF view of manifests written by the export hook, against the model files.

use apollo_checkpoint::synthetic::Rng;
use safetensors::Dtype;

use crate::util::{T, run, s, stderr, stdout_json, write_model};

fn entry(name: &str, dtype: &str, shape: &[u64], layout: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "name": name, "dtype": dtype, "shape": shape, "strides": [], "nbytes": 0, "device": 0,
        "device_uuid": "GPU-0", "ipc_handle": "ab".repeat(64), "offset": 0, "allocation_bytes": 0,
        "pid": 1, "layout": layout,
    })
}

#[test]
fn diagnose_lists_matched_live_only_disk_only_and_mismatched_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let mut rng = Rng::new(3);
    let l = "model.language_model.layers.0";
    write_model(
        &model,
        &[
            T::random(
                &format!("{l}.self_attn.q_proj.weight"),
                Dtype::BF16,
                &[32, 16],
                &mut rng,
            ),
            T::random(
                &format!("{l}.self_attn.k_proj.weight"),
                Dtype::BF16,
                &[8, 16],
                &mut rng,
            ),
            T::random(
                &format!("{l}.self_attn.v_proj.weight"),
                Dtype::BF16,
                &[8, 16],
                &mut rng,
            ),
            T::random(
                &format!("{l}.linear_attn.A_log"),
                Dtype::F32,
                &[4],
                &mut rng,
            ),
            T::random("lm_head.weight", Dtype::BF16, &[20, 16], &mut rng),
            T::random("mtp.fc.weight", Dtype::BF16, &[4, 4], &mut rng),
        ],
        2,
    );
    let handles = tmp.path().join("handles");
    std::fs::create_dir_all(&handles).unwrap();
    for rank in 0..2u64 {
        let part = |n: &str, rows: u64| serde_json::json!({ "name": n, "rows": rows, "local_rows": rows / 2, "first_row": rank * rows / 2 });
        let tp = |dim: Option<usize>| serde_json::json!({ "tp_rank": rank, "tp_size": 2, "shard_dim": dim });
        let mut qkv = tp(Some(0));
        qkv["packed"] = "qkv_proj".into();
        qkv["parts"] =
            serde_json::json!([part("q_proj", 32), part("k_proj", 8), part("v_proj", 8)]);
        let tensors = vec![
            entry(
                "language_model.model.layers.0.self_attn.qkv_proj.weight",
                "BF16",
                &[24, 16],
                &qkv,
            ),
            // A_log kept in bf16 by mistake: a dtype mismatch.
            entry(
                "language_model.model.layers.0.linear_attn.A_log",
                "BF16",
                &[2],
                &tp(Some(0)),
            ),
            entry(
                "language_model.lm_head.weight",
                "BF16",
                &[10, 16],
                &tp(Some(0)),
            ),
            entry(
                "language_model.model.layers.0.extra.weight",
                "BF16",
                &[2, 2],
                &tp(None),
            ),
        ];
        let doc = serde_json::json!({ "format": "apollo-checkpoint-handles", "version": 1, "meta": {}, "tensors": tensors });
        std::fs::write(
            handles.join(format!("handles-rank{rank}.json")),
            doc.to_string(),
        )
        .unwrap();
    }
    let o = run(&[
        "diagnose",
        "--model-dir",
        s(&model),
        "--handles",
        s(&handles),
        "--json",
    ]);
    // A live-only tensor and a dtype mismatch: a deploy script gating on diagnose must stop.
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let d = stdout_json(&o);
    assert_eq!(d["ok"], false);
    let names = |k: &str| -> Vec<String> {
        d[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names("matched"),
        vec![
            "lm_head.weight".to_string(),
            format!("{l}.self_attn.k_proj.weight"),
            format!("{l}.self_attn.q_proj.weight"),
            format!("{l}.self_attn.v_proj.weight"),
        ]
    );
    assert_eq!(names("live_only"), vec![format!("{l}.extra.weight")]);
    assert_eq!(names("disk_only"), vec!["mtp.fc.weight".to_string()]);
    assert_eq!(
        names("mismatched"),
        vec![format!(
            "{l}.linear_attn.A_log: F32 [4] in the files, BF16 [4] live"
        )]
    );
    assert_eq!(d["live_params"], 8);
    // The engine name behind the live-only tensor, with the names tried.
    let u = &d["unmatched"][0];
    assert_eq!(
        u["engine_name"],
        "language_model.model.layers.0.extra.weight"
    );
    assert!(
        u["candidates"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(format!("{l}.extra.weight")))
    );

    let o = run(&[
        "diagnose",
        "--model-dir",
        s(&model),
        "--handles",
        s(&handles),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("matched:         4")
            && text.contains("disk only (left untouched): 1")
            && text.contains("not ok"),
        "{text}"
    );

    // A pickle (the prototype's torch.save file) is not a manifest.
    let pickle = tmp.path().join("vllm_weight_handles.pt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let o = run(&[
        "diagnose",
        "--model-dir",
        s(&model),
        "--handles",
        s(&pickle),
    ]);
    assert_eq!(o.status.code(), Some(65));
    assert!(
        stderr(&o).contains("not a handles manifest"),
        "{}",
        stderr(&o)
    );
}

/// Without a CUDA driver (CI), `sync --handles` fails with a clear message and writes nothing;
/// the GPU path itself is tested by scripts/gpu_sync_test.py on a GPU machine.
#[test]
fn sync_from_handles_without_a_cuda_driver_is_a_clear_error() {
    let has_driver = [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/local/nvidia/lib64/libcuda.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if has_driver {
        eprintln!("skipping: this machine has a CUDA driver; scripts/gpu_sync_test.py covers it");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let mut rng = Rng::new(4);
    write_model(
        &model,
        &[T::random("lm_head.weight", Dtype::BF16, &[4, 4], &mut rng)],
        1,
    );
    let manifest = tmp.path().join("h.json");
    let doc = serde_json::json!({ "format": "apollo-checkpoint-handles", "version": 1, "meta": {},
        "tensors": [entry("language_model.lm_head.weight", "BF16", &[4, 4], &serde_json::Value::Null)] });
    std::fs::write(&manifest, doc.to_string()).unwrap();
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let o = run(&["sync", "--model-dir", s(&model), "--handles", s(&manifest)]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("no CUDA driver"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    assert!(!model.join(".apollo-checkpoint").exists());
}
