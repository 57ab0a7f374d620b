//! What a model directory may be: symlinked shards (refused for writing unless allowed), FIFOs
//! and empty weight maps (clear errors).

use crate::util::{mixed_tensors, pair, run, s, snapshot, stderr, write_model};

#[test]
fn symlinked_shards_are_refused_for_writing_unless_allowed() {
    // The Hugging Face cache layout: snapshots/<rev>/ holds links into blobs/.
    let p = pair(&mixed_tensors(11), 2, 1);
    let blobs = p.tmp.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let shard = p.model.join("model-00001-of-00002.safetensors");
    let blob = blobs.join("0123abcd");
    std::fs::rename(&shard, &blob).unwrap();
    std::os::unix::fs::symlink(&blob, &shard).unwrap();
    let blob_before = std::fs::read(&blob).unwrap();
    let m = s(&p.model);

    let o = run(&["init", "--model-dir", m]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("model-00001-of-00002.safetensors is a symbolic link to")
            && err.contains("0123abcd")
            && err.contains("--local-dir")
            && err.contains("--follow-symlinks"),
        "{err}"
    );
    // Readers follow links: they write nothing.
    let o = run(&[
        "diagnose",
        "--model-dir",
        m,
        "--handles",
        s(&p.tmp.path().join("none")),
    ]);
    assert_ne!(o.status.code(), Some(78), "{}", stderr(&o));

    // Opted in, init and sync write through the link into the blob.
    let o = run(&["init", "--model-dir", m, "--follow-symlinks"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut changed = mixed_tensors(11);
    for t in &mut changed {
        if let Some(b) = t.data.first_mut() {
            *b ^= 0xff;
        }
    }
    write_model(&p.source, &changed, 1);
    // Without the flag a sync refuses, and writes nothing.
    let o = run(&["sync", "--model-dir", m, "--from", s(&p.source)]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert_eq!(std::fs::read(&blob).unwrap(), blob_before);
    let o = run(&[
        "sync",
        "--model-dir",
        m,
        "--from",
        s(&p.source),
        "--follow-symlinks",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(&blob).unwrap(), blob_before);
    assert!(
        std::fs::symlink_metadata(&shard)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_fifo_shard_and_an_empty_weight_map_are_named_as_such() {
    let p = pair(&mixed_tensors(12), 2, 1);
    let shard = p.model.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&shard)
        .status()
        .unwrap();
    assert!(made.success());
    let before = snapshot(&p.model);
    let o = run(&["init", "--model-dir", s(&p.model)]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("which is a FIFO"), "{}", stderr(&o));
    assert_eq!(before, snapshot(&p.model));

    let p = pair(&mixed_tensors(13), 2, 1);
    std::fs::write(
        p.model.join("model.safetensors.index.json"),
        br#"{"metadata": {}, "weight_map": {}}"#,
    )
    .unwrap();
    let o = run(&["init", "--model-dir", s(&p.model)]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("weight_map is empty"), "{}", stderr(&o));
    assert!(!p.model.join(".apollo-checkpoint/index.db").exists());
}
