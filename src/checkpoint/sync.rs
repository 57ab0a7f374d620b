//! `sync`: bring the model files up to date with live weights, writing only the blocks that
//! changed, through the write transaction (steps 1–8 of [`super`]'s documentation).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use super::txn::{Mode, NewHashes, WriteTxn};
use super::{
    Checkpoint, Error, IndexedTensor, LastSync, RecoveryAction, SyncPhases, SyncReport,
    seconds_since,
};
use crate::blockhash::{self, BlockLayout, Cv};
use crate::index::{BlockIndex, FileRanges, HashUpdate, unix_ms};
use crate::io::{FileIo, OpenMode};
use crate::journal::{GenerationInfo, JournalFile, JournalHeader, JournalKind};
use crate::model::{ModelLayout, dtype_name};
use crate::plan::{self, ChangedBlock, Comparison, TensorPlan, block_span, merge_ranges};
use crate::record::{self, Record, encode_xor, hash_prefix};
use crate::source::WeightSource;

/// Changed blocks staged by one parallel work item, at most.
pub(crate) const BLOCKS_PER_CHUNK: usize = 256;
/// Work items staged before their records are appended to the journal.
pub(crate) const CHUNKS_PER_BATCH: usize = 64;

/// The records of one staged work item.
struct Staged {
    plan: usize,
    encoded: Vec<u8>,
    records: u64,
    bytes: u64,
    differing: u64,
    cvs: Vec<(u64, Cv)>,
}

/// What staging a sync's journal reads: the old bytes from the model files, the new ones from
/// the source.
struct Stage<'a> {
    model: &'a ModelLayout,
    model_dir: &'a Path,
    handles: &'a [Box<dyn FileIo>],
    /// Model file index -> its slot in the journal's file table (and in `handles`).
    slot: &'a HashMap<usize, u32>,
    source: &'a dyn WeightSource,
    layout: BlockLayout,
}

/// What staging produced.
#[derive(Default)]
struct Journaled {
    blocks: u64,
    bytes_changed: u64,
    differing: u64,
    /// New hashes per plan: (block, hash).
    new_cvs: Vec<Vec<(u64, Cv)>>,
}

