//! The index's write transactions: a sync's commit (hashes to the log or folded into the
//! BLOBs, files' stats, the generation and its ranges), a rebuild (init, repair), exports.

use std::path::PathBuf;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use std::collections::BTreeSet;

use super::{
    BLOCK_HASHES, BlockIndex, ExportRow, GenerationRecord, IndexError, LogError, MetaKey,
    NewSummaries, SUMMARIES, SUMMARY_CVS, SortedHashes, SyncCommit, TENSORS, encode_ranges,
    read_log, unix_ms,
};
use crate::blockhash::{self, CV_LEN, Cv};
use crate::model::{ModelFile, TensorEntry, dtype_name};

impl BlockIndex {
    /// Starts replacing everything the index knows about the model (init, repair).
    pub fn begin_rebuild(&mut self) -> Result<Rebuild<'_>, IndexError> {
        let (tx, path) = self.write_transaction()?;
        tx.execute_batch("DELETE FROM block_hash_log; DELETE FROM summaries; DELETE FROM tensors; DELETE FROM files;")
            .map_err(|source| IndexError::Sqlite {
                path: path.clone(),
                source,
            })?;
        Ok(Rebuild { tx, path })
    }

    /// Commits what one sync did, in one transaction (see [`SyncTxn`]).
    pub fn commit_sync(&mut self, commit: SyncCommit) -> Result<(), IndexError> {
        let mut txn = self.begin_sync()?;
        txn.write(commit)?;
        txn.commit()
    }

    /// Begins the transaction of a sync's commit: [`SyncTxn::write`] what it did, in one or more
    /// parts, then [`SyncTxn::commit`]. Dropped before that, nothing of it is committed.
    pub fn begin_sync(&mut self) -> Result<SyncTxn<'_>, IndexError> {
        let layout = self.block_layout()?;
        let (tx, path) = self.write_transaction()?;
        Ok(SyncTxn { tx, path, layout })
    }

    /// A transaction that writes (the log cache is dropped: it may change) and the index's path.
    fn write_transaction(&mut self) -> Result<(Transaction<'_>, PathBuf), IndexError> {
        self.log.take();
        let path = self.path.clone();
        match self.conn.transaction() {
            Ok(tx) => Ok((tx, path)),
            Err(source) => Err(IndexError::Sqlite { path, source }),
        }
    }

    /// Sets one `meta` value.
    pub fn set_meta(&mut self, key: MetaKey, value: &str) -> Result<(), IndexError> {
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

    /// Records the stats of a sync run.
    pub fn set_last_sync(&mut self, json: &str) -> Result<(), IndexError> {
        set_meta(&self.conn, MetaKey::LastSync, json).map_err(|e| self.sql(e))
    }
}

fn set_meta(conn: &Connection, key: MetaKey, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key.name(), value],
    )
    .map(drop)
}

fn insert_generation(conn: &Connection, g: &GenerationRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO generations (generation, kind, created_at, source, tensors, bytes_compared, blocks_changed, bytes_changed, seconds, tags)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            g.generation as i64,
            g.kind.name(),
            g.created_at_ms,
            g.source,
            g.tensors as i64,
            g.bytes_compared as i64,
            g.blocks_changed as i64,
            g.bytes_changed as i64,
            g.seconds,
            serde_json::to_string(&g.tags).expect("strings serialize")
        ],
    )
    .map(drop)
}

/// The transaction of a sync's commit. Its pages go to the WAL as SQLite's page cache fills, so
/// a writer can write the bulk of it (a dense sync's block hashes) before it writes the model
/// files and commit it after (with the files' stats): the kernel throttles every writer once the
/// model's pages are dirty (the commit of a 17 GB dense sync took 1.2-1.4 s after the files were
/// written, 0.3 s before), while frames without a commit are invisible to readers and to
/// recovery, so the index never shows a generation the files do not hold yet.
pub struct SyncTxn<'a> {
    tx: Transaction<'a>,
    path: PathBuf,
    layout: crate::blockhash::BlockLayout,
}

