//! The operations on one model directory: `init`, `sync`, `status` and `verify`.
//!
//! A sync runs in phases, and each phase only starts once the one before it succeeded:
//!
//! 1. **Trust.** Parse the model's headers and compare every file's size, mtime, inode and header
//!    hash with the index. A file changed behind our back is refused (run `verify --repair`).
//! 2. **Match.** The source must offer exactly the model's tensors with the same dtypes and
//!    shapes; otherwise every difference is listed and nothing is written.
//! 3. **Plan** (decide what changed). Hash the live data group by group where it lives and
//!    compare with the merged stored block hashes; hash single blocks only inside differing
//!    groups. No model byte is read.
//! 4. **Stage.** Read the old bytes of the changed blocks (and only those) and check them against
//!    their stored hashes, so a model edited behind the index is refused before anything is
//!    written. This is where the journal (old ⊕ new per block, fsynced, then a commit record)
//!    slots in: it needs exactly the old and new bytes of the changed blocks.
//! 5. **Apply.** Copy the new blocks into the memory-mapped files (re-checking each against the
//!    hash planned for it), then make the files durable.
//! 6. **Commit.** One SQLite transaction records the new hashes, the files' new stats, the new
//!    generation and the ranges it changed.
//!
//! Memory is bounded: stored hashes are loaded in batches of [`HASH_BATCH_BYTES`], live data is
//! hashed in place or in pieces of at most [`ITEM_BYTES`], and the plan keeps 72 bytes per
//! changed block (about 0.9 GB for a 54 GB model in which every block changed).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::blockhash::{self, BlockLayout, Cv, merge_blocks};
use crate::index::{
    BlockIndex, FileRanges, GenerationRecord, HashUpdate, IndexError, IndexedFile, IndexedTensor,
    SyncCommit, unix_ms,
};
use crate::io::{FileIo, FileStat, Io, OpenMode};
use crate::model::{ModelError, ModelLayout, dtype_name};
use crate::source::{SafetensorsSource, SourceError, WeightSource};

/// Name of the default state directory inside the model directory.
pub const STATE_DIR_NAME: &str = ".apollo-checkpoint";
/// Stored hashes loaded at once, at most (about 8 GiB of tensor data at 4 KiB blocks).
pub const HASH_BATCH_BYTES: u64 = 64 << 20;
/// Live bytes hashed by one parallel work item, at most.
pub const ITEM_BYTES: u64 = 4 << 20;
/// Changed blocks staged or applied by one parallel work item, at most.
const BLOCKS_PER_CHUNK: usize = 256;

/// Everything that can stop an operation. Each variant says what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model directory or one of its files is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The weight source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// An OS error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No index yet.
    #[error(
        "{state_dir}: no index yet; run `apollo-checkpoint init --model-dir {model_dir}` first"
    )]
    NotInitialized {
        /// The state directory.
        state_dir: PathBuf,
        /// The model directory.
        model_dir: PathBuf,
    },
    /// `init` on an indexed model.
    #[error(
        "{state_dir}: already initialized; `apollo-checkpoint verify --repair` re-indexes from the files (delete the state directory to start over with another block size)"
    )]
    AlreadyInitialized {
        /// The state directory.
        state_dir: PathBuf,
    },
    /// A bad `--block-size`.
    #[error(transparent)]
    BlockSize(#[from] blockhash::BadBlockSize),
    /// A model file no longer matches the index: it was changed by another program.
    #[error(
        "{file}: {what} since apollo-checkpoint last wrote it; it is not trusted. Check what changed it, then run `apollo-checkpoint verify --repair --model-dir {model_dir}` to re-index"
    )]
    Stale {
        /// The file.
        file: String,
        /// What differs.
        what: String,
        /// The model directory.
        model_dir: PathBuf,
    },
    /// Source and model disagree on names, dtypes or shapes.
    #[error("the source does not match the model ({} differences); nothing was written:\n  {}", .0.len(), .0.join("\n  "))]
    Mismatch(Vec<String>),
    /// An old block's bytes do not match its stored hash.
    #[error(
        "{file}: tensor {tensor} block {block} (bytes {offset}..{end}) does not match the index; the file was changed behind our back. Nothing was written; run `apollo-checkpoint verify --model-dir {model_dir}` to see what changed"
    )]
    OldBlockChanged {
        /// The file.
        file: String,
        /// The tensor.
        tensor: String,
        /// Block index within the tensor.
        block: u64,
        /// Absolute start in the file.
        offset: u64,
        /// Absolute end in the file.
        end: u64,
        /// The model directory.
        model_dir: PathBuf,
    },
    /// The source's bytes changed between planning and writing.
    #[error(
        "source tensor {tensor} block {block} changed while the sync was writing it; the model may hold a mix of the two versions for that tensor: run the sync again once the source is stable"
    )]
    SourceChanged {
        /// The tensor.
        tensor: String,
        /// Block index within the tensor.
        block: u64,
    },
}

