//! Finding and journaling what changed, streamed in bounded memory.
//!
//! Tensors are taken in batches whose stored hashes fit in [`plan::HASH_BATCH_BYTES`]. For each
//! batch:
//!
//! 1. **Candidates.** A source that hashes where its data lives (the GPU) hashes summary units
//!    (16 blocks) in place and only the hashes cross to the host; within the units whose hash
//!    differs from the stored summary it hashes the blocks, and the blocks whose hash differs
//!    from the stored one are candidates (see [`Changes::hash_in_place`]). A host source compares 16 KiB groups first (BLAKE3 runs at full SIMD
//!    width on them) and only the blocks of differing groups are candidates — except in a
//!    tensor whose sampled first groups nearly all differ (a training step changes every
//!    block): there every block is a candidate and no group is hashed, so each byte is hashed
//!    once, below.
//! 2. **Capture.** The candidates' bytes are copied in runs of adjacent blocks, at most
//!    [`CAPTURE_BYTES`] at a time, with the hash of each block *of the bytes copied* (a GPU
//!    gathers them into large transfers and makes the copy consistent, see
//!    [`WeightSource::capture`]). Blocks whose copy hashes as stored did not change.
//! 3. **Stage.** For each run of changed blocks, the old bytes are read with one read, each
//!    block checked against its stored hash and `old XOR new` zero-run coded, on all cores;
//!    the records go to the write transaction, which is begun at the first change (a sync
//!    that finds nothing writes no journal).
//! 4. **Summaries.** The summaries holding a changed block are recomputed from the stored
//!    hashes and the new ones (all of a tensor's when they were not known) for the index.
//!
//! Memory: one batch of stored hashes (only where summaries differ, for the GPU), candidates as block numbers, two capture buffers and the
//! old bytes of one capture; the new hashes of the changed blocks go to a [`HashSpill`] (in
//! memory up to 48 MiB, then sorted runs in a temporary file) for the index.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use indicatif::ProgressBar;
use rayon::prelude::*;

use super::txn::WriteTxn;
use super::{Checkpoint, Error, seconds_since};
use crate::blockhash::{self, BlockLayout, Cv, merge_blocks};
use crate::index::{BlockIndex, FileRanges, HashSpill, IndexedTensor, NewSummaries, unix_ms};
use crate::io::{FileIo, OpenMode};
use crate::journal::{GenerationInfo, JournalFile, JournalHeader, JournalKind};
use crate::model::ModelLayout;
use crate::plan::{self, merge_ranges};
use crate::record::{self, Record, encode_xor, hash_prefix};
use crate::source::{BlockRun, CaptureBuffer, CaptureStats, WeightSource};

/// Live bytes captured at a time, at most (one capture buffer).
pub const CAPTURE_BYTES: u64 = 64 << 20;
/// Capture buffers: one being copied into while the other is staged.
const CAPTURE_BUFFERS: usize = 2;
/// Old bytes read and coded by one parallel work item, at most.
const STAGE_PIECE: u64 = 1 << 20;
/// Groups sampled at the start of a tensor to judge whether nearly all of it changed.
const SAMPLE_GROUPS: u64 = 8;

/// A batch's stored block hashes, per comparison.
type Stored = Vec<Vec<Cv>>;
/// A batch's candidate blocks, per comparison (sorted block numbers).
type Candidates = Vec<Vec<u64>>;

/// One tensor to compare: (model tensor index, source tensor index, its index row).
pub(crate) type Comparison<'a> = (usize, usize, &'a IndexedTensor);

/// What the changes amount to.
#[derive(Default)]
pub(crate) struct Found {
    /// Blocks journaled.
    pub blocks: u64,
    /// Bytes of those blocks.
    pub bytes_changed: u64,
    /// Bytes that differ inside them.
    pub differing: u64,
    /// Tensors with a changed block.
    pub tensors_changed: usize,
    /// New block hashes of the changed blocks.
    pub updates: HashSpill,
    /// Changed ranges per file.
    pub ranges: FileRanges,
    /// Files written.
    pub files_changed: Vec<String>,
    /// What copying from the source's device cost.
    pub capture: CaptureStats,
    /// Seconds spent reading stored block hashes.
    pub index_read_seconds: f64,
    /// Bytes of stored hashes and summaries read.
    pub index_bytes_read: u64,
    /// New summaries, by tensor id, for the index.
    pub summaries: HashMap<i64, NewSummaries>,
    /// Seconds spent finding candidates (hashing live bytes, comparing).
    pub plan_seconds: f64,
    /// Seconds spent capturing and staging.
    pub stage_seconds: f64,
    /// Seconds spent copying changed blocks from the source (overlapping the staging).
    pub capture_seconds: f64,
}

/// A write begun: its transaction and the model files it opened (in the journal's order).
pub(crate) type Pending<'a> = (WriteTxn<'a>, Vec<Box<dyn FileIo>>);

