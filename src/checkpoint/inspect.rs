//! The read-mostly operations: `status` (what the state directory knows, reading no model
//! data), `verify [--repair]` (rehash the files against the index) and `retention`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    BlockMismatch, ChangeReport, Checkpoint, DEFAULT_RETAIN_GENERATIONS, Error, FileState,
    FileStatus, LogReport, Retention, StatusReport, VerifyReport, file_problems, seconds_since,
};
use crate::changemap::{self, Axis, ChangeMap, GenerationChanges, GenerationRange, TensorSpan};
use crate::index::{
    FileRanges, GenerationKind, GenerationRecord, IndexedTensor, MetaKey, SyncCommit, unix_ms,
};
use crate::io::FileStat;
use crate::lock::{LockError, LockKind, StateLock};
use crate::model::ModelLayout;
use crate::plan::{self, Comparison, TensorPlan, block_span, merge_ranges};
use crate::source::SafetensorsSource;

/// Generations `report` shows when not told which: the newest this many.
pub const REPORT_GENERATIONS: u64 = 100;

impl Checkpoint {
    /// Reads, and with `set` changes, how much undo data is kept (applied at the next sync).
    pub fn retention(
        &self,
        generations: Option<u64>,
        bytes: Option<u64>,
    ) -> Result<Retention, Error> {
        let (_write, _read);
        let mut index = if generations.is_some() || bytes.is_some() {
            _write = self.begin_write()?;
            self.require_index()?
        } else {
            _read = self.lock(LockKind::Shared)?;
            self.open_index_read_only()?
                .ok_or_else(|| self.not_initialized())?
        };
        if let Some(g) = generations {
            index.set_meta(MetaKey::RetainGenerations, &g.to_string())?;
        }
        if let Some(b) = bytes {
            index.set_meta(MetaKey::RetainBytes, &b.to_string())?;
        }
        Ok(Retention {
            generations: index
                .meta_u64(MetaKey::RetainGenerations)?
                .unwrap_or(DEFAULT_RETAIN_GENERATIONS),
            bytes: index.meta_u64(MetaKey::RetainBytes)?.unwrap_or(u64::MAX),
        })
    }

    /// The newest `limit` generations, newest first (`log`): what made each, when, from where,
    /// what changed and its tags. Reads no model data and never waits (like `status`).
    pub fn log(&self, limit: u64) -> Result<LogReport, Error> {
        self.require_model_dir()?;
        let index = self
            .open_index_read_only()?
            .ok_or_else(|| self.not_initialized())?;
        Ok(LogReport {
            generations: index.generation_records(limit)?,
        })
    }

    /// The bytes each generation of `range` changed, per layer and tensor kind (`report`); with
    /// `svg`, their heat map is written there (atomically). By default the newest
    /// [`REPORT_GENERATIONS`] generations after init. Reads no model data and never waits.
    pub fn report(
        &self,
        range: GenerationRange,
        svg: Option<&Path>,
    ) -> Result<ChangeReport, Error> {
        self.require_model_dir()?;
        let index = self
            .open_index_read_only()?
            .ok_or_else(|| self.not_initialized())?;
        let newest = index.generation()?.unwrap_or(0);
        let last = range.last.unwrap_or(newest);
        let first = range
            .first
            .unwrap_or_else(|| last.saturating_sub(REPORT_GENERATIONS - 1).max(last.min(1)));
        if last > newest || first > newest {
            let given = format!(
                "{}..{}",
                range.first.map(|g| g.to_string()).unwrap_or_default(),
                range.last.map(|g| g.to_string()).unwrap_or_default()
            );
            return Err(Error::Usage(format!(
                "--generations {given}: the model's newest generation is {newest} (see `apollo-checkpoint log {}`)",
                self.args()
            )));
        }
        let names: HashMap<i64, String> =
            index.files()?.into_iter().map(|f| (f.id, f.name)).collect();
        let tensors: Vec<TensorSpan> = index
            .tensors()?
            .into_iter()
            .map(|t| TensorSpan {
                file: names.get(&t.file_id).cloned().unwrap_or_default(),
                offset: t.offset,
                len: t.len,
                name: t.name,
            })
            .collect();
        let mut generations = Vec::new();
        for g in index.generation_records_between(first, last)? {
            generations.push(GenerationChanges {
                ranges: index.generation_ranges(g.generation)?,
                generation: g.generation,
                kind: g.kind,
                tags: g.tags,
            });
        }
        let map = ChangeMap::build(&tensors, generations);
        if let Some(path) = svg {
            let title = format!(
                "{}: bytes changed in generations {first}–{last}",
                self.model_dir.display()
            );
            let drawn = changemap::render_svg(&map, &title).map_err(|e| Error::Io {
                path: path.to_owned(),
                source: std::io::Error::other(format!("drawing the heat map: {e}")),
            })?;
            super::write_atomic(self.io.as_ref(), path, drawn.as_bytes())?;
        }
        Ok(ChangeReport {
            first_generation: first,
            last_generation: last,
            layers: map.totals(Axis::Layer),
            kinds: map.totals(Axis::Kind),
            generations: map.generations,
            svg: svg.map(Path::to_owned),
        })
    }

