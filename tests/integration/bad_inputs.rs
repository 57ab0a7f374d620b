//! Bad model files and sources: each gives a clear error naming the file and tensor, and the
//! model is left untouched.

use std::path::Path;

use apollo_checkpoint::SafetensorsSource;
use apollo_checkpoint::synthetic::Rng;

use crate::util::{checkpoint, mixed_tensors, pair, snapshot, write_model};

fn sync_err(model: &Path, source: &Path) -> apollo_checkpoint::Error {
    match SafetensorsSource::open(source) {
        Err(e) => e.into(),
        Ok(src) => checkpoint(model).sync(&src).unwrap_err(),
    }
}

/// Replaces `from` by `to` (same length) inside a file's header.
fn edit_header(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    assert!(header.contains(from), "{from} not in {header}");
    bytes[8..8 + n].copy_from_slice(header.replacen(from, to, 1).as_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn first_shard(dir: &Path) -> std::path::PathBuf {
    dir.join("model-00001-of-00002.safetensors")
}

#[test]
fn a_truncated_model_file_is_refused_by_init_and_sync() {
    let p = pair(&mixed_tensors(1), 2, 1);
    let f = first_shard(&p.model);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(
        e.contains("model-00001-of-00002.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // Truncated after init: sync refuses, nothing else is touched.
    let p = pair(&mixed_tensors(1), 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let f = first_shard(&p.model);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let before = snapshot(&p.model);
    let e = sync_err(&p.model, &p.source);
    assert!(
        e.to_string().contains("model-00001-of-00002.safetensors"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 65);
    assert_eq!(before, snapshot(&p.model));

    // A file shorter than the header length field.
    std::fs::write(&f, [1, 2, 3]).unwrap();
    assert!(
        sync_err(&p.model, &p.source)
            .to_string()
            .contains("too short")
    );
}

#[test]
fn a_truncated_source_is_refused_and_the_model_untouched() {
    let p = pair(&mixed_tensors(1), 1, 2);
    checkpoint(&p.model).init(4096).unwrap();
    let f = first_shard(&p.source);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let before = snapshot(&p.model);
    let e = sync_err(&p.model, &p.source).to_string();
    assert!(
        e.starts_with("source: ") && e.contains("model-00001-of-00002.safetensors"),
        "{e}"
    );
    assert_eq!(before, snapshot(&p.model));
}

#[test]
fn a_header_that_lies_names_the_tensor() {
    let p = pair(&mixed_tensors(1), 1, 1);
    let f = p.model.join("model.safetensors");
    // 300 × 128 bf16 is 76800 bytes; claim 300 × 129.
    edit_header(&f, "[300,128]", "[300,129]");
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(
        e.contains("tensor model.embed_tokens.weight") && e.contains("the header lies"),
        "{e}"
    );

    // A header length that points past the end of the file.
    let mut bytes = std::fs::read(&f).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(e.contains("runs past the end"), "{e}");

    // A header length over the cap.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    assert!(
        checkpoint(&p.model)
            .init(4096)
            .unwrap_err()
            .to_string()
            .contains("exceeds")
    );
}

#[test]
fn overlapping_tensors_in_the_source_are_refused() {
    let p = pair(&mixed_tensors(1), 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let f = p.source.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Move the second tensor's start back by one byte (same text length: 5 digits stay 5).
    let v: serde_json::Value = serde_json::from_str(header.trim_end()).unwrap();
    let (name, begin) = v
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, e)| Some((k.clone(), e.get("data_offsets")?[0].as_u64()?)))
        .filter(|(_, b)| *b >= 10_000)
        .min_by_key(|(_, b)| *b)
        .unwrap();
    edit_header(&f, &format!("[{begin},"), &format!("[{},", begin - 1));
    let e = sync_err(&p.model, &p.source).to_string();
    assert!(
        e.contains(&name) && (e.contains("overlaps") || e.contains("header lies")),
        "{e}"
    );
}

#[test]
fn a_missing_shard_or_an_index_naming_a_missing_tensor_is_refused() {
    let p = pair(&mixed_tensors(1), 2, 1);
    std::fs::remove_file(first_shard(&p.model)).unwrap();
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(
        e.contains("model-00001-of-00002.safetensors") && e.contains("does not exist"),
        "{e}"
    );

    let p = pair(&mixed_tensors(1), 2, 1);
    let index_path = p.model.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.ghost"] = "model-00002-of-00002.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(
        e.contains("model.ghost") && e.contains("no such tensor"),
        "{e}"
    );

    index["weight_map"]["model.ghost"] = "../elsewhere.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(e.contains("not a plain file name"), "{e}");

    std::fs::write(&index_path, b"{not json").unwrap();
    let e = checkpoint(&p.model).init(4096).unwrap_err().to_string();
    assert!(e.contains("model.safetensors.index.json"), "{e}");
}

#[test]
fn a_directory_without_a_model_says_what_it_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let e = checkpoint(tmp.path()).init(4096).unwrap_err();
    assert!(
        e.to_string()
            .contains("no model.safetensors or model.safetensors.index.json"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 66);
}

#[test]
fn a_source_with_the_same_names_but_a_different_model_size_is_refused() {
    let p = pair(&mixed_tensors(1), 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let mut other = mixed_tensors(1);
    let mut rng = Rng::new(1);
    other[0] = crate::util::T::random(
        "model.embed_tokens.weight",
        safetensors::Dtype::BF16,
        &[301, 128],
        &mut rng,
    );
    write_model(&p.source, &other, 1);
    let before = snapshot(&p.model);
    let e = sync_err(&p.model, &p.source).to_string();
    assert!(
        e.contains(
            "model.embed_tokens.weight: shape [300, 128] in the model, [301, 128] in the source"
        ),
        "{e}"
    );
    assert_eq!(before, snapshot(&p.model));
}
