//! The nightly copy to a backup host: `export-delta` on the model's host, `apply-delta` on the
//! replica.
//!
//! `export-delta` composes what every generation since the last export changed, from the
//! retained undo data (the retired journals): a block changed in three syncs ships once, as the
//! XOR of its base and target bytes. Generations whose undo data was pruned (the backlog limit)
//! ship their changed blocks whole, and the export says so. A *full* export ships whole files, for
//! a replica that has nothing yet. Each export is one immutable delta file plus a JSON manifest
//! and `changed-files.txt`, each appearing atomically; the export is recorded in the index only
//! once they are durable, so a crash mid-export just repeats it.
//!
//! `apply-delta` runs on the replica, which keeps its own state directory (generation and block
//! index, like a model). Deltas are applied in generation order, each journaled and recovered
//! exactly like a sync: every touched block's base hash is checked before anything is written,
//! and its target hash after. A replica without state *adopts* the files it holds (copied once
//! with cp or rsync) when their hashes match the delta's base roots, or is created from a full
//! delta.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::blockhash::{self, BlockLayout};
use crate::checkpoint::{Checkpoint, Error, seconds_since, write_atomic};
use crate::delta::{
    self, Delta, DeltaError, DeltaFile, DeltaHeader, DeltaRecord, DeltaWriter, NO_BASE, RAW,
};
use crate::index::{BlockIndex, ExportRow, IndexedTensor, unix_ms};
use crate::io::{FileIo, OpenMode};
use crate::journal::{
    self, HASH_PREFIX, JOURNAL_FILE, Journal, JournalFile, JournalHeader, JournalKind,
    JournalState, JournalWriter, Record, apply_xor, encode_xor, hash_prefix,
};
use crate::lock::LockKind;
use crate::model::{INDEX_FILE, ModelLayout};

/// Bytes of raw file data per record of a full delta.
const RAW_CHUNK: usize = 1 << 20;
/// Records encoded per parallel batch.
const BATCH: usize = 4096;

/// What `export-delta` did.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    /// False when the last export already reached the current generation.
    pub exported: bool,
    /// The delta file.
    pub file: Option<PathBuf>,
    /// Its manifest.
    pub manifest: Option<PathBuf>,
    /// Base generation (`None` for a full delta).
    pub base_generation: Option<u64>,
    /// Target generation.
    pub target_generation: u64,
    /// Size of the delta file.
    pub bytes: u64,
    /// Blocks (or raw chunks) it carries.
    pub records: u64,
    /// Blocks shipped whole because their undo data was gone.
    pub full_blocks: u64,
    /// Things the operator should know (fallbacks).
    pub notes: Vec<String>,
    /// Delta files removed by `--prune-through`.
    pub pruned: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

/// What `apply-delta` did with one delta.
#[derive(Clone, Debug, Serialize)]
pub struct AppliedDelta {
    /// The delta file.
    pub file: PathBuf,
    /// Its base generation (`None`: full).
    pub base_generation: Option<u64>,
    /// Its target generation.
    pub target_generation: u64,
    /// `applied`, `already applied`, `adopted and applied` or `created from a full delta`.
    pub outcome: String,
    /// Blocks written.
    pub blocks: u64,
}

/// What `apply-delta` did.
#[derive(Clone, Debug, Serialize)]
pub struct ApplyDeltaReport {
    /// Each delta, in the order applied.
    pub deltas: Vec<AppliedDelta>,
    /// The replica's generation afterwards.
    pub generation: u64,
    /// Wall time.
    pub seconds: f64,
}

/// One block (or raw chunk) of an export being composed.
struct Composed {
    tensor_offset: u64,
    len: u32,
    /// Hash before the span (unknown when the block ships whole).
    base: Option<[u8; HASH_PREFIX]>,
    target: [u8; HASH_PREFIX],
    /// Composed XOR, or `None` when the block ships whole.
    xor: Option<Vec<u8>>,
}

fn compose_xor(a: &[u8], b: &[u8], len: usize) -> Option<Vec<u8>> {
    let mut delta = vec![0u8; len];
    apply_xor(a, &mut delta)?;
    apply_xor(b, &mut delta)?;
    let mut out = Vec::new();
    encode_xor(&vec![0u8; len], &delta, &mut out);
    Some(out)
}