    /// Reports what the state directory knows, without reading model data.
    pub fn status(&self) -> Result<StatusReport, Error> {
        self.require_model_dir()?;
        // Never waits and never fails because of a writer: while one holds the lock, the index
        // is read as of its last commit and the writer is named.
        let (_lock, writer) = if self.state_dir.is_dir() {
            match StateLock::acquire(&self.state_dir, LockKind::Shared, Duration::ZERO) {
                Ok(lock) => (Some(lock), None),
                Err(LockError::Busy { holder, .. }) => (None, Some(holder)),
                Err(e) => return Err(e.into()),
            }
        } else {
            (None, None)
        };
        let mut report = StatusReport {
            model_dir: self.model_dir.clone(),
            state_dir: self.state_dir.clone(),
            initialized: false,
            generation: None,
            last_generation: None,
            last_sync: None,
            block_size: None,
            tensors: 0,
            files: Vec::new(),
            index_bytes: 0,
            pending: Vec::new(),
            attention: Vec::new(),
            writer: None,
            undo_generations: 0,
            undo_bytes: 0,
            retain_generations: None,
            retain_bytes: None,
            exported_through: None,
            unexported_generations: 0,
            unexported_bytes: 0,
        };
        if let Some(w) = &writer {
            report.pending.push(format!(
                "a write is in progress ({w}); this is the state before it"
            ));
        }
        let writing = writer.is_some();
        report.writer = writer;
        // A writer's own journal and files are not an interrupted write.
        let interrupted =
            !writing && (self.journal_path().exists() || self.unflushed_after_reboot()?);
        let busy = writing || interrupted;
        if interrupted {
            report.attention.push(format!(
                "an interrupted write is pending: run `apollo-checkpoint recover {}` (sync also recovers first)",
                self.args()
            ));
        }
        let Some(index) = self.open_index_read_only()? else {
            report.attention.push(format!(
                "not initialized: run `apollo-checkpoint init {}`",
                self.args()
            ));
            report.pending.extend(report.attention.iter().cloned());
            return Ok(report);
        };
        report.initialized = true;
        report.generation = index.generation()?;
        if let Some(g) = report.generation {
            report.last_generation = index.generation_record(g)?;
        }
        report.last_sync = index
            .meta(MetaKey::LastSync)?
            .and_then(|s| serde_json::from_str(&s).ok());
        report.block_size = Some(index.block_layout()?.block_size);
        report.tensors = index.tensors()?.len();
        report.retain_generations = index.meta_u64(MetaKey::RetainGenerations)?;
        report.retain_bytes = index.meta_u64(MetaKey::RetainBytes)?;
        let undo = self.undo_files()?;
        report.exported_through = index.exported_through()?;
        if let (Some(e), Some(g)) = (report.exported_through, report.generation) {
            report.unexported_generations = g.saturating_sub(e);
            report.unexported_bytes = undo.iter().filter(|u| u.0 > e).map(|u| u.2).sum();
        }
        report.undo_generations = undo.len() as u64;
        report.undo_bytes = undo.iter().map(|u| u.2).sum();
        report.index_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                std::fs::metadata(
                    self.state_dir
                        .join(format!("{}{suffix}", crate::index::INDEX_DB)),
                )
                .ok()
            })
            .map(|m| m.len())
            .sum();
        for f in index.files()? {
            let state = match std::fs::metadata(self.model_dir.join(&f.name)) {
                Err(_) => FileState::Missing,
                Ok(m) if FileStat::from_metadata(&m).same_file_as(&f.stat) => FileState::Ok,
                Ok(_) => FileState::Modified,
            };
            if state != FileState::Ok && !busy {
                report.attention.push(format!(
                    "{} is {state} since apollo-checkpoint last wrote it: sync will refuse; run `apollo-checkpoint verify --repair {}`",
                    f.name,
                    self.args()
                ));
            }
            report.files.push(FileStatus {
                name: f.name,
                size: f.stat.size,
                state,
            });
        }
        report.pending.extend(report.attention.iter().cloned());
        Ok(report)
    }

    /// Rehashes the model files and compares them with the index; with `repair`, re-indexes
    /// whatever differs from the files as they are now.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, Error> {
        let start = Instant::now();
        self.require_model_dir()?;
        let (_write, _read);
        let mut index = if repair {
            _write = self.begin_write()?;
            self.require_index()?
        } else {
            _read = self.lock(LockKind::Shared)?;
            self.open_index_read_only()?
                .ok_or_else(|| self.not_initialized())?
        };
        if repair {
            self.refuse_if_journal_pending()?;
        }
        let layout = index.block_layout()?;
        let model = if repair {
            self.open_model_for_write()?
        } else {
            ModelLayout::open(&self.model_dir, self.io.as_ref())?
        };
        let indexed_files = index.files()?;
        let mut problems: Vec<String> = file_problems(&indexed_files, &model)
            .iter()
            .map(|(f, w)| format!("{f}: {w}"))
            .collect();
        if self.journal_path().exists() || self.unflushed_after_reboot()? {
            problems.insert(
                0,
                format!(
                    "{}: an interrupted write is pending; run `apollo-checkpoint recover`",
                    self.state_dir.display()
                ),
            );
        }
        let mut report = VerifyReport {
            clean: true,
            file_problems: problems,
            mismatched_blocks: Vec::new(),
            mismatched_block_count: 0,
            bytes_checked: 0,
            repaired: false,
            generation: index.generation()?.unwrap_or(0),
            seconds: 0.0,
        };
        // Files whose header is unchanged can be compared block by block.
        let header_changed: Vec<&str> = model
            .files
            .iter()
            .filter(|f| {
                !indexed_files
                    .iter()
                    .any(|i| i.name == f.name && i.header_hash == f.header.header_hash)
            })
            .map(|f| f.name.as_str())
            .collect();
        let indexed = index.tensors()?;
        let by_name: HashMap<&str, &IndexedTensor> =
            indexed.iter().map(|t| (t.name.as_str(), t)).collect();
        let source = SafetensorsSource::open(&self.model_dir)?;
        let comparisons: Vec<Comparison<'_>> = model
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| !header_changed.contains(&model.files[t.file].name.as_str()))
            .filter_map(|(i, t)| Some((i, i, *by_name.get(t.entry.name.as_str())?)))
            .collect();
        report.bytes_checked = comparisons
            .iter()
            .map(|c| model.tensors[c.0].entry.len)
            .sum();
        let pb = self.progress_bar(report.bytes_checked, "verifying");
        let plans: Vec<TensorPlan> =
            plan::find_changed::<Error>(&index, &model, &source, &comparisons, layout, &pb)?;
        pb.finish_and_clear();
        let mut mismatched_ranges: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        for p in &plans {
            let t = &model.tensors[p.model];
            for b in &p.blocks {
                let (off, len) = block_span(layout, t.entry.len, b.block);
                report.mismatched_block_count += 1;
                mismatched_ranges
                    .entry(t.file)
                    .or_default()
                    .push((t.entry.offset + off, len));
                if report.mismatched_blocks.len() < VerifyReport::MAX_LISTED {
                    report.mismatched_blocks.push(BlockMismatch {
                        file: model.files[t.file].name.clone(),
                        tensor: t.entry.name.clone(),
                        block: b.block,
                        offset: t.entry.offset + off,
                        len,
                    });
                }
            }
        }
        report
            .mismatched_blocks
            .sort_by(|a, b| (&a.file, a.offset).cmp(&(&b.file, b.offset)));
        let stale = index.stale_summaries(layout)?;
        for t in &stale {
            report.file_problems.push(format!(
                "{}: the index's summaries of tensor {} disagree with its block hashes; `verify --repair` forgets them (the next sync recomputes them)",
                index.path().display(),
                t.name
            ));
        }
        report.clean = report.file_problems.is_empty() && report.mismatched_block_count == 0;

        let same_files = indexed_files.len() == model.files.len()
            && model
                .files
                .iter()
                .all(|f| indexed_files.iter().any(|i| i.name == f.name));
        if repair
            && !report.clean
            && header_changed.is_empty()
            && same_files
            && report.mismatched_block_count == 0
        {
            // Only stats changed (a copy, a touch): the bytes are the current generation's, so
            // the index trusts the new stats and no generation is recorded.
            let file_stats = model
                .files
                .iter()
                .map(|f| (f.name.clone(), f.stat))
                .collect();
            index.commit_sync(SyncCommit {
                file_stats,
                forget_summaries: stale.iter().map(|t| t.id).collect(),
                ..SyncCommit::default()
            })?;
            report.repaired = true;
        } else if repair && !report.clean {
            // Whole files whose header changed, and the mismatched blocks of the others.
            let mut ranges: FileRanges = Vec::new();
            for (i, f) in model.files.iter().enumerate() {
                let r = if header_changed.contains(&f.name.as_str()) {
                    vec![(0, f.stat.size)]
                } else {
                    merge_ranges(mismatched_ranges.remove(&i).unwrap_or_default())
                };
                if !r.is_empty() {
                    ranges.push((f.name.clone(), r));
                }
            }
            let generation = report.generation + 1;
            let blocks_changed = report.mismatched_block_count;
            let bytes_changed = ranges.iter().flat_map(|(_, r)| r.iter().map(|x| x.1)).sum();
            self.rebuild(
                &mut index,
                &model,
                layout,
                |_| Ok(()),
                |bytes| GenerationRecord {
                    tags: crate::index::Tags::new(),
                    generation,
                    kind: GenerationKind::Reindex,
                    created_at_ms: unix_ms(),
                    source: format!("files:{}", self.model_dir.display()),
                    tensors: model.tensors.len() as u64,
                    bytes_compared: bytes,
                    blocks_changed,
                    bytes_changed,
                    seconds: seconds_since(start),
                },
                &ranges,
            )?;
            report.repaired = true;
            report.generation = generation;
        }
        report.seconds = seconds_since(start);
        Ok(report)
    }
}
