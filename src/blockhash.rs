//! Block hashes: what is stored per block, and how to compare 4 KiB blocks at the speed of
//! hashing larger ones.
//!
//! A tensor's bytes are cut into blocks of `block_size` bytes counted from its first byte (the
//! last one may be partial). The stored hash of block `i` is the BLAKE3 *chaining value* of the
//! subtree that covers bytes `[i·B, (i+1)·B)` when the whole tensor is hashed as one BLAKE3
//! input (`blake3::hazmat`, offset `i·B`, non-root finalization). Because BLAKE3 is a tree, the
//! chaining value of an aligned *group* of blocks (16 KiB by default) is the parent-node merge
//! of its blocks' chaining values.
//!
//! That is the trick that keeps 4 KiB granularity without paying for it. Hashing a 4 KiB input
//! on its own fills only 4 of BLAKE3's SIMD lanes (8 with AVX2, 16 with AVX-512), so hashing a
//! model block by block, each block its own input, costs about twice what hashing it in larger
//! pieces does (measured with `cargo run --release --example hash_units` on a 2-core AMD EPYC
//! with AVX-512, one thread: 4 KiB 0.457 s/GiB, 8 KiB 0.301, 16 KiB 0.247, 64 KiB 0.237, 1 MiB
//! 0.233). Two answers:
//! - [`hash_units`] hashes runs of adjacent small units many chunks at a time and merges the
//!   chunks' chaining values into the units' (4 KiB 0.237 s/GiB, 1 MiB 0.238 on the same
//!   machine): a run of blocks costs what hashing it whole does.
//! - A sync compares group by group, merging the 4 stored block hashes of each group with 3
//!   cheap parent compressions, and hashes single blocks only inside the groups that differ:
//!   a quarter of the hashes to compare and to keep. 16 KiB is within 4% of the fastest size
//!   while a sparse change (0.5% of blocks) touches only 2% of 16 KiB groups, against 7.7% of
//!   64 KiB ones.
//!
//! The index also keeps one *summary* per aligned run of [`SUMMARY_BLOCKS`] blocks (64 KiB at
//! 4 KiB blocks): the same merge of their chaining values, so it equals the chaining value of
//! those bytes hashed as one subtree. A source that hashes where the weights live (a GPU) hashes
//! summary-sized units and compares them with the stored summaries: a sync that finds nothing
//! reads 1/16 of the stored hashes and copies 1/16 of the hashes back from the GPU.
//!
//! Invariant: `block_size` is a power of two of at least one BLAKE3 chunk (1 KiB), so every block
//! boundary is a valid subtree boundary, and `group_size` and `summary_size` are power-of-two
//! multiples of it.

use blake3::Hasher;
use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};

/// A stored block hash: a BLAKE3 chaining value.
pub type Cv = ChainingValue;
/// Bytes per stored hash.
pub const CV_LEN: usize = 32;
/// The default block size: 4 KiB, the page size, the unit of writes.
pub const DEFAULT_BLOCK_SIZE: u64 = 4096;
/// The smallest block size: one BLAKE3 chunk.
pub const MIN_BLOCK_SIZE: u64 = 1024;
/// The largest block size accepted at `init`.
pub const MAX_BLOCK_SIZE: u64 = 1 << 24;
/// The comparison group: wide enough for BLAKE3 to fill its SIMD lanes, small enough that a
/// sparse change touches few groups.
pub const DEFAULT_GROUP_SIZE: u64 = 16 * 1024;
/// Blocks per stored summary, at most (fewer for blocks over 1 MiB: a summary is at most
/// [`MAX_BLOCK_SIZE`], the largest unit the GPU kernel hashes).
pub const SUMMARY_BLOCKS: u64 = 16;
/// Name of the scheme recorded in the index, so that a future change of scheme is detected.
pub const SCHEME: &str = "blake3-subtree-cv-v1";

/// Why a block size is refused.
#[derive(Debug, thiserror::Error)]
#[error("block size {0} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}")]
pub struct BadBlockSize(pub u64);

/// Block and group sizes of one index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// Bytes per block (the unit of change and of writes).
    pub block_size: u64,
    /// Bytes per comparison group (a multiple of `block_size`).
    pub group_size: u64,
}

