//! The write transaction: the one protocol by which sync, rollback, apply-delta and recovery
//! change model files (see the module documentation of [`super`] for why it is safe).
//!
//! [`Checkpoint::begin_write`] takes the exclusive lock and makes the previous write's pages
//! durable (timed: the `flush` phase). [`WriteTxn::begin`] creates the journal; records are
//! [staged](WriteTxn::stage); [`WriteTxn::commit`] makes them and the commit record durable and
//! returns a [`Committed`] journal, which [`Committed::finish`] applies to the files, records in
//! the index (hashes, stats, generation, ranges) and retires. Dropping a `WriteTxn` before its
//! commit discards its journal: the files were never touched. A committed journal found after a
//! crash goes through the same [`Committed::finish`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

use super::undo::undo_name;
use super::{Checkpoint, Error, RecoverReport, RecoveryAction, seconds_since};
use crate::apply::{self, ApplyStats};
use crate::blockhash::{self, BlockLayout, Cv};
use crate::index::{
    BlockIndex, FileRanges, GenerationRecord, HashSpill, IndexError, IndexedTensor, NewSummaries,
    SyncCommit, unix_ms,
};
use crate::io::{FileIo, FileStat, OpenMode};
use crate::journal::{
    Journal, JournalError, JournalFile, JournalHeader, JournalState, JournalWriter, UNDO_DIR,
};
use crate::lock::{LockKind, StateLock};
use crate::plan::merge_ranges;
use crate::record::{self, hash_prefix};

/// The exclusive lock of a writer, taken with the previous write's pages made durable.
#[derive(Debug)]
pub struct WriteLock {
    _lock: Option<StateLock>,
    /// What making the previous write durable did, if it left anything.
    pub flushed: Option<RecoverReport>,
    /// How long that took.
    pub flush_seconds: f64,
}

impl Checkpoint {
    /// Begins a write: takes the exclusive lock, then makes the writes the previous journaled
    /// write left to the page cache durable (see [`crate::journal`], "Unflushed writes").
    pub(crate) fn begin_write(&self) -> Result<WriteLock, Error> {
        let lock = self.lock(LockKind::Exclusive)?;
        let start = Instant::now();
        let flushed = self.flush_previous()?;
        Ok(WriteLock {
            _lock: lock,
            flushed,
            flush_seconds: seconds_since(start),
        })
    }

    /// Makes the writes named by `unflushed.json` durable and removes it: in the same boot by
    /// fsyncing the files it names, after a reboot (or a failed fsync) by rolling their retired
    /// journal forward again. Runs under the exclusive lock; a pending journal is left to
    /// recovery, which finishes both.
    pub(crate) fn flush_previous(&self) -> Result<Option<RecoverReport>, Error> {
        let start = Instant::now();
        let Some(u) = self.unflushed()? else {
            return Ok(None);
        };
        if self.journal_path().exists() {
            return Ok(None);
        }
        let mut report = RecoverReport {
            action: RecoveryAction::Flushed,
            generation: u.generation,
            blocks: ApplyStats::default(),
            seconds: 0.0,
        };
        if !(self.same_boot(&u) && self.fsync_unflushed(&u.files).is_ok()) {
            let path = self.state_dir.join(UNDO_DIR).join(undo_name(u.generation));
            let JournalState::Committed(journal) = Journal::open(self.io.as_ref(), &path)? else {
                return Err(JournalError::Corrupt {
                    path,
                    what: "the journal of unflushed writes is not committed".into(),
                }
                .into());
            };
            report = Committed::found(self, *journal)
                .finish(Mode::Reflush, None, NewHashes::ReadBack, start)?
                .report;
        }
        self.make_index_durable()?;
        self.sync_retired()?;
        self.clear_unflushed()?;
        report.seconds = seconds_since(start);
        tracing::info!(
            generation = report.generation,
            action = ?report.action,
            seconds = report.seconds,
            "the previous write made durable"
        );
        Ok(Some(report))
    }
}

/// A journaled write being staged. Dropped before [`WriteTxn::commit`], it discards its journal.
pub(crate) struct WriteTxn<'c> {
    cp: &'c Checkpoint,
    path: PathBuf,
    writer: Option<JournalWriter>,
    /// Where each model file's records are: (file, start, end) byte ranges of the journal.
    sections: Vec<(u32, u64, u64)>,
}