impl SyncTxn<'_> {
    /// Writes `commit` into the transaction. New block hashes go to `block_hash_log`, or, when
    /// that would pass [`BlockIndex::fold_limit`], into the BLOBs with the log folded in, one
    /// tensor at a time (memory stays bounded at any model size, see [`HashSpill`]).
    pub fn write(&mut self, commit: SyncCommit) -> Result<(), IndexError> {
        let tx = &self.tx;
        let path = &self.path;
        let sql = |source| IndexError::Sqlite {
            path: path.clone(),
            source,
        };
        let spill = |source| IndexError::Spill {
            path: path.parent().unwrap_or(path).to_path_buf(),
            source,
        };
        // Tensors whose block hashes change here.
        let mut touched = BTreeSet::new();
        if !commit.hashes.is_empty() {
            let new_rows = commit.hashes.len();
            // Rows are only appended, and all deleted at once, so seq counts them (count(*)
            // would read the whole table).
            let logged: i64 = tx
                .query_row(
                    "SELECT coalesce(max(seq), 0) FROM block_hash_log",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            let limit = BlockIndex::fold_limit(tx, self.layout).map_err(sql)?;
            let updates = commit.hashes.sorted();
            let fold = u64::try_from(logged).unwrap_or(0) + new_rows > limit;
            tracing::debug!(new_rows, logged, limit, fold, "block hashes written");
            if fold {
                touched = fold_log(tx, updates).map_err(|e| match e {
                    FoldError::Log(e) => e.at(path),
                    FoldError::Spill(e) => spill(e),
                })?;
            } else {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO block_hash_log (tensor_id, block, cv) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(sql)?;
                for u in updates {
                    let u = u.map_err(spill)?;
                    touched.insert(u.tensor_id);
                    for (block, cv) in &u.blocks {
                        insert
                            .execute(params![u.tensor_id, *block as i64, cv.as_slice()])
                            .map_err(sql)?;
                    }
                }
            }
        }
        touched.extend(&commit.forget_summaries);
        write_summaries(tx, &touched, &commit.summaries).map_err(sql)?;
        for (name, stat) in &commit.file_stats {
            tx.execute(
                "UPDATE files SET size = ?2, mtime_ns = ?3, inode = ?4, ctime_ns = ?5 WHERE name = ?1",
                params![name, stat.size as i64, stat.mtime_ns, stat.inode as i64, stat.ctime_ns],
            )
            .map_err(sql)?;
        }
        if let Some(g) = &commit.generation {
            insert_generation(tx, g).map_err(sql)?;
            for (file, ranges) in &commit.ranges {
                tx.execute(
                    "INSERT INTO generation_ranges (generation, file, ranges) VALUES (?1, ?2, ?3)",
                    params![g.generation as i64, file, encode_ranges(ranges)],
                )
                .map_err(sql)?;
            }
        }
        if let Some(last_sync) = &commit.last_sync {
            set_meta(tx, MetaKey::LastSync, last_sync).map_err(sql)?;
        }
        Ok(())
    }

    /// Commits everything written.
    pub fn commit(self) -> Result<(), IndexError> {
        let path = self.path;
        self.tx
            .commit()
            .map_err(|source| IndexError::Sqlite { path, source })
    }
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
                "INSERT INTO files (name, size, mtime_ns, inode, header_len, header_hash, ctime_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    file.name,
                    file.stat.size as i64,
                    file.stat.mtime_ns,
                    file.stat.inode as i64,
                    file.header.header_len as i64,
                    file.header.header_hash.as_slice(),
                    file.stat.ctime_ns
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Adds a tensor of file `file_id` with its block hashes (of `layout`) and their summaries.
    pub fn add_tensor(
        &mut self,
        file_id: i64,
        t: &TensorEntry,
        hashes: &[Cv],
        layout: blockhash::BlockLayout,
    ) -> Result<(), IndexError> {
        let shape = serde_json::to_string(&t.shape).expect("a list of integers serializes");
        let summaries = layout.summaries_of(hashes, t.len);
        self.tx
            .execute(
                "INSERT INTO tensors (name, file_id, data_offset, data_len, dtype, shape, block_hashes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.name, file_id, t.offset as i64, t.len as i64, dtype_name(t.dtype), shape, blockhash::cvs_to_bytes(hashes)],
            )
            .and_then(|_| {
                self.tx.execute(
                    "INSERT INTO summaries (tensor_id, cvs) VALUES (?1, ?2)",
                    params![self.tx.last_insert_rowid(), blockhash::cvs_to_bytes(&summaries)],
                )
            })
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Sets a `meta` value.
    pub fn set_meta(&mut self, key: MetaKey, value: &str) -> Result<(), IndexError> {
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

/// Why a fold failed.
enum FoldError {
    Log(LogError),
    Spill(std::io::Error),
}

impl From<rusqlite::Error> for FoldError {
    fn from(e: rusqlite::Error) -> Self {
        FoldError::Log(LogError::Sql(e))
    }
}

/// Writes a commit's summaries, and forgets those of `touched` tensors it has none for.
fn write_summaries(
    tx: &Transaction<'_>,
    touched: &BTreeSet<i64>,
    summaries: &std::collections::HashMap<i64, NewSummaries>,
) -> rusqlite::Result<()> {
    let mut forget = tx.prepare_cached("DELETE FROM summaries WHERE tensor_id = ?1")?;
    for id in touched.iter().filter(|id| !summaries.contains_key(id)) {
        forget.execute([id])?;
    }
    let mut set = tx.prepare_cached(
        "INSERT INTO summaries (tensor_id, cvs) VALUES (?1, ?2)
         ON CONFLICT(tensor_id) DO UPDATE SET cvs = excluded.cvs",
    )?;
    let mut known = tx.prepare_cached("SELECT length(cvs) FROM summaries WHERE tensor_id = ?1")?;
    let mut run = Vec::new();
    for (&id, new) in summaries {
        match new {
            NewSummaries::All(cvs) => {
                set.execute(params![id, blockhash::cvs_to_bytes(cvs)])?;
            }
            NewSummaries::Some(changed) => {
                // Unknown summaries stay unknown (the writer read them known, under the lock it
                // holds, so this is only a guard).
                let len: Option<i64> = known.query_row([id], |r| r.get(0)).optional()?;
                let len = len.map_or(0, |l| usize::try_from(l).unwrap_or(0));
                if changed
                    .last()
                    .is_none_or(|(s, _)| (*s as usize + 1) * CV_LEN > len)
                {
                    forget.execute([id])?;
                    continue;
                }
                let mut blob =
                    tx.blob_open(rusqlite::MAIN_DB, SUMMARIES, SUMMARY_CVS, id, false)?;
                if changed.len() * 32 > blob.len() / CV_LEN {
                    // More than one in 32 (a 4 KiB page holds 128): nearly every page changes, so
                    // the whole BLOB is read, patched and written at once.
                    let mut all = vec![0u8; blob.len()];
                    blob.read_at_exact(&mut all, 0)?;
                    for (s, cv) in changed {
                        let at = *s as usize * CV_LEN;
                        all[at..at + CV_LEN].copy_from_slice(cv);
                    }
                    blob.write_at(&all, 0)?;
                    continue;
                }
                let mut i = 0;
                while i < changed.len() {
                    let start = changed[i].0;
                    run.clear();
                    while i < changed.len() && changed[i].0 == start + (run.len() / CV_LEN) as u64 {
                        run.extend_from_slice(&changed[i].1);
                        i += 1;
                    }
                    blob.write_at(&run, start as usize * CV_LEN)?;
                }
            }
        }
    }
    Ok(())
}

/// Writes the log and then `updates` into the tensors' BLOBs and empties the log. The log is
/// bounded by the fold limit; `updates` come one tensor at a time. Returns the tensors of
/// `updates`.
fn fold_log(tx: &Transaction<'_>, updates: SortedHashes) -> Result<BTreeSet<i64>, FoldError> {
    // Per tensor, (block, hash) in the order they were written: the log first, then this
    // commit's; a later hash of a block replaces an earlier one (a stable sort keeps the order).
    let mut log = read_log(tx).map_err(FoldError::Log)?;
    let mut run = Vec::new();
    let mut touched = BTreeSet::new();
    for u in updates {
        let u = u.map_err(FoldError::Spill)?;
        touched.insert(u.tensor_id);
        let mut blocks = log.remove(&u.tensor_id).unwrap_or_default();
        blocks.extend_from_slice(&u.blocks);
        write_blocks(tx, u.tensor_id, blocks, &mut run)?;
    }
    for (id, blocks) in log {
        write_blocks(tx, id, blocks, &mut run)?;
    }
    tx.execute("DELETE FROM block_hash_log", [])?;
    Ok(touched)
}

/// Writes `blocks` (block, hash), in the order written, into tensor `id`'s BLOB: runs of
/// consecutive blocks with one call each.
fn write_blocks(
    tx: &Transaction<'_>,
    id: i64,
    mut blocks: Vec<(u64, Cv)>,
    run: &mut Vec<u8>,
) -> Result<(), FoldError> {
    blocks.sort_by_key(|b| b.0);
    let mut blob = tx.blob_open(rusqlite::MAIN_DB, TENSORS, BLOCK_HASHES, id, false)?;
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i].0;
        run.clear();
        while i < blocks.len() {
            let (b, cv) = blocks[i];
            let next = start + (run.len() / CV_LEN) as u64;
            if b + 1 == next {
                // The same block again, later: its newer hash wins.
                let at = run.len() - CV_LEN;
                run[at..].copy_from_slice(&cv);
            } else if b == next {
                run.extend_from_slice(&cv);
            } else {
                break;
            }
            i += 1;
        }
        blob.write_at(run, start as usize * CV_LEN)
            .map_err(FoldError::from)?;
    }
    Ok(())
}
