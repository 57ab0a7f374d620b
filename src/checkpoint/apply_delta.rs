//! `apply-delta`: apply delta files to a replica on the backup host.
//!
//! The replica keeps its own state directory (generation and block index, like a model).
//! Deltas are applied in generation order, each through the write transaction exactly like a
//! sync: every touched block's base hash is checked before anything is written, and its target
//! hash after. A replica without state *adopts* the files it holds (copied once with cp or
//! rsync) when their hashes match the delta's base roots, or is created from a full delta.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::txn::{Mode, NewHashes, WriteTxn};
use super::{
    AppliedDelta, ApplyDeltaReport, ApplyOutcome, Checkpoint, Error, FileRoots, file_roots,
    seconds_since,
};
use crate::delta::{Delta, DeltaError, DeltaHeader, record_hash};
use crate::index::{GenerationKind, SyncCommit, unix_ms};
use crate::io::OpenMode;
use crate::journal::{GenerationInfo, JournalFile, JournalHeader, JournalKind};
use crate::model::INDEX_FILE;
use crate::record::{self, RAW, Record, encode_xor};

impl Checkpoint {
    /// Applies delta files to this directory as a replica (see the module documentation).
    pub fn apply_delta(&self, paths: &[PathBuf]) -> Result<ApplyDeltaReport, Error> {
        let start = Instant::now();
        // Every delta is verified before anything is touched: its MAC first, when a key is
        // configured (a delta without a valid one is refused).
        if let Some(key) = &self.key {
            for p in paths {
                key.check(p)?;
            }
        }
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
        let replica_existed = self.model_dir.exists();
        // A replica created from a full delta may not exist yet.
        self.io
            .create_dir_all(&self.model_dir)
            .map_err(Checkpoint::io_err(&self.model_dir))?;
        let mut report = ApplyDeltaReport {
            deltas: Vec::new(),
            generation: 0,
            seconds: 0.0,
        };
        let wrote = Cell::new(false);
        let applied = self.apply_sorted(&deltas, state_existed, &mut report, &wrote);
        if applied.is_err() && !wrote.get() {
            // Refused before any write could have begun (no journal ever committing, no file
            // moved into place): the state and the folder this run made go again, and the
            // replica folder is as it was.
            if !state_existed {
                let _ = std::fs::remove_dir_all(&self.state_dir);
            }
            if !replica_existed {
                let _ = std::fs::remove_dir(&self.model_dir);
            }
        }
        applied?;
        report.generation = self
            .open_index()?
            .map_or(Ok(0), |i| i.generation().map(|g| g.unwrap_or(0)))?;
        report.seconds = seconds_since(start);
        Ok(report)
    }

    /// [`Self::apply_delta`] of verified deltas in applying order, once the replica folder exists.
    /// Each delta applied (or skipped) is added to `report`.
    fn apply_sorted(
        &self,
        deltas: &[Delta],
        state_existed: bool,
        report: &mut ApplyDeltaReport,
        wrote: &Cell<bool>,
    ) -> Result<(), Error> {
        let _lock = self.begin_write()?;
        self.recover_locked()?;
        self.check_delta_set(deltas)?;
        for d in deltas {
            let h = &d.header;
            let entry = |outcome, blocks| AppliedDelta {
                file: d.path.clone(),
                base_generation: (!h.full).then_some(h.base_generation),
                target_generation: h.target_generation,
                outcome,
                blocks,
            };
            let Some(index) = self.open_index()? else {
                if h.full {
                    self.create_from_full(d, state_existed, wrote)?;
                    report
                        .deltas
                        .push(entry(ApplyOutcome::CreatedFromFull, d.count));
                } else {
                    self.adopt(d, state_existed)?;
                    let blocks = self.apply_one(d, wrote)?;
                    report
                        .deltas
                        .push(entry(ApplyOutcome::AdoptedAndApplied, blocks));
                }
                continue;
            };
            // `check_delta_set` made sure, under this lock, that the model is the replica's and
            // that this delta either is held already or continues from the replica's generation.
            let current = index.generation()?.unwrap_or(0);
            drop(index);
            if h.target_generation <= current {
                report.deltas.push(entry(ApplyOutcome::AlreadyApplied, 0));
                continue;
            }
            let blocks = self.apply_one(d, wrote)?;
            report.deltas.push(entry(ApplyOutcome::Applied, blocks));
        }
        Ok(())
    }

