//! The undo/redo journal: what makes a sync all-or-nothing.
//!
//! Before any model byte changes, a sync writes every changed block to `<state>/journal` as the
//! XOR of its old and new bytes, fsyncs the journal and the state directory, then appends and
//! fsyncs a *commit record*. Only then are the model files touched. After a crash:
//!
//! - no journal, or a journal without a valid commit record: the files were not touched; the
//!   journal is discarded;
//! - a committed journal: every record is rolled forward. XOR is its own inverse, so the same
//!   record turns old bytes into new ones; the old and new block hashes it carries tell which a
//!   block holds, make the roll-forward idempotent, and let a block torn by a power cut into a
//!   mix of old and new 512-byte sectors be repaired by trying which sectors to flip.
//!
//! A retired journal is kept in `<state>/undo/` as the undo data of its generation: applied to the
//! new bytes, its records give back the old ones (`rollback`).
//!
//! # Unflushed writes
//!
//! A sync, `apply-delta` or `rollback` returns once its journal is durable and its blocks are
//! written, without waiting for the scattered model pages to reach the disk (the kernel writes
//! them back within seconds): the committed journal is what makes the generation durable, like a
//! database's log. Before the journal is retired, `<state>/unflushed.json` is written (temp name,
//! fsync, rename, fsync of the state directory):
//!
//! ```text
//! { "generation": G, "boot_id": "<kernel boot id when written>", "files": ["model-00001-of-00002.safetensors", ...] }
//! ```
//!
//! The index's commit of the write is left unsynced too (SQLite's WAL without `fsync`, see
//! `BlockIndex::defer_durability`): a dense sync's commit holds a hash per block, and syncing it
//! while the kernel writes the model's pages back took seconds. The next command that takes the
//! lock for writing (or `recover`) finishes the marker: in the same boot (the page cache still
//! holds every byte written) it fsyncs those files and the index's WAL (a checkpoint) and
//! removes the marker, reading nothing; after a reboot, or if an fsync fails, it rolls
//! `undo/G.apj` forward again exactly like recovery (every block checked against its old and new
//! hash, torn blocks repaired; an index that lost the commit gets it again, its hashes read back
//! from the files) and fsyncs the files and the index.
//!
//! The journal costs in proportion to the bytes that changed, not the blocks: a training step
//! changes ~1% of bf16 elements, so nearly every block changes but the XOR of a block is almost all
//! zeros. The XOR is stored with a zero-run code (below), which for that data is both smaller and
//! far faster than a general-purpose compressor.
//!
//! # Format (all integers little-endian)
//!
//! ```text
//! header
//!   0   8  magic "APJRNL01"
//!   8   4  kind: 1 sync, 2 rollback, 3 apply-delta
//!   12  4  block size
//!   16  16 model id (the index's 32 hex digits as 16 bytes)
//!   32  8  base generation (the files hold it before the journal is applied)
//!   40  8  target generation (after)
//!   48  8  created, unix milliseconds
//!   56  4  file count F
//!   60  4  info length I
//!   64  F × { u16 name length, name bytes (UTF-8), u64 file size }
//!   ..  I bytes: JSON object describing the generation (source, stats)
//!   ..  32 BLAKE3 of every header byte before it
//! records, repeated: the record codec of [`crate::record`], tag 'R': file index into the
//!   header's file table, the block's tensor and block offsets, its length, the first 16 bytes
//!   of its chaining value before and after (see blockhash), old XOR new zero-run coded
//! commit record (88 bytes, appended and fsynced only after everything above is durable)
//!   0   8  magic "APJCOMIT"
//!   8   8  records end: offset of this commit record
//!   16  8  record count
//!   24  32 BLAKE3 of the journal's bytes 0..records end
//!   56  32 BLAKE3 of the commit record's bytes 0..56
//! ```
//!
//! The info JSON is a [`GenerationInfo`]: `{"source": ..., "tensors": N, "bytes_compared": N}`,
//! plus `"restored_generation"` for a rollback.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fileformat::{HashedWriter, hash_prefix_of, model_id_bytes};
use crate::io::{FileIo, Io, OpenMode};
use crate::record::{self, JOURNAL, ReadError, Record, le_u32, le_u64};

