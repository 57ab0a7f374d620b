//! Deciding what changed: compare live weights with the stored block hashes, without reading the
//! model files.
//!
//! Used by `sync` (the source is the live weights) and by `verify` (the source is the model files
//! themselves). Stored hashes are loaded in batches of at most [`HASH_BATCH_BYTES`]; each batch is
//! cut into work items of at most [`ITEM_BYTES`] of live data, hashed on all cores.

use std::collections::BTreeMap;

use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::blockhash::{self, BlockLayout, Cv, merge_blocks};
use crate::index::{BlockIndex, IndexedTensor};
use crate::model::ModelLayout;
use crate::source::WeightSource;

/// Stored hashes loaded at once, at most (about 8 GiB of tensor data at 4 KiB blocks).
pub const HASH_BATCH_BYTES: u64 = 64 << 20;
/// Live bytes hashed by one parallel work item, at most.
pub const ITEM_BYTES: u64 = 4 << 20;

/// A block whose live bytes differ from the stored hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangedBlock {
    /// Index of the block in its tensor.
    pub block: u64,
    /// Stored hash.
    pub old: Cv,
    /// Live hash.
    pub new: Cv,
}

/// The changed blocks of one tensor.
#[derive(Debug)]
pub struct TensorPlan {
    /// Index into the model layout's tensors.
    pub model: usize,
    /// Index into the source's tensors.
    pub source: usize,
    /// Index row id.
    pub index_id: i64,
    /// Changed blocks, by block index.
    pub blocks: Vec<ChangedBlock>,
}

/// One tensor to compare: (model tensor index, source tensor index, its index row).
pub type Comparison<'a> = (usize, usize, &'a IndexedTensor);

/// Start and length of block `block` of a tensor of `len` bytes.
pub fn block_span(layout: BlockLayout, len: u64, block: u64) -> (u64, u64) {
    let start = block * layout.block_size;
    (start, layout.block_size.min(len - start))
}

/// Work items covering `len` bytes in pieces of at most [`ITEM_BYTES`], aligned to `unit`:
/// (first unit, unit count).
pub fn work_items(len: u64, unit: u64) -> impl Iterator<Item = (u64, u64)> {
    let units = len.div_ceil(unit);
    let per_item = (ITEM_BYTES / unit).max(1);
    (0..units.div_ceil(per_item)).map(move |i| (i * per_item, per_item.min(units - i * per_item)))
}

/// Sorted, merged (offset, len) ranges.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= off => last.1 = last.1.max(off + len - last.0),
            _ => out.push((off, len)),
        }
    }
    out
}