    /// Checks the whole set of deltas (sorted for applying) against the replica before any is
    /// applied: one model; starting where the replica is (or, without an index, from a full
    /// delta or a copy at the first delta's base); each delta continuing from where the last
    /// one ended; deltas the replica (or an earlier delta of the set) already holds are skipped.
    /// A gap or an overlap anywhere is refused, naming the delta, with nothing applied.
    fn check_delta_set(&self, deltas: &[Delta]) -> Result<(), Error> {
        let index = self.open_index()?;
        let (mut generation, model) = match &index {
            Some(i) => (Some(i.generation()?.unwrap_or(0)), Some(i.model_id()?)),
            None => (None, None),
        };
        drop(index);
        let model = model.or_else(|| deltas.first().map(|d| d.header.model_id.clone()));
        for d in deltas {
            let h = &d.header;
            let refuse = |what: String| Error::ReplicaMismatch {
                delta: d.path.clone(),
                what,
            };
            if Some(&h.model_id) != model.as_ref() {
                return Err(refuse(format!(
                    "it is for model {}, the replica (or the set's first delta) is model {}",
                    h.model_id,
                    model.as_deref().unwrap_or("?")
                )));
            }
            // Generations are stored as SQLite integers (i64), and a delta moves forward.
            if h.target_generation > i64::MAX as u64
                || (!h.full && h.target_generation <= h.base_generation)
            {
                return Err(refuse(format!(
                    "it takes generation {} to {}, which no export writes",
                    h.base_generation, h.target_generation
                )));
            }
            let at = match generation {
                None if h.full => {
                    generation = Some(h.target_generation);
                    continue;
                }
                // A copied replica is adopted at the first delta's base.
                None => h.base_generation,
                Some(g) => g,
            };
            if h.target_generation <= at {
                generation = Some(at);
                continue; // already held: skipped when applied
            }
            if h.full {
                return Err(refuse(format!(
                    "it is a full delta and the replica already holds generation {at}; apply the incremental deltas from {at}"
                )));
            }
            if h.base_generation != at {
                return Err(refuse(if h.base_generation > at {
                    format!(
                        "it starts at generation {} but the replica (with the deltas before it in this set) is at {at}: apply the deltas from {at} first; nothing was applied",
                        h.base_generation
                    )
                } else {
                    format!(
                        "it takes generation {} to {}, but the replica (with the deltas before it in this set) is at {at}, in between; nothing was applied",
                        h.base_generation, h.target_generation
                    )
                }));
            }
            generation = Some(h.target_generation);
        }
        Ok(())
    }