/// File name of the pending journal inside the state directory.
pub const JOURNAL_FILE: &str = "journal";
/// Directory of retired journals (undo data) inside the state directory.
pub const UNDO_DIR: &str = "undo";
/// File name of the marker of a retired journal whose model writes are not yet known durable.
pub const UNFLUSHED_FILE: &str = "unflushed.json";

/// Contents of [`UNFLUSHED_FILE`] (see "Unflushed writes" above).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unflushed {
    /// The generation whose journal is `undo/<generation>.apj`.
    pub generation: u64,
    /// The kernel's boot id when the writes were made.
    pub boot_id: String,
    /// The model files written, relative to the model directory.
    pub files: Vec<String>,
}
const MAGIC: &[u8; 8] = b"APJRNL01";
const COMMIT_MAGIC: &[u8; 8] = b"APJCOMIT";
/// Length of the commit record.
pub const COMMIT_LEN: u64 = 88;

/// What a journal does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum JournalKind {
    /// A sync from live weights.
    Sync,
    /// A rollback to an earlier generation.
    Rollback,
    /// A delta applied to a replica.
    ApplyDelta,
}

impl JournalKind {
    fn code(self) -> u32 {
        match self {
            JournalKind::Sync => 1,
            JournalKind::Rollback => 2,
            JournalKind::ApplyDelta => 3,
        }
    }
    fn from_code(c: u32) -> Option<Self> {
        match c {
            1 => Some(JournalKind::Sync),
            2 => Some(JournalKind::Rollback),
            3 => Some(JournalKind::ApplyDelta),
            _ => None,
        }
    }
    /// The kind of generation it records.
    pub fn generation_kind(self) -> crate::index::GenerationKind {
        use crate::index::GenerationKind;
        match self {
            JournalKind::Sync => GenerationKind::Sync,
            JournalKind::Rollback => GenerationKind::Rollback,
            JournalKind::ApplyDelta => GenerationKind::ApplyDelta,
        }
    }
}

/// What a journal's generation is, beyond its records: kept in the header as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Where the new bytes came from.
    #[serde(default)]
    pub source: String,
    /// Tensors compared.
    #[serde(default)]
    pub tensors: u64,
    /// Bytes compared.
    #[serde(default)]
    pub bytes_compared: u64,
    /// For a rollback: the generation whose bytes it restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_generation: Option<u64>,
    /// `sync --tag` pairs, recorded with the generation.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: crate::index::Tags,
}

/// Errors reading or writing journals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// An OS error.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A committed journal whose bytes do not match its checksums.
    #[error(
        "journal {path} is committed but corrupt ({what}); it will not be applied and the model files are left as they are. Keep the file for inspection; the model may hold a partly applied sync: check it with `apollo-checkpoint verify`"
    )]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A file the journal touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalFile {
    /// Name relative to the model directory.
    pub name: String,
    /// Its size (model files never change size).
    pub size: u64,
}

/// The journal's header.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalHeader {
    /// What it does.
    pub kind: JournalKind,
    /// Block size of the index.
    pub block_size: u32,
    /// The index's model id (32 hex digits).
    pub model_id: String,
    /// Generation the files hold before.
    pub base_generation: u64,
    /// Generation they hold after.
    pub target_generation: u64,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Files, referenced by index from records.
    pub files: Vec<JournalFile>,
    /// What the generation is.
    pub info: GenerationInfo,
}