impl<'c> WriteTxn<'c> {
    /// Creates the journal of a write described by `header`.
    pub fn begin(cp: &'c Checkpoint, header: &JournalHeader) -> Result<Self, Error> {
        let mut txn = WriteTxn {
            cp,
            path: cp.journal_path(),
            writer: None,
            sections: Vec::new(),
        };
        match JournalWriter::create(cp.io.as_ref(), &txn.path, header) {
            Ok(w) => txn.writer = Some(w),
            Err(e) => {
                txn.discard();
                return Err(e.into());
            }
        }
        Ok(txn)
    }

    /// Appends `records` encoded records.
    pub fn stage(&mut self, encoded: &[u8], records: u64) -> Result<(), Error> {
        let writer = self.writer.as_mut().expect("staged before commit");
        let mut pos = writer.len();
        writer.append(encoded, records)?;
        // Note which file each record is for, by the record's own head.
        let mut at = 0;
        while let Some((r, n)) = encoded.get(at..).and_then(record::Record::decode_head_len) {
            match self.sections.last_mut() {
                Some(s) if s.0 == r && s.2 == pos => s.2 += n as u64,
                _ => self.sections.push((r, pos, pos + n as u64)),
            }
            pos += n as u64;
            at += n;
        }
        Ok(())
    }

    /// Makes the records and then the commit record durable: from here on the write happens,
    /// now or by recovery. Returns the committed journal, verified, and its size in bytes.
    pub fn commit(mut self) -> Result<(Committed<'c>, u64), Error> {
        let writer = self.writer.take().expect("committed once");
        match writer.commit(self.cp.io.as_ref()) {
            // Durable from here on: never discarded, only rolled forward.
            Ok(journal) => {
                let bytes = journal.len();
                let mut committed = Committed::found(self.cp, journal);
                committed.sections = Some(std::mem::take(&mut self.sections));
                Ok((committed, bytes))
            }
            Err(e) => {
                // A commit that failed is never trusted to be durable (a failed fsync is not
                // retried): the model was not touched, so the journal goes.
                self.discard();
                Err(e.into())
            }
        }
    }

    /// Removes the journal of a write that did not commit. Best effort: if this fails too,
    /// recovery discards it.
    fn discard(&self) {
        if self.cp.io.remove_file(&self.path).is_ok() {
            let _ = self.cp.io.sync_dir(&self.cp.state_dir);
        }
    }
}

impl Drop for WriteTxn<'_> {
    /// An uncommitted write leaves nothing pending: the model was not touched.
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            self.discard();
        }
    }
}

/// How a committed write ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A write that just committed: its model pages are left to the page cache and marked
    /// unflushed, the journal is retired.
    Write,
    /// A committed journal found pending: files fsynced, journal retired, marker cleared.
    Recover,
    /// The retired journal of unflushed writes rolled forward again after a reboot: files
    /// fsynced, the journal stays where it is.
    Reflush,
}

/// How the index learns the new generation's block hashes.
pub(crate) enum NewHashes {
    /// The writer knows them (a sync hashed the new bytes to plan).
    Known {
        /// The new hashes of the changed blocks.
        updates: HashSpill,
        /// Changed ranges per file.
        ranges: FileRanges,
        /// Bytes of the changed blocks.
        bytes: u64,
        /// The summaries the sync recomputed (the changed tensors' others are forgotten).
        summaries: HashMap<i64, NewSummaries>,
    },
    /// Read back from the files after applying, each checked against its record's new hash.
    ReadBack,
}

/// What [`Committed::finish`] did, with the time of its phases.
pub(crate) struct Finished {
    pub report: RecoverReport,
    pub apply_seconds: f64,
    pub commit_seconds: f64,
    pub retire_seconds: f64,
}

/// A committed journal: the write it describes happens.
pub(crate) struct Committed<'c> {
    cp: &'c Checkpoint,
    journal: Journal,
    /// For a journal this process wrote: where each file's records are.
    sections: Option<Vec<(u32, u64, u64)>>,
}

impl<'c> Committed<'c> {
    /// A committed journal of this checkpoint (just written, or found after a crash).
    pub fn found(cp: &'c Checkpoint, journal: Journal) -> Self {
        Committed {
            cp,
            journal,
            sections: None,
        }
    }

