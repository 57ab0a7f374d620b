//! Delta files: what `export-delta` writes and `apply-delta` reads on the backup host.
//!
//! A delta takes a replica from a base generation to a target generation. It is self-contained
//! (header, records, trailer with a checksum of everything before it) and immutable: written under
//! a hidden temporary name, fsynced, renamed into place, the folder fsynced, never rewritten.
//! Several generations compose: a block changed in three syncs ships once, as the XOR of its base
//! and target bytes, so a delta costs in proportion to the bytes that changed.
//!
//! A *full* delta (no base) carries whole files, for a replica that has nothing yet.
//!
//! # Format (all integers little-endian)
//!
//! ```text
//! header
//!   0   8  magic "APDELTA1"
//!   8   16 model id
//!   24  8  base generation (u64::MAX for a full delta)
//!   32  8  target generation
//!   40  4  block size
//!   44  4  flags: bit 0 full delta
//!   48  8  created, unix milliseconds
//!   56  4  file count F
//!   60  4  reserved (0)
//!   64  F × { u16 name length, name (UTF-8, a plain file name), u64 size,
//!             32 base root (zeros if unknown), 32 target root }
//! records, repeated: the record codec of [`crate::record`], tag 'X' (XOR against the base
//!   bytes, zero-run coded; old hash = base hash) or 'F' (the L target bytes themselves, old
//!   hash zeros); tensor offset u64::MAX marks raw file bytes; new hash = target hash
//! trailer (48 bytes)
//!   0   8  magic "APDEND01"
//!   8   8  record count
//!   16  32 BLAKE3 of every byte before the trailer
//! ```
//!
//! Block hashes are the first 16 bytes of the block's chaining value (see `blockhash`), or, for
//! raw file bytes (`tensor offset` u64::MAX), of `blake3::hash` of the bytes. A file's *root* is
//! the BLAKE3 of its header hash followed by the 16-byte hashes of all its tensors' blocks in file
//! order: two files with equal roots hold the same bytes. The base root lets a replica made by
//! copying the model files check its copy before the first delta is applied.

use std::path::{Path, PathBuf};

use crate::fileformat::{HashedWriter, hash_prefix_of, model_id_bytes};
use crate::io::{FileIo, Io, OpenMode};
use crate::record::{self, ReadError, Record, WHOLE, XOR, le_u32, le_u64};

const MAGIC: &[u8; 8] = b"APDELTA1";
const END_MAGIC: &[u8; 8] = b"APDEND01";
const TRAILER_LEN: u64 = 48;
/// Base generation of a full delta.
pub const NO_BASE: u64 = u64::MAX;

/// Errors reading deltas.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// An OS error.
    #[error("{path}: {source}")]
    Io {
        /// The delta.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a complete, intact delta.
    #[error(
        "{path}: not a valid delta ({what}); it was truncated or corrupted in transit: copy it again from the outbox"
    )]
    Corrupt {
        /// The delta.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file name in the delta that could escape the replica directory.
    #[error(
        "{path}: names the file {name:?}, which is not a plain file name inside the replica; refusing it"
    )]
    UnsafePath {
        /// The delta.
        path: PathBuf,
        /// The name.
        name: String,
    },
}

/// A file a delta touches.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeltaFile {
    /// Name relative to the model directory.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Root at the base generation (zeros if unknown).
    #[serde(serialize_with = "hex32")]
    pub base_root: [u8; 32],
    /// Root at the target generation.
    #[serde(serialize_with = "hex32")]
    pub target_root: [u8; 32],
}

fn hex32<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::blockhash::hex(v))
}

/// A delta's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    /// The model id (32 hex digits).
    pub model_id: String,
    /// Base generation, or [`NO_BASE`] for a full delta.
    pub base_generation: u64,
    /// Target generation.
    pub target_generation: u64,
    /// Block size.
    pub block_size: u32,
    /// Whether this is a full delta.
    pub full: bool,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Files.
    pub files: Vec<DeltaFile>,
}

/// Whether `name` is a plain file name (no directories, not hidden, not `..`).
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && !name.contains('\\')
        && !name.starts_with('.')
        && !name.contains('\0')
}

impl DeltaHeader {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&model_id_bytes(&self.model_id));
        out.extend_from_slice(&self.base_generation.to_le_bytes());
        out.extend_from_slice(&self.target_generation.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&u32::from(self.full).to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for f in &self.files {
            out.extend_from_slice(&(f.name.len() as u16).to_le_bytes());
            out.extend_from_slice(f.name.as_bytes());
            out.extend_from_slice(&f.size.to_le_bytes());
            out.extend_from_slice(&f.base_root);
            out.extend_from_slice(&f.target_root);
        }
        out
    }
}

/// Writes a delta under a hidden temporary name; [`DeltaWriter::finish`] makes it durable and
/// renames it into place.
pub struct DeltaWriter {
    out: HashedWriter,
    dest: PathBuf,
    /// Set once renamed into place; until then dropping the writer removes the temporary.
    done: bool,
}