impl Checkpoint {
    /// Brings the model files up to date with `source`, writing only the blocks that changed,
    /// through the journal.
    pub fn sync(&self, source: &dyn WeightSource) -> Result<SyncReport, Error> {
        let start = Instant::now();
        let write = self.begin_write()?;
        let recovered = self.recover_locked()?;
        let recovered = (recovered.action != RecoveryAction::None).then_some(recovered);
        let mut initialized_first = false;
        let mut index = if let Some(index) = self.open_index()? {
            index
        } else {
            self.init_locked(blockhash::DEFAULT_BLOCK_SIZE)?;
            initialized_first = true;
            self.require_index()?
        };
        let layout = index.block_layout()?;
        let read_before = self.io.bytes_read();
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        let indexed = self.check_trusted(&index, &model)?;
        let pairs = match_tensors(&model, source)?;
        let by_name: HashMap<&str, &IndexedTensor> =
            indexed.iter().map(|t| (t.name.as_str(), t)).collect();
        let comparisons: Vec<Comparison<'_>> = model
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i, pairs[i]?, by_name[t.entry.name.as_str()])))
            .collect();
        let untouched: Vec<String> = model
            .tensors
            .iter()
            .zip(&pairs)
            .filter(|(_, p)| p.is_none())
            .map(|(t, _)| t.entry.name.clone())
            .collect();
        let bytes_compared: u64 = comparisons
            .iter()
            .map(|c| model.tensors[c.0].entry.len)
            .sum();

        let mut phases = SyncPhases {
            flush: write.flush_seconds,
            check: (seconds_since(start) - write.flush_seconds).max(0.0),
            ..SyncPhases::default()
        };
        let lap = Instant::now();
        let pb = self.progress_bar(bytes_compared, "comparing");
        let plans: Vec<TensorPlan> =
            plan::find_changed::<Error>(&index, &model, source, &comparisons, layout, &pb)?;
        pb.finish_and_clear();
        phases.plan = seconds_since(lap);

        let current = index.generation()?.unwrap_or(0);
        let mut report = SyncReport {
            generation: current,
            changed: false,
            initialized_first,
            source: source.describe(),
            tensors: comparisons.len(),
            untouched,
            bytes_compared,
            tensors_changed: 0,
            blocks_changed: 0,
            bytes_changed: 0,
            bytes_differing: 0,
            files_changed: Vec::new(),
            model_bytes_read: 0,
            journal_bytes: 0,
            recovered,
            seconds: 0.0,
            phases: SyncPhases::default(),
        };
        if !plans.is_empty() {
            let (finished, journal_seconds) =
                self.write_changes(&index, &model, source, &plans, &mut report, start)?;
            phases.journal = journal_seconds;
            phases.apply = finished.apply_seconds;
            phases.commit = finished.commit_seconds;
            phases.retire = finished.retire_seconds;
            report.generation = current + 1;
            report.changed = true;
        }
        report.model_bytes_read = self.io.bytes_read().saturating_sub(read_before);
        report.phases = phases;
        report.seconds = seconds_since(start);
        let last = LastSync {
            at_ms: unix_ms(),
            report: report.clone(),
        };
        index.set_last_sync(&serde_json::to_string(&last).expect("plain data serializes"))?;
        Ok(report)
    }

    /// Journals, applies, records and retires the changed blocks of `plans`: the generation after
    /// `report.generation`. Returns what finishing did and the time spent writing the journal.
    fn write_changes(
        &self,
        index: &BlockIndex,
        model: &ModelLayout,
        source: &dyn WeightSource,
        plans: &[TensorPlan],
        report: &mut SyncReport,
        start: Instant,
    ) -> Result<(super::txn::Finished, f64), Error> {
        let lap = Instant::now();
        let layout = index.block_layout()?;
        let current = report.generation;
        // The files that change, opened read-write; their slot in the journal's file table.
        let mut touched: Vec<usize> = plans.iter().map(|p| model.tensors[p.model].file).collect();
        touched.sort_unstable();
        touched.dedup();
        let slot: HashMap<usize, u32> = touched
            .iter()
            .enumerate()
            .map(|(s, &f)| (f, s as u32))
            .collect();
        let mut handles: Vec<Box<dyn FileIo>> = Vec::with_capacity(touched.len());
        for &f in &touched {
            let path = model.file_path(f);
            let h = self
                .io
                .open(&path, OpenMode::ReadWrite)
                .map_err(Self::io_err(&path))?;
            if h.stat().map_err(Self::io_err(&path))? != model.files[f].stat {
                return Err(Error::Stale {
                    file: model.files[f].name.clone(),
                    what: "changed while this sync was reading it".into(),
                    model_dir: self.model_dir.clone(),
                });
            }
            handles.push(h);
        }
        let header = JournalHeader {
            kind: JournalKind::Sync,
            block_size: layout.block_size as u32,
            model_id: index.model_id()?,
            base_generation: current,
            target_generation: current + 1,
            created_ms: unix_ms() as u64,
            files: touched
                .iter()
                .map(|&f| JournalFile {
                    name: model.files[f].name.clone(),
                    size: model.files[f].stat.size,
                })
                .collect(),
            info: GenerationInfo {
                source: report.source.clone(),
                tensors: report.tensors as u64,
                bytes_compared: report.bytes_compared,
                restored_generation: None,
            },
        };
        // Journal: old ⊕ new of every changed block, then the commit record.
        let stage = Stage {
            model,
            model_dir: &self.model_dir,
            handles: &handles,
            slot: &slot,
            source,
            layout,
        };
        let mut txn = WriteTxn::begin(self, &header)?;
        let journaled = stage.all(plans, &mut txn)?;
        let (committed, journal_bytes) = txn.commit()?;
        let journal_seconds = seconds_since(lap);
        report.journal_bytes = journal_bytes;
        report.blocks_changed = journaled.blocks;
        report.bytes_changed = journaled.bytes_changed;
        report.bytes_differing = journaled.differing;
        report.files_changed = header.files.iter().map(|f| f.name.clone()).collect();

        // The new hashes and ranges are known: no block needs reading back.
        let mut ranges: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        let mut updates = Vec::new();
        for (p, cvs) in plans.iter().zip(journaled.new_cvs) {
            if cvs.is_empty() {
                continue;
            }
            let t = &model.tensors[p.model];
            let r = ranges.entry(t.file).or_default();
            for (b, _) in &cvs {
                let (off, len) = block_span(layout, t.entry.len, *b);
                r.push((t.entry.offset + off, len));
            }
            report.tensors_changed += 1;
            updates.push(HashUpdate {
                tensor_id: p.index_id,
                blocks: cvs,
            });
        }
        let ranges: FileRanges = ranges
            .into_iter()
            .map(|(f, r)| (model.files[f].name.clone(), merge_ranges(r)))
            .collect();
        let hashes = NewHashes::Known {
            updates,
            ranges,
            bytes: report.bytes_changed,
        };
        let finished = committed.finish(Mode::Write, Some(handles), hashes, start)?;
        Ok((finished, journal_seconds))
    }
}