impl BlockLayout {
    /// The layout for `block_size`, with the default group size (or one block if larger).
    pub fn new(block_size: u64) -> Result<Self, BadBlockSize> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(BadBlockSize(block_size));
        }
        Ok(BlockLayout {
            block_size,
            group_size: DEFAULT_GROUP_SIZE.max(block_size),
        })
    }

    /// Number of blocks of a tensor of `len` bytes.
    pub fn blocks(&self, len: u64) -> u64 {
        len.div_ceil(self.block_size)
    }

    /// Number of groups of a tensor of `len` bytes.
    pub fn groups(&self, len: u64) -> u64 {
        len.div_ceil(self.group_size)
    }

    /// Blocks per full group.
    pub fn blocks_per_group(&self) -> u64 {
        self.group_size / self.block_size
    }

    /// Bytes per stored summary: [`SUMMARY_BLOCKS`] blocks, at most [`MAX_BLOCK_SIZE`].
    pub fn summary_size(&self) -> u64 {
        (self.block_size * SUMMARY_BLOCKS).min(MAX_BLOCK_SIZE.max(self.block_size))
    }

    /// Blocks per full summary.
    pub fn blocks_per_summary(&self) -> u64 {
        self.summary_size() / self.block_size
    }

    /// Number of summaries of a tensor of `len` bytes.
    pub fn summaries(&self, len: u64) -> u64 {
        len.div_ceil(self.summary_size())
    }

    /// The blocks of summary `s` of a tensor of `len` bytes.
    pub fn summary_blocks(&self, len: u64, s: u64) -> std::ops::Range<u64> {
        let per = self.blocks_per_summary();
        s * per..((s + 1) * per).min(self.blocks(len))
    }

    /// Summary `s` of a tensor of `len` bytes whose block hashes are `cvs` (all of them).
    pub fn summary_of(&self, cvs: &[Cv], len: u64, s: u64) -> Cv {
        let b = self.summary_blocks(len, s);
        let start = s * self.summary_size();
        let end = (start + self.summary_size()).min(len);
        merge_blocks(
            &cvs[b.start as usize..b.end as usize],
            end - start,
            self.block_size,
        )
    }

    /// Every summary of a tensor of `len` bytes whose block hashes are `cvs`.
    pub fn summaries_of(&self, cvs: &[Cv], len: u64) -> Vec<Cv> {
        (0..self.summaries(len))
            .map(|s| self.summary_of(cvs, len, s))
            .collect()
    }
}