/// The 16-byte hash of a record's bytes: the block's chaining value, or BLAKE3 of raw bytes.
fn record_hash(tensor_offset: u64, offset: u64, bytes: &[u8]) -> [u8; HASH_PREFIX] {
    if tensor_offset == RAW {
        blake3::hash(bytes).as_bytes()[..HASH_PREFIX]
            .try_into()
            .expect("32 > 16")
    } else {
        hash_prefix(&blockhash::subtree_cv(offset - tensor_offset, bytes))
    }
}

/// A root hash per file name.
pub type FileRoots = BTreeMap<String, [u8; 32]>;

/// Per-file roots from the index: BLAKE3 of the header hash and every block's 16-byte hash in
/// file order. Returns (roots with each block's hash replaced by `overrides[(file, block
/// offset)]` where given, roots of the index as it is), computed in one pass over the hashes.
pub fn file_roots<S: std::hash::BuildHasher>(
    index: &BlockIndex,
    layout: BlockLayout,
    overrides: &HashMap<(String, u64), [u8; HASH_PREFIX], S>,
) -> Result<(FileRoots, FileRoots), Error> {
    let files = index.files()?;
    let tensors = index.tensors()?;
    // Per file, the overridden blocks in offset order, walked alongside the blocks.
    let mut by_file: HashMap<&str, Vec<(u64, &[u8; HASH_PREFIX])>> = HashMap::new();
    for ((file, at), p) in overrides {
        by_file.entry(file.as_str()).or_default().push((*at, p));
    }
    let (mut with_overrides, mut as_is) = (BTreeMap::new(), BTreeMap::new());
    for f in &files {
        let (mut over, mut plain) = (blake3::Hasher::new(), blake3::Hasher::new());
        over.update(&f.header_hash);
        plain.update(&f.header_hash);
        let mut replaced = by_file.remove(f.name.as_str()).unwrap_or_default();
        replaced.sort_unstable_by_key(|r| r.0);
        let mut next = replaced.into_iter().peekable();
        let mut mine: Vec<&IndexedTensor> = tensors
            .iter()
            .filter(|t| t.file_id == f.id && t.len > 0)
            .collect();
        mine.sort_by_key(|t| t.offset);
        let (mut prefixes, mut changed) = (Vec::new(), Vec::new());
        for t in mine {
            prefixes.clear();
            for cv in index.tensor_hashes(t, layout)? {
                prefixes.extend_from_slice(&cv[..HASH_PREFIX]);
            }
            plain.update(&prefixes);
            let end = t.offset + t.len;
            if next.peek().is_none_or(|r| r.0 >= end) {
                over.update(&prefixes);
                continue;
            }
            changed.clone_from(&prefixes);
            while let Some(&(at, p)) = next.peek().filter(|r| r.0 < end) {
                next.next();
                if let Some(i) = at
                    .checked_sub(t.offset)
                    .map(|rel| (rel / layout.block_size) as usize * HASH_PREFIX)
                    .filter(|&i| i < changed.len())
                {
                    changed[i..i + HASH_PREFIX].copy_from_slice(p);
                }
            }
            over.update(&changed);
        }
        with_overrides.insert(f.name.clone(), *over.finalize().as_bytes());
        as_is.insert(f.name.clone(), *plain.finalize().as_bytes());
    }
    Ok((with_overrides, as_is))
}

