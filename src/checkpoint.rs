//! The operations on one model directory: `init`, `sync`, `recover`, `status` and `verify`.
//!
//! Every operation that writes the model or the state holds the state directory's exclusive lock
//! ([`crate::lock`]) for its whole run; readers hold it shared. A sync runs in this order, and no
//! model byte changes before the journal's commit record is durable:
//!
//! 1. **Recover.** A journal left by a crash is rolled forward (or discarded if uncommitted).
//! 2. **Trust.** Parse the model's headers and compare every file's size, mtime, inode and header
//!    hash with the index. A file changed behind our back is refused (run `verify --repair`).
//! 3. **Match.** The source must offer exactly the model's tensors with the same dtypes and
//!    shapes; otherwise every difference is listed and nothing is written.
//! 4. **Plan** ([`crate::plan`]). Hash the live data group by group where it lives and compare
//!    with the merged stored block hashes. No model byte is read.
//! 5. **Journal** ([`crate::journal`]). For each changed block, read its old bytes (and only
//!    those), check them against the stored hash, and append old ⊕ new to the journal; fsync the
//!    journal and the state directory; append and fsync the commit record.
//! 6. **Apply** ([`crate::apply`]). Roll the journal forward into the model files — the same
//!    code `recover` runs. The files are not fsynced here: the committed journal already makes
//!    the generation durable, and the kernel writes the pages back by itself.
//! 7. **Commit.** One SQLite transaction records the new hashes, the files' new stats, the new
//!    generation and the ranges it changed.
//! 8. **Retire.** `unflushed.json` is made durable (see [`crate::journal`], "Unflushed
//!    writes"); the journal moves to `undo/` as the generation's undo data; the oldest undo
//!    files beyond the retention limits are removed.
//!
//! A crash before step 5 completes leaves the files untouched and an uncommitted journal, which
//! recovery discards. A crash after it leaves a committed journal, which recovery rolls forward:
//! the files then hold the new generation, and steps 6–8 are completed, durably. After step 8 the
//! next writer (or `recover`) finishes the unflushed writes first: an fsync in the same boot, the
//! retired journal rolled forward again after a reboot.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::apply::{self, ApplyError, ApplyStats};
use crate::blockhash::{self, BlockLayout, Cv};
use crate::index::{
    BlockIndex, FileRanges, GenerationRecord, HashUpdate, IndexError, IndexedFile, IndexedTensor,
    SyncCommit, unix_ms,
};
use crate::io::{FileIo, FileStat, Io, OpenMode};
use crate::journal::{
    JOURNAL_FILE, Journal, JournalError, JournalFile, JournalHeader, JournalKind, JournalState,
    JournalWriter, Record, UNDO_DIR, UNFLUSHED_FILE, Unflushed, encode_xor, hash_prefix,
};
use crate::lock::{LockError, LockKind, StateLock};
use crate::model::{ModelError, ModelLayout, dtype_name};
use crate::plan::{self, ChangedBlock, Comparison, TensorPlan, block_span, merge_ranges};
use crate::source::{SafetensorsSource, SourceError, WeightSource};

/// Name of the default state directory inside the model directory.
pub const STATE_DIR_NAME: &str = ".apollo-checkpoint";
/// Changed blocks staged by one parallel work item, at most.
const BLOCKS_PER_CHUNK: usize = 256;
/// Work items staged before their records are appended to the journal.
const CHUNKS_PER_BATCH: usize = 64;
/// Generations whose undo data is kept, by default.
pub const DEFAULT_RETAIN_GENERATIONS: u64 = 24;
/// Undo bytes kept by default, as a fraction of the model's size (1/N)...
pub const DEFAULT_RETAIN_FRACTION: u64 = 10;
/// ... but never less than this.
pub const MIN_DEFAULT_RETAIN_BYTES: u64 = 64 << 20;
/// Undo data not yet exported is kept up to this many times the rollback byte limit, by default.
pub const DEFAULT_BACKLOG_FACTOR: u64 = 4;

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
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Rolling the journal forward failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The state lock is held by another process.
    #[error(transparent)]
    Lock(#[from] LockError),
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
    /// A journal is pending and this command does not recover it.
    #[error(
        "{path}: an interrupted write is pending; run `apollo-checkpoint recover --model-dir {model_dir}` (or `sync`, which recovers first)"
    )]
    JournalPending {
        /// The journal.
        path: PathBuf,
        /// The model directory.
        model_dir: PathBuf,
    },
    /// `rollback --to` names a generation that is not before the current one.
    #[error(
        "cannot roll back to generation {to}: the model is at generation {current}; name an earlier generation"
    )]
    RollbackTarget {
        /// The generation asked for.
        to: u64,
        /// The current generation.
        current: u64,
    },
    /// The undo data needed for a rollback is not kept.
    #[error(
        "cannot roll back to generation {to}: the undo data of generation {missing} is not kept ({why}); the earliest generation reachable is {earliest}. `apollo-checkpoint retention` sets how much undo data is kept"
    )]
    NoUndo {
        /// The generation asked for.
        to: u64,
        /// A generation whose undo data is missing.
        missing: u64,
        /// Why it is missing.
        why: String,
        /// The earliest generation that can be reached.
        earliest: u64,
    },
    /// A handles manifest is unreadable or inconsistent.
    #[error(transparent)]
    Handles(#[from] crate::handles::HandlesError),
    /// Live weights on the GPU cannot be read.
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    /// A delta file is damaged or unsafe.
    #[error(transparent)]
    Delta(#[from] crate::delta::DeltaError),
    /// `export-delta` cannot describe the span asked for.
    #[error("export-delta: {what}")]
    ExportBase {
        /// Why.
        what: String,
    },
    /// A delta does not fit this replica; nothing was written.
    #[error("{delta}: refused: {what}; the replica is left as it is")]
    ReplicaMismatch {
        /// The delta file.
        delta: PathBuf,
        /// Why.
        what: String,
    },
    /// A replica block does not hold the bytes the delta was made against.
    #[error(
        "{delta}: the replica's {file} bytes {offset}..{end} are not the delta's base; nothing was written. The replica was changed by something else: run `apollo-checkpoint verify --model-dir` on it"
    )]
    BaseMismatch {
        /// The delta file.
        delta: PathBuf,
        /// The file.
        file: String,
        /// Start of the block.
        offset: u64,
        /// End of the block.
        end: u64,
    },
    /// After a journal was applied, a block does not hold the bytes it promised.
    #[error(
        "{file}: after applying generation {target}, the block at bytes {offset}..{end} does not hold the expected bytes; run `apollo-checkpoint verify --model-dir {model_dir}`"
    )]
    TargetMismatch {
        /// The file.
        file: String,
        /// Start of the block.
        offset: u64,
        /// End of the block.
        end: u64,
        /// The generation applied.
        target: u64,
        /// The model directory.
        model_dir: PathBuf,
    },
    /// A committed journal that does not belong to this model or state.
    #[error("{path}: {what}; it is not applied and the model is left as it is")]
    ForeignJournal {
        /// The journal.
        path: PathBuf,
        /// What does not match.
        what: String,
    },
}