impl JournalHeader {
    /// The header's encoding, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.kind.code().to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&model_id_bytes(&self.model_id));
        out.extend_from_slice(&self.base_generation.to_le_bytes());
        out.extend_from_slice(&self.target_generation.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        let info = serde_json::to_string(&self.info).expect("plain data serializes");
        out.extend_from_slice(&(info.len() as u32).to_le_bytes());
        for f in &self.files {
            out.extend_from_slice(&(f.name.len() as u16).to_le_bytes());
            out.extend_from_slice(f.name.as_bytes());
            out.extend_from_slice(&f.size.to_le_bytes());
        }
        out.extend_from_slice(info.as_bytes());
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes a header from the start of `bytes`; returns it and its encoded length.
    fn decode(bytes: &[u8]) -> Result<(Self, usize), String> {
        let short = || "header truncated".to_string();
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err("not an apollo-checkpoint journal (bad magic)".into());
        }
        let fixed = bytes.get(..64).ok_or_else(short)?;
        let kind = JournalKind::from_code(le_u32(&fixed[8..])).ok_or("unknown journal kind")?;
        let block_size = le_u32(&fixed[12..]);
        let model_id = crate::blockhash::hex(&fixed[16..32]);
        let nfiles = le_u32(&fixed[56..]) as usize;
        let info_len = le_u32(&fixed[60..]) as usize;
        let mut p = 64;
        let mut files = Vec::new();
        for _ in 0..nfiles {
            let n = usize::from(u16::from_le_bytes(
                bytes
                    .get(p..p + 2)
                    .ok_or_else(short)?
                    .try_into()
                    .expect("2"),
            ));
            let name = std::str::from_utf8(bytes.get(p + 2..p + 2 + n).ok_or_else(short)?)
                .map_err(|_| "file name not UTF-8")?;
            let size = le_u64(bytes.get(p + 2 + n..p + 10 + n).ok_or_else(short)?);
            files.push(JournalFile {
                name: name.to_string(),
                size,
            });
            p += 10 + n;
        }
        let info_bytes = bytes.get(p..p + info_len).ok_or_else(short)?;
        let info = serde_json::from_slice(info_bytes).map_err(|e| format!("info: {e}"))?;
        p += info_len;
        let sum = bytes.get(p..p + 32).ok_or_else(short)?;
        if blake3::hash(&bytes[..p]).as_bytes() != sum {
            return Err("header checksum mismatch".into());
        }
        let header = JournalHeader {
            kind,
            block_size,
            model_id,
            base_generation: le_u64(&fixed[32..]),
            target_generation: le_u64(&fixed[40..]),
            created_ms: le_u64(&fixed[48..]),
            files,
            info,
        };
        Ok((header, p + 32))
    }
}

/// Writes a journal: header, then records, then the commit record.
pub struct JournalWriter {
    out: HashedWriter,
    header: JournalHeader,
    records_start: u64,
}

impl JournalWriter {
    /// Creates `path` (which must not exist) and writes the header.
    pub fn create(io: &dyn Io, path: &Path, header: &JournalHeader) -> Result<Self, JournalError> {
        let err = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut out = HashedWriter::new(io.create(path).map_err(err)?, path);
        out.write(&header.encode()).map_err(err)?;
        let records_start = out.pos();
        Ok(JournalWriter {
            out,
            header: header.clone(),
            records_start,
        })
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> JournalError + use<> {
        let path = self.out.path().to_path_buf();
        move |source| JournalError::Io { path, source }
    }

    /// Appends `count` encoded records.
    pub fn append(&mut self, encoded: &[u8], count: u64) -> Result<(), JournalError> {
        self.out.append(encoded, count).map_err(self.err())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.out.pos()
    }

    /// Whether nothing has been written (never true after `create`).
    pub fn is_empty(&self) -> bool {
        self.out.pos() == 0
    }

    /// Makes the records durable (file and directory), then writes and syncs the commit record.
    /// When this returns `Ok`, the journal will be rolled forward after any crash. Returns the
    /// journal, to be read back by this process (not verified again: it wrote every byte).
    pub fn commit(self, io: &dyn Io) -> Result<Journal, JournalError> {
        let path = self.out.path().to_path_buf();
        let (header, records_start, count) =
            (self.header.clone(), self.records_start, self.out.count());
        let records_end = self.write_commit(io)?;
        let file = io
            .open(&path, OpenMode::Read)
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Journal {
            header,
            path,
            file,
            records_start,
            records_end,
            count,
        })
    }

