//! Pieces shared by the two self-checking file formats, the journal and the delta: an
//! append-only writer that hashes everything it writes, the chunked hash of a file's first bytes
//! used to verify them, and the 16-byte encoding of the model id.

use std::path::{Path, PathBuf};

use crate::io::FileIo;

/// Bytes read at a time when verifying a file.
const CHUNK: usize = 4 << 20;

/// Bytes a [`HashedWriter`] gathers before writing them: one `pwrite` per record would cost
/// a system call per changed block (8k calls for a sparse sync).
const WRITE_BUFFER: usize = 1 << 20;

/// Appends to a new file, keeping the BLAKE3 of everything written and a record count. Bytes
/// are buffered and reach the file by [`HashedWriter::sync`] at the latest.
pub struct HashedWriter {
    file: Box<dyn FileIo>,
    path: PathBuf,
    /// Bytes appended so far, buffered or not.
    pos: u64,
    /// Bytes not yet written to the file; they start at `pos - buf.len()`.
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    count: u64,
}

impl HashedWriter {
    /// Wraps a file just created (empty).
    pub fn new(file: Box<dyn FileIo>, path: &Path) -> Self {
        HashedWriter {
            file,
            path: path.to_path_buf(),
            pos: 0,
            buf: Vec::with_capacity(WRITE_BUFFER),
            hasher: blake3::Hasher::new(),
            count: 0,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + bytes.len() > WRITE_BUFFER {
            self.flush()?;
        }
        if bytes.len() >= WRITE_BUFFER {
            self.file.write_at(self.pos, bytes)?;
        } else {
            self.buf.extend_from_slice(bytes);
        }
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes the buffered bytes to the file.
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let at = self.pos - self.buf.len() as u64;
            self.file.write_at(at, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Appends `count` encoded records.
    pub fn append(&mut self, encoded: &[u8], count: u64) -> std::io::Result<()> {
        self.write(encoded)?;
        self.count += count;
        Ok(())
    }

    /// Bytes written so far.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Records appended so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// BLAKE3 of everything written so far.
    pub fn digest(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }

    /// Writes what is buffered and makes everything appended durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.file.sync()
    }
}

/// BLAKE3 of the first `len` bytes of `file`, read in chunks.
pub fn hash_prefix_of(file: &dyn FileIo, len: u64) -> std::io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK as u64) as usize;
        file.read_at(pos, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// The model id (32 hex digits) as the 16 bytes the formats store.
pub fn model_id_bytes(model_id: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = model_id
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_round_trip_through_hex() {
        let id = "00112233445566778899aabbccddeeff";
        assert_eq!(crate::blockhash::hex(&model_id_bytes(id)), id);
    }
}
