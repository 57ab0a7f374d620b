//! New block hashes of one write, gathered in bounded memory.
//!
//! A dense sync of a 54 GB model changes about 13 million 4 KiB blocks; at 40 bytes each their
//! new hashes alone would take half a gigabyte, and folding them into the index used to copy
//! them once more. [`HashSpill`] keeps at most [`MEMORY_ENTRIES`] of them in memory: when that
//! fills, the entries are sorted by (tensor, block) and written as one *run* to an unnamed
//! temporary file in the state directory (deleted by the kernel when closed, so a crash leaves
//! nothing behind; it is scratch, not state: the journal already holds everything the write
//! needs to be redone). [`HashSpill::sorted`] merges the runs and the in-memory rest and yields
//! each tensor's new hashes in block order, one tensor at a time.
//!
//! Run format: records of [`ENTRY_LEN`] bytes, `tensor id: i64 LE | block: u64 LE | hash: 32
//! bytes`, sorted by (tensor id, block), entries of one (tensor, block) in the order they were
//! pushed. Where a block was pushed more than once, the last push wins.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::HashUpdate;
use crate::blockhash::Cv;

/// Entries kept in memory before a run is written (48 MiB).
pub const MEMORY_ENTRIES: usize = 1 << 20;
/// Bytes of one entry in a run file.
pub const ENTRY_LEN: usize = 48;
/// Read buffer per run while merging.
const RUN_BUFFER: usize = 1 << 20;

/// One new hash: (tensor id, block, hash).
type Entry = (i64, u64, Cv);

/// New block hashes, in memory up to a limit and in sorted runs on disk beyond it.
#[derive(Debug, Default)]
pub struct HashSpill {
    /// Where runs go (`None`: never spill, for small writes known in advance).
    dir: Option<PathBuf>,
    /// Entries in memory before a run is written (set with `dir`).
    limit: usize,
    mem: Vec<Entry>,
    runs: Vec<File>,
    len: u64,
}

impl HashSpill {
    /// An empty spill whose runs go to unnamed files in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self::with_limit(dir, MEMORY_ENTRIES)
    }

    /// An empty spill that writes a run every `limit` entries (tests use small ones).
    pub fn with_limit(dir: &Path, limit: usize) -> Self {
        HashSpill {
            dir: Some(dir.to_path_buf()),
            limit: limit.max(1),
            ..HashSpill::default()
        }
    }

    /// Adds the new hash of `block` of tensor `tensor`.
    pub fn push(&mut self, tensor: i64, block: u64, cv: Cv) -> io::Result<()> {
        self.mem.push((tensor, block, cv));
        self.len += 1;
        if self.dir.is_some() && self.mem.len() >= self.limit {
            self.write_run()?;
        }
        Ok(())
    }

    /// Entries pushed (a block pushed twice counts twice).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs written to disk so far.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    fn write_run(&mut self) -> io::Result<()> {
        let dir = self.dir.as_deref().expect("checked by the caller");
        // A stable sort: pushes of one block keep their order.
        self.mem.sort_by_key(|e| (e.0, e.1));
        let file = tempfile::tempfile_in(dir)?;
        let mut w = BufWriter::with_capacity(RUN_BUFFER, file);
        for (t, b, cv) in self.mem.drain(..) {
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&b.to_le_bytes())?;
            w.write_all(&cv)?;
        }
        let mut file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.rewind()?;
        self.runs.push(file);
        Ok(())
    }

    /// Every tensor's new hashes, one tensor at a time (ordered by tensor id), each sorted by
    /// block with one hash per block (the last pushed).
    pub fn sorted(mut self) -> SortedHashes {
        self.mem.sort_by_key(|e| (e.0, e.1));
        let mut sources: Vec<Source> = self
            .runs
            .into_iter()
            .map(|f| Source::Run(BufReader::with_capacity(RUN_BUFFER, f)))
            .collect();
        sources.push(Source::Memory(self.mem.into_iter()));
        SortedHashes {
            sources,
            heap: BinaryHeap::new(),
            current: None,
            started: false,
            pending: None,
        }
    }
}

/// One sorted sequence of entries being merged.
enum Source {
    Run(BufReader<File>),
    Memory(std::vec::IntoIter<Entry>),
}

impl Source {
    fn next(&mut self) -> io::Result<Option<Entry>> {
        match self {
            Source::Memory(it) => Ok(it.next()),
            Source::Run(r) => {
                let mut buf = [0u8; ENTRY_LEN];
                match r.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(e),
                }
                let t = i64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                let b = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                let cv: Cv = buf[16..].try_into().expect("32 bytes");
                Ok(Some((t, b, cv)))
            }
        }
    }
}