impl Error {
    /// The process exit code for this error (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Model(ModelError::NoModel { .. })
            | Error::Source(SourceError::Model(ModelError::NoModel { .. })) => 66,
            Error::Model(ModelError::Io { .. })
            | Error::Source(SourceError::Io { .. })
            | Error::Io { .. }
            | Error::Index(IndexError::Sqlite { .. }) => 74,
            Error::Model(_)
            | Error::Source(_)
            | Error::Mismatch(_)
            | Error::OldBlockChanged { .. }
            | Error::SourceChanged { .. } => 65,
            Error::Index(_)
            | Error::NotInitialized { .. }
            | Error::AlreadyInitialized { .. }
            | Error::Stale { .. }
            | Error::BlockSize(_) => 78,
        }
    }
}

/// What `init` did.
#[derive(Clone, Debug, Serialize)]
pub struct InitReport {
    /// Generation recorded (always 0).
    pub generation: u64,
    /// Files indexed.
    pub files: usize,
    /// Tensors indexed.
    pub tensors: usize,
    /// Bytes of tensor data hashed.
    pub bytes_hashed: u64,
    /// Blocks indexed.
    pub blocks: u64,
    /// Block size.
    pub block_size: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What `sync` did.
#[derive(Clone, Debug, Serialize)]
pub struct SyncReport {
    /// The model's generation after the sync.
    pub generation: u64,
    /// Whether this sync created that generation.
    pub changed: bool,
    /// Whether the model had to be indexed first.
    pub initialized_first: bool,
    /// Where the weights came from.
    pub source: String,
    /// Tensors compared.
    pub tensors: usize,
    /// Bytes compared.
    pub bytes_compared: u64,
    /// Tensors with at least one changed block.
    pub tensors_changed: usize,
    /// Blocks written.
    pub blocks_changed: u64,
    /// Bytes written (whole blocks).
    pub bytes_changed: u64,
    /// Bytes that actually differ inside the written blocks.
    pub bytes_differing: u64,
    /// Files written.
    pub files_changed: Vec<String>,
    /// Bytes read from model files (headers and the old contents of changed blocks only).
    pub model_bytes_read: u64,
    /// Wall time.
    pub seconds: f64,
    /// Wall time of each phase, in seconds.
    pub phases: SyncPhases,
}

/// Wall time of each phase of a sync (see the module documentation), in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncPhases {
    /// Opening the index, parsing headers, checking trust, matching names.
    pub check: f64,
    /// Hashing the live weights and finding the changed blocks.
    pub plan: f64,
    /// Reading and checking the old bytes of the changed blocks.
    pub stage: f64,
    /// Writing the new bytes.
    pub apply: f64,
    /// Making the model files durable.
    pub flush: f64,
    /// The SQLite transaction.
    pub commit: f64,
}

/// A block whose bytes differ.
#[derive(Clone, Debug, Serialize)]
pub struct BlockMismatch {
    /// File.
    pub file: String,
    /// Tensor.
    pub tensor: String,
    /// Block index within the tensor.
    pub block: u64,
    /// Absolute offset in the file.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// What `verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// True when the files are exactly what the index says.
    pub clean: bool,
    /// Files whose identity (stat, header) differs, with what differs.
    pub file_problems: Vec<String>,
    /// Blocks whose bytes differ (at most [`VerifyReport::MAX_LISTED`] listed).
    pub mismatched_blocks: Vec<BlockMismatch>,
    /// Number of blocks that differ in all.
    pub mismatched_block_count: u64,
    /// Bytes hashed.
    pub bytes_checked: u64,
    /// Whether `--repair` re-indexed the files.
    pub repaired: bool,
    /// The generation after the run.
    pub generation: u64,
    /// Wall time.
    pub seconds: f64,
}

impl VerifyReport {
    /// How many mismatched blocks are listed.
    pub const MAX_LISTED: usize = 1000;
}

/// One file in `status`.
#[derive(Clone, Debug, Serialize)]
pub struct FileStatus {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `ok`, `modified` or `missing`, judged from size, mtime and inode.
    pub state: String,
}

/// What `status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Model directory.
    pub model_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Whether an index exists.
    pub initialized: bool,
    /// Current generation.
    pub generation: Option<u64>,
    /// The newest generation's record.
    pub last_generation: Option<GenerationRecord>,
    /// Stats of the last sync run (changed or not).
    pub last_sync: Option<serde_json::Value>,
    /// Block size.
    pub block_size: Option<u64>,
    /// Tensors indexed.
    pub tensors: usize,
    /// Files.
    pub files: Vec<FileStatus>,
    /// Bytes of the index database.
    pub index_bytes: u64,
    /// Things that need attention, each with what to do.
    pub pending: Vec<String>,
}

