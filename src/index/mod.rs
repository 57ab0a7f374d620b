//! The block index: what the model files held when apollo-checkpoint last wrote or indexed them.
//!
//! It lives in `<state-dir>/index.db`, a SQLite database (WAL, `synchronous=FULL`) whose schema is
//! the SQL in `migrations/`, applied in order and counted by `PRAGMA user_version`. Per file it
//! records size, mtime, inode and a hash of the header, so a file replaced or edited behind our
//! back is noticed; per tensor its place, dtype, shape and one BLOB of block hashes, with the
//! hashes changed since they were last folded in kept apart in `block_hash_log`; per generation
//! its stats and the byte ranges it changed.
//!
//! Invariant: the index is only ever changed in one transaction that also records what it is
//! consistent with (the files' stats after their new data was written), so a crash leaves
//! either the old or the new index, never a mix.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::path::{Path, PathBuf};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension};

use crate::blockhash::{self, BlockLayout, Cv};
use crate::io::FileStat;
mod spill;
mod write;

pub use spill::{HashSpill, SortedHashes};
pub use write::{Rebuild, SyncTxn};

/// The migrations, in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_exports.sql"),
    include_str!("../../migrations/0003_hash_log.sql"),
    include_str!("../../migrations/0004_ctime.sql"),
    include_str!("../../migrations/0005_tags.sql"),
    include_str!("../../migrations/0006_summaries.sql"),
];
/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;
/// File name of the index inside the state directory.
pub const INDEX_DB: &str = "index.db";

/// Errors of the block index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// SQLite failed.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The database was written by a newer apollo-checkpoint.
    #[error(
        "{path}: schema version {found} is newer than this apollo-checkpoint supports ({supported}); upgrade apollo-checkpoint (the index is left as it is)"
    )]
    NewerSchema {
        /// The database.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The newest this binary knows.
        supported: u32,
    },
    /// Reading or writing the scratch runs of new block hashes failed.
    #[error("{path}: temporary file of new block hashes: {source}")]
    Spill {
        /// The directory the runs go to.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The database has an older schema, and only a writer may upgrade it.
    #[error(
        "{path}: schema version {found} is older than this apollo-checkpoint's ({supported}); any writing command (`apollo-checkpoint recover`, or the next sync) upgrades it"
    )]
    OlderSchema {
        /// The database.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The version this binary writes.
        supported: u32,
    },
    /// The database exists but holds something this binary cannot use.
    #[error(
        "{path}: the index is damaged ({what}); run `apollo-checkpoint verify --repair` to rebuild it from the files"
    )]
    Corrupt {
        /// The database.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A file as the index remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedFile {
    /// Row id.
    pub id: i64,
    /// Name relative to the model directory.
    pub name: String,
    /// Size, mtime and inode after our last write.
    pub stat: FileStat,
    /// Header length.
    pub header_len: u64,
    /// BLAKE3 of the first `8 + header_len` bytes.
    pub header_hash: [u8; 32],
}

/// A tensor as the index remembers it (its hashes are loaded separately).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedTensor {
    /// Row id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Row id of its file.
    pub file_id: i64,
    /// Absolute offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
}

/// What made a generation. Stored in `generations.kind` as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenerationKind {
    /// `init`: the files as they were indexed.
    Init,
    /// A sync from live weights.
    Sync,
    /// A rollback to an earlier generation's bytes.
    Rollback,
    /// A delta applied to a replica.
    ApplyDelta,
    /// `verify --repair` re-indexed files changed behind the index.
    Reindex,
    /// A replica adopted the files copied into it.
    Adopt,
    /// A replica created from a full delta.
    FullDelta,
}

impl GenerationKind {
    const ALL: [GenerationKind; 7] = [
        GenerationKind::Init,
        GenerationKind::Sync,
        GenerationKind::Rollback,
        GenerationKind::ApplyDelta,
        GenerationKind::Reindex,
        GenerationKind::Adopt,
        GenerationKind::FullDelta,
    ];

