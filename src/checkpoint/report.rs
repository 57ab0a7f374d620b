//! What each operation reports: the `--json` objects and the text summaries are made from
//! these. States that code compares are enums; serde renames keep the JSON as documented.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::apply::ApplyStats;
use crate::index::GenerationRecord;

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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// Bytes of stored block hashes and summaries read from the index.
    pub index_bytes_read: u64,
    /// What copying live bytes from a GPU cost (`gpu_bytes_copied`, `gpu_copies`,
    /// `recaptured_blocks`; zeros for host sources).
    #[serde(flatten)]
    pub capture: crate::source::CaptureStats,
    /// What recovery did first, if a journal was pending.
    pub recovered: Option<RecoverReport>,
    /// Wall time.
    pub seconds: f64,
    /// Wall time of each phase, in seconds.
    pub phases: SyncPhases,
}

/// Wall time of each phase of a sync (see the module documentation), in seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncPhases {
    /// Opening the source before the sync began (live weights: manifests, names, GPU contexts
    /// and IPC mappings); not part of `seconds`.
    #[serde(default)]
    pub open: f64,
    /// Opening the index, parsing headers, checking trust, matching names (not `flush`).
    pub check: f64,
    /// Reading the stored block hashes from the index (for a source that hashes where its
    /// data lives, the GPU, at the same time as `plan` hashes the live weights, and inside it).
    #[serde(default)]
    pub index_read: f64,
    /// Hashing the live weights and finding the changed blocks.
    pub plan: f64,
    /// Copying the changed blocks from the source, reading and checking their old bytes,
    /// writing and committing the journal.
    pub journal: f64,
    /// Of `journal`: copying the changed blocks from the source, while the previous copy's
    /// records are staged.
    #[serde(default)]
    pub capture: f64,
    /// Rolling the journal forward into the files.
    pub apply: f64,
    /// Making the previous write's model pages durable (see [`crate::journal`], "Unflushed
    /// writes"): the first step of beginning a write; this sync's own pages are flushed by the
    /// next one.
    pub flush: f64,
    /// The SQLite transaction.
    pub commit: f64,
    /// Moving the journal to the undo data and pruning it.
    pub retire: f64,
}

/// What `log` shows.
#[derive(Clone, Debug, Serialize)]
pub struct LogReport {
    /// Generations, newest first.
    pub generations: Vec<crate::index::GenerationRecord>,
}

/// What `report` found: the bytes each generation of a range changed, per layer and per tensor
/// kind (the data of its heat map).
#[derive(Clone, Debug, Serialize)]
pub struct ChangeReport {
    /// The first generation shown.
    pub first_generation: u64,
    /// The last generation shown.
    pub last_generation: u64,
    /// Each generation of the range, oldest first, with the tensor bytes it changed.
    pub generations: Vec<crate::changemap::GenerationColumn>,
    /// Per layer (`other`: tensors outside the numbered layers), over the whole range.
    pub layers: Vec<crate::changemap::RowTotal>,
    /// Per tensor kind, over the whole range.
    pub kinds: Vec<crate::changemap::RowTotal>,
    /// The heat map written, if `--svg` was given.
    pub svg: Option<PathBuf>,
}

/// What `rollback` did.
#[derive(Clone, Debug, Serialize)]
pub struct RollbackReport {
    /// The generation the files held before.
    pub from_generation: u64,
    /// The generation whose bytes they hold now.
    pub restored_generation: u64,
    /// Its tags (`sync --tag`), which the rollback's generation carries too.
    pub restored_tags: crate::index::Tags,
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

/// What recovery did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryAction {
    /// Nothing was pending.
    None,
    /// An uncommitted journal was discarded: the files were not touched.
    Discarded,
    /// A committed journal was rolled forward.
    RolledForward,
    /// The last write's pages, left to the page cache, were made durable.
    Flushed,
}

/// What `recover` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecoverReport {
    /// What was done.
    pub action: RecoveryAction,
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

/// How a model file compares with what the index recorded, judged from size, mtime and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// As apollo-checkpoint last wrote it.
    Ok,
    /// Changed since.
    Modified,
    /// Gone.
    Missing,
}

impl std::fmt::Display for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileState::Ok => "ok",
            FileState::Modified => "modified",
            FileState::Missing => "missing",
        })
    }
}

/// One file in `status`.
#[derive(Clone, Debug, Serialize)]
pub struct FileStatus {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// How it compares with the index.
    pub state: FileState,
}

/// The stats of the last sync run (changed or not), as `status` shows them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LastSync {
    /// When it ran, Unix milliseconds.
    pub at_ms: i64,
    /// What it did.
    #[serde(flatten)]
    pub report: SyncReport,
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
    pub last_sync: Option<LastSync>,
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
    /// Those of `pending` that a person must act on (a write in progress is not one): no
    /// index, an interrupted write, a file changed behind the index. `status` exits 78 when
    /// there is any, so a monitor can alert on its exit code.
    pub attention: Vec<String>,
    /// The writer holding the lock while this was read (`pid … running …`), if any.
    pub writer: Option<String>,
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

impl StatusReport {
    /// The exit code of `status`: 0, or 78 when something needs a person (see `attention`).
    pub fn exit_code(&self) -> u8 {
        if self.attention.is_empty() { 0 } else { 78 }
    }
}

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

/// What `apply-delta` did with one delta file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ApplyOutcome {
    /// Applied to the replica.
    #[serde(rename = "applied")]
    Applied,
    /// The replica already held its target generation.
    #[serde(rename = "already applied")]
    AlreadyApplied,
    /// The replica's copied files were adopted as its base, then it was applied.
    #[serde(rename = "adopted and applied")]
    AdoptedAndApplied,
    /// The replica was created from it (a full delta).
    #[serde(rename = "created from a full delta")]
    CreatedFromFull,
}

impl std::fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Applied => "applied",
            ApplyOutcome::AlreadyApplied => "already applied",
            ApplyOutcome::AdoptedAndApplied => "adopted and applied",
            ApplyOutcome::CreatedFromFull => "created from a full delta",
        })
    }
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
    /// What was done with it.
    pub outcome: ApplyOutcome,
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
