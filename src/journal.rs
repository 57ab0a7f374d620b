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
//! The index's commit is durable as before. The next command that takes the lock for writing
//! (or `recover`) finishes the marker: in the same boot (the page cache still holds every byte
//! written) it fsyncs those files and removes the marker, reading nothing; after a reboot, or if
//! an fsync fails, it rolls `undo/G.apj` forward again exactly like recovery (every block
//! checked against its old and new hash, torn blocks repaired) and fsyncs the files.
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
//! records, repeated
//!   0   1  tag 'R' (0x52)
//!   1   4  file: index into the header's file table
//!   5   8  tensor offset: absolute offset of the block's tensor in the file
//!   13  8  block offset: absolute offset of the block in the file
//!   21  4  block length L
//!   25  16 old hash: first 16 bytes of the block's chaining value before (see blockhash)
//!   41  16 new hash: the same after
//!   57  4  payload length P
//!   61  P  payload: old XOR new, zero-run coded
//! commit record (88 bytes, appended and fsynced only after everything above is durable)
//!   0   8  magic "APJCOMIT"
//!   8   8  records end: offset of this commit record
//!   16  8  record count
//!   24  32 BLAKE3 of the journal's bytes 0..records end
//!   56  32 BLAKE3 of the commit record's bytes 0..56
//! ```
//!
//! Zero-run code of a block's XOR: a sequence of items `varint(zeros) varint(n) n literal bytes`,
//! meaning "skip `zeros` unchanged bytes, then XOR these `n` bytes in"; bytes after the last
//! item are unchanged. Varints are LEB128. A literal run is broken by 3 or more zero bytes.

use std::path::{Path, PathBuf};

use crate::blockhash::Cv;
use crate::fileformat::{HashedWriter, hash_prefix_of, le_u32, le_u64, model_id_bytes};
use crate::io::{FileIo, Io, OpenMode};

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
/// Bytes of a block hash kept in a record.
pub const HASH_PREFIX: usize = 16;
const RECORD_HEADER: usize = 61;
const RECORD_TAG: u8 = b'R';

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
    /// Name used in generation records.
    pub fn name(self) -> &'static str {
        match self {
            JournalKind::Sync => "sync",
            JournalKind::Rollback => "rollback",
            JournalKind::ApplyDelta => "apply-delta",
        }
    }
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
    /// A JSON object describing the generation.
    pub info: serde_json::Value,
}

/// One changed block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Index into the header's files.
    pub file: u32,
    /// Absolute offset of the block's tensor.
    pub tensor_offset: u64,
    /// Absolute offset of the block.
    pub block_offset: u64,
    /// Length of the block.
    pub len: u32,
    /// Hash prefix before.
    pub old: [u8; HASH_PREFIX],
    /// Hash prefix after.
    pub new: [u8; HASH_PREFIX],
    /// Zero-run coded XOR of old and new.
    pub payload: Vec<u8>,
}