    /// Its name, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            GenerationKind::Init => "init",
            GenerationKind::Sync => "sync",
            GenerationKind::Rollback => "rollback",
            GenerationKind::ApplyDelta => "apply-delta",
            GenerationKind::Reindex => "reindex",
            GenerationKind::Adopt => "adopt",
            GenerationKind::FullDelta => "full-delta",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for GenerationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The keys of the `meta` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    /// The model's identity (32 hex digits), written by `init`.
    ModelId,
    /// Bytes per block.
    BlockSize,
    /// The block hash scheme.
    HashScheme,
    /// When the index was created, Unix milliseconds.
    CreatedAt,
    /// Generations whose undo data is kept.
    RetainGenerations,
    /// Bytes of undo data kept.
    RetainBytes,
    /// Undo bytes kept for export-delta beyond the retention limits.
    ExportBacklogBytes,
    /// JSON stats of the last sync run.
    LastSync,
}

impl MetaKey {
    fn name(self) -> &'static str {
        match self {
            MetaKey::ModelId => "model_id",
            MetaKey::BlockSize => "block_size",
            MetaKey::HashScheme => "hash_scheme",
            MetaKey::CreatedAt => "created_at",
            MetaKey::RetainGenerations => "retain_generations",
            MetaKey::RetainBytes => "retain_bytes",
            MetaKey::ExportBacklogBytes => "export_backlog_bytes",
            MetaKey::LastSync => "last_sync",
        }
    }
}

/// One generation's row.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GenerationRecord {
    /// Its number.
    pub generation: u64,
    /// What made it.
    pub kind: GenerationKind,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// Where the weights came from.
    pub source: String,
    /// Tensors compared.
    pub tensors: u64,
    /// Bytes compared.
    pub bytes_compared: u64,
    /// Blocks written.
    pub blocks_changed: u64,
    /// Bytes written.
    pub bytes_changed: u64,
    /// Wall time.
    pub seconds: f64,
    /// `sync --tag` pairs (e.g. step = 41200).
    pub tags: Tags,
}

/// The columns [`generation_row`] reads, in its order.
const GENERATION_COLUMNS: &str = "generation, kind, created_at, source, tensors, bytes_compared, blocks_changed, bytes_changed, seconds, tags";

/// A `generations` row selected as [`GENERATION_COLUMNS`].
fn generation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GenerationRecord> {
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, what.into())
    };
    let kind: String = r.get(1)?;
    let kind = GenerationKind::from_name(&kind)
        .ok_or_else(|| bad(1, format!("generation kind {kind:?}")))?;
    let tags: String = r.get(9)?;
    let tags = serde_json::from_str(&tags).map_err(|e| bad(9, format!("tags {tags:?}: {e}")))?;
    Ok(GenerationRecord {
        generation: r.get::<_, i64>(0)? as u64,
        kind,
        created_at_ms: r.get(2)?,
        source: r.get(3)?,
        tensors: r.get::<_, i64>(4)? as u64,
        bytes_compared: r.get::<_, i64>(5)? as u64,
        blocks_changed: r.get::<_, i64>(6)? as u64,
        bytes_changed: r.get::<_, i64>(7)? as u64,
        seconds: r.get(8)?,
        tags,
    })
}

/// A generation's tags: KEY=VALUE pairs, sorted by key.
pub type Tags = std::collections::BTreeMap<String, String>;

/// Byte ranges per file: (file name, sorted merged (offset, len) pairs).
pub type FileRanges = Vec<(String, Vec<(u64, u64)>)>;

/// One exported delta file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExportRow {
    /// Base generation (`None` for a full delta).
    pub base_generation: Option<u64>,
    /// Target generation.
    pub target_generation: u64,
    /// File name in the outbox.
    pub file: String,
    /// The outbox.
    pub outbox: String,
    /// Size.
    pub bytes: u64,
    /// Hex BLAKE3 of the file.
    pub blake3: String,
    /// Blocks shipped whole because their undo data was gone.
    pub full_blocks: u64,
    /// Whether `--prune-through` removed it.
    pub pruned: bool,
}

