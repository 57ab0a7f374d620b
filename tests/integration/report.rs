//! `report`: the bytes each generation changed per layer and tensor kind, and its heat map —
//! checked the way a person would look at it: the SVG is parsed and rendered (usvg/resvg), and
//! its cells, colors and labels are read back (roxmltree).

use std::collections::BTreeMap;

use apollo_checkpoint::changemap::{BAR_FILL, LEGEND_STEPS, UNCHANGED_FILL, share_color};
use apollo_checkpoint::synthetic::Rng;
use plotters::style::RGBColor;
use resvg::{tiny_skia, usvg};
use safetensors::Dtype;

use crate::util::{T, run, s, stderr, stdout_json, sync_from, write_model};

/// A GPT-2-named model (not the fixtures' Qwen names): three layers and two tensors outside them.
fn gpt2_like(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    let mut t = vec![T::random("wte.weight", Dtype::F16, &[512, 64], &mut rng)];
    for l in 0..3 {
        t.push(T::random(
            &format!("h.{l}.attn.c_attn.weight"),
            Dtype::BF16,
            &[64, 192],
            &mut rng,
        ));
        t.push(T::random(
            &format!("h.{l}.mlp.c_fc.weight"),
            Dtype::BF16,
            &[64, 256],
            &mut rng,
        ));
        t.push(T::random(
            &format!("h.{l}.ln_1.weight"),
            Dtype::F32,
            &[64],
            &mut rng,
        ));
    }
    t.push(T::random("ln_f.weight", Dtype::F32, &[64], &mut rng));
    t
}

fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// name → (bytes, bytes_changed) of a `layers` or `kinds` array.
fn rows(v: &serde_json::Value) -> BTreeMap<String, (u64, u64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                (
                    r["bytes"].as_u64().unwrap(),
                    r["bytes_changed"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

#[test]
fn report_sums_each_generation_per_layer_and_kind_and_draws_the_heat_map() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, live) = (tmp.path().join("model"), tmp.path().join("live"));
    let mut tensors = gpt2_like(5);
    write_model(&model, &tensors, 2);
    write_model(&live, &tensors, 1);
    let m = s(&model);
    assert!(run(&["init", "--model-dir", m, "-q"]).status.success());
    let bytes_of = |name: &str, t: &[T]| t.iter().find(|t| t.name == name).unwrap().data.len();
    let layer_bytes = |l: u32, t: &[T]| -> u64 {
        t.iter()
            .filter(|x| x.name.starts_with(&format!("h.{l}.")))
            .map(|x| x.data.len() as u64)
            .sum()
    };
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();

    // Generation 1: one element of layer 1's MLP. Generation 2: one byte in every block.
    let fc1 = tensors
        .iter()
        .position(|t| t.name == "h.1.mlp.c_fc.weight")
        .unwrap();
    tensors[fc1].data[5000] ^= 0x40;
    write_model(&live, &tensors, 1);
    let o = sync_from(&model, &live, &["-q", "--tag", "step=100"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for t in &mut tensors {
        for i in (0..t.data.len()).step_by(4096) {
            t.data[i] ^= 1;
        }
    }
    write_model(&live, &tensors, 1);
    assert!(sync_from(&model, &live, &["-q"]).status.success());

    let svg_path = tmp.path().join("changes.svg");
    let o = run(&["report", "--model-dir", m, "--svg", s(&svg_path), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = stdout_json(&o);
    assert_eq!(j["first_generation"], 1);
    assert_eq!(j["last_generation"], 2);
    assert_eq!(j["svg"], s(&svg_path));
    let gens = j["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 2);
    assert_eq!(gens[0]["bytes_changed"], 4096, "one block: {j}");
    assert_eq!(gens[0]["tags"]["step"], "100");
    assert_eq!(gens[1]["bytes_changed"], total, "every block: {j}");
    let layers = rows(&j["layers"]);
    assert_eq!(
        layers.keys().collect::<Vec<_>>(),
        ["0", "1", "2", "other"],
        "{j}"
    );
    for l in 0..3 {
        let b = layer_bytes(l, &tensors);
        let extra = if l == 1 { 4096 } else { 0 };
        assert_eq!(layers[&l.to_string()], (b, b + extra), "layer {l}: {j}");
    }
    let other = (bytes_of("wte.weight", &tensors) + bytes_of("ln_f.weight", &tensors)) as u64;
    assert_eq!(layers["other"], (other, other));
    let kinds = rows(&j["kinds"]);
    assert_eq!(
        kinds.keys().collect::<Vec<_>>(),
        [
            "attn.c_attn.weight",
            "ln_1.weight",
            "ln_f.weight",
            "mlp.c_fc.weight",
            "wte.weight"
        ]
    );
    let fc = 3 * bytes_of("h.0.mlp.c_fc.weight", &tensors) as u64;
    assert_eq!(kinds["mlp.c_fc.weight"], (fc, fc + 4096));

    // The picture: a valid SVG that renders, with the cells the data says.
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let tree = usvg::Tree::from_str(&svg, &usvg::Options::default()).expect("a valid SVG");
    let size = tree.size().to_int_size();
    assert!(size.width() >= 400 && size.height() >= 400, "{size:?}");
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let pixel_count = |c: RGBColor| {
        pixmap
            .pixels()
            .iter()
            .filter(|p| (p.red(), p.green(), p.blue(), p.alpha()) == (c.0, c.1, c.2, 255))
            .count()
    };
    let full = share_color(1, 1);
    let one_block = share_color(4096, layer_bytes(1, &tensors));
    assert_ne!(one_block, full);
    for (what, c) in [
        ("unchanged cells", UNCHANGED_FILL),
        ("cells changed whole", full),
        ("layer 1 in generation 1", one_block),
        ("the bars", BAR_FILL),
    ] {
        assert!(pixel_count(c) >= 20, "{what} ({}) are not drawn", hex(c));
    }

    let doc = roxmltree::Document::parse(&svg).unwrap();
    let mut fills: BTreeMap<String, usize> = BTreeMap::new();
    for r in doc.descendants().filter(|n| n.has_tag_name("rect")) {
        *fills
            .entry(r.attribute("fill").unwrap_or("").to_owned())
            .or_default() += 1;
    }
    let count = |c: RGBColor| fills.get(&hex(c)).copied().unwrap_or(0);
    assert_eq!(count(BAR_FILL), 2, "one bar per generation: {fills:?}");
    // Unchanged: in generation 1 the layers 0, 2 and other, and 4 of the 5 kinds; one in the
    // legend. Nothing in generation 2 or over the range.
    assert_eq!(count(UNCHANGED_FILL), 3 + 4 + 1, "{fills:?}");
    // Colored: layers 1 + 4, kinds 1 + 5, layer × kind 3 × 3 + 2, the color bar.
    let heat: usize = fills
        .iter()
        .filter(|(f, _)| {
            ![
                "#FFFFFF".to_owned(),
                "#000000".to_owned(),
                "none".to_owned(),
                hex(BAR_FILL),
                hex(UNCHANGED_FILL),
            ]
            .contains(f)
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(heat, 5 + 6 + 11 + LEGEND_STEPS, "{fills:?}");
    assert_eq!(count(one_block), 1, "{fills:?}");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for label in [
        "0",
        "1",
        "2",
        "other",
        "mlp.c_fc.weight",
        "wte.weight",
        "generation",
        "100%",
        "unchanged",
    ] {
        assert!(texts.contains(&label), "no label {label:?} in {texts:?}");
    }
}

#[test]
fn report_takes_a_range_and_refuses_one_beyond_the_newest_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, live) = (tmp.path().join("model"), tmp.path().join("live"));
    let mut tensors = gpt2_like(9);
    write_model(&model, &tensors, 1);
    let m = s(&model);
    assert!(run(&["init", "--model-dir", m, "-q"]).status.success());
    for step in 0..3 {
        tensors[1].data[step * 4096] ^= 1;
        write_model(&live, &tensors, 1);
        assert!(sync_from(&model, &live, &["-q"]).status.success());
    }
    let o = run(&[
        "report",
        "--model-dir",
        m,
        "--generations",
        "2..3",
        "--json",
    ]);
    let j = stdout_json(&o);
    let gens: Vec<u64> = j["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, [2, 3]);
    // Text: the changed layer and kind, nothing else.
    let o = run(&["report", "--model-dir", m, "--generations", "..1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("generations 1..1: 1 generation(s), 4.00 KiB"),
        "{text}"
    );
    assert!(text.contains("attn.c_attn.weight"), "{text}");
    assert!(!text.contains("mlp.c_fc.weight"), "{text}");
    // Generation 0 (init) changed nothing, and says so.
    let o = run(&["report", "--model-dir", m, "--generations", "0"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("by layer:\n  (nothing changed)"), "{text}");
    // Beyond the newest: a usage error naming it as given, and no file written.
    let svg = tmp.path().join("never.svg");
    let o = run(&[
        "report",
        "--model-dir",
        m,
        "--generations",
        "3..4",
        "--svg",
        s(&svg),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("newest generation is 3"),
        "{}",
        stderr(&o)
    );
    assert!(!svg.exists());
    let o = run(&["report", "--model-dir", m, "--generations", "3..1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
}

/// Output files named without a directory go to the current one (`--svg changes.svg`,
/// `--metrics-file run.prom`): the directory synced after the rename is ".", not "".
#[test]
fn output_files_named_without_a_directory_land_in_the_current_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_model(&model, &gpt2_like(3), 1);
    assert!(
        run(&["init", "--model-dir", s(&model), "-q"])
            .status
            .success()
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_apollo-checkpoint"))
        .args([
            "report",
            "--model-dir",
            s(&model),
            "--svg",
            "changes.svg",
            "--metrics-file",
            "run.prom",
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tmp.path().join("changes.svg").is_file());
    assert!(tmp.path().join("run.prom").is_file());
}