    /// Indexes the replica's files as generation `generation` of the delta's model and returns
    /// their roots.
    fn index_replica(
        &self,
        h: &DeltaHeader,
        generation: u64,
        kind: GenerationKind,
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
            let roots = self.index_replica(h, h.base_generation, GenerationKind::Adopt)?;
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

    /// Creates the replica's files from a full delta, all or nothing: they are written into a
    /// hidden staging folder of the replica, indexed and checked against the delta's target
    /// roots there, and only then moved into place. A refused delta leaves the replica folder
    /// as it was (the staging folder, and the state this run created, are removed).
    fn create_from_full(
        &self,
        d: &Delta,
        state_existed: bool,
        wrote: &Cell<bool>,
    ) -> Result<(), Error> {
        let h = &d.header;
        let staging = self
            .model_dir
            .join(format!(".apollo-full-{}.tmp", h.target_generation));
        let result = self.stage_full(d, &staging).and_then(|()| {
            // Into place: the files only, each already complete and checked.
            wrote.set(true);
            for f in &h.files {
                let dest = self.model_dir.join(&f.name);
                self.io
                    .rename(&staging.join(&f.name), &dest)
                    .map_err(Checkpoint::io_err(&dest))?;
            }
            self.io
                .sync_dir(&self.model_dir)
                .map_err(Checkpoint::io_err(&self.model_dir))?;
            // A rename changes a file's ctime: the index learns the files' stats in place.
            let model = self.open_model_for_write()?;
            let mut index = self.require_index()?;
            index.commit_sync(SyncCommit {
                file_stats: model
                    .files
                    .iter()
                    .map(|f| (f.name.clone(), f.stat))
                    .collect(),
                ..SyncCommit::default()
            })?;
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&staging);
        if result.is_err() && !state_existed && !wrote.get() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
        result
    }

    /// Writes the files of full delta `d` into `staging`, indexes them there (into this
    /// replica's state directory) and checks them against the delta's target roots.
    fn stage_full(&self, d: &Delta, staging: &Path) -> Result<(), Error> {
        let h = &d.header;
        if let Some(f) = h
            .files
            .iter()
            .find(|f| f.name != INDEX_FILE && !f.name.ends_with(".safetensors"))
        {
            return Err(DeltaError::UnsafePath {
                path: d.path.clone(),
                name: f.name.clone(),
            }
            .into());
        }
        let _ = std::fs::remove_dir_all(staging);
        self.io
            .create_dir_all(staging)
            .map_err(Checkpoint::io_err(staging))?;
        let mut handles = Vec::new();
        for f in &h.files {
            let t = staging.join(&f.name);
            handles.push(self.io.create(&t).map_err(Checkpoint::io_err(&t))?);
        }
        d.for_each_batch(64 << 20, |batch| {
            for r in batch {
                if r.is_xor() || record_hash(r.tensor_offset, r.offset, &r.payload) != r.new {
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
        let staged = Checkpoint::new(staging, Some(&self.state_dir), Arc::clone(&self.io));
        let roots = staged.index_replica(h, h.target_generation, GenerationKind::FullDelta)?;
        for f in h.files.iter().filter(|f| f.name != INDEX_FILE) {
            if roots.get(&f.name) != Some(&f.target_root) {
                return Err(Error::ReplicaMismatch {
                    delta: d.path.clone(),
                    what: format!(
                        "{} does not match the delta's target after writing it; the replica is left as it was",
                        f.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Journals and applies one incremental delta whose base is the replica's generation.
    /// `wrote` is set once its journal may commit.
    fn apply_one(&self, d: &Delta, wrote: &Cell<bool>) -> Result<u64, Error> {
        let start = Instant::now();
        let h = &d.header;
        let index = self.require_index()?;
        let model = self.open_model_for_write()?;
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
            info: GenerationInfo {
                tags: crate::index::Tags::new(),
                source: format!("delta {}", d.path.display()),
                tensors: model.tensors.len() as u64,
                bytes_compared: 0,
                restored_generation: None,
            },
        };
        let block_size = u64::from(h.block_size);
        if block_size != index.block_layout()?.block_size {
            return Err(Error::ReplicaMismatch {
                delta: d.path.clone(),
                what: format!(
                    "its blocks are {block_size} bytes, the replica's index uses {}",
                    index.block_layout()?.block_size
                ),
            });
        }
        // Every tensor's data region, by (delta file index, absolute offset): its length.
        let regions: HashMap<(u32, u64), u64> = model
            .tensors
            .iter()
            .filter(|t| t.entry.len > 0)
            .filter_map(|t| {
                let name = &model.files[t.file].name;
                let i = h.files.iter().position(|f| &f.name == name)?;
                Some(((i as u32, t.entry.offset), t.entry.len))
            })
            .collect();
        // Records are untrusted input (the checksum is not a signature): each must be exactly
        // one block of a tensor of the replica, and its bytes must give its target hash, or the
        // delta is refused before its journal commits (nothing written).
        let corrupt = |r: &Record, what: &str| {
            Error::Delta(DeltaError::Corrupt {
                path: d.path.clone(),
                what: format!(
                    "the record for bytes {}..{} of {}: {what}",
                    r.offset,
                    r.offset.saturating_add(u64::from(r.len)),
                    h.files[r.file as usize].name
                ),
            })
        };
        let is_block = |r: &Record| {
            let Some(&len) = regions.get(&(r.file, r.tensor_offset)) else {
                return false;
            };
            let Some(rel) = r.offset.checked_sub(r.tensor_offset) else {
                return false;
            };
            rel % block_size == 0 && rel < len && u64::from(r.len) == block_size.min(len - rel)
        };
        let mut txn = WriteTxn::begin(self, &header)?;
        let mut blocks = 0;
        d.for_each_batch(64 << 20, |batch| {
            let encoded: Vec<Option<Vec<u8>>> = batch
                .par_iter()
                .map(|r| {
                    let name = &h.files[r.file as usize].name;
                    if r.tensor_offset == RAW {
                        return Err(corrupt(r, "raw bytes in an incremental delta"));
                    }
                    if !is_block(r) {
                        return Err(corrupt(r, "not a block of a tensor of the replica"));
                    }
                    let f = &handles[r.file as usize];
                    let mut block = vec![0u8; r.len as usize];
                    f.read_at(r.offset, &mut block)
                        .map_err(Checkpoint::io_err(f.path()))?;
                    let now = record_hash(r.tensor_offset, r.offset, &block);
                    let payload = if r.is_xor() {
                        if now != r.old {
                            return Err(Error::BaseMismatch {
                                delta: d.path.clone(),
                                file: name.clone(),
                                offset: r.offset,
                                end: r.offset + u64::from(r.len),
                            });
                        }
                        let mut new = block.clone();
                        if record::apply_xor(&r.payload, &mut new).is_none() {
                            return Err(corrupt(r, "its XOR code is malformed"));
                        }
                        if record_hash(r.tensor_offset, r.offset, &new) != r.new {
                            return Err(corrupt(r, "its bytes do not give its target hash"));
                        }
                        r.payload.clone()
                    } else {
                        if record_hash(r.tensor_offset, r.offset, &r.payload) != r.new {
                            return Err(corrupt(r, "its bytes do not give its target hash"));
                        }
                        if now == r.new {
                            return Ok(None);
                        }
                        let mut p = Vec::new();
                        encode_xor(&block, &r.payload, &mut p);
                        p
                    };
                    let mut out = Vec::new();
                    Record {
                        tag: record::JOURNAL,
                        file: r.file,
                        tensor_offset: r.tensor_offset,
                        offset: r.offset,
                        len: r.len,
                        old: now,
                        new: r.new,
                        payload,
                    }
                    .encode(&mut out);
                    Ok(Some(out))
                })
                .collect::<Result<_, Error>>()?;
            for e in encoded.into_iter().flatten() {
                txn.stage(&e, 1)?;
                blocks += 1;
            }
            Ok::<_, Error>(())
        })?;
        wrote.set(true);
        let (committed, _) = txn.commit()?;
        drop(index);
        committed.finish(Mode::Write, Some(handles), NewHashes::ReadBack, start)?;
        Ok(blocks)
    }
}