    /// The commit protocol; returns where the records end.
    fn write_commit(mut self, io: &dyn Io) -> Result<u64, JournalError> {
        let lap = std::time::Instant::now();
        self.out.sync().map_err(self.err())?;
        let records_synced = lap.elapsed().as_secs_f64();
        let dir = self
            .out
            .path()
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        io.sync_dir(&dir).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        let records_end = self.out.pos();
        let mut commit = Vec::with_capacity(COMMIT_LEN as usize);
        commit.extend_from_slice(COMMIT_MAGIC);
        commit.extend_from_slice(&records_end.to_le_bytes());
        commit.extend_from_slice(&self.out.count().to_le_bytes());
        commit.extend_from_slice(&self.out.digest());
        let self_sum = blake3::hash(&commit);
        commit.extend_from_slice(self_sum.as_bytes());
        let dir_synced = lap.elapsed().as_secs_f64();
        self.out.write(&commit).map_err(self.err())?;
        self.out.sync().map_err(self.err())?;
        tracing::debug!(
            records_synced,
            dir_synced,
            committed = lap.elapsed().as_secs_f64(),
            "journal committed (seconds from the start of the commit)"
        );
        Ok(records_end)
    }
}

/// What was found at a journal path.
#[derive(Debug)]
pub enum JournalState {
    /// No journal.
    Absent,
    /// A journal without a valid commit record: the files were never touched.
    Uncommitted,
    /// A committed journal whose checksums hold.
    Committed(Box<Journal>),
}