/// New hashes for some blocks of one tensor.
#[derive(Clone, Debug, Default)]
pub struct HashUpdate {
    /// Tensor row id.
    pub tensor_id: i64,
    /// (block index, new hash), sorted by block index.
    pub blocks: Vec<(u64, Cv)>,
}

/// Everything a sync commits, in one transaction.
#[derive(Debug, Default)]
pub struct SyncCommit {
    /// New block hashes.
    pub hashes: HashSpill,
    /// Files' stats after their new bytes were made durable.
    pub file_stats: Vec<(String, FileStat)>,
    /// The new generation, if anything changed.
    pub generation: Option<GenerationRecord>,
    /// Changed ranges of that generation, per file: sorted merged (offset, len).
    pub ranges: FileRanges,
    /// JSON stats of this run, changed or not (absent when recovery commits).
    pub last_sync: Option<String>,
    /// New summaries, by tensor id. A tensor whose block hashes this commit changes and that
    /// has no entry here loses its summaries (they become unknown, see
    /// [`BlockIndex::tensors_summaries`]).
    pub summaries: HashMap<i64, NewSummaries>,
    /// Tensors whose summaries become unknown (found stale by `verify`).
    pub forget_summaries: Vec<i64>,
}

/// A tensor's new summaries in a [`SyncCommit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewSummaries {
    /// All of them (they were unknown, or most changed).
    All(Vec<Cv>),
    /// Those that changed, (summary number, hash), sorted; the rest are as stored.
    Some(Vec<(u64, Cv)>),
}