    /// Rolls the journal forward into the files (`files`: the model files already open for
    /// writing, in the order of the journal's file table), commits the index (unless it
    /// already holds the journal's target generation) and ends as `mode` says.
    pub fn finish(
        self,
        mode: Mode,
        files: Option<Vec<Box<dyn FileIo>>>,
        hashes: NewHashes,
        start: Instant,
    ) -> Result<Finished, Error> {
        let cp = self.cp;
        let recovering = mode != Mode::Write;
        let path = self.journal.path.clone();
        let foreign = |what: String| Error::ForeignJournal {
            path: path.clone(),
            what,
        };
        let mut index = cp
            .open_index()?
            .ok_or_else(|| foreign("there is no index for it in this state directory".into()))?;
        let h = self.journal.header.clone();
        let model_id = index.model_id()?;
        if h.model_id != model_id {
            return Err(foreign(format!(
                "it belongs to model {}, this index is model {model_id}",
                h.model_id
            )));
        }
        let layout = index.block_layout()?;
        if u64::from(h.block_size) != layout.block_size {
            return Err(foreign(format!(
                "block size {} differs from the index's {}",
                h.block_size, layout.block_size
            )));
        }
        let current = index.generation()?.unwrap_or(0);
        if current != h.base_generation && current != h.target_generation {
            return Err(foreign(format!(
                "it takes generation {} to {}, but the index is at generation {current}",
                h.base_generation, h.target_generation
            )));
        }
        let handles = self.open_files(&index, files)?;
        let generation = |bytes_changed| GenerationRecord {
            generation: h.target_generation,
            kind: h.kind.generation_kind(),
            created_at_ms: unix_ms(),
            source: format!(
                "{}{}",
                h.info.source,
                if mode == Mode::Write {
                    ""
                } else {
                    " (recovered)"
                }
            ),
            tensors: h.info.tensors,
            bytes_compared: h.info.bytes_compared,
            blocks_changed: self.journal.count,
            bytes_changed,
            seconds: seconds_since(start),
            tags: h.info.tags.clone(),
        };
        let mut retire_seconds = 0.0;
        if mode == Mode::Write {
            // The retired journal can redo this commit until the next writer flushes it.
            index.defer_durability()?;
            // The marker is made durable now, while the disk is quiet: once the files' pages
            // are dirty every fsync waits behind their writeback (it took 0.5-0.8 s there).
            // Until the journal is retired, a crash finds it pending and recovery, which wins
            // over the marker, rolls it forward and removes the marker.
            let lap = Instant::now();
            if let Err(e) = cp.mark_unflushed(h.target_generation, &h.files) {
                // Nothing was written to the files or the index yet: the write is given up
                // whole, as if it had failed before its commit (were the removal lost in a
                // crash, recovery would roll the journal forward: consistent either way).
                let _ = cp.io.remove_file(&cp.unflushed_path());
                if cp.io.remove_file(&self.journal.path).is_ok() {
                    let _ = cp.io.sync_dir(&cp.state_dir);
                }
                return Err(e);
            }
            retire_seconds += seconds_since(lap);
        }
        // The generation's hashes, when the index does not hold it yet: those a writer knows are
        // written before the files and committed after them (see `SyncTxn`); the others are read
        // back from the files once they are written.
        let (blocks, apply_seconds, commit_seconds) = match hashes {
            NewHashes::Known {
                updates,
                ranges,
                bytes,
                summaries,
            } if current == h.base_generation => {
                let commit = SyncCommit {
                    generation: Some(generation(bytes)),
                    hashes: updates,
                    ranges,
                    summaries,
                    ..SyncCommit::default()
                };
                self.apply_beside_index(mode, &mut index, commit, &handles, recovering)?
            }
            hashes => {
                let lap = Instant::now();
                let mut txn = index.begin_sync()?;
                let mut commit_seconds = seconds_since(lap);
                let lap = Instant::now();
                let blocks = self.apply(mode, &handles)?;
                let file_stats = file_stats(&handles, &h.files, recovering)?;
                let apply_seconds = seconds_since(lap);
                let lap = Instant::now();
                let mut commit = SyncCommit {
                    file_stats,
                    ..SyncCommit::default()
                };
                if matches!(hashes, NewHashes::ReadBack) && current == h.base_generation {
                    // (The reading needs the index, which the open transaction holds: nothing
                    // is in it.)
                    drop(txn);
                    let (updates, ranges, bytes_changed) =
                        self.hashes_after(&index, &handles, layout)?;
                    commit.generation = Some(generation(bytes_changed));
                    commit.hashes = updates;
                    commit.ranges = ranges;
                    txn = index.begin_sync()?;
                }
                txn.write(commit)?;
                txn.commit()?;
                commit_seconds += seconds_since(lap);
                (blocks, apply_seconds, commit_seconds)
            }
        };
        drop(self.journal);
        let lap = Instant::now();
        if mode != Mode::Reflush {
            cp.retire(&index, h.target_generation, mode == Mode::Write)?;
        }
        if recovering {
            cp.clear_unflushed()?;
        }
        Ok(Finished {
            report: RecoverReport {
                action: RecoveryAction::RolledForward,
                generation: h.target_generation,
                blocks,
                seconds: seconds_since(start),
            },
            apply_seconds,
            commit_seconds,
            retire_seconds: retire_seconds + seconds_since(lap),
        })
    }