impl Drop for DeltaWriter {
    fn drop(&mut self) {
        if !self.done {
            // An export that failed (a full disk) leaves no temporary behind. Best effort, and
            // outside the I/O layer: a temporary left by a crash is replaced by the next export.
            let _ = std::fs::remove_file(self.out.path());
        }
    }
}

impl DeltaWriter {
    /// Starts `dest` (written as `.<name>.tmp` in the same folder; an old temporary is replaced).
    pub fn create(io: &dyn Io, dest: &Path, header: &DeltaHeader) -> Result<Self, DeltaError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.tmp"));
        let err = |source| DeltaError::Io {
            path: tmp.clone(),
            source,
        };
        if tmp.exists() {
            io.remove_file(&tmp).map_err(err)?;
        }
        let mut out = HashedWriter::new(io.create(&tmp).map_err(err)?, &tmp);
        out.write(&header.encode()).map_err(err)?;
        Ok(DeltaWriter {
            out,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> DeltaError + use<> {
        let path = self.out.path().to_path_buf();
        move |source| DeltaError::Io { path, source }
    }

    /// Appends encoded records.
    pub fn append(&mut self, encoded: &[u8], count: u64) -> Result<(), DeltaError> {
        self.out.append(encoded, count).map_err(self.err())
    }

    /// Writes the trailer, fsyncs, renames into place and fsyncs the folder; returns the size
    /// and the BLAKE3 of the whole file.
    pub fn finish(mut self, io: &dyn Io) -> Result<(u64, [u8; 32]), DeltaError> {
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        trailer.extend_from_slice(END_MAGIC);
        trailer.extend_from_slice(&self.out.count().to_le_bytes());
        trailer.extend_from_slice(&self.out.digest());
        self.out.write(&trailer).map_err(self.err())?;
        self.out.sync().map_err(self.err())?;
        let err = |p: &Path, source| DeltaError::Io {
            path: p.to_path_buf(),
            source,
        };
        io.rename(self.out.path(), &self.dest)
            .map_err(|e| err(&self.dest, e))?;
        self.done = true;
        let dir = self.dest.parent().unwrap_or(Path::new("."));
        io.sync_dir(dir).map_err(|e| err(dir, e))?;
        Ok((self.out.pos(), self.out.digest()))
    }
}

/// A verified delta file.
pub struct Delta {
    /// Its header.
    pub header: DeltaHeader,
    /// Where it is.
    pub path: PathBuf,
    file: Box<dyn FileIo>,
    records_start: u64,
    records_end: u64,
    /// Number of records.
    pub count: u64,
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delta")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Delta {
    /// Opens `path` and verifies its checksum, structure and file names.
    pub fn open(io: &dyn Io, path: &Path) -> Result<Self, DeltaError> {
        let io_err = |source| DeltaError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |what: &str| DeltaError::Corrupt {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        let file = io.open(path, OpenMode::Read).map_err(io_err)?;
        let len = file.len();
        if len < 64 + TRAILER_LEN {
            return Err(corrupt("too short"));
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        file.read_at(len - TRAILER_LEN, &mut trailer)
            .map_err(io_err)?;
        if &trailer[..8] != END_MAGIC {
            return Err(corrupt("no trailer: truncated"));
        }
        let records_end = len - TRAILER_LEN;
        if hash_prefix_of(file.as_ref(), records_end).map_err(io_err)? != trailer[16..] {
            return Err(corrupt("checksum mismatch"));
        }
        let mut head = vec![0u8; records_end.min(1 << 24) as usize];
        file.read_at(0, &mut head).map_err(io_err)?;
        if &head[..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let nfiles = le_u32(&head[56..]) as usize;
        // Each entry takes at least 74 bytes: a count the header cannot hold is a lie (it was
        // an allocation of hundreds of GB, and an abort).
        if nfiles.saturating_mul(74) > head.len() {
            return Err(corrupt("file count larger than its file table"));
        }
        let mut p = 64;
        let mut files = Vec::with_capacity(nfiles);
        for _ in 0..nfiles {
            let n = usize::from(u16::from_le_bytes(
                head.get(p..p + 2)
                    .ok_or_else(|| corrupt("file table"))?
                    .try_into()
                    .expect("2"),
            ));
            let entry = head
                .get(p + 2..p + 2 + n + 8 + 64)
                .ok_or_else(|| corrupt("file table"))?;
            let name = std::str::from_utf8(&entry[..n])
                .map_err(|_| corrupt("file name not UTF-8"))?
                .to_string();
            if !plain_name(&name) {
                return Err(DeltaError::UnsafePath {
                    path: path.to_path_buf(),
                    name,
                });
            }
            files.push(DeltaFile {
                name,
                size: le_u64(&entry[n..]),
                base_root: entry[n + 8..n + 40].try_into().expect("32"),
                target_root: entry[n + 40..n + 72].try_into().expect("32"),
            });
            p += 2 + n + 72;
        }
        let header = DeltaHeader {
            model_id: crate::blockhash::hex(&head[8..24]),
            base_generation: le_u64(&head[24..]),
            target_generation: le_u64(&head[32..]),
            block_size: le_u32(&head[40..]),
            full: le_u32(&head[44..]) & 1 == 1,
            created_ms: le_u64(&head[48..]),
            files,
        };
        let delta = Delta {
            header,
            path: path.to_path_buf(),
            file,
            records_start: p as u64,
            records_end,
            count: le_u64(&trailer[8..]),
        };
        let mut seen = 0;
        delta.for_each_batch(64 << 20, |b| {
            seen += b.len() as u64;
            Ok::<_, DeltaError>(())
        })?;
        if seen != delta.count {
            return Err(corrupt("record count does not match the trailer"));
        }
        Ok(delta)
    }

    /// Calls `f` with consecutive batches of records holding about `batch_bytes` of payload.
    pub fn for_each_batch<E: From<DeltaError>>(
        &self,
        batch_bytes: usize,
        f: impl FnMut(Vec<Record>) -> Result<(), E>,
    ) -> Result<(), E> {
        let files = &self.header.files;
        let check = |r: &Record, plen: u32| {
            if r.tag != XOR && r.tag != WHOLE {
                return Err("not a delta record".to_string());
            }
            let in_file = files
                .get(r.file as usize)
                .is_some_and(|f| r.end().is_some_and(|e| e <= f.size));
            if !in_file {
                return Err("outside its file".into());
            }
            if r.tag == WHOLE && plen != r.len {
                return Err("its bytes are not its length".into());
            }
            Ok(())
        };
        let path = &self.path;
        let error = |e| {
            E::from(match e {
                ReadError::Io(source) => DeltaError::Io {
                    path: path.clone(),
                    source,
                },
                ReadError::Malformed(what) => DeltaError::Corrupt {
                    path: path.clone(),
                    what,
                },
            })
        };
        record::read_batches(
            self.file.as_ref(),
            (self.records_start, self.records_end),
            batch_bytes,
            check,
            error,
            f,
        )
    }
}

/// The 16-byte hash of a record's bytes: the block's chaining value, or BLAKE3 of raw bytes.
pub fn record_hash(tensor_offset: u64, offset: u64, bytes: &[u8]) -> [u8; record::HASH_PREFIX] {
    if tensor_offset == record::RAW {
        blake3::hash(bytes).as_bytes()[..record::HASH_PREFIX]
            .try_into()
            .expect("32 > 16")
    } else {
        record::hash_prefix(&crate::blockhash::subtree_cv(offset - tensor_offset, bytes))
    }
}

/// Name of the delta file taking `base` to `target` (`full` for a full delta).
pub fn delta_name(base: Option<u64>, target: u64) -> String {
    match base {
        Some(b) => format!("delta-{b:06}-{target:06}.apd"),
        None => format!("delta-full-{target:06}.apd"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RealIo;

    #[test]
    fn a_delta_round_trips_and_any_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo::new();
        let header = DeltaHeader {
            model_id: "00112233445566778899aabbccddeeff".into(),
            base_generation: 41,
            target_generation: 47,
            block_size: 4096,
            full: false,
            created_ms: 5,
            files: vec![DeltaFile {
                name: "model.safetensors".into(),
                size: 1 << 20,
                base_root: [1; 32],
                target_root: [2; 32],
            }],
        };
        let dest = dir.path().join(delta_name(Some(41), 47));
        let mut w = DeltaWriter::create(&io, &dest, &header).unwrap();
        let rec = |i: u64| Record {
            tag: if i % 2 == 0 { XOR } else { WHOLE },
            file: 0,
            tensor_offset: 100,
            offset: 100 + 4096 * i,
            len: 4096,
            old: [3; 16],
            new: [4; 16],
            payload: if i % 2 == 0 {
                vec![0, 1, 7]
            } else {
                vec![9; 4096]
            },
        };
        let mut enc = Vec::new();
        for i in 0..6 {
            rec(i).encode(&mut enc);
        }
        w.append(&enc, 6).unwrap();
        assert!(!dest.exists(), "nothing appears before finish");
        let (len, sum) = w.finish(&io).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap().len() as u64, len);
        assert_eq!(
            &sum,
            blake3::hash(&std::fs::read(&dest).unwrap()).as_bytes()
        );
        let d = Delta::open(&io, &dest).unwrap();
        assert_eq!(d.header, header);
        let mut all = Vec::new();
        d.for_each_batch(10_000, |b| {
            all.extend(b);
            Ok::<_, DeltaError>(())
        })
        .unwrap();
        assert_eq!(all, (0..6).map(rec).collect::<Vec<_>>());

        let bytes = std::fs::read(&dest).unwrap();
        for at in [0, 30, 70, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            std::fs::write(&dest, &b).unwrap();
            assert!(Delta::open(&io, &dest).is_err(), "byte {at}");
        }
        std::fs::write(&dest, &bytes[..bytes.len() - 100]).unwrap();
        assert!(matches!(
            Delta::open(&io, &dest),
            Err(DeltaError::Corrupt { .. })
        ));
    }

    #[test]
    fn names_that_could_escape_are_not_plain() {
        for bad in ["", "../x", "/etc/passwd", "a/b", ".hidden", "..", "a\\b"] {
            assert!(!plain_name(bad), "{bad}");
        }
        assert!(plain_name("model-00001-of-00002.safetensors"));
    }
}
