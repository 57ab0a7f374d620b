//! `export-delta`: the changes since the last export, as one immutable delta file.
//!
//! It composes what every generation since the last export changed, from the retained undo
//! data (the retired journals): a block changed in three syncs ships once, as the XOR of its
//! base and target bytes. Generations whose undo data was pruned (the backlog limit) ship their
//! changed blocks whole, and the export says so. A *full* export ships whole files, for a
//! replica that has nothing yet. Each export is one immutable delta file plus a JSON manifest
//! and `changed-files.txt`, each appearing atomically; the export is recorded in the index only
//! once they are durable, so a crash mid-export just repeats it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use super::{Checkpoint, Error, ExportReport, seconds_since, write_atomic};
use crate::blockhash::{self, BlockLayout};
use crate::delta::{self, Delta, DeltaFile, DeltaHeader, DeltaWriter, NO_BASE, record_hash};
use crate::index::{BlockIndex, ExportRow, GenerationKind, IndexedTensor, unix_ms};
use crate::io::{FileIo, OpenMode};
use crate::journal::{Journal, JournalError, JournalState};
use crate::model::{INDEX_FILE, ModelLayout};
use crate::record::{HASH_PREFIX, RAW, Record, WHOLE, XOR, compose_xor};

/// Bytes of raw file data per record of a full delta.
const RAW_CHUNK: usize = 1 << 20;
/// Records encoded per parallel batch.
pub(crate) const BATCH: usize = 4096;

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
        let _lock = self.begin_write()?;
        self.refuse_if_journal_pending()?;
        let mut index = self.require_index()?;
        let layout = index.block_layout()?;
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        self.check_trusted(&index, &model)?;
        let current = index.generation()?.unwrap_or(0);
        let model_id = index.model_id()?;
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
        // What the backup host receives, by generation: its tags (`sync --tag`), if any.
        let mut tags = serde_json::Map::new();
        for g in index.generation_records_between(base.map_or(0, |b| b + 1), current)? {
            if !g.tags.is_empty() {
                tags.insert(g.generation.to_string(), serde_json::json!(g.tags));
            }
        }
        let manifest = serde_json::json!({
            "tags": tags,
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
        if let Some(key) = &self.key {
            let text = key.mac_file_text(&dest, Some(&manifest_path))?;
            write_atomic(
                self.io.as_ref(),
                &crate::mac::mac_path(&dest),
                text.as_bytes(),
            )?;
        }
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
            let kind = index.generation_record(g)?.map(|r| r.kind);
            if kind == Some(GenerationKind::Reindex) {
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
                    let key = (j.header.files[r.file as usize].name.clone(), r.offset);
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
                                let bad = || JournalError::Corrupt {
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
                        Record {
                            tag: XOR,
                            file: slot[file.as_str()],
                            tensor_offset: c.tensor_offset,
                            offset: *offset,
                            len: c.len,
                            old: base,
                            new: c.target,
                            payload: xor.clone(),
                        }
                    } else {
                        let h = &handles[file];
                        let mut bytes = vec![0u8; c.len as usize];
                        h.read_at(*offset, &mut bytes)
                            .map_err(Checkpoint::io_err(h.path()))?;
                        let target = record_hash(c.tensor_offset, *offset, &bytes);
                        Record {
                            tag: WHOLE,
                            file: slot[file.as_str()],
                            tensor_offset: c.tensor_offset,
                            offset: *offset,
                            len: c.len,
                            old: [0; HASH_PREFIX],
                            new: target,
                            payload: bytes,
                        }
                    };
                    rec.encode(&mut out);
                    Ok((out, !rec.is_xor()))
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
                Record {
                    tag: WHOLE,
                    file: i as u32,
                    tensor_offset: RAW,
                    offset,
                    len: n as u32,
                    old: [0; HASH_PREFIX],
                    new: record_hash(RAW, offset, &buf[..n]),
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
        let _lock = self.begin_write()?;
        let mut index = self.require_index()?;
        let mut removed = Vec::new();
        for e in index.exports()? {
            if e.target_generation > through || e.pruned {
                continue;
            }
            for name in [
                e.file.clone(),
                e.file.replace(".apd", ".json"),
                format!("{}{}", e.file, crate::mac::MAC_SUFFIX),
            ] {
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