/// A committed, verified journal.
pub struct Journal {
    /// Its header.
    pub header: JournalHeader,
    /// Where it is.
    pub path: PathBuf,
    file: Box<dyn FileIo>,
    records_start: u64,
    records_end: u64,
    /// Number of records.
    pub count: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// The journal's size in bytes, commit record included.
    pub fn len(&self) -> u64 {
        self.records_end + COMMIT_LEN
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Reads the journal at `path`: absent, uncommitted, or committed and verified.
    pub fn open(io: &dyn Io, path: &Path) -> Result<JournalState, JournalError> {
        if !path.exists() {
            return Ok(JournalState::Absent);
        }
        let io_err = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |what: String| JournalError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let file = io.open(path, OpenMode::Read).map_err(io_err)?;
        let len = file.len();
        if len < COMMIT_LEN {
            return Ok(JournalState::Uncommitted);
        }
        let mut commit = [0u8; COMMIT_LEN as usize];
        file.read_at(len - COMMIT_LEN, &mut commit)
            .map_err(io_err)?;
        let valid_commit = &commit[..8] == COMMIT_MAGIC
            && blake3::hash(&commit[..56]).as_bytes() == &commit[56..]
            && le_u64(&commit[8..]) == len - COMMIT_LEN;
        if !valid_commit {
            return Ok(JournalState::Uncommitted);
        }
        let records_end = len - COMMIT_LEN;
        // Verify the checksum of everything before the commit record.
        if hash_prefix_of(file.as_ref(), records_end).map_err(io_err)? != commit[24..56] {
            return Err(corrupt(
                "checksum of the records does not match the commit record".into(),
            ));
        }
        let head_len = records_end.min(1 << 24) as usize;
        let mut head = vec![0u8; head_len];
        file.read_at(0, &mut head).map_err(io_err)?;
        let (header, records_start) = JournalHeader::decode(&head).map_err(corrupt)?;
        let journal = Journal {
            header,
            path: path.to_path_buf(),
            file,
            records_start: records_start as u64,
            records_end,
            count: le_u64(&commit[16..]),
        };
        // Parse every record once so a malformed one is found before anything is applied.
        let mut seen = 0u64;
        journal.for_each_batch(64 << 20, |batch| {
            seen += batch.len() as u64;
            Ok::<_, JournalError>(())
        })?;
        if seen != journal.count {
            return Err(corrupt(format!(
                "{seen} records, the commit record says {}",
                journal.count
            )));
        }
        Ok(JournalState::Committed(Box::new(journal)))
    }

    /// Calls `f` with consecutive batches of records holding about `batch_bytes` of payload.
    pub fn for_each_batch<E: From<JournalError>>(
        &self,
        batch_bytes: usize,
        f: impl FnMut(Vec<Record>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_batch_in((self.records_start, self.records_end), batch_bytes, f)
    }

    /// [`Self::for_each_batch`] over the records between byte offsets `range` of the journal
    /// (record boundaries, as its writer noted them).
    pub fn for_each_batch_in<E: From<JournalError>>(
        &self,
        range: (u64, u64),
        batch_bytes: usize,
        f: impl FnMut(Vec<Record>) -> Result<(), E>,
    ) -> Result<(), E> {
        let files = &self.header.files;
        let check = |r: &Record, _plen: u32| {
            if r.tag != JOURNAL {
                return Err("not a journal record".to_string());
            }
            let size = files.get(r.file as usize).map(|f| f.size);
            match (size, r.end()) {
                (Some(size), Some(end)) if end <= size => Ok(()),
                (None, _) => Err(format!("file {} is not in the header", r.file)),
                _ => Err("points past the end of its file".into()),
            }
        };
        let path = &self.path;
        let range = (
            range.0.max(self.records_start),
            range.1.min(self.records_end),
        );
        record::read_batches(
            self.file.as_ref(),
            range,
            batch_bytes,
            check,
            |e| E::from(JournalError::read(path, e)),
            f,
        )
    }
}

impl JournalError {
    /// The error of journal `path` for a record that could not be read.
    fn read(path: &Path, e: ReadError) -> Self {
        match e {
            ReadError::Io(source) => JournalError::Io {
                path: path.to_path_buf(),
                source,
            },
            ReadError::Malformed(what) => JournalError::Corrupt {
                path: path.to_path_buf(),
                what,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RealIo;

    fn header() -> JournalHeader {
        JournalHeader {
            kind: JournalKind::Sync,
            block_size: 4096,
            model_id: "00112233445566778899aabbccddeeff".into(),
            base_generation: 4,
            target_generation: 5,
            created_ms: 123,
            files: vec![JournalFile {
                name: "a.safetensors".into(),
                size: 1 << 20,
            }],
            info: GenerationInfo {
                source: "x".into(),
                ..GenerationInfo::default()
            },
        }
    }

    fn record(i: u64) -> Record {
        Record {
            tag: JOURNAL,
            file: 0,
            tensor_offset: 64,
            offset: 64 + 4096 * i,
            len: 4096,
            old: [1; 16],
            new: [2; 16],
            payload: vec![0, 1, 9],
        }
    }

    #[test]
    fn a_committed_journal_reads_back_and_an_uncommitted_one_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let io = RealIo::new();
        let mut w = JournalWriter::create(&io, &path, &header()).unwrap();
        let mut enc = Vec::new();
        for i in 0..10 {
            record(i).encode(&mut enc);
        }
        w.append(&enc, 10).unwrap();
        assert!(matches!(
            Journal::open(&io, &path).unwrap(),
            JournalState::Uncommitted
        ));
        let len = w.commit(&io).unwrap().len();
        assert_eq!(len, std::fs::metadata(&path).unwrap().len());
        let JournalState::Committed(j) = Journal::open(&io, &path).unwrap() else {
            panic!("committed")
        };
        assert_eq!(j.header, header());
        let mut all = Vec::new();
        j.for_each_batch(100, |b| {
            all.extend(b);
            Ok::<_, JournalError>(())
        })
        .unwrap();
        assert_eq!(all, (0..10).map(record).collect::<Vec<_>>());

        // Any flipped byte before the commit record: committed but corrupt, never applied.
        let bytes = std::fs::read(&path).unwrap();
        for at in [0, 70, bytes.len() - COMMIT_LEN as usize - 1] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            std::fs::write(&path, &b).unwrap();
            assert!(
                matches!(Journal::open(&io, &path), Err(JournalError::Corrupt { .. })),
                "byte {at}"
            );
        }
        // A torn commit record (or a truncated journal) reads as uncommitted.
        for cut in [1, 40, COMMIT_LEN as usize + 3] {
            std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
            assert!(
                matches!(
                    Journal::open(&io, &path).unwrap(),
                    JournalState::Uncommitted
                ),
                "cut {cut}"
            );
        }
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Journal::open(&io, &path).unwrap(),
            JournalState::Absent
        ));
    }
}