/// Chaining value of the subtree holding `data`, which starts `offset` bytes into its tensor.
///
/// `offset` must be a multiple of the subtree's size (a block or group boundary) and `data` must
/// not be empty.
pub fn subtree_cv(offset: u64, data: &[u8]) -> Cv {
    debug_assert!(!data.is_empty());
    let mut h = Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// Chaining values of consecutive units of `unit` bytes of `tensor_data` (a tensor's bytes from
/// `first_offset` on), written to `out`: one per unit, the last one possibly partial.
///
/// Units smaller than [`WIDE_BELOW`] are hashed many at a time ([`hash_units_wide`]); larger
/// ones, and a partial last unit, one subtree each.
pub fn hash_units(first_offset: u64, unit: u64, data: &[u8], out: &mut [Cv]) {
    let full = if unit < WIDE_BELOW && unit.is_power_of_two() && unit >= CHUNK {
        let full = (data.len() as u64 / unit) as usize;
        hash_units_wide(
            first_offset,
            unit,
            &data[..full * unit as usize],
            &mut out[..full],
        );
        full
    } else {
        0
    };
    let rest = &data[full * unit as usize..];
    for (i, (piece, cv)) in rest
        .chunks(unit as usize)
        .zip(out[full..].iter_mut())
        .enumerate()
    {
        *cv = subtree_cv(first_offset + (full + i) as u64 * unit, piece);
    }
}

/// BLAKE3's chunk: the leaf of its tree.
const CHUNK: u64 = blake3::CHUNK_LEN as u64;
/// Units below this size are hashed many at a time by [`hash_units`]: from 16 KiB on, one
/// subtree already fills the SIMD lanes (see the module documentation).
pub const WIDE_BELOW: u64 = 16 * 1024;
/// Chunks hashed by one call of [`blake3::platform::Platform::hash_many`] in [`hash_units_wide`].
const WIDE_CHUNKS: usize = 64;
/// BLAKE3's initial chaining value (the hash mode's key words), from its specification.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// BLAKE3's domain flags (specification, table 3).
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;

/// [`hash_units`] for whole units of a power of two of at least one chunk and below
/// [`WIDE_BELOW`], at the full SIMD width whatever the unit size.
///
/// Hashed one by one, a 4 KiB unit fills 4 of BLAKE3's SIMD lanes (16 with AVX-512), and the
/// hashing runs at about half the speed of larger inputs. Here the chunks of many adjacent
/// units are compressed together (`hash_many`, the routine `blake3` itself uses for wide
/// inputs, with each chunk's counter its position in the tensor), then each level of the units'
/// subtrees is merged with parent compressions, again many at a time. The result is the same
/// chaining value as [`subtree_cv`] per unit, since a unit of 2^k aligned chunks is a complete
/// subtree of the tensor's tree (tested against it).
///
/// `hash_many` is public but outside `blake3`'s documented API, so `Cargo.toml` holds the crate
/// to 1.8.x and the tests compare both paths.
fn hash_units_wide(first_offset: u64, unit: u64, data: &[u8], out: &mut [Cv]) {
    use blake3::IncrementCounter;
    use blake3::platform::Platform;
    debug_assert!(unit.is_power_of_two() && (CHUNK..WIDE_BELOW).contains(&unit));
    debug_assert_eq!(first_offset % unit, 0);
    debug_assert_eq!(data.len() as u64 % unit, 0);
    let platform = Platform::detect();
    let per_unit = (unit / CHUNK) as usize;
    let units_per_call = WIDE_CHUNKS / per_unit;
    let mut cvs = [0u8; WIDE_CHUNKS * CV_LEN];
    let mut parents = [0u8; WIDE_CHUNKS / 2 * CV_LEN];
    for (call, (slab, slab_out)) in data
        .chunks(units_per_call * unit as usize)
        .zip(out.chunks_mut(units_per_call))
        .enumerate()
    {
        let chunks: Vec<&[u8; blake3::CHUNK_LEN]> = slab
            .chunks_exact(blake3::CHUNK_LEN)
            .map(|c| c.try_into().expect("chunks_exact yields whole chunks"))
            .collect();
        let counter = (first_offset + (call * units_per_call) as u64 * unit) / CHUNK;
        let mut n = chunks.len();
        platform.hash_many(
            &chunks,
            &IV,
            counter,
            IncrementCounter::Yes,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut cvs[..n * CV_LEN],
        );
        // Each level halves the chaining values; pairs never straddle two units, since every
        // unit holds a power of two of them at every level.
        let mut level = per_unit;
        while level > 1 {
            let pairs: Vec<&[u8; 2 * CV_LEN]> = cvs[..n * CV_LEN]
                .chunks_exact(2 * CV_LEN)
                .map(|p| p.try_into().expect("chunks_exact yields whole pairs"))
                .collect();
            n /= 2;
            platform.hash_many(
                &pairs,
                &IV,
                0,
                IncrementCounter::No,
                PARENT,
                0,
                0,
                &mut parents[..n * CV_LEN],
            );
            cvs[..n * CV_LEN].copy_from_slice(&parents[..n * CV_LEN]);
            level /= 2;
        }
        for (cv, bytes) in slab_out
            .iter_mut()
            .zip(cvs[..n * CV_LEN].chunks_exact(CV_LEN))
        {
            cv.copy_from_slice(bytes);
        }
    }
}

/// Merges the chaining values of the consecutive blocks of one aligned subtree of `len` bytes
/// into the chaining value of that subtree.
///
/// ```
/// use apollo_checkpoint::blockhash::{hash_units, merge_blocks, subtree_cv};
/// let group: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
/// let mut blocks = [[0u8; 32]; 3]; // 4096 + 4096 + 1808 bytes
/// hash_units(16384, 4096, &group, &mut blocks);
/// assert_eq!(merge_blocks(&blocks, group.len() as u64, 4096), subtree_cv(16384, &group));
/// ```
pub fn merge_blocks(cvs: &[Cv], len: u64, block_size: u64) -> Cv {
    debug_assert_eq!(cvs.len() as u64, len.div_ceil(block_size));
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left_len = left_subtree_len(len);
    let left_blocks = (left_len / block_size) as usize;
    let left = merge_blocks(&cvs[..left_blocks], left_len, block_size);
    let right = merge_blocks(&cvs[left_blocks..], len - left_len, block_size);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

/// Reads a stored hash blob (concatenated 32-byte chaining values).
pub fn cvs_from_bytes(bytes: &[u8]) -> Option<Vec<Cv>> {
    if bytes.len() % CV_LEN != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().expect("32-byte chunk"))
            .collect(),
    )
}

/// Writes hashes as a blob.
pub fn cvs_to_bytes(cvs: &[Cv]) -> Vec<u8> {
    cvs.concat()
}