impl Error {
    /// The process exit code for this error (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Model(ModelError::NoModel { .. })
            | Error::Source(SourceError::Model(ModelError::NoModel { .. })) => 66,
            Error::Lock(LockError::Busy { .. }) => 75,
            Error::Model(ModelError::Io { .. })
            | Error::Source(SourceError::Io { .. })
            | Error::Io { .. }
            | Error::Index(IndexError::Sqlite { .. })
            | Error::Journal(JournalError::Io { .. })
            | Error::Apply(ApplyError::Io { .. } | ApplyError::Journal(JournalError::Io { .. }))
            | Error::Delta(crate::delta::DeltaError::Io { .. })
            | Error::Handles(crate::handles::HandlesError::Io { .. })
            | Error::Lock(_) => 74,
            Error::Model(_)
            | Error::Source(_)
            | Error::Journal(_)
            | Error::Apply(_)
            | Error::Mismatch(_)
            | Error::TargetMismatch { .. }
            | Error::Delta(_)
            | Error::Handles(_)
            | Error::BaseMismatch { .. }
            | Error::OldBlockChanged { .. } => 65,
            Error::Index(_)
            | Error::NotInitialized { .. }
            | Error::AlreadyInitialized { .. }
            | Error::Stale { .. }
            | Error::BlockSize(_)
            | Error::JournalPending { .. }
            | Error::ForeignJournal { .. }
            | Error::RollbackTarget { .. }
            | Error::Cuda(_)
            | Error::NoUndo { .. }
            | Error::ExportBase { .. }
            | Error::ReplicaMismatch { .. } => 78,
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
    /// Model tensors the (partial) source does not hold, left untouched (e.g. `mtp.*`).
    pub untouched: Vec<String>,
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
    /// Bytes read from model files: headers, and the changed blocks (when journaled and applied).
    pub model_bytes_read: u64,
    /// Size of the journal written (its undo data), in bytes.
    pub journal_bytes: u64,
    /// What recovery did first, if a journal was pending.
    pub recovered: Option<RecoverReport>,
    /// Wall time.
    pub seconds: f64,
    /// Wall time of each phase, in seconds.
    pub phases: SyncPhases,
}

/// Wall time of each phase of a sync (see the module documentation), in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncPhases {
    /// Opening the index, parsing headers, checking trust, matching names (not `flush`).
    pub check: f64,
    /// Hashing the live weights and finding the changed blocks.
    pub plan: f64,
    /// Reading and checking the old bytes of the changed blocks, writing and committing the
    /// journal.
    pub journal: f64,
    /// Rolling the journal forward into the files.
    pub apply: f64,
    /// Making the previous write's model pages durable (see [`crate::journal`], "Unflushed
    /// writes"), before this sync's checks; this sync's own pages are flushed by the next one.
    pub flush: f64,
    /// The SQLite transaction.
    pub commit: f64,
    /// Moving the journal to the undo data and pruning it.
    pub retire: f64,
}

/// What `rollback` did.
#[derive(Clone, Debug, Serialize)]
pub struct RollbackReport {
    /// The generation the files held before.
    pub from_generation: u64,
    /// The generation whose bytes they hold now.
    pub restored_generation: u64,
    /// The new generation number recorded for the rollback (generations only move forward).
    pub generation: u64,
    /// Blocks written.
    pub blocks_changed: u64,
    /// Bytes written.
    pub bytes_changed: u64,
    /// Size of the rollback's journal (itself the undo data of the rollback).
    pub journal_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Undo-data retention limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// Generations whose undo data is kept.
    pub generations: u64,
    /// Bytes of undo data kept.
    pub bytes: u64,
}

/// What `recover` did.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverReport {
    /// `none` (no journal), `discarded` (uncommitted: files untouched), `rolled_forward`, or
    /// `flushed` (the last write's pages, left to the page cache, made durable).
    pub action: String,
    /// The generation the files hold afterwards.
    pub generation: u64,
    /// Records rolled forward, by outcome.
    pub blocks: ApplyStats,
    /// Wall time.
    pub seconds: f64,
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
    /// Undo data kept: generations.
    pub undo_generations: u64,
    /// Undo data kept: bytes.
    pub undo_bytes: u64,
    /// Retention limit: generations.
    pub retain_generations: Option<u64>,
    /// Retention limit: bytes.
    pub retain_bytes: Option<u64>,
    /// The generation the newest export reaches.
    pub exported_through: Option<u64>,
    /// Generations after it, not yet exported.
    pub unexported_generations: u64,
    /// Undo bytes of those generations still kept for the next export.
    pub unexported_bytes: u64,
}

/// One model directory and its state.
pub struct Checkpoint {
    pub(crate) model_dir: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) io: Arc<dyn Io>,
    progress: bool,
    wait: Duration,
    /// Nanoseconds the last [`Self::finish_unflushed`] took.
    flushed_ns: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("model_dir", &self.model_dir)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// Seconds since `start`, to the microsecond.
pub(crate) fn seconds_since(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e6
}

