//! Rolling a committed journal forward onto the model files.
//!
//! The one code path that changes model bytes, used by `sync` right after its journal commits and
//! by `recover` after a crash. Each record is applied idempotently: the block's current bytes are
//! hashed and compared with the record's old and new hashes.
//!
//! - equal to *new*: already applied (a crash came after this write), nothing to do;
//! - equal to *old*: XOR the record's payload in and write the block;
//! - neither: the block was torn by a power cut mid-write, so each 512-byte sector holds either
//!   its old or its new bytes. Only sectors the XOR changes can differ; every combination of
//!   flipping them is tried until the block hashes to *new* (written) or *old* (then applied).
//!   With 4 KiB blocks that is at most 2⁸ hashes. A block that matches no combination is
//!   reported and left as it is.

use rayon::prelude::*;

use crate::blockhash::subtree_cv;
use crate::io::FileIo;
use crate::journal::{
    HASH_PREFIX, Journal, JournalError, Record, apply_xor, changed_sectors, hash_prefix,
};

/// Sectors a power cut tears a block into.
pub const SECTOR: usize = 512;
/// Most differing sectors a torn-block repair tries (2^this combinations).
pub const MAX_TORN_SECTORS: usize = 16;
/// Payload and block bytes applied per parallel batch.
const BATCH_BYTES: usize = 64 << 20;

/// What rolling forward found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Blocks written from old to new.
    pub applied: u64,
    /// Blocks that already held their new bytes.
    pub already_new: u64,
    /// Torn blocks repaired.
    pub repaired: u64,
}

/// Why a record could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// An OS error on a model file.
    #[error("{file}: {source}")]
    Io {
        /// The model file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A block holds neither the old nor the new bytes nor a mix of their sectors.
    #[error(
        "{file}: block at bytes {offset}..{end} holds neither the bytes before nor after generation {target} (nor a mix of their sectors); it was changed by something else. It is left as it is; restore the file from a copy, then run `apollo-checkpoint verify --repair`"
    )]
    Unrecognised {
        /// The model file.
        file: String,
        /// Start of the block.
        offset: u64,
        /// End of the block.
        end: u64,
        /// The journal's target generation.
        target: u64,
    },
}

/// Applies every record of `journal`; `files[i]` is the open model file `i` of its header.
pub fn roll_forward(
    journal: &Journal,
    files: &[Box<dyn FileIo>],
) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    journal.for_each_batch(BATCH_BYTES, |batch: Vec<Record>| {
        let outcomes: Vec<Outcome> = batch
            .par_iter()
            .map(|r| apply_record(journal, files[r.file as usize].as_ref(), r))
            .collect::<Result<_, ApplyError>>()?;
        for o in outcomes {
            match o {
                Outcome::Applied => stats.applied += 1,
                Outcome::AlreadyNew => stats.already_new += 1,
                Outcome::Repaired => stats.repaired += 1,
            }
        }
        Ok::<_, ApplyError>(())
    })?;
    Ok(stats)
}

enum Outcome {
    Applied,
    AlreadyNew,
    Repaired,
}

fn prefix_of(r: &Record, block: &[u8]) -> [u8; HASH_PREFIX] {
    hash_prefix(&subtree_cv(r.block_offset - r.tensor_offset, block))
}

fn apply_record(journal: &Journal, file: &dyn FileIo, r: &Record) -> Result<Outcome, ApplyError> {
    let name = || journal.header.files[r.file as usize].name.clone();
    let io = |source| ApplyError::Io {
        file: name(),
        source,
    };
    let corrupt = || {
        ApplyError::Journal(JournalError::Corrupt {
            path: journal.path.clone(),
            what: format!(
                "record for {} at byte {} has a malformed payload",
                name(),
                r.block_offset
            ),
        })
    };
    let mut block = vec![0u8; r.len as usize];
    file.read_at(r.block_offset, &mut block).map_err(io)?;
    let now = prefix_of(r, &block);
    if now == r.new {
        return Ok(Outcome::AlreadyNew);
    }
    if now == r.old {
        apply_xor(&r.payload, &mut block).ok_or_else(corrupt)?;
        file.write_at(r.block_offset, &block).map_err(io)?;
        return Ok(Outcome::Applied);
    }
    // Torn: try flipping each combination of the sectors the XOR touches.
    let mut delta = vec![0u8; block.len()];
    apply_xor(&r.payload, &mut delta).ok_or_else(corrupt)?;
    let sectors: Vec<usize> = changed_sectors(&r.payload, block.len())
        .ok_or_else(corrupt)?
        .iter()
        .enumerate()
        .filter_map(|(i, &c)| c.then_some(i))
        .collect();
    let unrecognised = || ApplyError::Unrecognised {
        file: name(),
        offset: r.block_offset,
        end: r.block_offset + u64::from(r.len),
        target: journal.header.target_generation,
    };
    if sectors.len() > MAX_TORN_SECTORS {
        return Err(unrecognised());
    }
    let mut candidate = block.clone();
    for mask in 1u32..(1u32 << sectors.len()) {
        candidate.copy_from_slice(&block);
        for (bit, &s) in sectors.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                let range = s * SECTOR..((s + 1) * SECTOR).min(block.len());
                for (c, d) in candidate[range.clone()].iter_mut().zip(&delta[range]) {
                    *c ^= d;
                }
            }
        }
        let p = prefix_of(r, &candidate);
        if p == r.old {
            for (c, d) in candidate.iter_mut().zip(&delta) {
                *c ^= d;
            }
        } else if p != r.new {
            continue;
        }
        file.write_at(r.block_offset, &candidate).map_err(io)?;
        return Ok(Outcome::Repaired);
    }
    Err(unrecognised())
}
