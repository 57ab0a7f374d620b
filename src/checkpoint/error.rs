//! Errors of the operations, and what each means for the caller: every error has an
//! [`ErrorKind`], and one match turns kinds into the exit codes the README documents.

use std::path::PathBuf;

use crate::apply::ApplyError;
use crate::blockhash;
use crate::delta::DeltaError;
use crate::index::IndexError;
use crate::journal::JournalError;
use crate::live::cuda::CudaError;
use crate::live::handles::HandlesError;
use crate::lock::LockError;
use crate::model::ModelError;
use crate::source::SourceError;

/// What kind of failure an error is: decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The model directory (or a source directory) holds no model (66).
    NoModel,
    /// Bad data: a malformed file, a source that does not match, a damaged journal or delta (65).
    BadData,
    /// An I/O or SQLite error; nothing half-written (74).
    Io,
    /// The state does not allow the command: not initialized, pending recovery, ... (78).
    State,
    /// Another apollo-checkpoint holds the lock (75).
    Busy,
    /// A temporary failure: the live weights kept changing while they were copied (75).
    Temporary,
    /// A bad command line (2).
    Usage,
}

impl ErrorKind {
    /// The process exit code (the README's table).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::NoModel => 66,
            ErrorKind::BadData => 65,
            ErrorKind::Io => 74,
            ErrorKind::State => 78,
            ErrorKind::Busy | ErrorKind::Temporary => 75,
            ErrorKind::Usage => 2,
        }
    }
}

/// The `--model-dir` (and, when it is not the default, `--state-dir`) arguments that name a
/// model, for the commands an error message tells the user to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandTarget {
    /// The model directory.
    pub model_dir: PathBuf,
    /// The state directory, when not `<model_dir>/.apollo-checkpoint`.
    pub state_dir: Option<PathBuf>,
}

impl std::fmt::Display for CommandTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--model-dir {}", shell_word(&self.model_dir))?;
        if let Some(s) = &self.state_dir {
            write!(f, " --state-dir {}", shell_word(s))?;
        }
        Ok(())
    }
}