fn progress_bar(enabled: bool, total: u64, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// A block's composed undo: (tensor offset, block length, zero-run coded XOR).
type ComposedBlock = (u64, u32, Vec<u8>);

/// What writing the journal produced.
#[derive(Default)]
struct Journaled {
    bytes: u64,
    blocks: u64,
    bytes_changed: u64,
    differing: u64,
    /// New hashes per plan: (block, hash).
    new_cvs: Vec<Vec<(u64, Cv)>>,
}

/// The records of one staged work item.
struct Staged {
    plan: usize,
    encoded: Vec<u8>,
    records: u64,
    bytes: u64,
    differing: u64,
    cvs: Vec<(u64, Cv)>,
}

impl Checkpoint {
    /// A model directory with its state in `state_dir` (default `<model_dir>/.apollo-checkpoint`),
    /// all file I/O through `io`.
    pub fn new(model_dir: &Path, state_dir: Option<&Path>, io: Arc<dyn Io>) -> Self {
        let state_dir = state_dir.map_or_else(|| model_dir.join(STATE_DIR_NAME), Path::to_path_buf);
        Checkpoint {
            model_dir: model_dir.to_path_buf(),
            state_dir,
            io,
            progress: false,
            wait: Duration::ZERO,
            flushed_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Shows progress bars on stderr if it is a terminal.
    #[must_use]
    pub fn with_progress(mut self, on_terminal: bool) -> Self {
        self.progress = on_terminal && std::io::stderr().is_terminal();
        self
    }

    /// Waits up to `wait` for the state lock instead of failing at once.
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
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

    pub(crate) fn journal_path(&self) -> PathBuf {
        self.state_dir.join(JOURNAL_FILE)
    }

    pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Takes the lock, creating the state directory first for writers; a writer refuses a model
    /// directory that does not exist (rather than creating state inside a mistyped path).
    pub(crate) fn lock(&self, kind: LockKind) -> Result<Option<StateLock>, Error> {
        let lock = self.lock_only(kind)?;
        if kind == LockKind::Exclusive {
            self.finish_unflushed()?;
        }
        Ok(lock)
    }

    /// [`Self::lock`] without finishing unflushed writes (`recover` does that itself).
    fn lock_only(&self, kind: LockKind) -> Result<Option<StateLock>, Error> {
        if kind == LockKind::Exclusive {
            if !self.model_dir.is_dir() {
                return Err(ModelError::NoModel {
                    dir: self.model_dir.clone(),
                }
                .into());
            }
            self.io
                .create_dir_all(&self.state_dir)
                .map_err(Self::io_err(&self.state_dir))?;
        } else if !self.state_dir.is_dir() {
            return Ok(None);
        }
        Ok(Some(StateLock::acquire(&self.state_dir, kind, self.wait)?))
    }

    fn unflushed_path(&self) -> PathBuf {
        self.state_dir.join(UNFLUSHED_FILE)
    }

    /// The marker of writes left to the page cache by the last journaled write, if any.
    fn unflushed(&self) -> Result<Option<Unflushed>, Error> {
        let path = self.unflushed_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::ForeignJournal {
                        path: path.clone(),
                        what: format!("not a marker this version understands ({e})"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io_err(&path)(e)),
        }
    }

    /// Whether writes of the last journaled write may have been lost by a reboot since, so
    /// the files must not be read before `recover` (or the next writer) rolls them forward.
    pub(crate) fn unflushed_after_reboot(&self) -> Result<bool, Error> {
        Ok(self.unflushed()?.is_some_and(|u| !self.same_boot(&u)))
    }

    /// Makes the writes named by `unflushed.json` durable and removes it (see
    /// [`crate::journal`], "Unflushed writes"). Runs under the exclusive lock; a pending journal
    /// is left to recovery, which finishes both.
    fn finish_unflushed(&self) -> Result<Option<RecoverReport>, Error> {
        let start = Instant::now();
        let Some(u) = self.unflushed()? else {
            return Ok(None);
        };
        if self.journal_path().exists() {
            return Ok(None);
        }
        let same_boot = self.same_boot(&u);
        let mut report = RecoverReport {
            action: "flushed".into(),
            generation: u.generation,
            blocks: ApplyStats::default(),
            seconds: 0.0,
        };
        if !(same_boot && self.fsync_unflushed(&u.files).is_ok()) {
            let path = self.state_dir.join(UNDO_DIR).join(undo_name(u.generation));
            let JournalState::Committed(journal) = Journal::open(self.io.as_ref(), &path)? else {
                return Err(JournalError::Corrupt {
                    path,
                    what: "the journal of unflushed writes is not committed".into(),
                }
                .into());
            };
            report = self.complete_at(journal, true, start, false, None)?;
        }
        self.clear_unflushed()?;
        report.seconds = seconds_since(start);
        self.flushed_ns.store(
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(Some(report))
    }

    /// Fsyncs the named model files.
    fn fsync_unflushed(&self, files: &[String]) -> Result<(), Error> {
        files.par_iter().try_for_each(|f| {
            let p = &self.model_dir.join(f);
            self.io
                .open(p, OpenMode::ReadWrite)
                .and_then(|f| f.sync())
                .map_err(Self::io_err(p))
        })
    }

    /// Removes `unflushed.json` durably, if it is there.
    fn clear_unflushed(&self) -> Result<(), Error> {
        let path = self.unflushed_path();
        if !path.exists() {
            return Ok(());
        }
        self.io.remove_file(&path).map_err(Self::io_err(&path))?;
        self.io
            .sync_dir(&self.state_dir)
            .map_err(Self::io_err(&self.state_dir))
    }

    /// Makes `unflushed.json` durable for `generation`, before its journal is retired.
    fn mark_unflushed(&self, generation: u64, files: &[JournalFile]) -> Result<(), Error> {
        let marker = Unflushed {
            generation,
            boot_id: self.io.boot_id(),
            files: files.iter().map(|f| f.name.clone()).collect(),
        };
        let bytes = serde_json::to_vec(&marker).expect("plain data serializes");
        write_atomic(self.io.as_ref(), &self.unflushed_path(), &bytes)
    }

    /// Whether the writes `u` names were made in this boot (an unknown boot never is).
    fn same_boot(&self, u: &Unflushed) -> bool {
        !u.boot_id.is_empty() && u.boot_id == self.io.boot_id()
    }

    pub(crate) fn open_index(&self) -> Result<Option<BlockIndex>, Error> {
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

    pub(crate) fn require_index(&self) -> Result<BlockIndex, Error> {
        self.open_index()?.ok_or_else(|| Error::NotInitialized {
            state_dir: self.state_dir.clone(),
            model_dir: self.model_dir.clone(),
        })
    }

    pub(crate) fn refuse_if_journal_pending(&self) -> Result<(), Error> {
        let path = self.journal_path();
        if path.exists() {
            return Err(Error::JournalPending {
                path,
                model_dir: self.model_dir.clone(),
            });
        }
        Ok(())
    }

    /// Whether an index exists.
    pub fn is_initialized(&self) -> Result<bool, Error> {
        Ok(self.open_index()?.is_some())
    }

    /// Builds the index by hashing every block of the model's files.
    pub fn init(&self, block_size: u64) -> Result<InitReport, Error> {
        BlockLayout::new(block_size)?;
        let _lock = self.lock(LockKind::Exclusive)?;
        self.refuse_if_journal_pending()?;
        self.init_locked(block_size)
    }

    fn init_locked(&self, block_size: u64) -> Result<InitReport, Error> {
        self.init_as(block_size, None, 0, "init")
    }

    /// Indexes the model as generation `generation` of model `model_id` (a fresh id if `None`),
    /// recording a generation of kind `kind`.
    pub(crate) fn init_as(
        &self,
        block_size: u64,
        model_id: Option<&str>,
        generation: u64,
        kind: &str,
    ) -> Result<InitReport, Error> {
        let start = Instant::now();
        let layout = BlockLayout::new(block_size)?;
        if self.open_index()?.is_some() {
            return Err(Error::AlreadyInitialized {
                state_dir: self.state_dir.clone(),
            });
        }
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        let mut index = BlockIndex::open(&self.state_dir)?;
        let model_id = model_id.map_or_else(|| new_model_id(&model), str::to_string);
        let data_bytes = model.data_bytes();
        let blocks = self.rebuild(
            &mut index,
            &model,
            layout,
            |rebuild| {
                rebuild.set_meta("model_id", &model_id)?;
                rebuild.set_meta("block_size", &block_size.to_string())?;
                rebuild.set_meta("hash_scheme", blockhash::SCHEME)?;
                rebuild.set_meta("created_at", &unix_ms().to_string())?;
                rebuild.set_meta(
                    "retain_generations",
                    &DEFAULT_RETAIN_GENERATIONS.to_string(),
                )?;
                rebuild.set_meta(
                    "retain_bytes",
                    &(data_bytes / DEFAULT_RETAIN_FRACTION)
                        .max(MIN_DEFAULT_RETAIN_BYTES)
                        .to_string(),
                )
            },
            |bytes, seconds| GenerationRecord {
                generation,
                kind: kind.into(),
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
            generation,
            files: model.files.len(),
            tensors: model.tensors.len(),
            bytes_hashed: data_bytes,
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
        for batch in plan::hash_batches(model.tensors.iter().map(|t| t.entry.len), layout) {
            let mut hashes: Vec<Vec<Cv>> = batch
                .clone()
                .map(|i| vec![[0u8; 32]; layout.blocks(model.tensors[i].entry.len) as usize])
                .collect();
            let per_item = (plan::ITEM_BYTES / layout.block_size).max(1) as usize;
            let mut items = Vec::new();
            for (cvs, i) in hashes.iter_mut().zip(batch.clone()) {
                for (k, chunk) in cvs.chunks_mut(per_item).enumerate() {
                    items.push((i, (k * per_item) as u64, chunk));
                }
            }
            items.into_par_iter().try_for_each(|(i, first, out)| {
                source.hash_units(i, layout.block_size, first, out)?;
                let len = model.tensors[i].entry.len;
                pb.inc((out.len() as u64 * layout.block_size).min(len - first * layout.block_size));
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
    pub(crate) fn check_trusted(
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
        let by_name: HashMap<&str, &IndexedTensor> =
            tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let same = tensors.len() == model.tensors.len()
            && model.tensors.iter().all(|t| {
                by_name.get(t.entry.name.as_str()).is_some_and(|it| {
                    t.entry.offset == it.offset
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

    /// Brings the model files up to date with `source`, writing only the blocks that changed,
    /// through the journal.
    pub fn sync(&self, source: &dyn WeightSource) -> Result<SyncReport, Error> {
        let start = Instant::now();
        let _lock = self.lock(LockKind::Exclusive)?;
        let recovered = self.recover_locked()?;
        let recovered = (recovered.action != "none").then_some(recovered);
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

        let flush = self.flushed_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        let mut phases = SyncPhases {
            flush,
            check: (seconds_since(start) - flush).max(0.0),
            ..SyncPhases::default()
        };
        let mut lap = Instant::now();
        let pb = progress_bar(self.progress, bytes_compared, "comparing");
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
        if plans.is_empty() {
            report.model_bytes_read = self.io.bytes_read().saturating_sub(read_before);
            report.seconds = seconds_since(start);
            report.phases = phases;
            index.set_last_sync(&last_sync_json(&report))?;
            return Ok(report);
        }

        // The files that change, opened read-write; their slot in the journal's file table.
        lap = Instant::now();
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

        // Journal: old ⊕ new of every changed block, then the commit record.
        let journal_path = self.journal_path();
        let header = JournalHeader {
            kind: JournalKind::Sync,
            block_size: layout.block_size as u32,
            model_id: index.meta("model_id")?.unwrap_or_default(),
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
            info: serde_json::json!({
                "source": report.source,
                "tensors": report.tensors,
                "bytes_compared": report.bytes_compared,
            }),
        };
        let journaled = self
            .write_journal(
                &journal_path,
                &header,
                &plans,
                &model,
                &handles,
                &slot,
                source,
                layout,
            )
            .inspect_err(|_| self.discard_uncommitted(&journal_path))?;
        report.journal_bytes = journaled.bytes;
        report.blocks_changed = journaled.blocks;
        report.bytes_changed = journaled.bytes_changed;
        report.bytes_differing = journaled.differing;
        let new_cvs = journaled.new_cvs;
        phases.journal = seconds_since(lap);

        // Apply: roll the journal forward (the code recovery runs), then make the files durable.
        lap = Instant::now();
        let JournalState::Committed(journal) = Journal::open(self.io.as_ref(), &journal_path)?
        else {
            return Err(JournalError::Corrupt {
                path: journal_path,
                what: "not committed after its commit record was written".into(),
            }
            .into());
        };
        apply::roll_forward(&journal, &handles)?;
        drop(journal);
        let file_stats = file_stats(&handles, &header.files, false)?;
        phases.apply = seconds_since(lap);

        // Commit: hashes, stats, generation and its ranges in one transaction.
        lap = Instant::now();
        let mut ranges: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        let mut updates = Vec::new();
        for (p, cvs) in plans.iter().zip(new_cvs) {
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
        report.generation = current + 1;
        report.changed = true;
        report.files_changed = file_stats.iter().map(|(n, _)| n.clone()).collect();
        report.model_bytes_read = self.io.bytes_read().saturating_sub(read_before);
        report.seconds = seconds_since(start);
        let commit = SyncCommit {
            updates,
            file_stats,
            generation: Some(GenerationRecord {
                generation: report.generation,
                kind: JournalKind::Sync.name().into(),
                created_at_ms: unix_ms(),
                source: report.source.clone(),
                tensors: report.tensors as u64,
                bytes_compared: report.bytes_compared,
                blocks_changed: report.blocks_changed,
                bytes_changed: report.bytes_changed,
                seconds: report.seconds,
            }),
            ranges,
            last_sync: Some(last_sync_json(&report)),
        };
        index.commit_sync(&commit)?;
        phases.commit = seconds_since(lap);
        lap = Instant::now();
        self.retire(&index, report.generation, Some(&header.files))?;
        phases.retire = seconds_since(lap);
        report.phases = phases;
        report.seconds = seconds_since(start);
        Ok(report)
    }

    /// Writes and commits the journal of `plans`: reads and checks the old bytes of every changed
    /// block, reads its new bytes from the source and appends their XOR.
    #[allow(clippy::too_many_arguments)]
    fn write_journal(
        &self,
        path: &Path,
        header: &JournalHeader,
        plans: &[TensorPlan],
        model: &ModelLayout,
        handles: &[Box<dyn FileIo>],
        slot: &HashMap<usize, u32>,
        source: &dyn WeightSource,
        layout: BlockLayout,
    ) -> Result<Journaled, Error> {
        let mut writer = JournalWriter::create(self.io.as_ref(), path, header)?;
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
                .map(|&(i, blocks)| {
                    self.stage_chunk(model, handles, slot, source, layout, &plans[i], i, blocks)
                })
                .collect::<Result<_, Error>>()?;
            for s in staged {
                writer.append(&s.encoded, s.records)?;
                out.blocks += s.records;
                out.bytes_changed += s.bytes;
                out.differing += s.differing;
                out.new_cvs[s.plan].extend(s.cvs);
            }
        }
        out.bytes = writer.commit(self.io.as_ref())?;
        Ok(out)
    }

    /// Removes a journal that failed before the model was touched, so the failure leaves
    /// nothing pending. Best effort: if this fails too, recovery discards or finishes it.
    pub(crate) fn discard_uncommitted(&self, path: &Path) {
        if self.io.remove_file(path).is_ok() {
            let _ = self.io.sync_dir(&self.state_dir);
        }
    }

    /// Reads the old bytes of `blocks`, checks them against their stored hashes, reads the new
    /// bytes from the source and encodes one journal record per block that still differs.
    #[allow(clippy::too_many_arguments)]
    fn stage_chunk(
        &self,
        model: &ModelLayout,
        handles: &[Box<dyn FileIo>],
        slot: &HashMap<usize, u32>,
        source: &dyn WeightSource,
        layout: BlockLayout,
        plan: &TensorPlan,
        plan_index: usize,
        blocks: &[ChangedBlock],
    ) -> Result<Staged, Error> {
        let t = &model.tensors[plan.model];
        let file = slot[&t.file];
        let handle = &handles[file as usize];
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
                .map_err(Self::io_err(handle.path()))?;
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
            // The source may have moved on since the plan: journal what it holds now.
            source.read(plan.source, off, new)?;
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
                file,
                tensor_offset: t.entry.offset,
                block_offset: t.entry.offset + off,
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

    /// Moves the journal of `generation` to the undo data and prunes the undo data to the
    /// retention limits. With `unflushed` (the files it wrote, not fsynced), first marks them
    /// unflushed, and keeps the journal whatever the limits until they are flushed.
    fn retire(
        &self,
        index: &BlockIndex,
        generation: u64,
        unflushed: Option<&[JournalFile]>,
    ) -> Result<(), Error> {
        if let Some(files) = unflushed {
            self.mark_unflushed(generation, files)?;
        }
        let undo = self.state_dir.join(UNDO_DIR);
        self.io.create_dir_all(&undo).map_err(Self::io_err(&undo))?;
        let target = undo.join(undo_name(generation));
        if target.exists() {
            self.io
                .remove_file(&target)
                .map_err(Self::io_err(&target))?;
        }
        self.io
            .rename(&self.journal_path(), &target)
            .map_err(Self::io_err(&target))?;
        self.io.sync_dir(&undo).map_err(Self::io_err(&undo))?;
        self.io
            .sync_dir(&self.state_dir)
            .map_err(Self::io_err(&self.state_dir))?;
        let keep_gens = index
            .meta("retain_generations")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_RETAIN_GENERATIONS);
        let keep_bytes = index
            .meta("retain_bytes")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        // Once anything was exported, undo data not yet exported is kept for export-delta too,
        // up to the backlog limit; beyond it, export ships those generations' blocks whole.
        let exported = index.exported_through()?;
        let backlog_limit = index
            .meta("export_backlog_bytes")?
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| keep_bytes.saturating_mul(DEFAULT_BACKLOG_FACTOR));
        let mut kept = self.undo_files()?;
        let mut removed = false;
        let mut total: u64 = kept.iter().map(|(_, _, len)| len).sum();
        let unexported = |g: u64| exported.is_some_and(|e| g > e);
        let mut backlog: u64 = kept.iter().filter(|k| unexported(k.0)).map(|k| k.2).sum();
        while let Some(&(g, _, len)) = kept.first() {
            let over = kept.len() as u64 > keep_gens || total > keep_bytes;
            let needed = unflushed.is_some() && g == generation;
            if !over || needed || (unexported(g) && backlog <= backlog_limit) {
                break;
            }
            let (_, path, _) = kept.remove(0);
            self.io.remove_file(&path).map_err(Self::io_err(&path))?;
            total -= len;
            if unexported(g) {
                backlog -= len;
            }
            removed = true;
        }
        if removed {
            self.io.sync_dir(&undo).map_err(Self::io_err(&undo))?;
        }
        Ok(())
    }

    /// Undo files, oldest first: (generation, path, bytes).
    pub(crate) fn undo_files(&self) -> Result<Vec<(u64, PathBuf, u64)>, Error> {
        let undo = self.state_dir.join(UNDO_DIR);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&undo) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Self::io_err(&undo)(e)),
        };
        for e in entries {
            let e = e.map_err(Self::io_err(&undo))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(g) = name
                .strip_suffix(".apj")
                .and_then(|g| g.parse::<u64>().ok())
            {
                let len = e.metadata().map_err(Self::io_err(&e.path()))?.len();
                out.push((g, e.path(), len));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Finishes or discards an interrupted write, taking the lock.
    pub fn recover(&self) -> Result<RecoverReport, Error> {
        let _lock = self.lock_only(LockKind::Exclusive)?;
        self.recover_locked()
    }

    pub(crate) fn recover_locked(&self) -> Result<RecoverReport, Error> {
        let start = Instant::now();
        let path = self.journal_path();
        let journal = match Journal::open(self.io.as_ref(), &path)? {
            JournalState::Absent => {
                if let Some(report) = self.finish_unflushed()? {
                    return Ok(report);
                }
                let generation = match self.open_index()? {
                    Some(index) => index.generation()?.unwrap_or(0),
                    None => 0,
                };
                return Ok(RecoverReport {
                    action: "none".into(),
                    generation,
                    blocks: ApplyStats::default(),
                    seconds: seconds_since(start),
                });
            }
            JournalState::Uncommitted => {
                // The commit record never became durable, so no model byte was written.
                self.io.remove_file(&path).map_err(Self::io_err(&path))?;
                self.io
                    .sync_dir(&self.state_dir)
                    .map_err(Self::io_err(&self.state_dir))?;
                let generation = match self.open_index()? {
                    Some(index) => index.generation()?.unwrap_or(0),
                    None => 0,
                };
                return Ok(RecoverReport {
                    action: "discarded".into(),
                    generation,
                    blocks: ApplyStats::default(),
                    seconds: seconds_since(start),
                });
            }
            JournalState::Committed(j) => j,
        };
        self.complete(journal, true, start)
    }

    /// Rolls a committed journal forward, commits the index (unless it already holds the
    /// journal's target generation) and retires the journal: the end of every journaled write,
    /// and all of recovery. A write leaves the files to the page cache and marks them unflushed;
    /// recovery makes them and the index durable before it retires the journal.
    pub(crate) fn complete(
        &self,
        journal: Journal,
        recovering: bool,
        start: Instant,
    ) -> Result<RecoverReport, Error> {
        self.complete_at(journal, recovering, start, true, None)
    }

    /// [`Self::complete`] of a write that already has its files open for writing, in the
    /// order of the journal's file table (their maps are then read once, not twice).
    pub(crate) fn complete_open(
        &self,
        journal: Journal,
        start: Instant,
        files: Vec<Box<dyn FileIo>>,
    ) -> Result<RecoverReport, Error> {
        self.complete_at(journal, false, start, true, Some(files))
    }

    /// [`Self::complete`] for a journal at `journal.path`; `retire`: false for a journal already
    /// in `undo/` (unflushed writes finished after a reboot).
    fn complete_at(
        &self,
        journal: Journal,
        recovering: bool,
        start: Instant,
        retire: bool,
        opened: Option<Vec<Box<dyn FileIo>>>,
    ) -> Result<RecoverReport, Error> {
        let path = journal.path.clone();
        let foreign = |what: String| Error::ForeignJournal {
            path: path.clone(),
            what,
        };
        let mut index = self
            .open_index()?
            .ok_or_else(|| foreign("there is no index for it in this state directory".into()))?;
        let h = journal.header.clone();
        let model_id = index.meta("model_id")?.unwrap_or_default();
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
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        let indexed_files = index.files()?;
        let mut opened = opened
            .filter(|o| o.len() == h.files.len())
            .map(Vec::into_iter);
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
                return Err(foreign(format!(
                    "its file {} is not the model's file of that name",
                    jf.name
                )));
            }
            if let Some(f) = opened.as_mut().and_then(Iterator::next) {
                handles.push(f);
                continue;
            }
            let p = self.model_dir.join(&jf.name);
            handles.push(
                self.io
                    .open(&p, OpenMode::ReadWrite)
                    .map_err(Self::io_err(&p))?,
            );
        }
        let blocks = apply::roll_forward(&journal, &handles)?;
        let file_stats = file_stats(&handles, &h.files, recovering)?;
        let mut commit = SyncCommit {
            file_stats,
            ..SyncCommit::default()
        };
        if current == h.base_generation {
            let (updates, ranges, bytes_changed) =
                Self::hashes_after(&self.model_dir, &journal, &index, &handles, layout)?;
            let info = &h.info;
            commit.generation = Some(GenerationRecord {
                generation: h.target_generation,
                kind: h.kind.name().into(),
                created_at_ms: unix_ms(),
                source: format!(
                    "{}{}",
                    info.get("source")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("?"),
                    if recovering { " (recovered)" } else { "" }
                ),
                tensors: info
                    .get("tensors")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                bytes_compared: info
                    .get("bytes_compared")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                blocks_changed: journal.count,
                bytes_changed,
                seconds: seconds_since(start),
            });
            commit.updates = updates;
            commit.ranges = ranges;
        }
        index.commit_sync(&commit)?;
        drop(journal);
        if retire {
            self.retire(
                &index,
                h.target_generation,
                (!recovering).then_some(&h.files[..]),
            )?;
        }
        if recovering {
            self.clear_unflushed()?;
        }
        Ok(RecoverReport {
            action: "rolled_forward".into(),
            generation: h.target_generation,
            blocks,
            seconds: seconds_since(start),
        })
    }

    /// The new block hashes, changed ranges and changed bytes of a journal rolled forward, read
    /// back from the files.
    fn hashes_after(
        model_dir: &Path,
        journal: &Journal,
        index: &BlockIndex,
        handles: &[Box<dyn FileIo>],
        layout: BlockLayout,
    ) -> Result<(Vec<HashUpdate>, FileRanges, u64), Error> {
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
        let model_dir = model_dir.to_path_buf();
        let mut updates: BTreeMap<i64, Vec<(u64, Cv)>> = BTreeMap::new();
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
                    h.read_at(r.block_offset, &mut block)
                        .map_err(Self::io_err(h.path()))?;
                    let rel = r.block_offset - r.tensor_offset;
                    let cv = blockhash::subtree_cv(rel, &block);
                    if hash_prefix(&cv) != r.new {
                        return Err(Error::TargetMismatch {
                            file: name.to_string(),
                            offset: r.block_offset,
                            end: r.block_offset + u64::from(r.len),
                            target: journal.header.target_generation,
                            model_dir: model_dir.clone(),
                        });
                    }
                    Ok((t.id, rel / layout.block_size, cv))
                })
                .collect::<Result<_, Error>>()?;
            for (r, (id, block, cv)) in batch.iter().zip(hashed) {
                updates.entry(id).or_default().push((block, cv));
                ranges
                    .entry(r.file as usize)
                    .or_default()
                    .push((r.block_offset, u64::from(r.len)));
                bytes += u64::from(r.len);
            }
            Ok::<_, Error>(())
        })?;
        let updates = updates
            .into_iter()
            .map(|(tensor_id, mut blocks)| {
                blocks.sort_unstable_by_key(|b| b.0);
                HashUpdate { tensor_id, blocks }
            })
            .collect();
        let ranges = ranges
            .into_iter()
            .map(|(f, r)| (names[f].to_string(), merge_ranges(r)))
            .collect();
        Ok((updates, ranges, bytes))
    }

    /// Restores the files to generation `to` (default: the one before the current) from the
    /// retained undo data. The rollback is journaled like a sync and recorded as a new generation.
    pub fn rollback(&self, to: Option<u64>) -> Result<RollbackReport, Error> {
        let start = Instant::now();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.refuse_if_journal_pending()?;
        let index = self.require_index()?;
        let layout = index.block_layout()?;
        let current = index.generation()?.unwrap_or(0);
        let to = to.unwrap_or(current.saturating_sub(1));
        if to >= current {
            return Err(Error::RollbackTarget { to, current });
        }
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
        self.check_trusted(&index, &model)?;
        // The undo data of every generation after `to`, newest first.
        let undo: HashMap<u64, PathBuf> = self
            .undo_files()?
            .into_iter()
            .map(|(g, p, _)| (g, p))
            .collect();
        let earliest = (0..=current)
            .rev()
            .take_while(|g| *g == current || undo.contains_key(&(g + 1)))
            .last()
            .unwrap_or(current);
        let mut journals = Vec::new();
        for g in (to + 1..=current).rev() {
            let kind = index
                .generation_record(g)?
                .map(|r| r.kind)
                .unwrap_or_default();
            let why = if kind == "reindex" {
                "it re-indexed files changed by another program, so there is nothing to undo"
                    .to_string()
            } else {
                "it was pruned by the retention limits".to_string()
            };
            let missing = || Error::NoUndo {
                to,
                missing: g,
                why: why.clone(),
                earliest,
            };
            let path = undo.get(&g).ok_or_else(missing)?;
            match Journal::open(self.io.as_ref(), path)? {
                JournalState::Committed(j) if j.header.target_generation == g => journals.push(j),
                _ => return Err(missing()),
            }
        }
        // Compose the XORs of every block, keyed by (file, offset).
        let mut composed: BTreeMap<(String, u64), ComposedBlock> = BTreeMap::new();
        for j in &journals {
            j.for_each_batch(64 << 20, |batch| {
                for r in batch {
                    let key = (j.header.files[r.file as usize].name.clone(), r.block_offset);
                    match composed.get_mut(&key) {
                        None => {
                            composed.insert(key, (r.tensor_offset, r.len, r.payload));
                        }
                        Some(entry) => {
                            let mut delta = vec![0u8; r.len as usize];
                            let bad = || JournalError::Corrupt {
                                path: j.path.clone(),
                                what: "malformed payload".into(),
                            };
                            crate::journal::apply_xor(&entry.2, &mut delta).ok_or_else(bad)?;
                            crate::journal::apply_xor(&r.payload, &mut delta).ok_or_else(bad)?;
                            let mut payload = Vec::new();
                            encode_xor(&vec![0u8; delta.len()], &delta, &mut payload);
                            entry.2 = payload;
                        }
                    }
                }
                Ok::<_, Error>(())
            })?;
        }
        drop(journals);
        // One rollback journal: the current bytes as old, current ⊕ composed as new.
        let mut names: Vec<String> = composed.keys().map(|(f, _)| f.clone()).collect();
        names.dedup();
        let mut files = Vec::new();
        let mut handles = Vec::new();
        for name in &names {
            let f = model
                .files
                .iter()
                .find(|f| &f.name == name)
                .ok_or_else(|| Error::ForeignJournal {
                    path: self.state_dir.join(UNDO_DIR),
                    what: format!("the undo data names {name}, which is not a file of the model"),
                })?;
            files.push(JournalFile {
                name: name.clone(),
                size: f.stat.size,
            });
            let p = self.model_dir.join(name);
            handles.push(self.io.open(&p, OpenMode::Read).map_err(Self::io_err(&p))?);
        }
        let header = JournalHeader {
            kind: JournalKind::Rollback,
            block_size: layout.block_size as u32,
            model_id: index.meta("model_id")?.unwrap_or_default(),
            base_generation: current,
            target_generation: current + 1,
            created_ms: unix_ms() as u64,
            files,
            info: serde_json::json!({
                "source": format!("rollback from generation {current} to generation {to}"),
                "tensors": model.tensors.len(),
                "bytes_compared": 0,
                "restored_generation": to,
            }),
        };
        let path = self.journal_path();
        let entries: Vec<((String, u64), ComposedBlock)> = composed.into_iter().collect();
        let written = (|| {
            let mut writer = JournalWriter::create(self.io.as_ref(), &path, &header)?;
            let (mut blocks, mut bytes) = (0u64, 0u64);
            for batch in entries.chunks(BLOCKS_PER_CHUNK * CHUNKS_PER_BATCH) {
                let encoded: Vec<Option<Vec<u8>>> = batch
                    .par_iter()
                    .map(|((name, offset), (tensor_offset, len, payload))| {
                        let file = names
                            .binary_search(name)
                            .expect("names come from these keys");
                        let h = &handles[file];
                        let mut block = vec![0u8; *len as usize];
                        h.read_at(*offset, &mut block)
                            .map_err(Self::io_err(h.path()))?;
                        let rel = offset - tensor_offset;
                        let old = blockhash::subtree_cv(rel, &block);
                        crate::journal::apply_xor(payload, &mut block).ok_or_else(|| {
                            JournalError::Corrupt {
                                path: self.state_dir.join(UNDO_DIR),
                                what: "malformed payload".into(),
                            }
                        })?;
                        let new = blockhash::subtree_cv(rel, &block);
                        if new == old {
                            return Ok(None);
                        }
                        let mut out = Vec::new();
                        Record {
                            file: file as u32,
                            tensor_offset: *tensor_offset,
                            block_offset: *offset,
                            len: *len,
                            old: hash_prefix(&old),
                            new: hash_prefix(&new),
                            payload: payload.clone(),
                        }
                        .encode(&mut out);
                        Ok(Some(out))
                    })
                    .collect::<Result<_, Error>>()?;
                for ((_, (_, len, _)), e) in batch.iter().zip(encoded) {
                    if let Some(e) = e {
                        writer.append(&e, 1)?;
                        blocks += 1;
                        bytes += u64::from(*len);
                    }
                }
            }
            Ok::<_, Error>((writer.commit(self.io.as_ref())?, blocks, bytes))
        })();
        let (journal_bytes, blocks_changed, bytes_changed) =
            written.inspect_err(|_| self.discard_uncommitted(&path))?;
        drop(handles);
        drop(index);
        let JournalState::Committed(journal) = Journal::open(self.io.as_ref(), &path)? else {
            return Err(JournalError::Corrupt {
                path,
                what: "not committed after its commit record was written".into(),
            }
            .into());
        };
        let done = self.complete(journal, false, start)?;
        Ok(RollbackReport {
            from_generation: current,
            restored_generation: to,
            generation: done.generation,
            blocks_changed,
            bytes_changed,
            journal_bytes,
            seconds: seconds_since(start),
        })
    }

    /// Reads, and with `set` changes, how much undo data is kept (applied at the next sync).
    pub fn retention(
        &self,
        generations: Option<u64>,
        bytes: Option<u64>,
    ) -> Result<Retention, Error> {
        let _lock = self.lock(if generations.is_some() || bytes.is_some() {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        })?;
        let mut index = self.require_index()?;
        if let Some(g) = generations {
            index.set_meta("retain_generations", &g.to_string())?;
        }
        if let Some(b) = bytes {
            index.set_meta("retain_bytes", &b.to_string())?;
        }
        Ok(Retention {
            generations: index
                .meta("retain_generations")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_RETAIN_GENERATIONS),
            bytes: index
                .meta("retain_bytes")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX),
        })
    }

    /// Reports what the state directory knows, without reading model data.
    pub fn status(&self) -> Result<StatusReport, Error> {
        let _lock = self.lock(LockKind::Shared)?;
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
            undo_generations: 0,
            undo_bytes: 0,
            retain_generations: None,
            retain_bytes: None,
            exported_through: None,
            unexported_generations: 0,
            unexported_bytes: 0,
        };
        let interrupted = self.journal_path().exists() || self.unflushed_after_reboot()?;
        if interrupted {
            report.pending.push(format!(
                "an interrupted write is pending: run `apollo-checkpoint recover --model-dir {}` (sync also recovers first)",
                self.model_dir.display()
            ));
        }
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
        report.retain_generations = index
            .meta("retain_generations")?
            .and_then(|v| v.parse().ok());
        report.retain_bytes = index.meta("retain_bytes")?.and_then(|v| v.parse().ok());
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
                Err(_) => "missing",
                Ok(m) if FileStat::from_metadata(&m) == f.stat => "ok",
                Ok(_) => "modified",
            };
            if state != "ok" && !interrupted {
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
        let _lock = self.lock(if repair {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        })?;
        let mut index = self.require_index()?;
        if repair {
            self.refuse_if_journal_pending()?;
        }
        let layout = index.block_layout()?;
        let model = ModelLayout::open(&self.model_dir, self.io.as_ref())?;
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
        let pb = progress_bar(self.progress, report.bytes_checked, "verifying");
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
            index.commit_sync(&SyncCommit {
                file_stats,
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

/// File name of the undo data of `generation`.
fn undo_name(generation: u64) -> String {
    format!("{generation:020}.apj")
}

/// Writes `bytes` to `path` atomically: hidden temporary, fsync, rename, fsync the folder.
pub(crate) fn write_atomic(io: &dyn Io, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let err = Checkpoint::io_err;
    if tmp.exists() {
        io.remove_file(&tmp).map_err(err(&tmp))?;
    }
    let f = io.create(&tmp).map_err(err(&tmp))?;
    f.write_at(0, bytes).map_err(err(&tmp))?;
    f.sync().map_err(err(&tmp))?;
    drop(f);
    io.rename(&tmp, path).map_err(err(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    io.sync_dir(dir).map_err(err(dir))
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
    fn undo_names_sort_by_generation() {
        assert!(undo_name(9) < undo_name(10));
        assert_eq!(undo_name(7), "00000000000000000007.apj");
    }
}
