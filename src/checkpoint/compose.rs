//! Composing the undo data of several generations (a rollback) in bounded memory.
//!
//! Rolling back N generations XORs, per block, the undo records of all of them. The composed
//! records wait in memory up to [`MEMORY_BYTES`]; beyond that they are sorted by (file,
//! offset), composed where one block appears twice, and written as one *run* to an unnamed
//! temporary file in the state directory (scratch: deleted by the kernel when closed, nothing to
//! clean up after a crash). [`Composer::finish`] merges the runs and yields each block once,
//! composed, in (file, offset) order. XOR composition is commutative, so the order records
//! arrive in does not matter.
//!
//! Run format: pieces of `file: u32 LE | offset: u64 LE | tensor offset: u64 LE | len: u32 LE |
//! payload length: u32 LE | payload (zero-run coded XOR, see `crate::record`)`, sorted by
//! (file, offset), one piece per block.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::record::compose_xor;

/// Payload bytes kept in memory before a run is written.
pub const MEMORY_BYTES: usize = 64 << 20;
const RUN_BUFFER: usize = 1 << 20;

/// One block's undo: where it is and the XOR that undoes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Index into the composer's file names.
    pub file: u32,
    pub offset: u64,
    pub tensor_offset: u64,
    pub len: u32,
    pub payload: Vec<u8>,
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed undo payload")
}

/// `a` becomes `a` and `b` (one block) as one piece.
fn compose(a: &mut Piece, b: &Piece) -> io::Result<()> {
    a.payload = compose_xor(&a.payload, &b.payload, a.len as usize).ok_or_else(malformed)?;
    Ok(())
}

/// Undo pieces of several generations, composed per block, in bounded memory.
pub(crate) struct Composer {
    dir: PathBuf,
    limit: usize,
    mem: Vec<Piece>,
    mem_bytes: usize,
    runs: Vec<File>,
}

impl Composer {
    /// A composer whose runs go to unnamed files in `dir`, written every `limit` payload bytes.
    pub fn new(dir: &Path, limit: usize) -> Self {
        Composer {
            dir: dir.to_path_buf(),
            limit: limit.max(1),
            mem: Vec::new(),
            mem_bytes: 0,
            runs: Vec::new(),
        }
    }

    /// Adds one block's undo.
    pub fn push(&mut self, piece: Piece) -> io::Result<()> {
        self.mem_bytes += piece.payload.len() + 32;
        self.mem.push(piece);
        if self.mem_bytes >= self.limit {
            let sorted = sort_and_compose(std::mem::take(&mut self.mem))?;
            self.mem_bytes = 0;
            let file = tempfile::tempfile_in(&self.dir)?;
            let mut w = BufWriter::with_capacity(RUN_BUFFER, file);
            for p in &sorted {
                w.write_all(&p.file.to_le_bytes())?;
                w.write_all(&p.offset.to_le_bytes())?;
                w.write_all(&p.tensor_offset.to_le_bytes())?;
                w.write_all(&p.len.to_le_bytes())?;
                w.write_all(&(p.payload.len() as u32).to_le_bytes())?;
                w.write_all(&p.payload)?;
            }
            let mut file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.rewind()?;
            self.runs.push(file);
        }
        Ok(())
    }

    /// Every block once, composed, in (file, offset) order.
    pub fn finish(self) -> io::Result<Composed> {
        let mut sources: Vec<Source> = self
            .runs
            .into_iter()
            .map(|f| Source::Run(BufReader::with_capacity(RUN_BUFFER, f)))
            .collect();
        sources.push(Source::Memory(sort_and_compose(self.mem)?.into_iter()));
        let mut heads = Vec::with_capacity(sources.len());
        let mut heap = BinaryHeap::new();
        for (i, s) in sources.iter_mut().enumerate() {
            let head = s.next()?;
            if let Some(p) = &head {
                heap.push(Reverse((p.file, p.offset, i)));
            }
            heads.push(head);
        }
        Ok(Composed {
            sources,
            heads,
            heap,
        })
    }
}

/// `pieces` sorted by (file, offset), each block once.
fn sort_and_compose(mut pieces: Vec<Piece>) -> io::Result<Vec<Piece>> {
    pieces.sort_by_key(|p| (p.file, p.offset));
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match out.last_mut() {
            Some(last) if (last.file, last.offset) == (p.file, p.offset) => compose(last, &p)?,
            _ => out.push(p),
        }
    }
    Ok(out)
}

enum Source {
    Run(BufReader<File>),
    Memory(std::vec::IntoIter<Piece>),
}

impl Source {
    fn next(&mut self) -> io::Result<Option<Piece>> {
        let r = match self {
            Source::Memory(it) => return Ok(it.next()),
            Source::Run(r) => r,
        };
        let mut head = [0u8; 28];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8"));
        let mut payload = vec![0u8; u32_at(24) as usize];
        r.read_exact(&mut payload)?;
        Ok(Some(Piece {
            file: u32_at(0),
            offset: u64_at(4),
            tensor_offset: u64_at(12),
            len: u32_at(20),
            payload,
        }))
    }
}

/// The merge of a composer's runs: each block once, composed, in (file, offset) order.
pub(crate) struct Composed {
    sources: Vec<Source>,
    heads: Vec<Option<Piece>>,
    heap: BinaryHeap<Reverse<(u32, u64, usize)>>,
}

impl Composed {
    fn take(&mut self, i: usize) -> io::Result<Piece> {
        let p = self.heads[i]
            .take()
            .expect("a source in the heap has a head");
        let next = self.sources[i].next()?;
        if let Some(n) = &next {
            self.heap.push(Reverse((n.file, n.offset, i)));
        }
        self.heads[i] = next;
        Ok(p)
    }

    fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        let Some(Reverse((file, offset, i))) = self.heap.pop() else {
            return Ok(None);
        };
        let mut piece = self.take(i)?;
        while let Some(&Reverse((f, o, j))) = self.heap.peek() {
            if (f, o) != (file, offset) {
                break;
            }
            self.heap.pop();
            let other = self.take(j)?;
            compose(&mut piece, &other)?;
        }
        Ok(Some(piece))
    }
}

impl Iterator for Composed {
    type Item = io::Result<Piece>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::record::{apply_xor, encode_xor};

    proptest! {
        /// Any undo pieces, spilled every few bytes, compose to what composing them all in
        /// memory gives: per block, the XOR of all its pieces.
        #[test]
        fn spilled_composition_equals_composition_in_memory(
            pieces in proptest::collection::vec((0u32..3, 0u64..6, any::<[u8; 8]>()), 0..120),
            limit in 1usize..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut c = Composer::new(dir.path(), limit);
            let mut want: BTreeMap<(u32, u64), [u8; 8]> = BTreeMap::new();
            for (file, block, x) in &pieces {
                let mut payload = Vec::new();
                encode_xor(&[0u8; 8], x, &mut payload);
                c.push(Piece { file: *file, offset: block * 8, tensor_offset: 0, len: 8, payload }).unwrap();
                let w = want.entry((*file, block * 8)).or_insert([0; 8]);
                for (a, b) in w.iter_mut().zip(x) {
                    *a ^= b;
                }
            }
            let got: Vec<Piece> = c.finish().unwrap().collect::<io::Result<_>>().unwrap();
            prop_assert_eq!(got.len(), want.len());
            for (p, ((file, offset), x)) in got.iter().zip(&want) {
                prop_assert_eq!((p.file, p.offset), (*file, *offset));
                let mut block = [0u8; 8];
                apply_xor(&p.payload, &mut block).unwrap();
                prop_assert_eq!(&block, x);
            }
        }
    }
}