/// Encodes merged ranges as the `generation_ranges.ranges` BLOB.
pub fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranges.len() * 16);
    for &(off, len) in ranges {
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

/// Decodes a `generation_ranges.ranges` BLOB.
pub fn decode_ranges(blob: &[u8]) -> Option<Vec<(u64, u64)>> {
    if blob.len() % 16 != 0 {
        return None;
    }
    Some(
        blob.chunks_exact(16)
            .map(|c| {
                let off = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                let len = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
                (off, len)
            })
            .collect(),
    )
}

const TENSORS: &CStr = c"tensors";
const BLOCK_HASHES: &CStr = c"block_hashes";
const SUMMARIES: &CStr = c"summaries";
const SUMMARY_CVS: &CStr = c"cvs";

/// An open index database.
pub struct BlockIndex {
    conn: Connection,
    path: PathBuf,
    /// `block_hash_log`, read once.
    log: OnceCell<HashLog>,
}

/// `block_hash_log` by tensor id: (block, hash) in seq order.
type HashLog = HashMap<i64, Vec<(u64, Cv)>>;

/// Connections reading stored hashes at once, at most.
pub const READERS: usize = 4;
/// Stored hash bytes worth another reader.
const PER_READER: u64 = 8 << 20;

/// Bytes of the database file each connection reads through a memory map (`PRAGMA mmap_size`;
/// SQLite caps it at its compiled limit, 2 GiB in the bundled build). A block hash BLOB is a
/// chain of overflow pages; read with `pread` that is one system call and one copy per 4 KiB
/// page, through the map one copy: reading 135 MB of hashes (a 17 GB model) took half the
/// time. SQLite still writes with `pwrite` (the map is read-only), and pages still in the WAL
/// are read from there as before.
const MMAP_BYTES: i64 = 1 << 40;

/// Fewest and most rows `block_hash_log` may reach before a commit folds it.
const FOLD_LIMIT_MIN: u64 = 1024;
const FOLD_LIMIT_MAX: u64 = 524_288;

impl std::fmt::Debug for BlockIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockIndex")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl BlockIndex {
    /// Opens (creating if needed) `<state_dir>/index.db` and brings its schema up to date.
    pub fn open(state_dir: &Path) -> Result<Self, IndexError> {
        let path = state_dir.join(INDEX_DB);
        let sql = |source| IndexError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        conn.pragma_update(None, "mmap_size", MMAP_BYTES)
            .map_err(sql)?;
        migrate(&mut conn, &path)?;
        Ok(BlockIndex {
            conn,
            path,
            log: OnceCell::new(),
        })
    }

    /// Opens `<state_dir>/index.db` read-only, for readers (`status`, `verify`): nothing is
    /// written, not even a schema migration, so readers never contend with each other or with a
    /// writer (WAL: a reader sees the last committed transaction). An index whose schema is
    /// older than this binary's is refused, saying which command upgrades it.
    pub fn open_read_only(state_dir: &Path) -> Result<Self, IndexError> {
        let path = state_dir.join(INDEX_DB);
        let sql = |source| IndexError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.pragma_update(None, "mmap_size", MMAP_BYTES)
            .map_err(sql)?;
        let found: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        if found > SCHEMA_VERSION {
            return Err(IndexError::NewerSchema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            return Err(IndexError::OlderSchema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(BlockIndex {
            conn,
            path,
            log: OnceCell::new(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From here on this connection's commits survive a crash of the process but not a power
    /// loss, until [`Self::make_durable`]: they are written to the WAL without `fsync`, and
    /// neither a commit nor closing the connection copies the WAL back into the database.
    ///
    /// For a journaled write only (see [`crate::journal`], "Unflushed writes"): its retired
    /// journal, named by the durable `unflushed.json`, can redo the commit after a reboot, and
    /// the next writer makes it durable before it removes that marker. A dense sync's commit
    /// writes a hash per block (135 MB for 17 GB) while the kernel writes the model's pages
    /// back; syncing it then waited behind that writeback for seconds.
    pub fn defer_durability(&self) -> Result<(), IndexError> {
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .and_then(|()| self.conn.pragma_update(None, "wal_autocheckpoint", 0))
            .and_then(|()| {
                self.conn
                    .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                    .map(drop)
            })
            .map_err(|e| self.sql(e))
    }

    /// Makes every commit so far durable and copies the WAL back into the database as far as
    /// readers allow (a passive checkpoint: it never waits for them). Returns whether frames
    /// are left in the WAL; they are synced (the checkpoint syncs the WAL before it copies),
    /// but the caller fsyncs the WAL file itself when frames are left, since SQLite syncs only
    /// what it copies.
    pub fn checkpoint(&self) -> Result<bool, IndexError> {
        let (busy, log, copied): (i64, i64, i64) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(|e| self.sql(e))?;
        Ok(busy != 0 || copied < log)
    }

    fn sql(&self, source: rusqlite::Error) -> IndexError {
        IndexError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> IndexError {
        IndexError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// Reads one `meta` value.
    pub fn meta(&self, key: MetaKey) -> Result<Option<String>, IndexError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key.name()], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Reads one numeric `meta` value (`None` if absent or not a number).
    pub fn meta_u64(&self, key: MetaKey) -> Result<Option<u64>, IndexError> {
        Ok(self.meta(key)?.and_then(|v| v.parse().ok()))
    }

    /// The model's identity (empty before `init`).
    pub fn model_id(&self) -> Result<String, IndexError> {
        Ok(self.meta(MetaKey::ModelId)?.unwrap_or_default())
    }

    /// True once `init` has committed (the model id is written in the same transaction).
    pub fn is_initialized(&self) -> Result<bool, IndexError> {
        Ok(self.meta(MetaKey::ModelId)?.is_some())
    }

    /// The block layout chosen at init.
    pub fn block_layout(&self) -> Result<BlockLayout, IndexError> {
        let scheme = self.meta(MetaKey::HashScheme)?.unwrap_or_default();
        if scheme != blockhash::SCHEME {
            return Err(self.corrupt(format!(
                "hash scheme {scheme:?}, expected {}",
                blockhash::SCHEME
            )));
        }
        let raw = self.meta(MetaKey::BlockSize)?.unwrap_or_default();
        let size: u64 = raw
            .parse()
            .map_err(|_| self.corrupt(format!("block_size {raw:?}")))?;
        BlockLayout::new(size).map_err(|e| self.corrupt(e.to_string()))
    }

    /// The indexed files, by name.
    pub fn files(&self) -> Result<Vec<IndexedFile>, IndexError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, size, mtime_ns, inode, header_len, header_hash, ctime_ns FROM files ORDER BY name")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Vec<u8>>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, size, mtime_ns, inode, header_len, hash, ctime_ns) =
                row.map_err(|e| self.sql(e))?;
            let header_hash = hash
                .try_into()
                .map_err(|_| self.corrupt(format!("header hash of {name}")))?;
            out.push(IndexedFile {
                id,
                name,
                stat: FileStat {
                    size: size as u64,
                    mtime_ns,
                    inode: inode as u64,
                    ctime_ns,
                },
                header_len: header_len as u64,
                header_hash,
            });
        }
        Ok(out)
    }

    /// The indexed tensors, ordered by file and offset.
    pub fn tensors(&self) -> Result<Vec<IndexedTensor>, IndexError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT t.id, t.name, t.file_id, t.data_offset, t.data_len, t.dtype, t.shape
                 FROM tensors t JOIN files f ON f.id = t.file_id ORDER BY f.name, t.data_offset, t.name",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, file_id, offset, len, dtype, shape) = row.map_err(|e| self.sql(e))?;
            let shape = serde_json::from_str(&shape)
                .map_err(|_| self.corrupt(format!("shape of {name}")))?;
            out.push(IndexedTensor {
                id,
                name,
                file_id,
                offset: offset as u64,
                len: len as u64,
                dtype,
                shape,
            });
        }
        Ok(out)
    }

    /// The block hashes of one tensor: its BLOB with the log's newer hashes laid over it.
    pub fn tensor_hashes(
        &self,
        tensor: &IndexedTensor,
        layout: BlockLayout,
    ) -> Result<Vec<Cv>, IndexError> {
        read_hashes(&self.conn, &self.path, tensor, layout, self.log()?, None)
    }

    /// The block hashes of `tensors`, in order, read by up to [`READERS`] connections at once
    /// (one reader when there is little to read).
    pub fn tensors_hashes(
        &self,
        tensors: &[&IndexedTensor],
        layout: BlockLayout,
    ) -> Result<Vec<Vec<Cv>>, IndexError> {
        let wants: Vec<(&IndexedTensor, Option<&[u64]>)> =
            tensors.iter().map(|t| (*t, None)).collect();
        self.tensors_hashes_in(&wants, layout)
    }

    /// [`Self::tensors_hashes`] of only some of each tensor's blocks: with `Some(summaries)`
    /// (sorted summary numbers), the blocks of those summaries hold their hashes and every
    /// other entry is zero (the vector has one entry per block either way, unread pages never
    /// touched); `None` reads every block.
    pub fn tensors_hashes_in(
        &self,
        wants: &[(&IndexedTensor, Option<&[u64]>)],
        layout: BlockLayout,
    ) -> Result<Vec<Vec<Cv>>, IndexError> {
        let log = self.log()?;
        let cost = |(t, only): &(&IndexedTensor, Option<&[u64]>)| -> u64 {
            only.map_or(layout.blocks(t.len), |s| {
                s.len() as u64 * layout.blocks_per_summary()
            }) * 32
        };
        let bytes: u64 = wants.iter().map(cost).sum();
        let readers = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(READERS)
            .min(wants.len())
            .min(bytes.div_ceil(PER_READER) as usize);
        if readers <= 1 {
            return wants
                .iter()
                .map(|&(t, only)| read_hashes(&self.conn, &self.path, t, layout, log, only))
                .collect();
        }
        // Most to read first, each to the reader with the least to read.
        let mut order: Vec<usize> = (0..wants.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(cost(&wants[i])));
        let mut shares: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); readers];
        for i in order {
            let least = shares.iter_mut().min_by_key(|s| s.0).expect("readers > 1");
            least.0 += cost(&wants[i]);
            least.1.push(i);
        }
        let path = &self.path;
        let read = |share: &[usize]| -> Result<Vec<(usize, Vec<Cv>)>, IndexError> {
            let sql = |source| IndexError::Sqlite {
                path: path.clone(),
                source,
            };
            let conn = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sql)?;
            conn.pragma_update(None, "mmap_size", MMAP_BYTES)
                .map_err(sql)?;
            share
                .iter()
                .map(|&i| {
                    let (t, only) = wants[i];
                    Ok((i, read_hashes(&conn, path, t, layout, log, only)?))
                })
                .collect()
        };
        let mut out: Vec<Vec<Cv>> = vec![Vec::new(); wants.len()];
        std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .iter()
                .map(|(_, share)| scope.spawn(|| read(share)))
                .collect();
            for h in handles {
                for (i, cvs) in h.join().expect("a reader does not panic")? {
                    out[i] = cvs;
                }
            }
            Ok::<_, IndexError>(())
        })?;
        Ok(out)
    }

    /// The stored summaries of `tensors` (see [`crate::blockhash`]), in order: `None` for a
    /// tensor whose summaries are not known (never computed, or its block hashes were changed
    /// by a commit that did not recompute them).
    pub fn tensors_summaries(
        &self,
        tensors: &[&IndexedTensor],
        layout: BlockLayout,
    ) -> Result<Vec<Option<Vec<Cv>>>, IndexError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT cvs FROM summaries WHERE tensor_id = ?1")
            .map_err(|e| self.sql(e))?;
        tensors
            .iter()
            .map(|t| {
                let blob: Option<Vec<u8>> = stmt
                    .query_row([t.id], |r| r.get(0))
                    .optional()
                    .map_err(|e| self.sql(e))?;
                let n = layout.summaries(t.len) as usize;
                Ok(blob
                    .filter(|b| b.len() == n * blockhash::CV_LEN)
                    .and_then(|b| blockhash::cvs_from_bytes(&b)))
            })
            .collect()
    }

    /// The tensors whose known summaries differ from the merge of their block hashes (an index
    /// damaged behind our back; `verify` reports them, `verify --repair` forgets them).
    pub fn stale_summaries(&self, layout: BlockLayout) -> Result<Vec<IndexedTensor>, IndexError> {
        let tensors = self.tensors()?;
        let mut stale = Vec::new();
        for t in tensors {
            let Some(known) = self.tensors_summaries(&[&t], layout)?.pop().flatten() else {
                continue;
            };
            if layout.summaries_of(&self.tensor_hashes(&t, layout)?, t.len) != known {
                stale.push(t);
            }
        }
        Ok(stale)
    }

    /// `block_hash_log`, read on first use.
    fn log(&self) -> Result<&HashLog, IndexError> {
        if let Some(log) = self.log.get() {
            return Ok(log);
        }
        let log = read_log(&self.conn).map_err(|e| e.at(&self.path))?;
        Ok(self.log.get_or_init(|| log))
    }

    /// Rows `block_hash_log` may hold before a commit folds it: one per 4 blocks of the model,
    /// within [FOLD_LIMIT_MIN, FOLD_LIMIT_MAX]. A fold rewrites about every page of the hash
    /// BLOBs whatever its size, so a longer log makes it rarer; every reader loads the log.
    fn fold_limit(conn: &Connection, layout: BlockLayout) -> rusqlite::Result<u64> {
        let bytes: i64 =
            conn.query_row("SELECT coalesce(sum(data_len), 0) FROM tensors", [], |r| {
                r.get(0)
            })?;
        let blocks = u64::try_from(bytes).unwrap_or(0) / layout.block_size;
        Ok((blocks / 4).clamp(FOLD_LIMIT_MIN, FOLD_LIMIT_MAX))
    }

    /// The newest generation number, if any.
    pub fn generation(&self) -> Result<Option<u64>, IndexError> {
        self.conn
            .query_row("SELECT max(generation) FROM generations", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|g| g.map(|g| g as u64))
            .map_err(|e| self.sql(e))
    }

    /// One generation's row.
    pub fn generation_record(
        &self,
        generation: u64,
    ) -> Result<Option<GenerationRecord>, IndexError> {
        self.conn
            .query_row(
                &format!("SELECT {GENERATION_COLUMNS} FROM generations WHERE generation = ?1"),
                [generation as i64],
                generation_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// The newest `limit` generations, newest first (`log`).
    pub fn generation_records(&self, limit: u64) -> Result<Vec<GenerationRecord>, IndexError> {
        self.generations_where(
            "ORDER BY generation DESC LIMIT ?1",
            [i64::try_from(limit).unwrap_or(i64::MAX)],
        )
    }

    /// The generations `first..=last`, oldest first (`report`, the export manifest).
    pub fn generation_records_between(
        &self,
        first: u64,
        last: u64,
    ) -> Result<Vec<GenerationRecord>, IndexError> {
        let to_sql = |g: u64| i64::try_from(g).unwrap_or(i64::MAX);
        self.generations_where(
            "WHERE generation BETWEEN ?1 AND ?2 ORDER BY generation",
            [to_sql(first), to_sql(last)],
        )
    }

    /// The `generations` rows that `clause` (with `params`) selects.
    fn generations_where(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<GenerationRecord>, IndexError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {GENERATION_COLUMNS} FROM generations {clause}"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params, generation_row)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// The ranges generation `generation` changed, per file.
    pub fn generation_ranges(&self, generation: u64) -> Result<FileRanges, IndexError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT file, ranges FROM generation_ranges WHERE generation = ?1 ORDER BY file",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([generation as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (file, blob) = row.map_err(|e| self.sql(e))?;
            let ranges = decode_ranges(&blob)
                .ok_or_else(|| self.corrupt(format!("ranges of generation {generation}")))?;
            out.push((file, ranges));
        }
        Ok(out)
    }
}

