//! Files changed behind the index are never trusted: sync refuses, verify names what changed,
//! `verify --repair` re-indexes, and the next sync works.

use std::os::unix::fs::FileExt;
use std::path::Path;

use apollo_checkpoint::checkpoint::FileState;
use apollo_checkpoint::{Error, SafetensorsSource};

use crate::util::{assert_same_tensors, checkpoint, mixed_tensors, pair, snapshot, write_model};

/// Absolute offset of tensor `name` in a safetensors file.
fn tensor_offset(path: &Path, name: &str) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    8 + n as u64 + meta.info(name).unwrap().data_offsets.0 as u64
}

/// Flips the byte at `offset` into tensor `tensor`; keeps the mtime if `keep_mtime`.
fn flip(path: &Path, tensor: &str, offset: u64, keep_mtime: bool) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    let at = tensor_offset(path, tensor) + offset;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
    if keep_mtime {
        f.set_modified(mtime).unwrap();
    }
}

#[test]
fn a_model_file_edited_behind_the_index_is_refused_until_repaired() {
    let tensors = mixed_tensors(4);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let f = p.model.join("model.safetensors");
    flip(&f, "lm_head.weight", 10, false);
    let before = snapshot(&p.model);
    let err = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Stale { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("verify --repair"),
        "{msg}"
    );
    assert_eq!(err.exit_code(), 78);
    assert_eq!(before, snapshot(&p.model));

    let v = checkpoint(&p.model).verify(false).unwrap();
    assert!(!v.clean);
    assert_eq!(v.mismatched_block_count, 1);
    assert_eq!(v.mismatched_blocks[0].block, 0);
    assert_eq!(v.file_problems.len(), 1, "{:?}", v.file_problems);
    let status = checkpoint(&p.model).status().unwrap();
    assert_eq!(status.files[0].state, FileState::Modified);
    assert!(status.pending[0].contains("verify --repair"));

    let r = checkpoint(&p.model).verify(true).unwrap();
    assert!(r.repaired && r.generation == 1);
    assert!(checkpoint(&p.model).verify(false).unwrap().clean);
    // The next sync works and restores the source's bytes.
    let s = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
    assert_eq!((s.blocks_changed, s.generation), (1, 2));
    assert_same_tensors(&p.model, &p.source);
}

/// An edit that kept size and mtime is caught by the ctime (which nobody can set back): even a
/// sync whose source changed nothing refuses (it used to say "no change" while the file differed).
#[test]
fn an_edit_that_kept_the_mtime_is_refused_by_its_ctime() {
    let tensors = mixed_tensors(6);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    flip(
        &p.model.join("model.safetensors"),
        "lm_head.weight",
        3,
        true,
    );
    let before = snapshot(&p.model);
    let err = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::Stale { .. }), "{err}");
    assert!(err.to_string().contains("ctime"), "{err}");
    assert_eq!(before, snapshot(&p.model));
    let status = checkpoint(&p.model).status().unwrap();
    assert_eq!(status.files[0].state, FileState::Modified);
    let v = checkpoint(&p.model).verify(false).unwrap();
    assert_eq!((v.file_problems.len(), v.mismatched_block_count), (1, 1));
}

/// Where no ctime was recorded (an index from before it was), an edit that kept size and mtime
/// slips past the stat check, but sync reads the old bytes of every block it is about to change
/// and checks them: it refuses before writing anything.
#[test]
fn an_edit_that_kept_the_mtime_is_caught_before_anything_is_written() {
    let mut tensors = mixed_tensors(5);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let db = rusqlite::Connection::open(p.model.join(".apollo-checkpoint/index.db")).unwrap();
    db.execute("UPDATE files SET ctime_ns = 0", []).unwrap();
    drop(db);
    flip(
        &p.model.join("model.safetensors"),
        "model.embed_tokens.weight",
        4096 * 2 + 7,
        true,
    );
    // The source changes the same block and others.
    let idx = tensors
        .iter()
        .position(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    tensors[idx].data.iter_mut().for_each(|b| *b ^= 1);
    write_model(&p.source, &tensors, 1);
    let before = snapshot(&p.model);
    let err = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, Error::OldBlockChanged { block: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Nothing was written"));
    assert_eq!(before, snapshot(&p.model));
    // verify finds it by content even though the stat matches.
    let v = checkpoint(&p.model).verify(false).unwrap();
    assert!(v.file_problems.is_empty() && v.mismatched_block_count == 1);
}

#[test]
fn a_replaced_file_or_changed_header_is_noticed() {
    let tensors = mixed_tensors(6);
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    // Same bytes, new inode (cp then mv).
    let f = p.model.join("model-00002-of-00002.safetensors");
    let tmp = p.model.join("tmp");
    std::fs::copy(&f, &tmp).unwrap();
    std::fs::rename(&tmp, &f).unwrap();
    let msg = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("replaced"),
        "{msg}"
    );
    // Content is the same, so verify finds no block mismatch but still reports the file.
    let v = checkpoint(&p.model).verify(false).unwrap();
    assert!(!v.clean && v.mismatched_block_count == 0 && v.file_problems.len() == 1);
    let r = checkpoint(&p.model).verify(true).unwrap();
    assert!(r.repaired);
    assert_eq!(
        r.generation, 0,
        "same bytes: the new stats are trusted, no generation is recorded"
    );
    assert!(checkpoint(&p.model).verify(false).unwrap().clean);

    // A rewritten model with other tensors: the header hash differs.
    let mut other = tensors.clone();
    other.truncate(5);
    write_model(&p.model, &other, 1);
    let msg = checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no longer part of the model") || msg.contains("new to the model"),
        "{msg}"
    );
    let r = checkpoint(&p.model).verify(true).unwrap();
    assert!(r.repaired);
    assert!(checkpoint(&p.model).verify(false).unwrap().clean);
    assert_eq!(checkpoint(&p.model).status().unwrap().tensors, 5);
}