/// Splits tensors (given by length) into consecutive index ranges whose stored hashes fit in
/// [`HASH_BATCH_BYTES`].
pub fn hash_batches(
    lens: impl Iterator<Item = u64>,
    layout: BlockLayout,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    let mut n = 0;
    for (i, len) in lens.enumerate() {
        let b = layout.blocks(len) * blockhash::CV_LEN as u64;
        if i > start && bytes + b > HASH_BATCH_BYTES {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
        n = i + 1;
    }
    if n > start {
        out.push(start..n);
    }
    out
}

/// Compares every tensor of `comparisons` in `source` with its stored hashes and returns the
/// tensors that have changed blocks, in the order given.
pub fn find_changed<E>(
    index: &BlockIndex,
    model: &ModelLayout,
    source: &dyn WeightSource,
    comparisons: &[Comparison<'_>],
    layout: BlockLayout,
    progress: &ProgressBar,
) -> Result<Vec<TensorPlan>, E>
where
    E: From<crate::index::IndexError> + From<crate::source::SourceError> + Send,
{
    let mut plans = Vec::new();
    let len = |c: &Comparison<'_>| model.tensors[c.0].entry.len;
    for batch in hash_batches(comparisons.iter().map(len), layout) {
        let mut stored: Vec<Vec<Cv>> = Vec::with_capacity(batch.len());
        for c in &comparisons[batch.clone()] {
            stored.push(index.tensor_hashes(c.2, layout)?);
        }
        let mut items = Vec::new();
        for (k, c) in comparisons[batch.clone()].iter().enumerate() {
            for (first, count) in work_items(len(c), layout.group_size) {
                items.push((k, first, count));
            }
        }
        let found: Vec<(usize, Vec<ChangedBlock>)> = items
            .into_par_iter()
            .map(|(k, first, count)| {
                let c = &comparisons[batch.start + k];
                let changed = plan_groups(source, c.1, len(c), layout, &stored[k], first, count)?;
                progress.inc((count * layout.group_size).min(len(c) - first * layout.group_size));
                Ok((k, changed))
            })
            .collect::<Result<_, E>>()?;
        let mut by_tensor: BTreeMap<usize, Vec<ChangedBlock>> = BTreeMap::new();
        for (k, changed) in found {
            if !changed.is_empty() {
                by_tensor.entry(k).or_default().extend(changed);
            }
        }
        for (k, mut blocks) in by_tensor {
            blocks.sort_unstable_by_key(|b| b.block);
            let c = &comparisons[batch.start + k];
            plans.push(TensorPlan {
                model: c.0,
                source: c.1,
                index_id: c.2.id,
                blocks,
            });
        }
    }
    Ok(plans)
}

/// Compares `count` groups of a tensor, from group `first`, with the stored block hashes;
/// returns the blocks that differ with their stored and new hashes.
fn plan_groups(
    source: &dyn WeightSource,
    source_tensor: usize,
    len: u64,
    layout: BlockLayout,
    stored: &[Cv],
    first: u64,
    count: u64,
) -> Result<Vec<ChangedBlock>, crate::source::SourceError> {
    let mut groups = vec![[0u8; 32]; count as usize];
    source.hash_units(source_tensor, layout.group_size, first, &mut groups)?;
    let per = layout.blocks_per_group();
    let nblocks = layout.blocks(len);
    let mut changed = Vec::new();
    let mut block_cvs = vec![[0u8; 32]; per as usize];
    for (k, live) in groups.iter().enumerate() {
        let g = first + k as u64;
        let b0 = g * per;
        let b1 = (b0 + per).min(nblocks);
        let old = &stored[b0 as usize..b1 as usize];
        let group_len = layout.group_size.min(len - g * layout.group_size);
        if merge_blocks(old, group_len, layout.block_size) == *live {
            continue;
        }
        let new = &mut block_cvs[..old.len()];
        if old.len() == 1 {
            new[0] = *live;
        } else {
            source.hash_units(source_tensor, layout.block_size, b0, new)?;
        }
        for (j, (o, n)) in old.iter().zip(new.iter()).enumerate() {
            if o != n {
                changed.push(ChangedBlock {
                    block: b0 + j as u64,
                    old: *o,
                    new: *n,
                });
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        assert_eq!(
            merge_ranges(vec![(8, 4), (0, 4), (4, 4), (20, 1), (19, 3)]),
            vec![(0, 12), (19, 3)]
        );
        assert!(merge_ranges(vec![]).is_empty());
    }

    #[test]
    fn work_items_cover_the_tensor_once() {
        for (len, unit) in [
            (0, 4096),
            (1, 4096),
            (ITEM_BYTES, 65536),
            (3 * ITEM_BYTES + 5, 65536),
            (10, 1 << 24),
        ] {
            let items: Vec<_> = work_items(len, unit).collect();
            let mut next = 0;
            for (first, count) in &items {
                assert_eq!(*first, next);
                next += count;
            }
            assert_eq!(next, len.div_ceil(unit));
        }
    }

    #[test]
    fn hash_batches_respect_the_budget_but_always_progress() {
        let layout = BlockLayout::new(4096).unwrap();
        let big = HASH_BATCH_BYTES / 32 * 4096; // exactly one budget of hashes
        let batches = hash_batches([10, big, 10, 10].into_iter(), layout);
        assert_eq!(batches, vec![0..1, 1..2, 2..4]);
        assert!(hash_batches(std::iter::empty(), layout).is_empty());
    }
}