/// One batch of tensors: their comparisons and stored block hashes.
struct Batch<'b> {
    cmp: &'b [Comparison<'b>],
    stored: &'b [Vec<Cv>],
}

/// The blocks of a capture whose copy (hash `cvs`, in run order) is not what the index holds.
fn changed_blocks(
    batch: &Batch<'_>,
    runs: &[(usize, BlockRun)],
    lens: &[u64],
    cvs: &[Cv],
    block_size: u64,
) -> Vec<Changed> {
    let mut changed = Vec::new();
    let (mut at, mut i) = (0usize, 0usize);
    for ((k, r), len) in runs.iter().zip(lens) {
        for b in r.first..r.first + r.count {
            if cvs[i] != batch.stored[*k][b as usize] {
                changed.push(Changed {
                    k: *k,
                    block: b,
                    at: at + ((b - r.first) * block_size) as usize,
                    new: cvs[i],
                });
            }
            i += 1;
        }
        at += *len as usize;
    }
    changed
}

/// A block whose live copy differs from the stored hash.
#[derive(Clone, Copy)]
struct Changed {
    /// Index into the batch's comparisons.
    k: usize,
    block: u64,
    /// Where its copy starts in the capture buffer.
    at: usize,
    new: Cv,
}

/// The streaming search and journaling of one sync.
pub(crate) struct Changes<'a> {
    pub cp: &'a Checkpoint,
    pub model: &'a ModelLayout,
    pub source: &'a dyn WeightSource,
    pub layout: BlockLayout,
    pub info: GenerationInfo,
}