/// Lowercase hex of a hash, for messages and JSON.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    /// Boundary table: the group hash computed in one pass must equal the merge of its blocks'
    /// hashes for empty-ish, one-chunk, partial-block, exact and multi-group lengths.
    #[test]
    fn group_cv_equals_merge_of_block_cvs() {
        for block in [1024u64, 4096, 16384] {
            let layout = BlockLayout::new(block).unwrap();
            let g = layout.group_size as usize;
            let b = block as usize;
            for len in [
                1,
                1023,
                1024,
                1025,
                b - 1,
                b,
                b + 1,
                3 * b + 7,
                g - 1,
                g,
                g + 1,
                2 * g + b / 2,
                5 * g,
            ] {
                let d = data(len);
                let nblocks = layout.blocks(len as u64) as usize;
                let mut block_cvs = vec![[0u8; 32]; nblocks];
                hash_units(0, block, &d, &mut block_cvs);
                let ngroups = layout.groups(len as u64) as usize;
                let mut group_cvs = vec![[0u8; 32]; ngroups];
                hash_units(0, layout.group_size, &d, &mut group_cvs);
                let per = layout.blocks_per_group() as usize;
                for (gi, gcv) in group_cvs.iter().enumerate() {
                    let first = gi * per;
                    let last = (first + per).min(nblocks);
                    let glen = (len - gi * g).min(g) as u64;
                    assert_eq!(
                        merge_blocks(&block_cvs[first..last], glen, block),
                        *gcv,
                        "block {block} len {len} group {gi}"
                    );
                }
            }
        }
    }

    /// Units hashed many at a time equal each unit hashed as its own subtree, for every wide
    /// unit size, offsets deep into a tensor (chunk counters past 2^32), whole and partial
    /// `hash_many` calls and a partial last unit.
    #[test]
    fn wide_units_equal_one_subtree_each() {
        let d = data(300 * 1024 + 333);
        for unit in [1024u64, 2048, 4096, 8192] {
            for first in [0u64, 7 * unit, (1u64 << 42) + 3 * unit] {
                for len in [unit as usize, 3 * unit as usize + 1, 64 * 1024, d.len()] {
                    let n = len.div_ceil(unit as usize);
                    let mut wide = vec![[0u8; 32]; n];
                    hash_units(first, unit, &d[..len], &mut wide);
                    let one: Vec<Cv> = d[..len]
                        .chunks(unit as usize)
                        .enumerate()
                        .map(|(i, p)| subtree_cv(first + i as u64 * unit, p))
                        .collect();
                    assert_eq!(wide, one, "unit {unit} first {first} len {len}");
                }
            }
        }
    }

    /// A stored summary equals the chaining value of its bytes hashed as one unit of
    /// `summary_size` (what the GPU computes), for partial last summaries and for block sizes
    /// whose summary is capped at the largest unit.
    #[test]
    fn summaries_equal_the_hash_of_their_bytes() {
        for block in [1024u64, 4096, 1 << 20, 1 << 22, MAX_BLOCK_SIZE] {
            let layout = BlockLayout::new(block).unwrap();
            let unit = layout.summary_size();
            assert!(
                unit.is_power_of_two() && unit % block == 0 && unit <= MAX_BLOCK_SIZE.max(block)
            );
            assert_eq!(
                layout.blocks_per_summary(),
                (SUMMARY_BLOCKS).min((MAX_BLOCK_SIZE / block).max(1))
            );
            let u = unit as usize;
            let lens: Vec<usize> = if block >= 1 << 20 {
                vec![1, block as usize + 3, u + 1]
            } else {
                vec![1, 1025, u - 1, u, u + 1, 3 * u + block as usize / 2 + 5]
            };
            for len in lens {
                let d = data(len);
                let mut blocks = vec![[0u8; 32]; layout.blocks(len as u64) as usize];
                hash_units(0, block, &d, &mut blocks);
                let mut direct = vec![[0u8; 32]; layout.summaries(len as u64) as usize];
                hash_units(0, unit, &d, &mut direct);
                assert_eq!(
                    layout.summaries_of(&blocks, len as u64),
                    direct,
                    "block {block} len {len}"
                );
            }
        }
    }

    /// The scheme is real BLAKE3: merging the chaining values of a whole input's two halves at
    /// the root gives `blake3::hash` of the input.
    #[test]
    fn subtree_cvs_are_blake3_tree_nodes() {
        let d = data(8192);
        let left = subtree_cv(0, &d[..4096]);
        let right = subtree_cv(4096, &d[4096..]);
        let root = blake3::hazmat::merge_subtrees_root(&left, &right, Mode::Hash);
        assert_eq!(root, blake3::hash(&d));
    }

    #[test]
    fn the_same_bytes_at_another_offset_hash_differently() {
        let d = data(4096);
        assert_ne!(subtree_cv(0, &d), subtree_cv(4096, &d));
    }

    #[test]
    fn block_sizes_are_checked() {
        assert!(BlockLayout::new(4096).is_ok());
        assert!(BlockLayout::new(1 << 20).unwrap().group_size == 1 << 20);
        for bad in [0, 512, 3000, 1 << 25] {
            assert!(BlockLayout::new(bad).is_err());
        }
    }

    #[test]
    fn blobs_round_trip() {
        let cvs = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(cvs_from_bytes(&cvs_to_bytes(&cvs)).unwrap(), cvs);
        assert!(cvs_from_bytes(&[0u8; 33]).is_none());
        assert_eq!(hex(&[0xab, 0x01]), "ab01");
    }
}