impl Checkpoint {
    /// Writes one delta taking a replica from `since` (default: the last export's target) to the
    /// current generation into `outbox`, or a full delta with `full`.
    pub fn export_delta(
        &self,
        outbox: &Path,
        since: Option<u64>,
        full: bool,
    ) -> Result<ExportReport, Error> {
        let start = Instant::now();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.refuse_if_journal_pending()?;
        let mut index = self.require_index()?;
        let layout = index.block_layout()?;
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        self.check_trusted(&index, &model)?;
        let current = index.generation()?.unwrap_or(0);
        let model_id = index.meta("model_id")?.unwrap_or_default();
        let base = if full {
            None
        } else {
            Some(since.or(index.exported_through()?).ok_or_else(|| Error::ExportBase {
                what: "nothing has been exported yet: pass --full for a replica that has nothing, or --since GEN with the generation the replica's copy was made at (see `status`)".into(),
            })?)
        };
        let mut report = ExportReport {
            exported: false,
            file: None,
            manifest: None,
            base_generation: base,
            target_generation: current,
            bytes: 0,
            records: 0,
            full_blocks: 0,
            notes: Vec::new(),
            pruned: Vec::new(),
            seconds: 0.0,
        };
        if let Some(b) = base {
            if b > current {
                return Err(Error::ExportBase {
                    what: format!("--since {b} is after the current generation {current}"),
                });
            }
            if b == current {
                report.seconds = seconds_since(start);
                return Ok(report);
            }
        }
        self.io
            .create_dir_all(outbox)
            .map_err(Checkpoint::io_err(outbox))?;
        let name = delta::delta_name(base, current);
        let dest = outbox.join(&name);

        // What every file looks like at the target, and (for incremental deltas) at the base.
        let composed = match base {
            Some(b) => self.compose_span(&index, &model, layout, b, current, &mut report)?,
            None => BTreeMap::new(),
        };
        let overrides: HashMap<(String, u64), [u8; HASH_PREFIX]> = composed
            .iter()
            .filter_map(|(k, c)| Some((k.clone(), c.base?)))
            .collect();
        let unknown_base: Vec<&str> = composed
            .iter()
            .filter(|(_, c)| c.base.is_none())
            .map(|(k, _)| k.0.as_str())
            .collect();
        let (base_roots, target_roots) = file_roots(&index, layout, &overrides)?;
        let mut files: Vec<DeltaFile> = model
            .files
            .iter()
            .map(|f| DeltaFile {
                name: f.name.clone(),
                size: f.stat.size,
                base_root: if base.is_none() || unknown_base.contains(&f.name.as_str()) {
                    [0; 32]
                } else {
                    base_roots[&f.name]
                },
                target_root: target_roots[&f.name],
            })
            .collect();
        let index_json = self.model_dir.join(INDEX_FILE);
        if base.is_none() && index_json.is_file() {
            let size = std::fs::metadata(&index_json)
                .map_err(Checkpoint::io_err(&index_json))?
                .len();
            files.push(DeltaFile {
                name: INDEX_FILE.into(),
                size,
                base_root: [0; 32],
                target_root: [0; 32],
            });
        }
        let header = DeltaHeader {
            model_id,
            base_generation: base.unwrap_or(NO_BASE),
            target_generation: current,
            block_size: layout.block_size as u32,
            full: base.is_none(),
            created_ms: unix_ms() as u64,
            files: files.clone(),
        };

        let (bytes, sum) = if dest.exists() {
            // A crash after the rename but before the index recorded it: keep the file as it is.
            let d = Delta::open(self.io.as_ref(), &dest)?;
            if d.header.base_generation != header.base_generation
                || d.header.target_generation != current
            {
                return Err(Error::ExportBase {
                    what: format!(
                        "{} exists and is another delta; move it away",
                        dest.display()
                    ),
                });
            }
            report.records = d.count;
            let bytes = std::fs::read(&dest).map_err(Checkpoint::io_err(&dest))?;
            (bytes.len() as u64, *blake3::hash(&bytes).as_bytes())
        } else {
            let mut w = DeltaWriter::create(self.io.as_ref(), &dest, &header)?;
            if base.is_some() {
                self.write_composed(&mut w, &model, &files, composed, &mut report)?;
            } else {
                self.write_full(&mut w, &files, &mut report)?;
            }
            w.finish(self.io.as_ref())?
        };

        // The manifest and changed-files.txt, then the record in the index.
        let manifest_path = outbox.join(name.replace(".apd", ".json"));
        let manifest = serde_json::json!({
            "model_id": header.model_id,
            "base_generation": base,
            "target_generation": current,
            "full": base.is_none(),
            "block_size": layout.block_size,
            "delta_file": name,
            "delta_bytes": bytes,
            "delta_blake3": blockhash::hex(&sum),
            "records": report.records,
            "full_blocks": report.full_blocks,
            "files": files.iter().map(|f| Ok(serde_json::json!({
                "name": f.name,
                "size": f.size,
                "base_root": if f.base_root == [0; 32] { serde_json::Value::Null } else { blockhash::hex(&f.base_root).into() },
                "target_root": blockhash::hex(&f.target_root),
                "ranges": Self::ranges_of(&index, &f.name, base, current)?,
            }))).collect::<Result<Vec<_>, Error>>()?,
        });
        write_atomic(
            self.io.as_ref(),
            &manifest_path,
            serde_json::to_string(&manifest)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        let changed: Vec<String> = manifest["files"]
            .as_array()
            .map(|fs| {
                fs.iter()
                    .filter(|f| {
                        base.is_none() || f["ranges"].as_array().is_some_and(|r| !r.is_empty())
                    })
                    .filter_map(|f| f["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut list = changed.join("\n");
        list.push('\n');
        write_atomic(
            self.io.as_ref(),
            &outbox.join("changed-files.txt"),
            list.as_bytes(),
        )?;
        index.record_export(&ExportRow {
            base_generation: base,
            target_generation: current,
            file: name,
            outbox: outbox.display().to_string(),
            bytes,
            blake3: blockhash::hex(&sum),
            full_blocks: report.full_blocks,
            pruned: false,
        })?;
        report.exported = true;
        report.file = Some(dest);
        report.manifest = Some(manifest_path);
        report.bytes = bytes;
        report.seconds = seconds_since(start);
        Ok(report)
    }

    /// The merged byte ranges generations `base+1..=target` changed in `file` (all of it for a
    /// full export).
    fn ranges_of(
        index: &BlockIndex,
        file: &str,
        base: Option<u64>,
        target: u64,
    ) -> Result<Vec<(u64, u64)>, Error> {
        let Some(base) = base else {
            return Ok(Vec::new());
        };
        let mut all = Vec::new();
        for g in base + 1..=target {
            for (f, r) in index.generation_ranges(g)? {
                if f == file {
                    all.extend(r);
                }
            }
        }
        Ok(crate::plan::merge_ranges(all))
    }

    /// Composes the changes of generations `base+1..=target` per block.
    fn compose_span(
        &self,
        index: &BlockIndex,
        model: &ModelLayout,
        layout: BlockLayout,
        base: u64,
        target: u64,
        report: &mut ExportReport,
    ) -> Result<BTreeMap<(String, u64), Composed>, Error> {
        let undo: HashMap<u64, PathBuf> = self
            .undo_files()?
            .into_iter()
            .map(|(g, p, _)| (g, p))
            .collect();
        let mut composed: BTreeMap<(String, u64), Composed> = BTreeMap::new();
        let mut pruned_gens = Vec::new();
        for g in base + 1..=target {
            let kind = index
                .generation_record(g)?
                .map(|r| r.kind)
                .unwrap_or_default();
            if kind == "reindex" {
                return Err(Error::ExportBase {
                    what: format!(
                        "generation {g} re-indexed files changed behind the index, so no delta can describe it; export with --full"
                    ),
                });
            }
            let journal = match undo.get(&g) {
                Some(p) => match Journal::open(self.io.as_ref(), p)? {
                    JournalState::Committed(j) if j.header.target_generation == g => Some(j),
                    _ => None,
                },
                None => None,
            };
            let Some(j) = journal else {
                pruned_gens.push(g);
                for (file, ranges) in index.generation_ranges(g)? {
                    for (offset, tensor_offset, len) in blocks_in(model, layout, &file, &ranges) {
                        composed.insert(
                            (file.clone(), offset),
                            Composed {
                                tensor_offset,
                                len,
                                base: None,
                                target: [0; HASH_PREFIX],
                                xor: None,
                            },
                        );
                    }
                }
                continue;
            };
            j.for_each_batch(64 << 20, |batch| {
                for r in batch {
                    let key = (j.header.files[r.file as usize].name.clone(), r.block_offset);
                    match composed.get_mut(&key) {
                        None => {
                            composed.insert(
                                key,
                                Composed {
                                    tensor_offset: r.tensor_offset,
                                    len: r.len,
                                    base: Some(r.old),
                                    target: r.new,
                                    xor: Some(r.payload),
                                },
                            );
                        }
                        Some(c) => {
                            c.target = r.new;
                            if let Some(x) = &c.xor {
                                let bad = || journal::JournalError::Corrupt {
                                    path: j.path.clone(),
                                    what: "malformed payload".into(),
                                };
                                c.xor = Some(
                                    compose_xor(x, &r.payload, r.len as usize).ok_or_else(bad)?,
                                );
                            }
                        }
                    }
                }
                Ok::<_, Error>(())
            })?;
        }
        if !pruned_gens.is_empty() {
            report.notes.push(format!(
                "the undo data of generation(s) {} was pruned (export backlog limit): their changed blocks ship whole, and this delta cannot adopt a copied replica",
                pruned_gens.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            ));
        }
        // Blocks that changed and changed back carry nothing.
        composed.retain(|_, c| c.base != Some(c.target) || c.xor.is_none());
        Ok(composed)
    }

    fn write_composed(
        &self,
        w: &mut DeltaWriter,
        model: &ModelLayout,
        files: &[DeltaFile],
        composed: BTreeMap<(String, u64), Composed>,
        report: &mut ExportReport,
    ) -> Result<(), Error> {
        let slot: HashMap<&str, u32> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.as_str(), i as u32))
            .collect();
        let mut handles: HashMap<String, Box<dyn FileIo>> = HashMap::new();
        for f in &model.files {
            let p = model.dir.join(&f.name);
            handles.insert(
                f.name.clone(),
                self.io
                    .open(&p, OpenMode::Read)
                    .map_err(Checkpoint::io_err(&p))?,
            );
        }
        let entries: Vec<((String, u64), Composed)> = composed.into_iter().collect();
        for batch in entries.chunks(BATCH) {
            let encoded: Vec<(Vec<u8>, bool)> = batch
                .par_iter()
                .map(|((file, offset), c)| {
                    let mut out = Vec::new();
                    let rec = if let (Some(base), Some(xor)) = (c.base, &c.xor) {
                        DeltaRecord {
                            xor: true,
                            file: slot[file.as_str()],
                            tensor_offset: c.tensor_offset,
                            offset: *offset,
                            len: c.len,
                            base,
                            target: c.target,
                            payload: xor.clone(),
                        }
                    } else {
                        let h = &handles[file];
                        let mut bytes = vec![0u8; c.len as usize];
                        h.read_at(*offset, &mut bytes)
                            .map_err(Checkpoint::io_err(h.path()))?;
                        let target = record_hash(c.tensor_offset, *offset, &bytes);
                        DeltaRecord {
                            xor: false,
                            file: slot[file.as_str()],
                            tensor_offset: c.tensor_offset,
                            offset: *offset,
                            len: c.len,
                            base: [0; HASH_PREFIX],
                            target,
                            payload: bytes,
                        }
                    };
                    rec.encode(&mut out);
                    Ok((out, !rec.xor))
                })
                .collect::<Result<_, Error>>()?;
            for (e, whole) in encoded {
                w.append(&e, 1)?;
                report.records += 1;
                report.full_blocks += u64::from(whole);
            }
        }
        Ok(())
    }

    fn write_full(
        &self,
        w: &mut DeltaWriter,
        files: &[DeltaFile],
        report: &mut ExportReport,
    ) -> Result<(), Error> {
        for (i, f) in files.iter().enumerate() {
            let p = self.model_dir.join(&f.name);
            let h = self
                .io
                .open(&p, OpenMode::Read)
                .map_err(Checkpoint::io_err(&p))?;
            let mut offset = 0u64;
            let mut buf = vec![0u8; RAW_CHUNK];
            while offset < f.size {
                let n = (f.size - offset).min(RAW_CHUNK as u64) as usize;
                h.read_at(offset, &mut buf[..n])
                    .map_err(Checkpoint::io_err(&p))?;
                let mut out = Vec::with_capacity(n + 64);
                DeltaRecord {
                    xor: false,
                    file: i as u32,
                    tensor_offset: RAW,
                    offset,
                    len: n as u32,
                    base: [0; HASH_PREFIX],
                    target: record_hash(RAW, offset, &buf[..n]),
                    payload: buf[..n].to_vec(),
                }
                .encode(&mut out);
                w.append(&out, 1)?;
                report.records += 1;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// Removes the delta files (and manifests) in `outbox` whose target generation is at most
    /// `through`: the backup host has confirmed them.
    pub fn prune_exports(&self, outbox: &Path, through: u64) -> Result<Vec<String>, Error> {
        let _lock = self.lock(LockKind::Exclusive)?;
        let mut index = self.require_index()?;
        let mut removed = Vec::new();
        for e in index.exports()? {
            if e.target_generation > through || e.pruned {
                continue;
            }
            for name in [e.file.clone(), e.file.replace(".apd", ".json")] {
                let p = outbox.join(&name);
                if p.exists() {
                    self.io.remove_file(&p).map_err(Checkpoint::io_err(&p))?;
                }
            }
            removed.push(e.file);
        }
        if !removed.is_empty() {
            self.io
                .sync_dir(outbox)
                .map_err(Checkpoint::io_err(outbox))?;
            index.mark_pruned(&removed)?;
        }
        Ok(removed)
    }

    /// Applies delta files to this directory as a replica (see the module documentation).
    pub fn apply_delta(&self, paths: &[PathBuf]) -> Result<ApplyDeltaReport, Error> {
        let start = Instant::now();
        // Every delta is verified before anything is touched.
        let mut deltas = Vec::with_capacity(paths.len());
        for p in paths {
            deltas.push(Delta::open(self.io.as_ref(), p)?);
        }
        deltas.sort_by_key(|d| {
            (
                !d.header.full,
                d.header.base_generation,
                d.header.target_generation,
            )
        });
        for d in &deltas {
            for f in &d.header.files {
                let p = self.model_dir.join(&f.name);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(DeltaError::UnsafePath {
                        path: d.path.clone(),
                        name: f.name.clone(),
                    }
                    .into());
                }
            }
        }
        let state_existed = self.state_dir.exists();
        // A replica created from a full delta may not exist yet.
        self.io
            .create_dir_all(&self.model_dir)
            .map_err(Checkpoint::io_err(&self.model_dir))?;
        let _lock = self.lock(LockKind::Exclusive)?;
        self.recover_locked()?;
        let mut report = ApplyDeltaReport {
            deltas: Vec::new(),
            generation: 0,
            seconds: 0.0,
        };
        for d in &deltas {
            let h = &d.header;
            let entry = |outcome: &str, blocks| AppliedDelta {
                file: d.path.clone(),
                base_generation: (!h.full).then_some(h.base_generation),
                target_generation: h.target_generation,
                outcome: outcome.into(),
                blocks,
            };
            let Some(index) = self.open_index()? else {
                if h.full {
                    self.create_from_full(d)?;
                    report
                        .deltas
                        .push(entry("created from a full delta", d.count));
                } else {
                    self.adopt(d, state_existed)?;
                    let blocks = self.apply_one(d)?;
                    report.deltas.push(entry("adopted and applied", blocks));
                }
                continue;
            };
            let model_id = index.meta("model_id")?.unwrap_or_default();
            if h.model_id != model_id {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: format!(
                        "it is for model {}, this replica holds model {model_id}",
                        h.model_id
                    ),
                });
            }
            let current = index.generation()?.unwrap_or(0);
            drop(index);
            if h.target_generation <= current {
                report.deltas.push(entry("already applied", 0));
                continue;
            }
            if h.full {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: format!(
                        "it is a full delta and the replica already holds generation {current}; apply the incremental deltas from {current}"
                    ),
                });
            }
            if h.base_generation != current {
                let what = if h.base_generation > current {
                    format!(
                        "it starts at generation {} but the replica is at {current}: apply the deltas from {current} first",
                        h.base_generation
                    )
                } else {
                    format!(
                        "it takes generation {} to {}, but the replica is at {current}, in between",
                        h.base_generation, h.target_generation
                    )
                };
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what,
                });
            }
            let blocks = self.apply_one(d)?;
            report.deltas.push(entry("applied", blocks));
        }
        report.generation = self
            .open_index()?
            .map_or(Ok(0), |i| i.generation().map(|g| g.unwrap_or(0)))?;
        report.seconds = seconds_since(start);
        Ok(report)
    }

    /// Indexes the replica's files as generation `generation` of the delta's model and returns
    /// their roots.
    fn index_replica(
        &self,
        h: &DeltaHeader,
        generation: u64,
        kind: &str,
    ) -> Result<FileRoots, Error> {
        self.init_as(u64::from(h.block_size), Some(&h.model_id), generation, kind)?;
        let index = self.require_index()?;
        Ok(file_roots(&index, index.block_layout()?, &HashMap::<_, _>::new())?.1)
    }

    /// Adopts the files of a replica made by copying: indexes them as the delta's base
    /// generation and checks them against its base roots. On a mismatch the state created here is
    /// removed again and the files are untouched.
    fn adopt(&self, d: &Delta, state_existed: bool) -> Result<(), Error> {
        let h = &d.header;
        let undo_state = || {
            if !state_existed {
                let _ = std::fs::remove_dir_all(&self.state_dir);
            }
        };
        let result = (|| {
            if h.files.iter().any(|f| f.base_root == [0; 32]) {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: "the replica has no state and this delta cannot check a copied replica (some of its blocks ship whole); copy the model again, or create the replica from `export-delta --full`".into(),
                });
            }
            let roots = self.index_replica(h, h.base_generation, "adopt")?;
            for f in &h.files {
                if roots.get(&f.name) != Some(&f.base_root) {
                    return Err(Error::ReplicaMismatch {
                        delta: d.path.clone(),
                        what: format!(
                            "the replica's {} is not the model's file at generation {}: copy it again",
                            f.name, h.base_generation
                        ),
                    });
                }
            }
            if roots.len() != h.files.len() {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: "the replica holds other files than the model".into(),
                });
            }
            Ok(())
        })();
        result.inspect_err(|_| undo_state())
    }

    /// Creates the replica's files from a full delta, then indexes them.
    fn create_from_full(&self, d: &Delta) -> Result<(), Error> {
        let h = &d.header;
        let tmp_of = |name: &str| self.model_dir.join(format!(".{name}.apd-tmp"));
        self.io
            .create_dir_all(&self.model_dir)
            .map_err(Checkpoint::io_err(&self.model_dir))?;
        let mut handles = Vec::new();
        for f in &h.files {
            let t = tmp_of(&f.name);
            if t.exists() {
                self.io.remove_file(&t).map_err(Checkpoint::io_err(&t))?;
            }
            handles.push(self.io.create(&t).map_err(Checkpoint::io_err(&t))?);
        }
        d.for_each_batch(64 << 20, |batch| {
            for r in batch {
                if r.xor || record_hash(r.tensor_offset, r.offset, &r.payload) != r.target {
                    return Err(Error::Delta(DeltaError::Corrupt {
                        path: d.path.clone(),
                        what: format!(
                            "record at {} of {}",
                            r.offset, h.files[r.file as usize].name
                        ),
                    }));
                }
                let f = &handles[r.file as usize];
                f.write_at(r.offset, &r.payload)
                    .map_err(Checkpoint::io_err(f.path()))?;
            }
            Ok(())
        })?;
        for (f, handle) in h.files.iter().zip(&handles) {
            handle.sync().map_err(Checkpoint::io_err(handle.path()))?;
            if handle.len() != f.size {
                return Err(DeltaError::Corrupt {
                    path: d.path.clone(),
                    what: format!("{} is incomplete", f.name),
                }
                .into());
            }
        }
        drop(handles);
        for f in &h.files {
            let dest = self.model_dir.join(&f.name);
            self.io
                .rename(&tmp_of(&f.name), &dest)
                .map_err(Checkpoint::io_err(&dest))?;
        }
        self.io
            .sync_dir(&self.model_dir)
            .map_err(Checkpoint::io_err(&self.model_dir))?;
        let roots = self.index_replica(h, h.target_generation, "full-delta")?;
        for f in h.files.iter().filter(|f| f.name != INDEX_FILE) {
            if roots.get(&f.name) != Some(&f.target_root) {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: format!(
                        "{} does not match the delta's target after writing it",
                        f.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Journals and applies one incremental delta whose base is the replica's generation.
    fn apply_one(&self, d: &Delta) -> Result<u64, Error> {
        let start = Instant::now();
        let h = &d.header;
        let index = self.require_index()?;
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        self.check_trusted(&index, &model)?;
        let mut handles = Vec::new();
        for f in &h.files {
            let m = model.files.iter().find(|m| m.name == f.name);
            if m.is_none_or(|m| m.stat.size != f.size) {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: format!("the replica's {} is missing or has another size", f.name),
                });
            }
            let p = self.model_dir.join(&f.name);
            handles.push(
                self.io
                    .open(&p, OpenMode::ReadWrite)
                    .map_err(Checkpoint::io_err(&p))?,
            );
        }
        let header = JournalHeader {
            kind: JournalKind::ApplyDelta,
            block_size: h.block_size,
            model_id: h.model_id.clone(),
            base_generation: h.base_generation,
            target_generation: h.target_generation,
            created_ms: unix_ms() as u64,
            files: h
                .files
                .iter()
                .map(|f| JournalFile {
                    name: f.name.clone(),
                    size: f.size,
                })
                .collect(),
            info: serde_json::json!({ "source": format!("delta {}", d.path.display()), "tensors": model.tensors.len(), "bytes_compared": 0 }),
        };
        let path = self.state_dir.join(JOURNAL_FILE);
        let written = (|| {
            let mut w = JournalWriter::create(self.io.as_ref(), &path, &header)?;
            let mut blocks = 0;
            d.for_each_batch(64 << 20, |batch| {
                let encoded: Vec<Option<Vec<u8>>> = batch
                    .par_iter()
                    .map(|r| {
                        let name = &h.files[r.file as usize].name;
                        if r.tensor_offset == RAW {
                            return Err(Error::Delta(DeltaError::Corrupt {
                                path: d.path.clone(),
                                what: "raw bytes in an incremental delta".into(),
                            }));
                        }
                        let f = &handles[r.file as usize];
                        let mut block = vec![0u8; r.len as usize];
                        f.read_at(r.offset, &mut block)
                            .map_err(Checkpoint::io_err(f.path()))?;
                        let now = record_hash(r.tensor_offset, r.offset, &block);
                        let payload = if r.xor {
                            if now != r.base {
                                return Err(Error::BaseMismatch {
                                    delta: d.path.clone(),
                                    file: name.clone(),
                                    offset: r.offset,
                                    end: r.offset + u64::from(r.len),
                                });
                            }
                            r.payload.clone()
                        } else {
                            if now == r.target {
                                return Ok(None);
                            }
                            let mut p = Vec::new();
                            encode_xor(&block, &r.payload, &mut p);
                            p
                        };
                        let mut out = Vec::new();
                        Record {
                            file: r.file,
                            tensor_offset: r.tensor_offset,
                            block_offset: r.offset,
                            len: r.len,
                            old: now,
                            new: r.target,
                            payload,
                        }
                        .encode(&mut out);
                        Ok(Some(out))
                    })
                    .collect::<Result<_, Error>>()?;
                for e in encoded.into_iter().flatten() {
                    w.append(&e, 1)?;
                    blocks += 1;
                }
                Ok::<_, Error>(())
            })?;
            w.commit(self.io.as_ref())?;
            Ok::<_, Error>(blocks)
        })();
        let blocks = written.inspect_err(|_| self.discard_uncommitted(&path))?;
        drop(index);
        let JournalState::Committed(journal) = Journal::open(self.io.as_ref(), &path)? else {
            return Err(journal::JournalError::Corrupt {
                path,
                what: "not committed after its commit record was written".into(),
            }
            .into());
        };
        self.complete_open(journal, start, handles)?;
        Ok(blocks)
    }
}

/// The blocks (absolute offset, tensor offset, length) that `ranges` of `file` cover.
fn blocks_in(
    model: &ModelLayout,
    layout: BlockLayout,
    file: &str,
    ranges: &[(u64, u64)],
) -> Vec<(u64, u64, u32)> {
    let Some(fi) = model.files.iter().position(|f| f.name == file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in model
        .tensors
        .iter()
        .filter(|t| t.file == fi && t.entry.len > 0)
    {
        let (t0, t1) = (t.entry.offset, t.entry.offset + t.entry.len);
        for &(off, len) in ranges {
            let (a, b) = (off.max(t0), (off + len).min(t1));
            if a >= b {
                continue;
            }
            for blk in (a - t0) / layout.block_size..=(b - t0 - 1) / layout.block_size {
                let start = blk * layout.block_size;
                out.push((
                    t0 + start,
                    t0,
                    layout.block_size.min(t.entry.len - start) as u32,
                ));
            }
        }
    }
    out
}