/// `path` as one shell word: as it is when it needs no quoting, else in single quotes.
fn shell_word(path: &std::path::Path) -> String {
    let s = path.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

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
    /// A key or a delta's MAC failed.
    #[error(transparent)]
    Mac(#[from] crate::mac::MacError),
    /// The state lock is held by another process.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A model file is a symbolic link, and writing it in place would change what it points to.
    #[error(
        "{file} is a symbolic link to {target}: writing the model in place would change that file (in a Hugging Face cache, a blob other revisions share). Make real copies (`huggingface-cli download --local-dir DIR`, or `cp -L`), or pass --follow-symlinks if you own the target and want it written"
    )]
    Symlink {
        /// The link, in the model directory.
        file: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// An OS error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No index yet.
    #[error("{state_dir}: no index yet; run `apollo-checkpoint init {args}` first")]
    NotInitialized {
        /// The state directory.
        state_dir: PathBuf,
        /// The model (and state) directory, as command-line arguments.
        args: CommandTarget,
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
        "{file}: {what} since apollo-checkpoint last wrote it; it is not trusted. Check what changed it, then run `apollo-checkpoint verify --repair {args}` to re-index"
    )]
    Stale {
        /// The file.
        file: String,
        /// What differs.
        what: String,
        /// The model (and state) directory, as command-line arguments.
        args: CommandTarget,
    },
    /// Source and model disagree on names, dtypes or shapes.
    #[error("the source does not match the model ({} differences); nothing was written:\n  {}", .0.len(), .0.join("\n  "))]
    Mismatch(Vec<String>),
    /// An old block's bytes do not match its stored hash.
    #[error(
        "{file}: tensor {tensor} block {block} (bytes {offset}..{end}) does not match the index; the file was changed behind our back. Nothing was written; run `apollo-checkpoint verify {args}` to see what changed"
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
        /// The model (and state) directory, as command-line arguments.
        args: CommandTarget,
    },
    /// A journal is pending and this command does not recover it.
    #[error(
        "{path}: an interrupted write is pending; run `apollo-checkpoint recover {args}` (or `sync`, which recovers first)"
    )]
    JournalPending {
        /// The journal.
        path: PathBuf,
        /// The model (and state) directory, as command-line arguments.
        args: CommandTarget,
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
    Handles(#[from] HandlesError),
    /// Live weights on the GPU cannot be read.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// A delta file is damaged or unsafe.
    #[error(transparent)]
    Delta(#[from] DeltaError),
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
        "{file}: after applying generation {target}, the block at bytes {offset}..{end} does not hold the expected bytes; run `apollo-checkpoint verify {args}`"
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
        /// The model (and state) directory, as command-line arguments.
        args: CommandTarget,
    },
    /// A command line that cannot work (arguments that contradict each other or the source).
    #[error("{0}")]
    Usage(String),
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
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Model(e) => e.kind(),
            Error::Index(e) => e.kind(),
            Error::Source(e) => e.kind(),
            Error::Journal(e) => e.kind(),
            Error::Apply(e) => e.kind(),
            Error::Lock(e) => e.kind(),
            Error::Mac(e) => match e {
                crate::mac::MacError::Io { .. } => ErrorKind::Io,
                crate::mac::MacError::Missing { .. } | crate::mac::MacError::Mismatch { .. } => {
                    ErrorKind::BadData
                }
                _ => ErrorKind::State,
            },
            Error::Handles(e) => e.kind(),
            Error::Delta(e) => e.kind(),
            Error::Cuda(e) => e.kind(),
            Error::Io { .. } => ErrorKind::Io,
            Error::Usage(_) => ErrorKind::Usage,
            Error::Mismatch(_)
            | Error::OldBlockChanged { .. }
            | Error::BaseMismatch { .. }
            | Error::TargetMismatch { .. } => ErrorKind::BadData,
            Error::NotInitialized { .. }
            | Error::AlreadyInitialized { .. }
            | Error::BlockSize(_)
            | Error::Stale { .. }
            | Error::JournalPending { .. }
            | Error::RollbackTarget { .. }
            | Error::NoUndo { .. }
            | Error::ExportBase { .. }
            | Error::ReplicaMismatch { .. }
            | Error::Symlink { .. }
            | Error::ForeignJournal { .. } => ErrorKind::State,
        }
    }

    /// The process exit code for this error (documented in the README).
    pub fn exit_code(&self) -> u8 {
        self.kind().exit_code()
    }
}

impl ModelError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ModelError::NoModel { .. } => ErrorKind::NoModel,
            ModelError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::BadData,
        }
    }
}

impl SourceError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Model(e) => e.kind(),
            SourceError::Io { .. } => ErrorKind::Io,
            SourceError::Unstable { .. } => ErrorKind::Temporary,
            _ => ErrorKind::BadData,
        }
    }
}

impl IndexError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            IndexError::Sqlite { .. } | IndexError::Spill { .. } => ErrorKind::Io,
            _ => ErrorKind::State,
        }
    }
}

impl JournalError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            JournalError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::BadData,
        }
    }
}

impl ApplyError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::Journal(e) => e.kind(),
            ApplyError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::BadData,
        }
    }
}

impl LockError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LockError::Busy { .. } => ErrorKind::Busy,
            _ => ErrorKind::Io,
        }
    }
}

impl HandlesError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HandlesError::Io { .. } => ErrorKind::Io,
            HandlesError::Version { .. } => ErrorKind::State,
            _ => ErrorKind::BadData,
        }
    }
}

impl DeltaError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeltaError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::BadData,
        }
    }
}

impl CudaError {
    /// What kind of failure this is: the machine or the producer, not the data.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::State
    }
}