/// Why `block_hash_log` could not be read or folded.
enum LogError {
    Sql(rusqlite::Error),
    Corrupt(String),
}

impl LogError {
    /// The index error of the database at `path`.
    fn at(self, path: &Path) -> IndexError {
        match self {
            LogError::Sql(source) => IndexError::Sqlite {
                path: path.to_path_buf(),
                source,
            },
            LogError::Corrupt(what) => IndexError::Corrupt {
                path: path.to_path_buf(),
                what,
            },
        }
    }
}

impl From<rusqlite::Error> for LogError {
    fn from(e: rusqlite::Error) -> Self {
        LogError::Sql(e)
    }
}

/// The block hashes of `tensor` through `conn`: its BLOB read straight into place (with
/// `only`, just the blocks of those sorted summaries; the other entries stay zero), with the
/// log's newer hashes laid over it.
fn read_hashes(
    conn: &Connection,
    path: &Path,
    tensor: &IndexedTensor,
    layout: BlockLayout,
    log: &HashLog,
    only: Option<&[u64]>,
) -> Result<Vec<Cv>, IndexError> {
    let corrupt = |what: String| IndexError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let n = layout.blocks(tensor.len) as usize;
    let mut cvs = vec![[0u8; 32]; n];
    if n == 0 {
        return Ok(cvs);
    }
    let blob = conn
        .blob_open(rusqlite::MAIN_DB, TENSORS, BLOCK_HASHES, tensor.id, true)
        .map_err(|source| IndexError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    if blob.len() != n * 32 {
        return Err(corrupt(format!(
            "block hashes of tensor {} have {} bytes",
            tensor.name,
            blob.len()
        )));
    }
    let mut read = |blocks: std::ops::Range<u64>| {
        let (a, b) = (blocks.start as usize, blocks.end as usize);
        blob.read_at_exact(cvs[a..b].as_flattened_mut(), a * 32)
            .map_err(|e| corrupt(format!("block hashes of tensor {}: {e}", tensor.name)))
    };
    match only {
        None => read(0..n as u64)?,
        Some(summaries) => {
            // Runs of consecutive summaries, one read each.
            let mut i = 0;
            while i < summaries.len() {
                let mut j = i + 1;
                while j < summaries.len() && summaries[j] == summaries[j - 1] + 1 {
                    j += 1;
                }
                let first = layout.summary_blocks(tensor.len, summaries[i]);
                let last = layout.summary_blocks(tensor.len, summaries[j - 1]);
                if last.end > n as u64 || first.start >= last.end {
                    return Err(corrupt(format!(
                        "summary {} of tensor {} is past its end",
                        summaries[j - 1],
                        tensor.name
                    )));
                }
                read(first.start..last.end)?;
                i = j;
            }
        }
    }
    for &(block, cv) in log.get(&tensor.id).into_iter().flatten() {
        *usize::try_from(block)
            .ok()
            .and_then(|b| cvs.get_mut(b))
            .ok_or_else(|| {
                corrupt(format!(
                    "block_hash_log names block {block} of tensor {}, which has {n}",
                    tensor.name
                ))
            })? = cv;
    }
    Ok(cvs)
}

/// `block_hash_log` by tensor id, each tensor's rows in seq order.
fn read_log(conn: &Connection) -> Result<HashLog, LogError> {
    let mut out = HashLog::new();
    let mut st = conn.prepare("SELECT tensor_id, block, cv FROM block_hash_log ORDER BY seq")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let (id, block, cv): (i64, i64, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let cv: Cv = cv.as_slice().try_into().map_err(|_| {
            LogError::Corrupt(format!(
                "block_hash_log: a hash of tensor {id} has {} bytes",
                cv.len()
            ))
        })?;
        let block = u64::try_from(block)
            .map_err(|_| LogError::Corrupt(format!("block_hash_log: block {block}")))?;
        out.entry(id).or_default().push((block, cv));
    }
    Ok(out)
}

/// Brings a database's schema up to [`SCHEMA_VERSION`], one transaction per migration.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), IndexError> {
    let sql = |source| IndexError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let found: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if found > SCHEMA_VERSION {
        return Err(IndexError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        // IMMEDIATE: the write lock first, then the version read again, so a migration runs
        // once even if two processes open an old index at the same moment.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let now: u32 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        if now > i as u32 {
            continue;
        }
        tx.execute_batch(migration).map_err(sql)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, as stored in `created_at`.
pub fn unix_ms() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes opening an index of an older schema at once both succeed: the migration
    /// runs once (it read the version outside its transaction, and the second one failed with
    /// "table block_hash_log already exists").
    /// Takes an index of the current schema back to version 2.
    const DOWNGRADE: &str = "DROP TABLE summaries; ALTER TABLE generations DROP COLUMN tags; ALTER TABLE files DROP COLUMN ctime_ns; DROP TABLE block_hash_log; PRAGMA user_version = 2;";

    #[test]
    fn concurrent_opens_migrate_an_old_index_once() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            drop(BlockIndex::open(dir.path()).unwrap());
            let conn = Connection::open(dir.path().join(INDEX_DB)).unwrap();
            conn.execute_batch(DOWNGRADE).unwrap();
            drop(conn);
            let opened: Vec<Result<(), String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            BlockIndex::open(dir.path())
                                .map(drop)
                                .map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(opened.iter().all(Result::is_ok), "{opened:?}");
            // A reader neither migrates nor fails at random: it says who upgrades the index.
            let conn = Connection::open(dir.path().join(INDEX_DB)).unwrap();
            conn.execute_batch(DOWNGRADE).unwrap();
            let e = BlockIndex::open_read_only(dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains("older") && e.contains("recover"), "{e}");
        }
    }

    #[test]
    fn migrating_an_empty_database_reaches_the_current_schema() {
        let dir = tempfile::tempdir().unwrap();
        let index = BlockIndex::open(dir.path()).unwrap();
        let v: u32 = index
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert!(!index.is_initialized().unwrap());
        assert_eq!(index.generation().unwrap(), None);
        drop(index);
        // Reopening an up-to-date database applies nothing and keeps working.
        let index = BlockIndex::open(dir.path()).unwrap();
        assert!(index.files().unwrap().is_empty());
    }

    #[test]
    fn a_database_from_a_newer_version_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        drop(BlockIndex::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(INDEX_DB)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = BlockIndex::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, IndexError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade apollo-checkpoint"));
        let conn = Connection::open(dir.path().join(INDEX_DB)).unwrap();
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION + 1);
    }

    #[test]
    fn ranges_round_trip() {
        let r = vec![(0, 4096), (1 << 40, 7)];
        assert_eq!(decode_ranges(&encode_ranges(&r)).unwrap(), r);
        assert!(decode_ranges(&[0; 15]).is_none());
    }
}