/// One model directory and its state.
pub struct Checkpoint {
    model_dir: PathBuf,
    state_dir: PathBuf,
    io: Arc<dyn Io>,
    progress: bool,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("model_dir", &self.model_dir)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// A tensor's changed block: index, stored hash, new hash.
#[derive(Clone, Copy, Debug)]
struct ChangedBlock {
    block: u64,
    old: Cv,
    new: Cv,
}

/// The changes planned for one tensor.
#[derive(Debug)]
struct TensorPlan {
    /// Index into the model layout's tensors.
    model: usize,
    /// Index into the source's tensors.
    source: usize,
    /// Index row id.
    index_id: i64,
    blocks: Vec<ChangedBlock>,
}

fn seconds_since(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e6
}

fn progress_bar(enabled: bool, total: u64, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Start and length of block `block` of a tensor of `len` bytes.
fn block_span(layout: BlockLayout, len: u64, block: u64) -> (u64, u64) {
    let start = block * layout.block_size;
    (start, layout.block_size.min(len - start))
}

/// Work items covering `len` bytes in pieces of at most [`ITEM_BYTES`], aligned to `unit`:
/// (first unit, unit count).
fn work_items(len: u64, unit: u64) -> impl Iterator<Item = (u64, u64)> {
    let units = len.div_ceil(unit);
    let per_item = (ITEM_BYTES / unit).max(1);
    (0..units.div_ceil(per_item)).map(move |i| (i * per_item, per_item.min(units - i * per_item)))
}

/// Sorted, merged (offset, len) ranges.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= off => last.1 = last.1.max(off + len - last.0),
            _ => out.push((off, len)),
        }
    }
    out
}

impl Checkpoint {
    /// A model directory with its state in `state_dir` (default `<model_dir>/.apollo-checkpoint`),
    /// all model-file I/O through `io`.
    pub fn new(model_dir: &Path, state_dir: Option<&Path>, io: Arc<dyn Io>) -> Self {
        let state_dir = state_dir.map_or_else(|| model_dir.join(STATE_DIR_NAME), Path::to_path_buf);
        Checkpoint {
            model_dir: model_dir.to_path_buf(),
            state_dir,
            io,
            progress: false,
        }
    }

    /// Shows progress bars on stderr if it is a terminal.
    #[must_use]
    pub fn with_progress(mut self, on_terminal: bool) -> Self {
        self.progress = on_terminal && std::io::stderr().is_terminal();
        self
    }