impl<'a> Changes<'a> {
    /// Finds and journals every change of `comparisons`; returns what was found and the write
    /// transaction holding it (`None`: nothing changed), with the model files it opened.
    pub fn run(
        &self,
        index: &BlockIndex,
        comparisons: &[Comparison<'_>],
        progress: &ProgressBar,
    ) -> Result<(Found, Option<Pending<'a>>), Error> {
        let mut out = Staging {
            found: Found::default(),
            txn: None,
            captures: Vec::new(),
            batch_changed: Vec::new(),
            files: Vec::new(),
            tensors: BTreeSet::new(),
            ranges: BTreeMap::new(),
        };
        out.found.updates = HashSpill::new(&self.cp.state_dir);
        let len = |c: &Comparison<'_>| self.model.tensors[c.0].entry.len;
        for batch in plan::hash_batches(comparisons.iter().map(len), self.layout) {
            let cmp = &comparisons[batch];
            let known = self.known_summaries(index, cmp, &mut out.found)?;
            let (mut stored, candidates) = if self.source.hashes_in_place() {
                self.hash_in_place(index, cmp, &known, &mut out.found)?
            } else {
                let wants: Vec<_> = cmp.iter().map(|c| (c.2, None)).collect();
                let stored = self.stored(index, &wants, &mut out.found)?;
                let lap = Instant::now();
                let candidates = self.compare_groups(cmp, &stored)?;
                out.found.plan_seconds += seconds_since(lap);
                (stored, candidates)
            };
            let lap = Instant::now();
            let batch = Batch {
                cmp,
                stored: &stored,
            };
            let captures = capture_batches(&candidates, cmp, self.layout);
            self.capture_and_stage(index, &batch, &captures, &mut out)?;
            let changed = std::mem::take(&mut out.batch_changed);
            self.new_summaries(cmp, &mut stored, &known, changed, &mut out.found);
            out.found.stage_seconds += seconds_since(lap);
            progress.inc(cmp.iter().map(len).sum());
        }
        let mut found = out.found;
        found.tensors_changed = out.tensors.len();
        found.files_changed = out
            .ranges
            .keys()
            .map(|&f| self.model.files[f].name.clone())
            .collect();
        found.ranges = out
            .ranges
            .into_iter()
            .map(|(f, r)| (self.model.files[f].name.clone(), merge_ranges(r)))
            .collect();
        Ok((found, out.txn.map(|t| (t, out.files))))
    }

    /// The stored summaries of a batch's tensors (`None` where not known).
    fn known_summaries(
        &self,
        index: &BlockIndex,
        cmp: &[Comparison<'_>],
        found: &mut Found,
    ) -> Result<Vec<Option<Vec<Cv>>>, Error> {
        let lap = Instant::now();
        let rows: Vec<&IndexedTensor> = cmp.iter().map(|c| c.2).collect();
        let known = index.tensors_summaries(&rows, self.layout)?;
        let bytes = known
            .iter()
            .flatten()
            .map(|s| s.len() as u64 * 32)
            .sum::<u64>();
        found.index_bytes_read += bytes;
        tracing::debug!(
            tensors = rows.len(),
            bytes,
            seconds = seconds_since(lap),
            "summaries read"
        );
        found.index_read_seconds += seconds_since(lap);
        Ok(known)
    }

    /// The batch's new summaries, into `found.summaries`: those holding a changed block of a
    /// tensor whose summaries are known, every summary of a tensor whose summaries were not
    /// (its stored hashes were all read). `stored` takes the new hashes of `changed`.
    fn new_summaries(
        &self,
        cmp: &[Comparison<'_>],
        stored: &mut Stored,
        known: &[Option<Vec<Cv>>],
        mut changed: Vec<(usize, u64, Cv)>,
        found: &mut Found,
    ) {
        let layout = self.layout;
        let lap = Instant::now();
        changed.sort_unstable_by_key(|c| (c.0, c.1));
        for &(k, b, cv) in &changed {
            stored[k][b as usize] = cv;
        }
        let per = layout.blocks_per_summary();
        let mut by_tensor: Vec<Vec<u64>> = vec![Vec::new(); cmp.len()];
        for &(k, b, _) in &changed {
            if by_tensor[k].last() != Some(&(b / per)) {
                by_tensor[k].push(b / per);
            }
        }
        // Every summary to compute, (comparison, summary), on all cores: a dense change
        // recomputes them all, and a few tensors hold most of them.
        let mut items: Vec<(usize, u64)> = Vec::new();
        for k in 0..cmp.len() {
            let len = self.model.tensors[cmp[k].0].entry.len;
            match &known[k] {
                None => items.extend((0..layout.summaries(len)).map(|s| (k, s))),
                Some(_) => items.extend(by_tensor[k].iter().map(|&s| (k, s))),
            }
        }
        let cvs: Vec<Cv> = items
            .par_iter()
            .map(|&(k, s)| {
                let len = self.model.tensors[cmp[k].0].entry.len;
                layout.summary_of(&stored[k], len, s)
            })
            .collect();
        let mut per_tensor: Vec<Vec<(u64, Cv)>> = vec![Vec::new(); cmp.len()];
        for (&(k, s), &cv) in items.iter().zip(&cvs) {
            per_tensor[k].push((s, cv));
        }
        let new = per_tensor.into_iter().enumerate().filter_map(|(k, list)| {
            let new = match known[k] {
                // (A tensor without bytes gets its empty list too.)
                None => NewSummaries::All(list.into_iter().map(|(_, cv)| cv).collect()),
                Some(_) if list.is_empty() => return None,
                Some(_) => NewSummaries::Some(list),
            };
            Some((cmp[k].2.id, new))
        });
        tracing::debug!(
            summaries = cvs.len(),
            seconds = seconds_since(lap),
            "summaries recomputed"
        );
        found.summaries.extend(new);
    }

    /// The stored hashes of `wants`: every block (`None`), or those of the given summaries
    /// (the other entries zero).
    fn stored(
        &self,
        index: &BlockIndex,
        wants: &[(&IndexedTensor, Option<&[u64]>)],
        found: &mut Found,
    ) -> Result<Stored, Error> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let lap = Instant::now();
        let stored = index.tensors_hashes_in(wants, self.layout)?;
        let per = self.layout.blocks_per_summary();
        found.index_bytes_read += wants
            .iter()
            .map(|(t, only)| only.map_or(self.layout.blocks(t.len), |s| s.len() as u64 * per) * 32)
            .sum::<u64>();
        tracing::debug!(
            tensors = wants.len(),
            seconds = seconds_since(lap),
            "stored hashes read"
        );
        found.index_read_seconds += seconds_since(lap);
        Ok(stored)
    }

    /// Hashes the runs of each of `jobs` (runs, unit, output) on the source, in another thread,
    /// while `read` (the stored hashes) runs in this one; returns what `read` gave and what the
    /// hashing cost (stats, seconds).
    fn hash_while<T>(
        &self,
        jobs: &mut [(&[BlockRun], u64, &mut [Cv])],
        read: impl FnOnce() -> T,
    ) -> (T, Result<(CaptureStats, f64), crate::source::SourceError>) {
        let source = self.source;
        std::thread::scope(|scope| {
            let hashing = scope.spawn(|| {
                let lap = Instant::now();
                let mut stats = CaptureStats::default();
                for (runs, unit, out) in jobs.iter_mut().filter(|j| !j.0.is_empty()) {
                    stats.add(source.hash_blocks(runs, *unit, out)?);
                }
                Ok((stats, seconds_since(lap)))
            });
            let read = read();
            (read, hashing.join().expect("hashing does not panic"))
        })
    }

    /// For a source that hashes where its data lives (the GPU): returns the stored hashes and
    /// the candidates (the blocks whose live hash differs from the stored one); only hashes
    /// cross to the host.
    ///
    /// A tensor whose summaries are known is hashed in summary units (64 KiB at 4 KiB blocks)
    /// and compared with them, while they are read; only within the summaries that differ are
    /// the stored block hashes read and, unless most of the tensor's summaries differ (a
    /// training step: every block of them is a candidate, judged when captured), its blocks
    /// hashed. A tensor without known summaries has every block hashed while its stored hashes
    /// are read.
    fn hash_in_place(
        &self,
        index: &BlockIndex,
        cmp: &[Comparison<'_>],
        known: &[Option<Vec<Cv>>],
        found: &mut Found,
    ) -> Result<(Stored, Candidates), Error> {
        let lap = Instant::now();
        let layout = self.layout;
        let len = |k: usize| self.model.tensors[cmp[k].0].entry.len;
        let unit = layout.summary_size();
        let (by_summary, whole): (Vec<usize>, Vec<usize>) =
            (0..cmp.len()).partition(|&k| known[k].is_some());
        let runs = |ks: &[usize], unit: u64| -> Vec<BlockRun> {
            ks.iter()
                .map(|&k| BlockRun {
                    tensor: cmp[k].1,
                    first: 0,
                    count: len(k).div_ceil(unit),
                })
                .collect()
        };
        let (summary_runs, block_runs) = (runs(&by_summary, unit), runs(&whole, layout.block_size));
        let count = |r: &[BlockRun]| r.iter().map(|r| r.count as usize).sum::<usize>();
        let mut live_summaries = vec![[0u8; 32]; count(&summary_runs)];
        let mut live_blocks = vec![[0u8; 32]; count(&block_runs)];
        let whole_wants: Vec<_> = whole.iter().map(|&k| (cmp[k].2, None)).collect();
        // The GPU hashes while the stored hashes of the tensors without summaries are read.
        let (stored_whole, hashed) = self.hash_while(
            &mut [
                (&summary_runs, unit, &mut live_summaries),
                (&block_runs, layout.block_size, &mut live_blocks),
            ],
            || self.stored(index, &whole_wants, found),
        );
        let (stored_whole, (stats, hash_seconds)) = (stored_whole?, hashed?);
        found.capture.add(stats);
        let compared = Instant::now();
        let mut stored: Stored = vec![Vec::new(); cmp.len()];
        let mut candidates: Candidates = vec![Vec::new(); cmp.len()];
        // Tensors without summaries: every block compared.
        let mut at = 0;
        for (&k, s) in whole.iter().zip(stored_whole) {
            let live = &live_blocks[at..at + s.len()];
            at += s.len();
            candidates[k] = (0..s.len())
                .filter(|&b| live[b] != s[b])
                .map(|b| b as u64)
                .collect();
            stored[k] = s;
        }
        // Tensors with summaries: the summaries that differ.
        let mut differing: Vec<(usize, Vec<u64>)> = Vec::new();
        let mut at = 0;
        for &k in &by_summary {
            let old = known[k].as_deref().expect("partitioned on it");
            let live = &live_summaries[at..at + old.len()];
            at += old.len();
            let diff: Vec<u64> = (0..old.len())
                .filter(|&i| live[i] != old[i])
                .map(|i| i as u64)
                .collect();
            // (No stored hashes at all for a tensor whose summaries all match: nothing reads
            // them.)
            if !diff.is_empty() {
                differing.push((k, diff));
            }
        }
        let mut compare_seconds = seconds_since(compared);
        if !differing.is_empty() {
            compare_seconds +=
                self.within_summaries(index, cmp, &differing, &mut stored, &mut candidates, found)?;
        }
        tracing::debug!(
            tensors = cmp.len(),
            by_summary = by_summary.len(),
            summaries_differing = differing.iter().map(|d| d.1.len()).sum::<usize>(),
            hash_seconds,
            compare_seconds,
            "batch hashed where the weights live"
        );
        // Wall time, with the reading of the stored hashes (`index_read`) inside it.
        found.plan_seconds += seconds_since(lap);
        Ok((stored, candidates))
    }

    /// For [`Self::hash_in_place`]: the stored hashes and candidates of the tensors whose
    /// `differing` summaries (comparison, sorted summary numbers) did not match; returns the
    /// seconds spent comparing.
    fn within_summaries(
        &self,
        index: &BlockIndex,
        cmp: &[Comparison<'_>],
        differing: &[(usize, Vec<u64>)],
        stored: &mut Stored,
        candidates: &mut Candidates,
        found: &mut Found,
    ) -> Result<f64, Error> {
        let layout = self.layout;
        let len = |k: usize| self.model.tensors[cmp[k].0].entry.len;
        // Most of a tensor's summaries differ: all their blocks are candidates (judged by
        // the capture's hashes); otherwise their blocks are hashed, while their stored
        // hashes are read.
        let mostly = |k: usize, diff: &[u64]| diff.len() as u64 * 2 > layout.summaries(len(k));
        let mut block_runs = Vec::new();
        let mut places = Vec::new();
        for (k, diff) in differing {
            if mostly(*k, diff) {
                continue;
            }
            for s in diff {
                let b = layout.summary_blocks(len(*k), *s);
                places.push((*k, b.clone()));
                block_runs.push(BlockRun {
                    tensor: cmp[*k].1,
                    first: b.start,
                    count: b.end - b.start,
                });
            }
        }
        let mut live = vec![[0u8; 32]; block_runs.iter().map(|r| r.count as usize).sum()];
        // Only the differing summaries' blocks are read where few differ; where more than
        // one in 16 do, nearly every page of the hashes holds one of them: all are read.
        let rows: Vec<(&IndexedTensor, Option<&[u64]>)> = differing
            .iter()
            .map(|(k, diff)| {
                let few = (diff.len() as u64) * 16 < layout.summaries(len(*k));
                (cmp[*k].2, few.then_some(diff.as_slice()))
            })
            .collect();
        let (read, hashed) = self
            .hash_while(&mut [(&block_runs, layout.block_size, &mut live)], || {
                self.stored(index, &rows, found)
            });
        let (read, (stats, _)) = (read?, hashed?);
        found.capture.add(stats);
        let lap = Instant::now();
        for ((k, diff), s) in differing.iter().zip(read) {
            if mostly(*k, diff) {
                candidates[*k] = diff
                    .iter()
                    .flat_map(|&d| layout.summary_blocks(len(*k), d))
                    .collect();
            }
            stored[*k] = s;
        }
        let mut at = 0;
        for (k, blocks) in places {
            for b in blocks {
                if live[at] != stored[k][b as usize] {
                    candidates[k].push(b);
                }
                at += 1;
            }
        }
        Ok(seconds_since(lap))
    }

    /// For a host source: the candidate blocks of a batch, per comparison (sorted block
    /// numbers), by comparing 16 KiB groups first.
    fn compare_groups(
        &self,
        cmp: &[Comparison<'_>],
        stored: &[Vec<Cv>],
    ) -> Result<Vec<Vec<u64>>, Error> {
        let layout = self.layout;
        // Groups: a sample of each tensor first, then the rest of the tensors that are not
        // nearly all changed.
        let per = layout.blocks_per_group();
        let groups = |k: usize| layout.groups(self.model.tensors[cmp[k].0].entry.len);
        let differing = |k: usize, first: u64, count: u64| -> Result<Vec<u64>, Error> {
            let c = &cmp[k];
            let len = self.model.tensors[c.0].entry.len;
            let mut live = vec![[0u8; 32]; count as usize];
            self.source
                .hash_units(c.1, layout.group_size, first, &mut live)?;
            Ok((0..count)
                .filter(|&i| {
                    let g = first + i;
                    let b0 = (g * per) as usize;
                    let b1 = (b0 + per as usize).min(stored[k].len());
                    let glen = layout.group_size.min(len - g * layout.group_size);
                    merge_blocks(&stored[k][b0..b1], glen, layout.block_size) != live[i as usize]
                })
                .map(|i| first + i)
                .collect())
        };
        let sampled: Vec<(Vec<u64>, bool)> = (0..cmp.len())
            .into_par_iter()
            .map(|k| {
                let n = SAMPLE_GROUPS.min(groups(k));
                let diff = differing(k, 0, n)?;
                // Nearly all of the sample changed, and there is more: take every block.
                let dense = n == SAMPLE_GROUPS && diff.len() as u64 * 4 >= n * 3;
                Ok::<_, Error>((diff, dense))
            })
            .collect::<Result<_, _>>()?;
        let mut items = Vec::new();
        for (k, (_, dense)) in sampled.iter().enumerate() {
            if !dense {
                for (first, count) in plan::work_items(
                    (groups(k) - SAMPLE_GROUPS.min(groups(k))) * layout.group_size,
                    layout.group_size,
                ) {
                    items.push((k, SAMPLE_GROUPS.min(groups(k)) + first, count));
                }
            }
        }
        let rest: Vec<(usize, Vec<u64>)> = items
            .into_par_iter()
            .map(|(k, first, count)| Ok::<_, Error>((k, differing(k, first, count)?)))
            .collect::<Result<_, _>>()?;
        let mut out: Vec<Vec<u64>> = vec![Vec::new(); cmp.len()];
        for (k, (diff, dense)) in sampled.into_iter().enumerate() {
            if dense {
                out[k] = (0..stored[k].len() as u64).collect();
            } else {
                out[k] = blocks_of_groups(&diff, per, stored[k].len() as u64);
            }
        }
        for (k, diff) in rest {
            out[k].extend(blocks_of_groups(&diff, per, stored[k].len() as u64));
        }
        for o in &mut out {
            o.sort_unstable();
        }
        Ok(out)
    }

    /// Captures each of `captures` and stages the records of the blocks that changed: the next
    /// capture is copied (by another thread, into the other of two buffers) while the last one
    /// is staged.
    fn capture_and_stage(
        &self,
        index: &BlockIndex,
        batch: &Batch<'_>,
        captures: &[Vec<(usize, BlockRun)>],
        out: &mut Staging<'a>,
    ) -> Result<(), Error> {
        if captures.is_empty() {
            return Ok(());
        }
        let bs = self.layout.block_size;
        let lens = |runs: &[(usize, BlockRun)]| -> Vec<u64> {
            runs.iter()
                .map(|(k, r)| r.span(bs, self.model.tensors[batch.cmp[*k].0].entry.len).1)
                .collect()
        };
        let all_lens: Vec<Vec<u64>> = captures.iter().map(|c| lens(c)).collect();
        while out.captures.len() < CAPTURE_BUFFERS.min(captures.len()) {
            out.captures
                .push(self.source.capture_buffer(CAPTURE_BYTES as usize)?);
        }
        let source = self.source;
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Box<dyn CaptureBuffer>>();
        for b in out.captures.drain(..) {
            free_tx.send(b).expect("the receiver is alive");
        }
        std::thread::scope(|scope| {
            let capturer = scope.spawn(|| {
                for (runs, lens) in captures.iter().zip(&all_lens) {
                    let Ok(mut buffer) = free_rx.recv() else {
                        break;
                    };
                    let total = lens.iter().sum::<u64>() as usize;
                    let source_runs: Vec<BlockRun> = runs.iter().map(|r| r.1).collect();
                    let mut cvs = vec![[0u8; 32]; runs.iter().map(|r| r.1.count as usize).sum()];
                    let lap = Instant::now();
                    let captured = source.capture(&source_runs, bs, &mut buffer[..total], &mut cvs);
                    let took = seconds_since(lap);
                    if done_tx.send((buffer, cvs, captured, took)).is_err() {
                        break;
                    }
                }
                drop(done_tx);
                free_rx
            });
            let mut result = Ok(());
            for (runs, lens) in captures.iter().zip(&all_lens) {
                let Ok((buffer, cvs, captured, took)) = done_rx.recv() else {
                    break;
                };
                out.found.capture_seconds += took;
                let total = lens.iter().sum::<u64>() as usize;
                result = captured.map_err(Error::from).and_then(|stats| {
                    out.found.capture.add(stats);
                    let changed = changed_blocks(batch, runs, lens, &cvs, bs);
                    self.stage(index, batch, &changed, &buffer[..total], out)
                });
                if result.is_err() {
                    out.captures.push(buffer);
                    break;
                }
                free_tx
                    .send(buffer)
                    .expect("the capturer keeps its receiver until it ends");
            }
            drop(free_tx);
            drop(done_rx);
            let free_rx = capturer.join().expect("capturing does not panic");
            out.captures.extend(free_rx.try_iter());
            result
        })
    }

    /// Stages the records of `changed` (their new bytes in `bytes`), beginning the write at the
    /// first change.
    fn stage(
        &self,
        index: &BlockIndex,
        batch: &Batch<'_>,
        changed: &[Changed],
        bytes: &[u8],
        out: &mut Staging<'a>,
    ) -> Result<(), Error> {
        if changed.is_empty() {
            return Ok(());
        }
        if out.txn.is_none() {
            out.begin(self, index)?;
        }
        // Pieces of adjacent changed blocks of one tensor, staged in parallel, in order.
        let pieces = pieces(changed, self.layout.block_size, STAGE_PIECE);
        let staged: Vec<(Vec<u8>, u64, u64)> = pieces
            .par_iter()
            .map(|p| self.stage_piece(batch, &changed[p.clone()], bytes, &out.files))
            .collect::<Result<_, Error>>()?;
        let txn = out.txn.as_mut().expect("begun above");
        for (p, (encoded, bytes_changed, differing)) in pieces.iter().zip(staged) {
            let n = p.len() as u64;
            txn.stage(&encoded, n)?;
            out.found.blocks += n;
            out.found.bytes_changed += bytes_changed;
            out.found.differing += differing;
        }
        for c in changed {
            let t = &self.model.tensors[batch.cmp[c.k].0];
            let id = batch.cmp[c.k].2.id;
            out.tensors.insert(id);
            out.batch_changed.push((c.k, c.block, c.new));
            out.found
                .updates
                .push(id, c.block, c.new)
                .map_err(|source| Error::Io {
                    path: self.cp.state_dir.clone(),
                    source,
                })?;
            let (off, len) = plan::block_span(self.layout, t.entry.len, c.block);
            out.ranges
                .entry(t.file)
                .or_default()
                .push((t.entry.offset + off, len));
        }
        for r in out.ranges.values_mut() {
            if r.len() > 1 << 16 {
                *r = merge_ranges(std::mem::take(r));
            }
        }
        Ok(())
    }

    /// Reads the old bytes of adjacent changed blocks with one read, checks each against its
    /// stored hash and codes `old XOR new`: (encoded records, bytes, differing bytes).
    fn stage_piece(
        &self,
        batch: &Batch<'_>,
        piece: &[Changed],
        bytes: &[u8],
        files: &[Box<dyn FileIo>],
    ) -> Result<(Vec<u8>, u64, u64), Error> {
        let (bs, first) = (self.layout.block_size, piece[0]);
        let t = &self.model.tensors[batch.cmp[first.k].0];
        let file = &files[t.file];
        let start = first.block * bs;
        let end = ((piece[piece.len() - 1].block + 1) * bs).min(t.entry.len);
        OLD.with_borrow_mut(|old| {
            old.resize((end - start) as usize, 0);
            file.read_at(t.entry.offset + start, old)
                .map_err(Checkpoint::io_err(file.path()))?;
            self.code_piece(batch, piece, bytes, old, start)
        })
    }

    /// Codes the records of `piece` from its old bytes `old` (from tensor byte `start` on).
    fn code_piece(
        &self,
        batch: &Batch<'_>,
        piece: &[Changed],
        bytes: &[u8],
        old: &[u8],
        start: u64,
    ) -> Result<(Vec<u8>, u64, u64), Error> {
        let t = &self.model.tensors[batch.cmp[piece[0].k].0];
        let mut encoded = Vec::with_capacity(piece.len() * (record::HEAD_LEN + 64));
        let (mut total, mut differing) = (0u64, 0u64);
        let mut payload = Vec::with_capacity(self.layout.block_size as usize);
        let stored = &batch.stored[piece[0].k];
        let blocks = piece[0].block..piece[piece.len() - 1].block + 1;
        if let Some(block) = old_mismatch(self.layout, t.entry.len, stored, blocks, old, start) {
            let (off, len) = plan::block_span(self.layout, t.entry.len, block);
            return Err(Error::OldBlockChanged {
                file: self.model.files[t.file].name.clone(),
                tensor: t.entry.name.clone(),
                block,
                offset: t.entry.offset + off,
                end: t.entry.offset + off + len,
                args: self.cp.args(),
            });
        }
        for c in piece {
            let (off, len) = plan::block_span(self.layout, t.entry.len, c.block);
            let o = &old[(off - start) as usize..(off - start + len) as usize];
            let was = stored[c.block as usize];
            let new = &bytes[c.at..c.at + len as usize];
            payload.clear();
            differing += encode_xor(o, new, &mut payload);
            let record = Record {
                tag: record::JOURNAL,
                file: t.file as u32,
                tensor_offset: t.entry.offset,
                offset: t.entry.offset + off,
                len: len as u32,
                old: hash_prefix(&was),
                new: hash_prefix(&c.new),
                payload: std::mem::take(&mut payload),
            };
            record.encode(&mut encoded);
            payload = record.payload;
            total += len;
        }
        Ok((encoded, total, differing))
    }
}

thread_local! {
    /// Each staging thread's buffer of old bytes, reused (no fresh pages per piece).
    static OLD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The write in progress: begun at the first change.
struct Staging<'a> {
    found: Found,
    txn: Option<WriteTxn<'a>>,
    /// The capture buffers ([`CAPTURE_BYTES`] each), from the source, reused.
    captures: Vec<Box<dyn CaptureBuffer>>,
    /// The changed blocks of the current batch: (comparison index, block, new hash).
    batch_changed: Vec<(usize, u64, Cv)>,
    /// Every model file, open for writing, in the journal's file table order (model order).
    files: Vec<Box<dyn FileIo>>,
    /// Tensors with a changed block (row ids).
    tensors: BTreeSet<i64>,
    ranges: BTreeMap<usize, Vec<(u64, u64)>>,
}

impl<'a> Staging<'a> {
    /// Opens every model file for writing (each still the file the index trusts) and begins the
    /// write transaction; the journal's file table is the model's files, in order.
    fn begin(&mut self, c: &Changes<'a>, index: &BlockIndex) -> Result<(), Error> {
        let model = c.model;
        for (f, mf) in model.files.iter().enumerate() {
            let path = model.file_path(f);
            let h =
                c.cp.io
                    .open(&path, OpenMode::ReadWrite)
                    .map_err(Checkpoint::io_err(&path))?;
            if !h
                .stat()
                .map_err(Checkpoint::io_err(&path))?
                .same_file_as(&mf.stat)
            {
                return Err(Error::Stale {
                    file: mf.name.clone(),
                    what: "changed while this sync was reading it".into(),
                    args: c.cp.args(),
                });
            }
            self.files.push(h);
        }
        let current = index.generation()?.unwrap_or(0);
        let header = JournalHeader {
            kind: JournalKind::Sync,
            block_size: c.layout.block_size as u32,
            model_id: index.model_id()?,
            base_generation: current,
            target_generation: current + 1,
            created_ms: unix_ms() as u64,
            files: model
                .files
                .iter()
                .map(|f| JournalFile {
                    name: f.name.clone(),
                    size: f.stat.size,
                })
                .collect(),
            info: c.info.clone(),
        };
        self.txn = Some(WriteTxn::begin(c.cp, &header)?);
        Ok(())
    }
}

/// The blocks of groups `groups` (of `per` blocks each) of a tensor of `blocks` blocks.
fn blocks_of_groups(groups: &[u64], per: u64, blocks: u64) -> Vec<u64> {
    groups
        .iter()
        .flat_map(|g| (g * per..((g + 1) * per).min(blocks)).collect::<Vec<_>>())
        .collect()
}

/// The candidates as runs of adjacent blocks, in captures of at most [`CAPTURE_BYTES`]: each
/// capture a list of (comparison index, run).
fn capture_batches(
    candidates: &[Vec<u64>],
    cmp: &[Comparison<'_>],
    layout: BlockLayout,
) -> Vec<Vec<(usize, BlockRun)>> {
    let bs = layout.block_size;
    let per_capture = (CAPTURE_BYTES / bs).max(1);
    let mut out = Vec::new();
    let mut current: Vec<(usize, BlockRun)> = Vec::new();
    let mut blocks = 0u64;
    for (k, cands) in candidates.iter().enumerate() {
        let tensor = cmp[k].1;
        let mut i = 0;
        while i < cands.len() {
            let first = cands[i];
            let mut count = 1;
            while i + (count as usize) < cands.len()
                && cands[i + count as usize] == first + count
                && blocks + count < per_capture
            {
                count += 1;
            }
            current.push((
                k,
                BlockRun {
                    tensor,
                    first,
                    count,
                },
            ));
            blocks += count;
            i += count as usize;
            if blocks >= per_capture {
                out.push(std::mem::take(&mut current));
                blocks = 0;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The first of the consecutive `blocks` of a tensor of `tensor_len` bytes whose bytes `old`
/// (from tensor byte `start` on) do not hash to `stored`, if any. The blocks are hashed as one
/// run, at BLAKE3's full SIMD width ([`blockhash::hash_units`]).
fn old_mismatch(
    layout: BlockLayout,
    tensor_len: u64,
    stored: &[Cv],
    blocks: std::ops::Range<u64>,
    old: &[u8],
    start: u64,
) -> Option<u64> {
    let bs = layout.block_size;
    let first = blocks.start * bs;
    let end = (blocks.end * bs).min(tensor_len);
    let mut cvs = vec![[0u8; 32]; (blocks.end - blocks.start) as usize];
    blockhash::hash_units(
        first,
        bs,
        &old[(first - start) as usize..(end - start) as usize],
        &mut cvs,
    );
    cvs.iter()
        .zip(&stored[blocks.start as usize..blocks.end as usize])
        .position(|(new, old)| new != old)
        .map(|i| blocks.start + i as u64)
}

/// `changed` cut into pieces of adjacent blocks of one tensor, of at most `max` bytes.
fn pieces(changed: &[Changed], block_size: u64, max: u64) -> Vec<std::ops::Range<usize>> {
    let per = (max / block_size).max(1) as usize;
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=changed.len() {
        let split = i == changed.len()
            || i - start == per
            || changed[i].k != changed[i - 1].k
            || changed[i].block != changed[i - 1].block + 1;
        if split {
            out.push(start..i);
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The check finds exactly the first block whose old bytes differ from its
        /// stored hash, for any range of blocks, tensor length and changed byte.
        #[test]
        fn old_mismatch_finds_the_first_changed_block(
            len in 1u64..90_000,
            a in 0u64..1000,
            b in 0u64..1000,
            flip in proptest::option::of((0u64..90_000, 1u8..=255)),
            seed in any::<u64>(),
        ) {
            let layout = BlockLayout::new(4096).unwrap();
            let mut rng = crate::synthetic::Rng::new(seed);
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let blocks = layout.blocks(len);
            let mut stored = vec![[0u8; 32]; blocks as usize];
            blockhash::hash_units(0, 4096, &data, &mut stored);
            let (lo, hi) = ((a % blocks).min(b % blocks), (a % blocks).max(b % blocks) + 1);
            let start = lo * 4096;
            let end = (hi * 4096).min(len);
            let mut old = data[start as usize..end as usize].to_vec();
            let mut expected = None;
            if let Some((at, x)) = flip {
                let at = at % len;
                if (start..end).contains(&at) {
                    old[(at - start) as usize] ^= x;
                    expected = Some(at / 4096);
                }
            }
            prop_assert_eq!(old_mismatch(layout, len, &stored, lo..hi, &old, start), expected);
        }
    }
}