/// The prefix of a chaining value kept in records.
pub fn hash_prefix(cv: &Cv) -> [u8; HASH_PREFIX] {
    cv[..HASH_PREFIX].try_into().expect("32 > 16")
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *input.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Appends the zero-run code of `old XOR new` to `out`; returns how many bytes differ.
pub fn encode_xor(old: &[u8], new: &[u8], out: &mut Vec<u8>) -> u64 {
    debug_assert_eq!(old.len(), new.len());
    let n = old.len();
    let mut differing = 0u64;
    let mut pos = 0; // first byte not yet coded
    let mut i = 0;
    while i < n {
        // Skip equal bytes, 8 at a time where possible.
        while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i >= n {
            break;
        }
        let start = i;
        // Extend the literal until 3 equal bytes in a row (or the end).
        let mut end = i;
        let mut equal_run = 0;
        while i < n && equal_run < 3 {
            if old[i] == new[i] {
                equal_run += 1;
            } else {
                equal_run = 0;
                end = i + 1;
                differing += 1;
            }
            i += 1;
        }
        put_varint(out, (start - pos) as u64);
        put_varint(out, (end - start) as u64);
        out.extend(
            old[start..end]
                .iter()
                .zip(&new[start..end])
                .map(|(a, b)| a ^ b),
        );
        pos = end;
        i = end;
    }
    differing
}

/// XORs a zero-run coded payload into `target`; `None` if the payload is malformed or runs past
/// the end of `target`.
pub fn apply_xor(payload: &[u8], target: &mut [u8]) -> Option<()> {
    let mut p = 0;
    let mut pos = 0usize;
    while p < payload.len() {
        let zeros = usize::try_from(get_varint(payload, &mut p)?).ok()?;
        let n = usize::try_from(get_varint(payload, &mut p)?).ok()?;
        pos = pos.checked_add(zeros)?;
        let lit = payload.get(p..p.checked_add(n)?)?;
        let dst = target.get_mut(pos..pos.checked_add(n)?)?;
        for (d, x) in dst.iter_mut().zip(lit) {
            *d ^= x;
        }
        p += n;
        pos += n;
    }
    Some(())
}

impl Record {
    /// Appends the record's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(RECORD_TAG);
        out.extend_from_slice(&self.file.to_le_bytes());
        out.extend_from_slice(&self.tensor_offset.to_le_bytes());
        out.extend_from_slice(&self.block_offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.old);
        out.extend_from_slice(&self.new);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
    }
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
        let info = self.info.to_string();
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
        Ok(JournalWriter { out })
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
    /// When this returns `Ok`, the journal will be rolled forward after any crash.
    pub fn commit(mut self, io: &dyn Io) -> Result<u64, JournalError> {
        self.out.sync().map_err(self.err())?;
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
        self.out.write(&commit).map_err(self.err())?;
        self.out.sync().map_err(self.err())?;
        Ok(records_end + COMMIT_LEN)
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
    Committed(Journal),
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
        journal.for_each_batch(usize::MAX, |batch| {
            seen += batch.len() as u64;
            Ok::<_, JournalError>(())
        })?;
        if seen != journal.count {
            return Err(corrupt(format!(
                "{seen} records, the commit record says {}",
                journal.count
            )));
        }
        Ok(JournalState::Committed(journal))
    }

    /// Calls `f` with consecutive batches of records holding about `batch_bytes` of payload.
    pub fn for_each_batch<E: From<JournalError>>(
        &self,
        batch_bytes: usize,
        mut f: impl FnMut(Vec<Record>) -> Result<(), E>,
    ) -> Result<(), E> {
        let corrupt = |what: String| JournalError::Corrupt {
            path: self.path.clone(),
            what,
        };
        let io_err = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut pos = self.records_start;
        let mut batch = Vec::new();
        let mut batch_size = 0usize;
        let mut head = [0u8; RECORD_HEADER];
        while pos < self.records_end {
            if self.records_end - pos < RECORD_HEADER as u64 {
                return Err(corrupt(format!("record at byte {pos} is truncated")).into());
            }
            self.file.read_at(pos, &mut head).map_err(io_err)?;
            if head[0] != RECORD_TAG {
                return Err(corrupt(format!("no record tag at byte {pos}")).into());
            }
            let plen = u64::from(le_u32(&head[57..]));
            let file = le_u32(&head[1..]);
            let len = le_u32(&head[21..]);
            let end = pos + RECORD_HEADER as u64 + plen;
            if end > self.records_end || file as usize >= self.header.files.len() {
                return Err(corrupt(format!("record at byte {pos} is malformed")).into());
            }
            let mut payload = vec![0u8; plen as usize];
            self.file
                .read_at(pos + RECORD_HEADER as u64, &mut payload)
                .map_err(io_err)?;
            let block_offset = le_u64(&head[13..]);
            let size = self.header.files[file as usize].size;
            if block_offset
                .checked_add(u64::from(len))
                .is_none_or(|e| e > size)
            {
                return Err(corrupt(format!(
                    "record at byte {pos} points past the end of its file"
                ))
                .into());
            }
            batch_size += payload.len() + u64::from(len) as usize;
            batch.push(Record {
                file,
                tensor_offset: le_u64(&head[5..]),
                block_offset,
                len,
                old: head[25..41].try_into().expect("16"),
                new: head[41..57].try_into().expect("16"),
                payload,
            });
            pos = end;
            if batch_size >= batch_bytes {
                f(std::mem::take(&mut batch))?;
                batch_size = 0;
            }
        }
        if !batch.is_empty() {
            f(batch)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RealIo;

    fn xor_round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut code = Vec::new();
        let differing = encode_xor(old, new, &mut code);
        assert_eq!(
            differing as usize,
            old.iter().zip(new).filter(|(a, b)| a != b).count()
        );
        let mut t = old.to_vec();
        apply_xor(&code, &mut t).unwrap();
        assert_eq!(t, new);
        // XOR is its own inverse: the same code turns new back into old.
        apply_xor(&code, &mut t).unwrap();
        assert_eq!(t, old);
        code.len()
    }

    #[test]
    fn xor_code_round_trips_and_is_small_for_sparse_changes() {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
        assert_eq!(xor_round_trip(&old, &old), 0);
        let mut one = old.clone();
        one[4095] ^= 0x40;
        assert!(xor_round_trip(&old, &one) <= 4);
        let mut spread = old.clone();
        for i in (7..4096).step_by(200) {
            spread[i] ^= 1;
            spread[i + 1] ^= 0x80;
        }
        let n = xor_round_trip(&old, &spread);
        assert!(n <= 21 * 5, "{n}");
        let other: Vec<u8> = old.iter().map(|b| !b).collect();
        assert!(xor_round_trip(&old, &other) <= 4096 + 4);
        for len in [0, 1, 2, 3, 7, 8, 9, 513] {
            let a = vec![1u8; len];
            let mut b = a.clone();
            if len > 0 {
                b[len - 1] = 0;
                b[0] = 0;
            }
            xor_round_trip(&a, &b);
        }
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        let mut t = [0u8; 16];
        assert!(
            apply_xor(&[0, 5, 1, 2], &mut t).is_none(),
            "literal past the payload"
        );
        assert!(
            apply_xor(&[15, 2, 1, 1], &mut t).is_none(),
            "literal past the block"
        );
        assert!(apply_xor(&[0xff; 11], &mut t).is_none(), "varint overflow");
    }

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
            info: serde_json::json!({"source": "x"}),
        }
    }

    fn record(i: u64) -> Record {
        Record {
            file: 0,
            tensor_offset: 64,
            block_offset: 64 + 4096 * i,
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
        let len = w.commit(&io).unwrap();
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
