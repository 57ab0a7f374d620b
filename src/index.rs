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
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::blockhash::{self, BlockLayout, CV_LEN, Cv};
use crate::io::FileStat;
use crate::model::{ModelFile, TensorEntry, dtype_name};

/// The migrations, in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_initial.sql"),
    include_str!("../migrations/0002_exports.sql"),
    include_str!("../migrations/0003_hash_log.sql"),
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

/// One generation's row.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GenerationRecord {
    /// Its number.
    pub generation: u64,
    /// `init`, `sync` or `reindex`.
    pub kind: String,
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
}

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
    pub updates: Vec<HashUpdate>,
    /// Files' stats after their new bytes were made durable.
    pub file_stats: Vec<(String, FileStat)>,
    /// The new generation, if anything changed.
    pub generation: Option<GenerationRecord>,
    /// Changed ranges of that generation, per file: sorted merged (offset, len).
    pub ranges: FileRanges,
    /// JSON stats of this run, changed or not (absent when recovery commits).
    pub last_sync: Option<String>,
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

/// An open index database.
pub struct BlockIndex {
    conn: Connection,
    path: PathBuf,
    /// `block_hash_log`, read once.
    log: OnceCell<HashLog>,
}

/// `block_hash_log` by tensor id: (block, hash) in seq order.
type HashLog = HashMap<i64, Vec<(u64, Cv)>>;

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
        migrate(&mut conn, &path)?;
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
    pub fn meta(&self, key: &str) -> Result<Option<String>, IndexError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// True once `init` has committed (the model id is written in the same transaction).
    pub fn is_initialized(&self) -> Result<bool, IndexError> {
        Ok(self.meta("model_id")?.is_some())
    }

    /// The block layout chosen at init.
    pub fn block_layout(&self) -> Result<BlockLayout, IndexError> {
        let scheme = self.meta("hash_scheme")?.unwrap_or_default();
        if scheme != blockhash::SCHEME {
            return Err(self.corrupt(format!(
                "hash scheme {scheme:?}, expected {}",
                blockhash::SCHEME
            )));
        }
        let raw = self.meta("block_size")?.unwrap_or_default();
        let size: u64 = raw
            .parse()
            .map_err(|_| self.corrupt(format!("block_size {raw:?}")))?;
        BlockLayout::new(size).map_err(|e| self.corrupt(e.to_string()))
    }

    /// The indexed files, by name.
    pub fn files(&self) -> Result<Vec<IndexedFile>, IndexError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, size, mtime_ns, inode, header_len, header_hash FROM files ORDER BY name")
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
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, size, mtime_ns, inode, header_len, hash) =
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

    /// The block hashes of one tensor.
    pub fn tensor_hashes(
        &self,
        tensor: &IndexedTensor,
        layout: BlockLayout,
    ) -> Result<Vec<Cv>, IndexError> {
        let blob: Vec<u8> = self
            .conn
            .query_row(
                "SELECT block_hashes FROM tensors WHERE id = ?1",
                [tensor.id],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        let mut cvs = blockhash::cvs_from_bytes(&blob)
            .filter(|c| c.len() as u64 == layout.blocks(tensor.len))
            .ok_or_else(|| {
                self.corrupt(format!(
                    "block hashes of tensor {} have {} bytes",
                    tensor.name,
                    blob.len()
                ))
            })?;
        for &(block, cv) in self.log()?.get(&tensor.id).into_iter().flatten() {
            *usize::try_from(block)
                .ok()
                .and_then(|b| cvs.get_mut(b))
                .ok_or_else(|| {
                    self.corrupt(format!(
                        "block_hash_log names block {block} of tensor {}, which has {}",
                        tensor.name,
                        layout.blocks(tensor.len)
                    ))
                })? = cv;
        }
        Ok(cvs)
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
                "SELECT generation, kind, created_at, source, tensors, bytes_compared, blocks_changed, bytes_changed, seconds
                 FROM generations WHERE generation = ?1",
                [generation as i64],
                |r| {
                    Ok(GenerationRecord {
                        generation: r.get::<_, i64>(0)? as u64,
                        kind: r.get(1)?,
                        created_at_ms: r.get(2)?,
                        source: r.get(3)?,
                        tensors: r.get::<_, i64>(4)? as u64,
                        bytes_compared: r.get::<_, i64>(5)? as u64,
                        blocks_changed: r.get::<_, i64>(6)? as u64,
                        bytes_changed: r.get::<_, i64>(7)? as u64,
                        seconds: r.get(8)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql(e))
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

    /// Starts replacing everything the index knows about the model (init, repair).
    pub fn begin_rebuild(&mut self) -> Result<Rebuild<'_>, IndexError> {
        self.log.take();
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|source| IndexError::Sqlite {
                path: path.clone(),
                source,
            })?;
        tx.execute_batch("DELETE FROM block_hash_log; DELETE FROM tensors; DELETE FROM files;")
            .map_err(|source| IndexError::Sqlite {
                path: path.clone(),
                source,
            })?;
        Ok(Rebuild { tx, path })
    }

    /// Commits what one sync did, in one transaction. New block hashes go to `block_hash_log`,
    /// or, when that would pass [`Self::fold_limit`], into the BLOBs with the log folded in.
    pub fn commit_sync(&mut self, commit: &SyncCommit) -> Result<(), IndexError> {
        let layout = if commit.updates.is_empty() {
            None
        } else {
            Some(self.block_layout()?)
        };
        self.log.take();
        let path = self.path.clone();
        let sql = |source| IndexError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        if let Some(layout) = layout {
            let new_rows: u64 = commit.updates.iter().map(|u| u.blocks.len() as u64).sum();
            // Rows are only appended, and all deleted at once, so seq counts them (count(*)
            // would read the whole table).
            let logged: i64 = tx
                .query_row(
                    "SELECT coalesce(max(seq), 0) FROM block_hash_log",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            let limit = Self::fold_limit(&tx, layout).map_err(sql)?;
            if u64::try_from(logged).unwrap_or(0) + new_rows > limit {
                fold_log(&tx, &commit.updates).map_err(|e| e.at(&path))?;
            } else {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO block_hash_log (tensor_id, block, cv) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(sql)?;
                for u in &commit.updates {
                    for (block, cv) in &u.blocks {
                        insert
                            .execute(params![u.tensor_id, *block as i64, cv.as_slice()])
                            .map_err(sql)?;
                    }
                }
            }
        }
        for (name, stat) in &commit.file_stats {
            tx.execute(
                "UPDATE files SET size = ?2, mtime_ns = ?3, inode = ?4 WHERE name = ?1",
                params![name, stat.size as i64, stat.mtime_ns, stat.inode as i64],
            )
            .map_err(sql)?;
        }
        if let Some(g) = &commit.generation {
            insert_generation(&tx, g).map_err(sql)?;
            for (file, ranges) in &commit.ranges {
                tx.execute(
                    "INSERT INTO generation_ranges (generation, file, ranges) VALUES (?1, ?2, ?3)",
                    params![g.generation as i64, file, encode_ranges(ranges)],
                )
                .map_err(sql)?;
            }
        }
        if let Some(last_sync) = &commit.last_sync {
            set_meta(&tx, "last_sync", last_sync).map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Sets one `meta` value.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), IndexError> {
        set_meta(&self.conn, key, value).map_err(|e| self.sql(e))
    }

    /// Records a delta file written by `export-delta` (after it is durable).
    pub fn record_export(&mut self, e: &ExportRow) -> Result<(), IndexError> {
        self.conn
            .execute(
                "INSERT INTO exports (base_generation, target_generation, file, outbox, bytes, blake3, full_blocks, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(file) DO UPDATE SET outbox = excluded.outbox, pruned = 0",
                params![
                    e.base_generation.map(|g| g as i64),
                    e.target_generation as i64,
                    e.file,
                    e.outbox,
                    e.bytes as i64,
                    e.blake3,
                    e.full_blocks as i64,
                    unix_ms()
                ],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Every export recorded, oldest first.
    pub fn exports(&self) -> Result<Vec<ExportRow>, IndexError> {
        let mut stmt = self
            .conn
            .prepare("SELECT base_generation, target_generation, file, outbox, bytes, blake3, full_blocks, pruned FROM exports ORDER BY target_generation, id")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ExportRow {
                    base_generation: r.get::<_, Option<i64>>(0)?.map(|g| g as u64),
                    target_generation: r.get::<_, i64>(1)? as u64,
                    file: r.get(2)?,
                    outbox: r.get(3)?,
                    bytes: r.get::<_, i64>(4)? as u64,
                    blake3: r.get(5)?,
                    full_blocks: r.get::<_, i64>(6)? as u64,
                    pruned: r.get::<_, i64>(7)? != 0,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// The generation the newest export reaches, if any.
    pub fn exported_through(&self) -> Result<Option<u64>, IndexError> {
        self.conn
            .query_row("SELECT max(target_generation) FROM exports", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|g| g.map(|g| g as u64))
            .map_err(|e| self.sql(e))
    }

    /// Marks the exports of `files` as pruned.
    pub fn mark_pruned(&mut self, files: &[String]) -> Result<(), IndexError> {
        let tx = self.conn.transaction().map_err(|e| IndexError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        for f in files {
            tx.execute("UPDATE exports SET pruned = 1 WHERE file = ?1", [f])
                .map_err(|e| IndexError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
        }
        tx.commit().map_err(|e| IndexError::Sqlite {
            path: self.path.clone(),
            source: e,
        })
    }

    /// Records the stats of a sync run (used when a run changed nothing).
    pub fn set_last_sync(&mut self, json: &str) -> Result<(), IndexError> {
        set_meta(&self.conn, "last_sync", json).map_err(|e| self.sql(e))
    }
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )
    .map(drop)
}

fn insert_generation(conn: &Connection, g: &GenerationRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO generations (generation, kind, created_at, source, tensors, bytes_compared, blocks_changed, bytes_changed, seconds)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            g.generation as i64,
            g.kind,
            g.created_at_ms,
            g.source,
            g.tensors as i64,
            g.bytes_compared as i64,
            g.blocks_changed as i64,
            g.bytes_changed as i64,
            g.seconds
        ],
    )
    .map(drop)
}

/// A transaction that replaces the index's files and tensors.
pub struct Rebuild<'a> {
    tx: Transaction<'a>,
    path: PathBuf,
}

impl Rebuild<'_> {
    fn sql(&self, source: rusqlite::Error) -> IndexError {
        IndexError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Adds a file; returns its row id.
    pub fn add_file(&mut self, file: &ModelFile) -> Result<i64, IndexError> {
        self.tx
            .execute(
                "INSERT INTO files (name, size, mtime_ns, inode, header_len, header_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    file.name,
                    file.stat.size as i64,
                    file.stat.mtime_ns,
                    file.stat.inode as i64,
                    file.header.header_len as i64,
                    file.header.header_hash.as_slice()
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Adds a tensor of file `file_id` with its block hashes.
    pub fn add_tensor(
        &mut self,
        file_id: i64,
        t: &TensorEntry,
        hashes: &[Cv],
    ) -> Result<(), IndexError> {
        let shape = serde_json::to_string(&t.shape).expect("a list of integers serializes");
        self.tx
            .execute(
                "INSERT INTO tensors (name, file_id, data_offset, data_len, dtype, shape, block_hashes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.name, file_id, t.offset as i64, t.len as i64, dtype_name(t.dtype), shape, blockhash::cvs_to_bytes(hashes)],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Sets a `meta` value.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), IndexError> {
        set_meta(&self.tx, key, value).map_err(|e| self.sql(e))
    }

    /// Records a generation with the ranges it changed, then commits everything.
    pub fn commit(
        self,
        generation: &GenerationRecord,
        ranges: &[(String, Vec<(u64, u64)>)],
    ) -> Result<(), IndexError> {
        let path = self.path;
        let sql = |source| IndexError::Sqlite {
            path: path.clone(),
            source,
        };
        insert_generation(&self.tx, generation).map_err(sql)?;
        for (file, r) in ranges {
            self.tx
                .execute(
                    "INSERT INTO generation_ranges (generation, file, ranges) VALUES (?1, ?2, ?3)",
                    params![generation.generation as i64, file, encode_ranges(r)],
                )
                .map_err(sql)?;
        }
        self.tx.commit().map_err(sql)
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

/// Writes the log and then `updates` into the tensors' BLOBs and empties the log.
fn fold_log(tx: &Transaction<'_>, updates: &[HashUpdate]) -> Result<(), LogError> {
    let mut by_tensor: BTreeMap<i64, BTreeMap<u64, Cv>> = BTreeMap::new();
    for (id, rows) in read_log(tx)? {
        by_tensor.entry(id).or_default().extend(rows);
    }
    for u in updates {
        by_tensor
            .entry(u.tensor_id)
            .or_default()
            .extend(u.blocks.iter().copied());
    }
    for (id, blocks) in by_tensor {
        let mut blob = tx.blob_open(rusqlite::MAIN_DB, TENSORS, BLOCK_HASHES, id, false)?;
        // Write runs of consecutive blocks with one call each.
        let blocks: Vec<(u64, Cv)> = blocks.into_iter().collect();
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i].0;
            let mut run = Vec::new();
            while i < blocks.len() && blocks[i].0 == start + (run.len() / CV_LEN) as u64 {
                run.extend_from_slice(&blocks[i].1);
                i += 1;
            }
            blob.write_at(&run, start as usize * CV_LEN)?;
        }
    }
    tx.execute("DELETE FROM block_hash_log", [])?;
    Ok(())
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
        let tx = conn.transaction().map_err(sql)?;
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