    /// Rolls the journal forward into `handles`: a write that just committed knows every block
    /// holds its old bytes (the writer checked them under this lock), so no hash is needed to
    /// judge them; recovery judges each.
    fn apply(&self, mode: Mode, handles: &[Box<dyn FileIo>]) -> Result<ApplyStats, Error> {
        Ok(
            if let (Mode::Write, Some(sections)) = (mode, &self.sections) {
                apply::roll_forward_checked_by_writer(&self.journal, handles, sections)?
            } else {
                apply::roll_forward(&self.journal, handles)?
            },
        )
    }

    /// Applies the journal while another thread writes the new hashes `commit` into an index
    /// transaction (they do not depend on each other: a dense sync's hashes took 0.07 s of
    /// SQLite on the 2-core VM, as long as a tenth of its apply), then commits that transaction
    /// with the files' new stats once the files are written: the index never names a
    /// generation the files do not hold yet. A failed apply rolls the transaction back.
    /// Returns (blocks, apply seconds, seconds spent on the index after the apply).
    fn apply_beside_index(
        &self,
        mode: Mode,
        index: &mut BlockIndex,
        commit: SyncCommit,
        handles: &[Box<dyn FileIo>],
        recovering: bool,
    ) -> Result<(ApplyStats, f64, f64), Error> {
        let files = &self.journal.header.files;
        std::thread::scope(|s| {
            let (stats_tx, stats_rx) = std::sync::mpsc::sync_channel(1);
            let writer = s.spawn(move || -> Result<(), Error> {
                let lap = Instant::now();
                let mut txn = index.begin_sync()?;
                txn.write(commit)?;
                tracing::debug!(
                    seconds = seconds_since(lap),
                    "new hashes written into the index (while the files are written)"
                );
                // No stats: the apply failed, and dropping the transaction rolls it back.
                let Ok(file_stats) = stats_rx.recv() else {
                    return Ok(());
                };
                txn.write(SyncCommit {
                    file_stats,
                    ..SyncCommit::default()
                })?;
                txn.commit()?;
                Ok(())
            });
            let lap = Instant::now();
            let applied = self
                .apply(mode, handles)
                .and_then(|blocks| Ok((blocks, file_stats(handles, files, recovering)?)));
            let apply_seconds = seconds_since(lap);
            let lap = Instant::now();
            let blocks = match applied {
                Ok((blocks, file_stats)) => {
                    // A writer that failed has dropped its receiver; its error comes from join.
                    let _ = stats_tx.send(file_stats);
                    blocks
                }
                Err(e) => {
                    drop(stats_tx);
                    let _ = writer.join();
                    return Err(e);
                }
            };
            match writer.join() {
                Ok(written) => written?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
            Ok((blocks, apply_seconds, seconds_since(lap)))
        })
    }

    /// The journal's files open for writing: `opened`, when the writer has them (it checked them
    /// against the index under this lock before journaling), else opened here after checking
    /// that each is the model's file the journal was written for.
    fn open_files(
        &self,
        index: &BlockIndex,
        opened: Option<Vec<Box<dyn FileIo>>>,
    ) -> Result<Vec<Box<dyn FileIo>>, Error> {
        let cp = self.cp;
        let h = &self.journal.header;
        if let Some(files) = opened.filter(|o| o.len() == h.files.len()) {
            return Ok(files);
        }
        let model = cp.open_model_for_write()?;
        let indexed_files = index.files()?;
        let mut handles = Vec::with_capacity(h.files.len());
        for jf in &h.files {
            let known = indexed_files.iter().find(|f| f.name == jf.name);
            let now = model.files.iter().find(|f| f.name == jf.name);
            let same = match (known, now) {
                (Some(k), Some(n)) => {
                    k.header_hash == n.header.header_hash && n.stat.size == jf.size
                }
                _ => false,
            };
            if !same {
                return Err(Error::ForeignJournal {
                    path: self.journal.path.clone(),
                    what: format!("its file {} is not the model's file of that name", jf.name),
                });
            }
            let p = cp.model_dir.join(&jf.name);
            handles.push(
                cp.io
                    .open(&p, OpenMode::ReadWrite)
                    .map_err(Checkpoint::io_err(&p))?,
            );
        }
        Ok(handles)
    }

    /// The new block hashes, changed ranges and changed bytes of a journal rolled forward, read
    /// back from the files.
    fn hashes_after(
        &self,
        index: &BlockIndex,
        handles: &[Box<dyn FileIo>],
        layout: BlockLayout,
    ) -> Result<(HashSpill, FileRanges, u64), Error> {
        let journal = &self.journal;
        let args = self.cp.args();
        let files = index.files()?;
        let tensors = index.tensors()?;
        let mut by_place: HashMap<(&str, u64), &IndexedTensor> = HashMap::new();
        // Empty tensors share their offset with the next tensor and have no blocks.
        for t in tensors.iter().filter(|t| t.len > 0) {
            if let Some(f) = files.iter().find(|f| f.id == t.file_id) {
                by_place.insert((f.name.as_str(), t.offset), t);
            }
        }
        let names: Vec<&str> = journal
            .header
            .files
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        let index_path = index.path().to_path_buf();
        let state_dir = &self.cp.state_dir;
        let mut updates = HashSpill::new(state_dir);
        let mut ranges: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        let mut bytes = 0;
        journal.for_each_batch(64 << 20, |batch| {
            let hashed: Vec<(i64, u64, Cv)> = batch
                .par_iter()
                .map(|r| {
                    let name = names[r.file as usize];
                    let t = by_place.get(&(name, r.tensor_offset)).ok_or_else(|| {
                        IndexError::Corrupt {
                            path: index_path.clone(),
                            what: format!(
                                "no tensor at byte {} of {name}, where the journal has one",
                                r.tensor_offset
                            ),
                        }
                    })?;
                    let mut block = vec![0u8; r.len as usize];
                    let h = &handles[r.file as usize];
                    h.read_at(r.offset, &mut block)
                        .map_err(Checkpoint::io_err(h.path()))?;
                    let rel = r.offset - r.tensor_offset;
                    let cv = blockhash::subtree_cv(rel, &block);
                    if hash_prefix(&cv) != r.new {
                        return Err(Error::TargetMismatch {
                            file: name.to_string(),
                            offset: r.offset,
                            end: r.offset + u64::from(r.len),
                            target: journal.header.target_generation,
                            args: args.clone(),
                        });
                    }
                    Ok((t.id, rel / layout.block_size, cv))
                })
                .collect::<Result<_, Error>>()?;
            for (r, (id, block, cv)) in batch.iter().zip(hashed) {
                updates
                    .push(id, block, cv)
                    .map_err(Checkpoint::io_err(state_dir))?;
                let file = ranges.entry(r.file as usize).or_default();
                file.push((r.offset, u64::from(r.len)));
                if file.len() > 1 << 16 {
                    *file = merge_ranges(std::mem::take(file));
                }
                bytes += u64::from(r.len);
            }
            Ok::<_, Error>(())
        })?;
        let ranges = ranges
            .into_iter()
            .map(|(f, r)| (names[f].to_string(), merge_ranges(r)))
            .collect();
        Ok((updates, ranges, bytes))
    }
}

/// The files' names and new stats; with `fsync`, first makes every file durable, in parallel so
/// the device sees all their writes at once.
fn file_stats(
    handles: &[Box<dyn FileIo>],
    files: &[JournalFile],
    fsync: bool,
) -> Result<Vec<(String, FileStat)>, Error> {
    handles
        .par_iter()
        .zip(files)
        .map(|(h, f)| {
            if fsync {
                h.sync().map_err(Checkpoint::io_err(h.path()))?;
            }
            let stat = h.stat().map_err(Checkpoint::io_err(h.path()))?;
            Ok((f.name.clone(), stat))
        })
        .collect()
}