/// The merge of a spill's runs: an iterator of each tensor's [`HashUpdate`].
pub struct SortedHashes {
    sources: Vec<Source>,
    /// The next entry of each source but `current`'s, smallest (tensor, block, source) first:
    /// entries of one block come out in the order they were pushed (earlier runs hold earlier
    /// pushes).
    heap: BinaryHeap<Reverse<(i64, u64, usize, Cv)>>,
    /// The smallest entry of all: taken from the heap, or the next of the source the last one
    /// came from while that is still smaller than the heap's top (a source's entries are
    /// taken in long stretches without touching the heap: a sync's runs hold whole tensors).
    current: Option<(i64, u64, usize, Cv)>,
    started: bool,
    /// The first entry of the next tensor, taken while finishing the previous one.
    pending: Option<Entry>,
}

impl SortedHashes {
    fn pop(&mut self) -> io::Result<Option<Entry>> {
        if !self.started {
            self.started = true;
            for i in 0..self.sources.len() {
                if let Some((t, b, cv)) = self.sources[i].next()? {
                    self.heap.push(Reverse((t, b, i, cv)));
                }
            }
            self.current = self.heap.pop().map(|Reverse(e)| e);
        }
        let Some((t, b, i, cv)) = self.current.take() else {
            return Ok(None);
        };
        let next = self.sources[i]
            .next()?
            .map(|(t2, b2, cv2)| (t2, b2, i, cv2));
        self.current = match (next, self.heap.peek()) {
            (Some(n), Some(Reverse(top))) if (n.0, n.1, n.2) > (top.0, top.1, top.2) => {
                self.heap.push(Reverse(n));
                self.heap.pop().map(|Reverse(e)| e)
            }
            (Some(n), _) => Some(n),
            (None, _) => self.heap.pop().map(|Reverse(e)| e),
        };
        Ok(Some((t, b, cv)))
    }

    fn next_update(&mut self) -> io::Result<Option<HashUpdate>> {
        let first = match self.pending.take() {
            Some(e) => e,
            None => match self.pop()? {
                Some(e) => e,
                None => return Ok(None),
            },
        };
        let mut update = HashUpdate {
            tensor_id: first.0,
            blocks: vec![(first.1, first.2)],
        };
        while let Some(e) = self.pop()? {
            if e.0 != update.tensor_id {
                self.pending = Some(e);
                break;
            }
            let last = update.blocks.last_mut().expect("one pushed above");
            if last.0 == e.1 {
                last.1 = e.2; // the same block, pushed later: its newer hash wins
            } else {
                update.blocks.push((e.1, e.2));
            }
        }
        Ok(Some(update))
    }
}

impl Iterator for SortedHashes {
    type Item = io::Result<HashUpdate>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_update().transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn cv(n: u64) -> Cv {
        let mut c = [0u8; 32];
        c[..8].copy_from_slice(&n.to_le_bytes());
        c
    }

    proptest! {
        /// Any pushes, spilled every few entries, come back as the map "last push wins" gives.
        #[test]
        fn merged_runs_equal_the_last_push_of_each_block(
            pushes in proptest::collection::vec((0i64..6, 0u64..40), 0..300),
            limit in 1usize..50,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut spill = HashSpill::with_limit(dir.path(), limit);
            let mut expect: BTreeMap<i64, BTreeMap<u64, Cv>> = BTreeMap::new();
            for (i, &(t, b)) in pushes.iter().enumerate() {
                spill.push(t, b, cv(i as u64)).unwrap();
                expect.entry(t).or_default().insert(b, cv(i as u64));
            }
            prop_assert_eq!(spill.len(), pushes.len() as u64);
            prop_assert_eq!(spill.runs(), pushes.len() / limit);
            let got: Vec<HashUpdate> = spill.sorted().collect::<io::Result<_>>().unwrap();
            let want: Vec<(i64, Vec<(u64, Cv)>)> = expect
                .into_iter()
                .map(|(t, m)| (t, m.into_iter().collect()))
                .collect();
            let got: Vec<(i64, Vec<(u64, Cv)>)> =
                got.into_iter().map(|u| (u.tensor_id, u.blocks)).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn runs_are_unnamed_files_that_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = HashSpill::with_limit(dir.path(), 4);
        for b in 0..10 {
            spill.push(1, b, cv(b)).unwrap();
        }
        assert_eq!(spill.runs(), 2);
        let updates: Vec<HashUpdate> = spill.sorted().collect::<io::Result<_>>().unwrap();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].blocks.len(), 10);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
