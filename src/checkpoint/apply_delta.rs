//! `apply-delta`: apply delta files to a replica on the backup host.
//!
//! The replica keeps its own state directory (generation and block index, like a model).
//! Deltas are applied in generation order, each through the write transaction exactly like a
//! sync: every touched block's base hash is checked before anything is written, and its target
//! hash after. A replica without state *adopts* the files it holds (copied once with cp or
//! rsync) when their hashes match the delta's base roots, or is created from a full delta.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

use super::txn::{Mode, NewHashes, WriteTxn};
use super::{
    AppliedDelta, ApplyDeltaReport, ApplyOutcome, Checkpoint, Error, FileRoots, file_roots,
    seconds_since,
};
use crate::delta::{Delta, DeltaError, DeltaHeader, record_hash};
use crate::index::{GenerationKind, unix_ms};
use crate::io::OpenMode;
use crate::journal::{GenerationInfo, JournalFile, JournalHeader, JournalKind};
use crate::model::INDEX_FILE;
use crate::record::{self, RAW, Record, encode_xor};

impl Checkpoint {
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
        let _lock = self.begin_write()?;
        self.recover_locked()?;
        self.check_delta_set(&deltas)?;
        let mut report = ApplyDeltaReport {
            deltas: Vec::new(),
            generation: 0,
            seconds: 0.0,
        };
        for d in &deltas {
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
                    self.create_from_full(d)?;
                    report
                        .deltas
                        .push(entry(ApplyOutcome::CreatedFromFull, d.count));
                } else {
                    self.adopt(d, state_existed)?;
                    let blocks = self.apply_one(d)?;
                    report
                        .deltas
                        .push(entry(ApplyOutcome::AdoptedAndApplied, blocks));
                }
                continue;
            };
            let model_id = index.model_id()?;
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
                report.deltas.push(entry(ApplyOutcome::AlreadyApplied, 0));
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
            report.deltas.push(entry(ApplyOutcome::Applied, blocks));
        }
        report.generation = self
            .open_index()?
            .map_or(Ok(0), |i| i.generation().map(|g| g.unwrap_or(0)))?;
        report.seconds = seconds_since(start);
        Ok(report)
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
        for f in &h.files {
            let dest = self.model_dir.join(&f.name);
            self.io
                .rename(&tmp_of(&f.name), &dest)
                .map_err(Checkpoint::io_err(&dest))?;
        }
        self.io
            .sync_dir(&self.model_dir)
            .map_err(Checkpoint::io_err(&self.model_dir))?;
        let roots = self.index_replica(h, h.target_generation, GenerationKind::FullDelta)?;
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
                source: format!("delta {}", d.path.display()),
                tensors: model.tensors.len() as u64,
                bytes_compared: 0,
                restored_generation: None,
            },
        };
        let mut txn = WriteTxn::begin(self, &header)?;
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
                    let payload = if r.is_xor() {
                        if now != r.old {
                            return Err(Error::BaseMismatch {
                                delta: d.path.clone(),
                                file: name.clone(),
                                offset: r.offset,
                                end: r.offset + u64::from(r.len),
                            });
                        }
                        r.payload.clone()
                    } else {
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
        let (committed, _) = txn.commit()?;
        drop(index);
        committed.finish(Mode::Write, Some(handles), NewHashes::ReadBack, start)?;
        Ok(blocks)
    }
}