impl Stage<'_> {
    /// Stages the records of every changed block of `plans` into `txn`: reads and checks the
    /// old bytes of each, reads its new bytes from the source and appends their XOR.
    fn all(&self, plans: &[TensorPlan], txn: &mut WriteTxn<'_>) -> Result<Journaled, Error> {
        let chunks: Vec<(usize, &[ChangedBlock])> = plans
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.blocks.chunks(BLOCKS_PER_CHUNK).map(move |c| (i, c)))
            .collect();
        let mut out = Journaled {
            new_cvs: vec![Vec::new(); plans.len()],
            ..Journaled::default()
        };
        for batch in chunks.chunks(CHUNKS_PER_BATCH) {
            let staged: Vec<Staged> = batch
                .par_iter()
                .map(|&(i, blocks)| self.chunk(&plans[i], i, blocks))
                .collect::<Result<_, Error>>()?;
            for s in staged {
                txn.stage(&s.encoded, s.records)?;
                out.blocks += s.records;
                out.bytes_changed += s.bytes;
                out.differing += s.differing;
                out.new_cvs[s.plan].extend(s.cvs);
            }
        }
        Ok(out)
    }

    /// Reads the old bytes of `blocks`, checks them against their stored hashes, reads the new
    /// bytes from the source and encodes one journal record per block that still differs.
    fn chunk(
        &self,
        plan: &TensorPlan,
        plan_index: usize,
        blocks: &[ChangedBlock],
    ) -> Result<Staged, Error> {
        let (model, layout) = (self.model, self.layout);
        let t = &model.tensors[plan.model];
        let file = self.slot[&t.file];
        let handle = &self.handles[file as usize];
        let mut old = vec![0u8; layout.block_size as usize];
        let mut new = vec![0u8; layout.block_size as usize];
        let mut staged = Staged {
            plan: plan_index,
            encoded: Vec::new(),
            records: 0,
            bytes: 0,
            differing: 0,
            cvs: Vec::new(),
        };
        for b in blocks {
            let (off, len) = block_span(layout, t.entry.len, b.block);
            let (old, new) = (&mut old[..len as usize], &mut new[..len as usize]);
            handle
                .read_at(t.entry.offset + off, old)
                .map_err(Checkpoint::io_err(handle.path()))?;
            if blockhash::subtree_cv(off, old) != b.old {
                return Err(Error::OldBlockChanged {
                    file: model.files[t.file].name.clone(),
                    tensor: t.entry.name.clone(),
                    block: b.block,
                    offset: t.entry.offset + off,
                    end: t.entry.offset + off + len,
                    model_dir: self.model_dir.to_path_buf(),
                });
            }
            // The source may have moved on since the plan: journal what it holds now.
            self.source.read(plan.source, off, new)?;
            let cv = if new == old {
                b.old
            } else {
                blockhash::subtree_cv(off, new)
            };
            if cv == b.old {
                continue;
            }
            let mut payload = Vec::new();
            staged.differing += encode_xor(old, new, &mut payload);
            Record {
                tag: record::JOURNAL,
                file,
                tensor_offset: t.entry.offset,
                offset: t.entry.offset + off,
                len: len as u32,
                old: hash_prefix(&b.old),
                new: hash_prefix(&cv),
                payload,
            }
            .encode(&mut staged.encoded);
            staged.records += 1;
            staged.bytes += len;
            staged.cvs.push((b.block, cv));
        }
        Ok(staged)
    }
}

/// For each model tensor, the index of the source tensor of the same name (`None`: a partial
/// source lacks it, and it is left untouched); or every difference.
fn match_tensors(
    model: &ModelLayout,
    source: &dyn WeightSource,
) -> Result<Vec<Option<usize>>, Error> {
    let by_name: HashMap<&str, usize> = source
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut problems = Vec::new();
    let mut pairs = Vec::with_capacity(model.tensors.len());
    for t in &model.tensors {
        let e = &t.entry;
        match by_name.get(e.name.as_str()) {
            None if source.is_partial() => pairs.push(None),
            None => problems.push(format!("{}: in the model but not in the source", e.name)),
            Some(&i) => {
                let s = &source.tensors()[i];
                if s.dtype != e.dtype {
                    problems.push(format!(
                        "{}: dtype {} in the model, {} in the source",
                        e.name,
                        dtype_name(e.dtype),
                        dtype_name(s.dtype)
                    ));
                } else if s.shape != e.shape {
                    problems.push(format!(
                        "{}: shape {:?} in the model, {:?} in the source",
                        e.name, e.shape, s.shape
                    ));
                }
                pairs.push(Some(i));
            }
        }
    }
    let model_names: std::collections::HashSet<&str> = model
        .tensors
        .iter()
        .map(|t| t.entry.name.as_str())
        .collect();
    for s in source.tensors() {
        if !model_names.contains(s.name.as_str()) {
            problems.push(format!("{}: in the source but not in the model", s.name));
        }
    }
    if problems.is_empty() {
        Ok(pairs)
    } else {
        Err(Error::Mismatch(problems))
    }
}