    /// The model directory.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn open_index(&self) -> Result<Option<BlockIndex>, Error> {
        if !self.state_dir.join(crate::index::INDEX_DB).exists() {
            return Ok(None);
        }
        let index = BlockIndex::open(&self.state_dir)?;
        Ok(if index.is_initialized()? {
            Some(index)
        } else {
            None
        })
    }

    fn require_index(&self) -> Result<BlockIndex, Error> {
        self.open_index()?.ok_or_else(|| Error::NotInitialized {
            state_dir: self.state_dir.clone(),
            model_dir: self.model_dir.clone(),
        })
    }

    /// Whether an index exists.
    pub fn is_initialized(&self) -> Result<bool, Error> {
        Ok(self.open_index()?.is_some())
    }

    /// Builds the index by hashing every block of the model's files.
    pub fn init(&self, block_size: u64) -> Result<InitReport, Error> {
        let start = Instant::now();
        let layout = BlockLayout::new(block_size)?;
        if self.open_index()?.is_some() {
            return Err(Error::AlreadyInitialized {
                state_dir: self.state_dir.clone(),
            });
        }
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        self.io
            .create_dir_all(&self.state_dir)
            .map_err(|source| Error::Io {
                path: self.state_dir.clone(),
                source,
            })?;
        let mut index = BlockIndex::open(&self.state_dir)?;
        let model_id = new_model_id(&model);
        let blocks = self.rebuild(
            &mut index,
            &model,
            layout,
            |rebuild| {
                rebuild.set_meta("model_id", &model_id)?;
                rebuild.set_meta("block_size", &block_size.to_string())?;
                rebuild.set_meta("hash_scheme", blockhash::SCHEME)?;
                rebuild.set_meta("created_at", &unix_ms().to_string())
            },
            |bytes, seconds| GenerationRecord {
                generation: 0,
                kind: "init".into(),
                created_at_ms: unix_ms(),
                source: format!("files:{}", self.model_dir.display()),
                tensors: model.tensors.len() as u64,
                bytes_compared: bytes,
                blocks_changed: 0,
                bytes_changed: 0,
                seconds,
            },
            &[],
            start,
        )?;
        Ok(InitReport {
            generation: 0,
            files: model.files.len(),
            tensors: model.tensors.len(),
            bytes_hashed: model.data_bytes(),
            blocks,
            block_size,
            seconds: seconds_since(start),
        })
    }

    /// Replaces the index's files and tensors with `model`, hashing every block from the files.
    #[allow(clippy::too_many_arguments)]
    fn rebuild(
        &self,
        index: &mut BlockIndex,
        model: &ModelLayout,
        layout: BlockLayout,
        meta: impl FnOnce(&mut crate::index::Rebuild<'_>) -> Result<(), IndexError>,
        generation: impl FnOnce(u64, f64) -> GenerationRecord,
        ranges: &[(String, Vec<(u64, u64)>)],
        start: Instant,
    ) -> Result<u64, Error> {
        let source = SafetensorsSource::open(&self.model_dir)?;
        let pb = progress_bar(self.progress, model.data_bytes(), "indexing");
        let mut rebuild = index.begin_rebuild()?;
        meta(&mut rebuild)?;
        let mut file_ids = Vec::with_capacity(model.files.len());
        for f in &model.files {
            file_ids.push(rebuild.add_file(f)?);
        }
        let mut total_blocks = 0;
        for batch in hash_batches(model.tensors.iter().map(|t| t.entry.len), layout) {
            let mut hashes: Vec<Vec<Cv>> = batch
                .clone()
                .map(|i| vec![[0u8; 32]; layout.blocks(model.tensors[i].entry.len) as usize])
                .collect();
            let mut items = Vec::new();
            for (cvs, i) in hashes.iter_mut().zip(batch.clone()) {
                let per_item = (ITEM_BYTES / layout.block_size).max(1) as usize;
                for (k, chunk) in cvs.chunks_mut(per_item).enumerate() {
                    items.push((i, (k * per_item) as u64, chunk));
                }
            }
            items.into_par_iter().try_for_each(|(i, first, out)| {
                source.hash_units(i, layout.block_size, first, out)?;
                pb.inc(
                    (out.len() as u64 * layout.block_size)
                        .min(model.tensors[i].entry.len - first * layout.block_size),
                );
                Ok::<_, Error>(())
            })?;
            for (cvs, i) in hashes.iter().zip(batch) {
                let t = &model.tensors[i];
                rebuild.add_tensor(file_ids[t.file], &t.entry, cvs)?;
                total_blocks += cvs.len() as u64;
            }
        }
        pb.finish_and_clear();
        rebuild.commit(
            &generation(model.data_bytes(), seconds_since(start)),
            ranges,
        )?;
        Ok(total_blocks)
    }

    /// Checks that every model file is exactly what the index last recorded.
    fn check_trusted(
        &self,
        index: &BlockIndex,
        model: &ModelLayout,
    ) -> Result<Vec<IndexedTensor>, Error> {
        let problems = file_problems(&index.files()?, model);
        if let Some((file, what)) = problems.into_iter().next() {
            return Err(Error::Stale {
                file,
                what,
                model_dir: self.model_dir.clone(),
            });
        }
        let tensors = index.tensors()?;
        let same = tensors.len() == model.tensors.len()
            && tensors.iter().all(|it| {
                model.tensors.iter().any(|t| {
                    t.entry.name == it.name
                        && t.entry.offset == it.offset
                        && t.entry.len == it.len
                        && t.entry.shape == it.shape
                        && dtype_name(t.entry.dtype) == it.dtype
                })
            });
        if !same {
            return Err(IndexError::Corrupt {
                path: index.path().to_path_buf(),
                what: "its tensor table does not match the file headers it recorded".into(),
            }
            .into());
        }
        Ok(tensors)
    }

    /// Brings the model files up to date with `source`, writing only the blocks that changed.
    pub fn sync(&self, source: &dyn WeightSource) -> Result<SyncReport, Error> {
        let start = Instant::now();
        let mut initialized_first = false;
        let mut index = if let Some(index) = self.open_index()? {
            index
        } else {
            self.init(blockhash::DEFAULT_BLOCK_SIZE)?;
            initialized_first = true;
            self.require_index()?
        };
        let layout = index.block_layout()?;
        let read_before = self.io.bytes_read();
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        let indexed = self.check_trusted(&index, &model)?;
        let pairs = match_tensors(&model, source)?;
        let id_by_name: HashMap<&str, &IndexedTensor> =
            indexed.iter().map(|t| (t.name.as_str(), t)).collect();

        let mut phases = SyncPhases {
            check: seconds_since(start),
            ..SyncPhases::default()
        };
        let mut lap = Instant::now();
        // Plan: which blocks differ.
        let pb = progress_bar(self.progress, model.data_bytes(), "comparing");
        let mut plans: Vec<TensorPlan> = Vec::new();
        for batch in hash_batches(model.tensors.iter().map(|t| t.entry.len), layout) {
            let mut stored: Vec<Vec<Cv>> = Vec::new();
            for i in batch.clone() {
                stored.push(
                    index
                        .tensor_hashes(id_by_name[model.tensors[i].entry.name.as_str()], layout)?,
                );
            }
            let mut items = Vec::new();
            for (k, i) in batch.clone().enumerate() {
                for (first, count) in work_items(model.tensors[i].entry.len, layout.group_size) {
                    items.push((k, i, first, count));
                }
            }
            let found: Vec<(usize, Vec<ChangedBlock>)> = items
                .into_par_iter()
                .map(|(k, i, first, count)| {
                    let len = model.tensors[i].entry.len;
                    let changed =
                        plan_groups(source, pairs[i], len, layout, &stored[k], first, count)?;
                    pb.inc((count * layout.group_size).min(len - first * layout.group_size));
                    Ok((i, changed))
                })
                .collect::<Result<_, Error>>()?;
            let mut by_tensor: BTreeMap<usize, Vec<ChangedBlock>> = BTreeMap::new();
            for (i, changed) in found {
                if !changed.is_empty() {
                    by_tensor.entry(i).or_default().extend(changed);
                }
            }
            for (i, mut blocks) in by_tensor {
                blocks.sort_unstable_by_key(|b| b.block);
                let index_id = id_by_name[model.tensors[i].entry.name.as_str()].id;
                plans.push(TensorPlan {
                    model: i,
                    source: pairs[i],
                    index_id,
                    blocks,
                });
            }
        }
        pb.finish_and_clear();
        phases.plan = seconds_since(lap);

        let bytes_compared = model.data_bytes();
        let blocks_changed: u64 = plans.iter().map(|p| p.blocks.len() as u64).sum();
        let bytes_changed: u64 = plans
            .iter()
            .flat_map(|p| {
                let len = model.tensors[p.model].entry.len;
                p.blocks
                    .iter()
                    .map(move |b| block_span(layout, len, b.block).1)
            })
            .sum();
        let current = index.generation()?.unwrap_or(0);
        let mut report = SyncReport {
            generation: current,
            changed: false,
            initialized_first,
            source: source.describe(),
            tensors: model.tensors.len(),
            bytes_compared,
            tensors_changed: plans.len(),
            blocks_changed,
            bytes_changed,
            bytes_differing: 0,
            files_changed: Vec::new(),
            model_bytes_read: 0,
            seconds: 0.0,
            phases: SyncPhases::default(),
        };
        if plans.is_empty() {
            report.phases = phases;
            report.model_bytes_read = self.io.bytes_read().saturating_sub(read_before);
            report.seconds = seconds_since(start);
            index.set_last_sync(&last_sync_json(&report))?;
            return Ok(report);
        }

        // Open the files that change, read-write.
        let mut handles: BTreeMap<usize, Box<dyn FileIo>> = BTreeMap::new();
        for p in &plans {
            let f = model.tensors[p.model].file;
            if let std::collections::btree_map::Entry::Vacant(e) = handles.entry(f) {
                let path = model.file_path(f);
                let h = self
                    .io
                    .open(&path, OpenMode::ReadWrite)
                    .map_err(|source| Error::Io {
                        path: path.clone(),
                        source,
                    })?;
                let stat = h.stat().map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                if stat != model.files[f].stat {
                    return Err(Error::Stale {
                        file: model.files[f].name.clone(),
                        what: "changed while this sync was reading it".into(),
                        model_dir: self.model_dir.clone(),
                    });
                }
                e.insert(h);
            }
        }
        let chunks: Vec<(&TensorPlan, &[ChangedBlock])> = plans
            .iter()
            .flat_map(|p| p.blocks.chunks(BLOCKS_PER_CHUNK).map(move |c| (p, c)))
            .collect();

        // Stage: read and check the old bytes of the changed blocks.
        lap = Instant::now();
        let bytes_differing: u64 = chunks
            .par_iter()
            .map(|&(p, blocks)| self.stage_chunk(&model, &handles, source, layout, p, blocks))
            .try_reduce(|| 0, |a, b| Ok(a + b))?;

        phases.stage = seconds_since(lap);
        lap = Instant::now();
        // Apply: write the new bytes, then make each file durable.
        chunks.par_iter().try_for_each(|&(p, blocks)| {
            apply_chunk(&model, &handles, source, layout, p, blocks)
        })?;
        phases.apply = seconds_since(lap);
        lap = Instant::now();
        // Files are flushed in parallel so the device sees all their writes at once.
        let file_stats: Vec<(String, FileStat)> = handles
            .par_iter()
            .map(|(&f, h)| {
                let path = model.file_path(f);
                h.sync().map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                let stat = h.stat().map_err(|source| Error::Io { path, source })?;
                Ok((model.files[f].name.clone(), stat))
            })
            .collect::<Result<_, Error>>()?;
        phases.flush = seconds_since(lap);
        lap = Instant::now();
        // Commit: hashes, stats, generation and its ranges in one transaction.
        let mut ranges: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        for p in &plans {
            let t = &model.tensors[p.model];
            let r = ranges.entry(t.file).or_default();
            for b in &p.blocks {
                let (off, len) = block_span(layout, t.entry.len, b.block);
                r.push((t.entry.offset + off, len));
            }
        }
        let ranges: FileRanges = ranges
            .into_iter()
            .map(|(f, r)| (model.files[f].name.clone(), merge_ranges(r)))
            .collect();
        report.generation = current + 1;
        report.changed = true;
        report.bytes_differing = bytes_differing;
        report.files_changed = file_stats.iter().map(|(n, _)| n.clone()).collect();
        report.model_bytes_read = self.io.bytes_read().saturating_sub(read_before);
        report.seconds = seconds_since(start);
        let commit = SyncCommit {
            updates: plans
                .iter()
                .map(|p| HashUpdate {
                    tensor_id: p.index_id,
                    blocks: p.blocks.iter().map(|b| (b.block, b.new)).collect(),
                })
                .collect(),
            file_stats,
            generation: Some(GenerationRecord {
                generation: report.generation,
                kind: "sync".into(),
                created_at_ms: unix_ms(),
                source: report.source.clone(),
                tensors: report.tensors as u64,
                bytes_compared,
                blocks_changed,
                bytes_changed,
                seconds: report.seconds,
            }),
            ranges,
            last_sync: last_sync_json(&report),
        };
        index.commit_sync(&commit)?;
        phases.commit = seconds_since(lap);
        report.phases = phases;
        report.seconds = seconds_since(start);
        Ok(report)
    }

    /// Reads the old bytes of `blocks`, checks them against their stored hashes and returns how
    /// many bytes differ from the new ones.
    fn stage_chunk(
        &self,
        model: &ModelLayout,
        handles: &BTreeMap<usize, Box<dyn FileIo>>,
        source: &dyn WeightSource,
        layout: BlockLayout,
        plan: &TensorPlan,
        blocks: &[ChangedBlock],
    ) -> Result<u64, Error> {
        let t = &model.tensors[plan.model];
        let file = &handles[&t.file];
        let mut old = vec![0u8; layout.block_size as usize];
        let mut new = vec![0u8; layout.block_size as usize];
        let mut differing = 0u64;
        for b in blocks {
            let (off, len) = block_span(layout, t.entry.len, b.block);
            let (old, new) = (&mut old[..len as usize], &mut new[..len as usize]);
            file.read_at(t.entry.offset + off, old)
                .map_err(|source| Error::Io {
                    path: file.path().to_path_buf(),
                    source,
                })?;
            if blockhash::subtree_cv(off, old) != b.old {
                return Err(Error::OldBlockChanged {
                    file: model.files[t.file].name.clone(),
                    tensor: t.entry.name.clone(),
                    block: b.block,
                    offset: t.entry.offset + off,
                    end: t.entry.offset + off + len,
                    model_dir: self.model_dir.clone(),
                });
            }
            source.read(plan.source, off, new)?;
            differing += old.iter().zip(new.iter()).filter(|(a, b)| a != b).count() as u64;
        }
        Ok(differing)
    }

    /// Reports what the state directory knows, without reading model data.
    pub fn status(&self) -> Result<StatusReport, Error> {
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
        };
        let Some(index) = self.open_index()? else {
            report.pending.push(format!(
                "not initialized: run `apollo-checkpoint init --model-dir {}`",
                self.model_dir.display()
            ));
            return Ok(report);
        };
        report.initialized = true;
        report.generation = index.generation()?;
        if let Some(g) = report.generation {
            report.last_generation = index.generation_record(g)?;
        }
        report.last_sync = index
            .meta("last_sync")?
            .and_then(|s| serde_json::from_str(&s).ok());
        report.block_size = Some(index.block_layout()?.block_size);
        report.tensors = index.tensors()?.len();
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
                Err(_) => "missing",
                Ok(m) if FileStat::from_metadata(&m) == f.stat => "ok",
                Ok(_) => "modified",
            };
            if state != "ok" {
                report.pending.push(format!(
                    "{} is {state} since apollo-checkpoint last wrote it: sync will refuse; run `apollo-checkpoint verify --repair --model-dir {}`",
                    f.name,
                    self.model_dir.display()
                ));
            }
            report.files.push(FileStatus {
                name: f.name,
                size: f.stat.size,
                state: state.into(),
            });
        }
        Ok(report)
    }

    /// Rehashes the model files and compares them with the index; with `repair`, re-indexes
    /// whatever differs from the files as they are now.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, Error> {
        let start = Instant::now();
        let mut index = self.require_index()?;
        let layout = index.block_layout()?;
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        let indexed_files = index.files()?;
        let problems = file_problems(&indexed_files, &model);
        let mut report = VerifyReport {
            clean: true,
            file_problems: problems.iter().map(|(f, w)| format!("{f}: {w}")).collect(),
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
        let comparable: Vec<usize> = (0..model.tensors.len())
            .filter(|&i| {
                let t = &model.tensors[i];
                !header_changed.contains(&model.files[t.file].name.as_str())
                    && by_name.contains_key(t.entry.name.as_str())
            })
            .collect();
        let pb = progress_bar(
            self.progress,
            comparable.iter().map(|&i| model.tensors[i].entry.len).sum(),
            "verifying",
        );
        let mut mismatched_ranges: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        for batch in hash_batches(
            comparable.iter().map(|&i| model.tensors[i].entry.len),
            layout,
        ) {
            let mut stored = Vec::new();
            for k in batch.clone() {
                stored.push(index.tensor_hashes(
                    by_name[model.tensors[comparable[k]].entry.name.as_str()],
                    layout,
                )?);
            }
            let mut items = Vec::new();
            for (s, k) in batch.clone().enumerate() {
                for (first, count) in
                    work_items(model.tensors[comparable[k]].entry.len, layout.group_size)
                {
                    items.push((s, comparable[k], first, count));
                }
            }
            let found: Vec<(usize, Vec<ChangedBlock>)> = items
                .into_par_iter()
                .map(|(s, i, first, count)| {
                    let len = model.tensors[i].entry.len;
                    let changed = plan_groups(&source, i, len, layout, &stored[s], first, count)?;
                    pb.inc((count * layout.group_size).min(len - first * layout.group_size));
                    Ok((i, changed))
                })
                .collect::<Result<_, Error>>()?;
            for (i, changed) in found {
                let t = &model.tensors[i];
                for b in changed {
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
        }
        pb.finish_and_clear();
        report
            .mismatched_blocks
            .sort_by(|a, b| (&a.file, a.offset).cmp(&(&b.file, b.offset)));
        report.bytes_checked = comparable.iter().map(|&i| model.tensors[i].entry.len).sum();
        report.clean = report.file_problems.is_empty() && report.mismatched_block_count == 0;

        if repair && !report.clean {
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
                |bytes, seconds| GenerationRecord {
                    generation,
                    kind: "reindex".into(),
                    created_at_ms: unix_ms(),
                    source: format!("files:{}", self.model_dir.display()),
                    tensors: model.tensors.len() as u64,
                    bytes_compared: bytes,
                    blocks_changed,
                    bytes_changed,
                    seconds,
                },
                &ranges,
                start,
            )?;
            report.repaired = true;
            report.generation = generation;
        }
        report.seconds = seconds_since(start);
        Ok(report)
    }
}

