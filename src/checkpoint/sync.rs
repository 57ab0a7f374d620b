//! `sync`: bring the model files up to date with live weights, writing only the blocks that
//! changed, through the write transaction (steps 1–8 of [`super`]'s documentation).

use std::collections::HashMap;
use std::time::Instant;

use super::changes::{Changes, Comparison};
use super::txn::{Mode, NewHashes};
use super::{
    Checkpoint, Error, IndexedTensor, LastSync, RecoveryAction, SyncPhases, SyncReport,
    seconds_since,
};
use crate::blockhash;
use crate::index::{SyncCommit, unix_ms};
use crate::journal::GenerationInfo;
use crate::model::{ModelLayout, dtype_name};
use crate::source::{CaptureStats, WeightSource};

/// Blocks staged together by one parallel work item of a rollback, at most.
pub(crate) const BLOCKS_PER_CHUNK: usize = 256;
/// Work items encoded before their records are appended to the journal.
pub(crate) const CHUNKS_PER_BATCH: usize = 64;

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
        let model = self.open_model_for_write()?;
        let indexed = self.check_trusted(&index, &model)?;
        let pairs = match_tensors(&model, source, self.ignore.as_ref())?;
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
            open: (source.open_seconds() * 1e6).round() / 1e6,
            flush: write.flush_seconds,
            check: (seconds_since(start) - write.flush_seconds).max(0.0),
            ..SyncPhases::default()
        };
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
            index_bytes_read: 0,
            capture: CaptureStats::default(),
            recovered,
            seconds: 0.0,
            phases: SyncPhases::default(),
        };
        let changes = Changes {
            cp: self,
            model: &model,
            source,
            layout,
            info: GenerationInfo {
                source: report.source.clone(),
                tensors: report.tensors as u64,
                bytes_compared,
                restored_generation: None,
                tags: self.tags.clone(),
            },
        };
        let pb = self.progress_bar(bytes_compared, "comparing");
        let (mut found, write_txn) = changes.run(&index, &comparisons, &pb)?;
        pb.finish_and_clear();
        phases.index_read = found.index_read_seconds;
        phases.capture = found.capture_seconds;
        phases.plan = found.plan_seconds;
        report.capture = found.capture;
        if let Some((txn, files)) = write_txn {
            let lap = Instant::now();
            let (committed, journal_bytes) = txn.commit()?;
            phases.journal = found.stage_seconds + seconds_since(lap);
            report.journal_bytes = journal_bytes;
            report.blocks_changed = found.blocks;
            report.bytes_changed = found.bytes_changed;
            report.bytes_differing = found.differing;
            report.tensors_changed = found.tensors_changed;
            report.files_changed = found.files_changed;
            let hashes = NewHashes::Known {
                updates: found.updates,
                ranges: found.ranges,
                bytes: found.bytes_changed,
                summaries: std::mem::take(&mut found.summaries),
            };
            let finished = committed.finish(Mode::Write, Some(files), hashes, start)?;
            phases.apply = finished.apply_seconds;
            phases.commit = finished.commit_seconds;
            phases.retire = finished.retire_seconds;
            report.generation = current + 1;
            report.changed = true;
        } else {
            phases.journal = found.stage_seconds;
        }
        report.index_bytes_read = found.index_bytes_read;
        report.model_bytes_read = self.io.bytes_read().saturating_sub(read_before);
        tracing::debug!(?phases, "sync phases (seconds)");
        report.phases = phases;
        report.seconds = seconds_since(start);
        let last = LastSync {
            at_ms: unix_ms(),
            report: report.clone(),
        };
        if report.changed {
            // Like the write's own commit (see `BlockIndex::defer_durability`): syncing the WAL
            // here would wait for the commit's frames behind the model's writeback.
            index.defer_durability()?;
        }
        let last = serde_json::to_string(&last).expect("plain data serializes");
        if found.summaries.is_empty() {
            index.set_last_sync(&last)?;
        } else {
            // Nothing changed, but summaries that were not known are now.
            index.commit_sync(SyncCommit {
                summaries: std::mem::take(&mut found.summaries),
                last_sync: Some(last),
                ..SyncCommit::default()
            })?;
        }
        Ok(report)
    }
}

/// For each model tensor, the index of the source tensor of the same name (`None`: a partial
/// source lacks it, or `--ignore` names it: it is left untouched); or every difference.
fn match_tensors(
    model: &ModelLayout,
    source: &dyn WeightSource,
    ignore: Option<&super::Ignore>,
) -> Result<Vec<Option<usize>>, Error> {
    let ignored = |name: &str| ignore.is_some_and(|i| i.matches(name));
    if let Some(i) = ignore {
        let names = model
            .tensors
            .iter()
            .map(|t| t.entry.name.as_str())
            .chain(source.tensors().iter().map(|t| t.name.as_str()));
        for glob in i.unused(names) {
            tracing::warn!("--ignore {glob:?} matches no tensor of the model or the source");
        }
    }
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
        if ignored(&e.name) {
            pairs.push(None);
            continue;
        }
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
        if !model_names.contains(s.name.as_str()) && !ignored(&s.name) {
            problems.push(format!("{}: in the source but not in the model", s.name));
        }
    }
    if problems.is_empty() {
        Ok(pairs)
    } else {
        Err(Error::Mismatch(problems))
    }
}