/// Differences between the indexed files and the files as parsed now, as (file, what).
fn file_problems(indexed: &[IndexedFile], model: &ModelLayout) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in indexed {
        if !model.files.iter().any(|m| m.name == f.name) {
            out.push((f.name.clone(), "is no longer part of the model".to_string()));
        }
    }
    for m in &model.files {
        let Some(f) = indexed.iter().find(|f| f.name == m.name) else {
            out.push((m.name.clone(), "is new to the model".to_string()));
            continue;
        };
        let what = if f.header_hash != m.header.header_hash {
            "its header (tensor names, dtypes, shapes or offsets) changed".to_string()
        } else if f.stat.inode != m.stat.inode {
            format!(
                "was replaced (inode {} became {})",
                f.stat.inode, m.stat.inode
            )
        } else if f.stat.size != m.stat.size {
            format!(
                "changed size ({} bytes became {})",
                f.stat.size, m.stat.size
            )
        } else if f.stat.mtime_ns != m.stat.mtime_ns {
            "was modified (its mtime changed)".to_string()
        } else {
            continue;
        };
        out.push((m.name.clone(), what));
    }
    out
}

/// For each model tensor, the index of the source tensor of the same name; or every difference.
fn match_tensors(model: &ModelLayout, source: &dyn WeightSource) -> Result<Vec<usize>, Error> {
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
                pairs.push(i);
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

/// Splits tensors (given by length) into consecutive index ranges whose stored hashes fit in
/// [`HASH_BATCH_BYTES`].
fn hash_batches(
    lens: impl Iterator<Item = u64>,
    layout: BlockLayout,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    let mut n = 0;
    for (i, len) in lens.enumerate() {
        let b = layout.blocks(len) * blockhash::CV_LEN as u64;
        if i > start && bytes + b > HASH_BATCH_BYTES {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
        n = i + 1;
    }
    if n > start {
        out.push(start..n);
    }
    out
}

/// Compares `count` groups of a tensor, from group `first`, with the stored block hashes;
/// returns the blocks that differ with their stored and new hashes.
fn plan_groups(
    source: &dyn WeightSource,
    source_tensor: usize,
    len: u64,
    layout: BlockLayout,
    stored: &[Cv],
    first: u64,
    count: u64,
) -> Result<Vec<ChangedBlock>, Error> {
    let mut groups = vec![[0u8; 32]; count as usize];
    source.hash_units(source_tensor, layout.group_size, first, &mut groups)?;
    let per = layout.blocks_per_group();
    let nblocks = layout.blocks(len);
    let mut changed = Vec::new();
    let mut block_cvs = vec![[0u8; 32]; per as usize];
    for (k, live) in groups.iter().enumerate() {
        let g = first + k as u64;
        let b0 = g * per;
        let b1 = (b0 + per).min(nblocks);
        let old = &stored[b0 as usize..b1 as usize];
        let group_len = layout.group_size.min(len - g * layout.group_size);
        if merge_blocks(old, group_len, layout.block_size) == *live {
            continue;
        }
        let new = &mut block_cvs[..old.len()];
        if old.len() == 1 {
            new[0] = *live;
        } else {
            source.hash_units(source_tensor, layout.block_size, b0, new)?;
        }
        for (j, (o, n)) in old.iter().zip(new.iter()).enumerate() {
            if o != n {
                changed.push(ChangedBlock {
                    block: b0 + j as u64,
                    old: *o,
                    new: *n,
                });
            }
        }
    }
    Ok(changed)
}

/// Writes the new bytes of `blocks` into the model file, checking each against its planned hash.
fn apply_chunk(
    model: &ModelLayout,
    handles: &BTreeMap<usize, Box<dyn FileIo>>,
    source: &dyn WeightSource,
    layout: BlockLayout,
    plan: &TensorPlan,
    blocks: &[ChangedBlock],
) -> Result<(), Error> {
    let t = &model.tensors[plan.model];
    let file = &handles[&t.file];
    let mut buf = vec![0u8; layout.block_size as usize];
    for b in blocks {
        let (off, len) = block_span(layout, t.entry.len, b.block);
        let new = &mut buf[..len as usize];
        source.read(plan.source, off, new)?;
        if blockhash::subtree_cv(off, new) != b.new {
            return Err(Error::SourceChanged {
                tensor: t.entry.name.clone(),
                block: b.block,
            });
        }
        file.write_at(t.entry.offset + off, new)
            .map_err(|source| Error::Io {
                path: file.path().to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

fn last_sync_json(report: &SyncReport) -> String {
    let mut v = serde_json::to_value(report).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("at_ms".into(), unix_ms().into());
    }
    v.to_string()
}

/// A fresh identity for a model: unique per `init`, recorded in journals and deltas later.
fn new_model_id(model: &ModelLayout) -> String {
    let mut h = blake3::Hasher::new();
    h.update(model.dir.as_os_str().as_encoded_bytes());
    for f in &model.files {
        h.update(&f.header.header_hash);
    }
    h.update(&unix_ms().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let mut r = [0u8; 16];
        if std::io::Read::read_exact(&mut f, &mut r).is_ok() {
            h.update(&r);
        }
    }
    blockhash::hex(&h.finalize().as_bytes()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        assert_eq!(
            merge_ranges(vec![(8, 4), (0, 4), (4, 4), (20, 1), (19, 3)]),
            vec![(0, 12), (19, 3)]
        );
        assert!(merge_ranges(vec![]).is_empty());
    }

    #[test]
    fn work_items_cover_the_tensor_once() {
        for (len, unit) in [
            (0, 4096),
            (1, 4096),
            (ITEM_BYTES, 65536),
            (3 * ITEM_BYTES + 5, 65536),
            (10, 1 << 24),
        ] {
            let items: Vec<_> = work_items(len, unit).collect();
            let mut next = 0;
            for (first, count) in &items {
                assert_eq!(*first, next);
                next += count;
            }
            assert_eq!(next, len.div_ceil(unit));
        }
    }

    #[test]
    fn hash_batches_respect_the_budget_but_always_progress() {
        let layout = BlockLayout::new(4096).unwrap();
        let big = HASH_BATCH_BYTES / 32 * 4096; // exactly one budget of hashes
        let batches = hash_batches([10, big, 10, 10].into_iter(), layout);
        assert_eq!(batches, vec![0..1, 1..2, 2..4]);
        assert!(hash_batches(std::iter::empty(), layout).is_empty());
    }
}
