//! Rolling a committed journal forward onto the model files.
//!
//! The one code path that changes model bytes, used by `sync` right after its journal commits and
//! by `recover` after a crash. Each record is applied idempotently: the block's current bytes are
//! hashed and compared with the record's old and new hashes.
//!
//! - equal to *new*: already applied (a crash came after this write), nothing to do;
//! - equal to *old*: XOR the record's payload in and write the block;
//! - neither: the block was torn mid-write. Two kinds of tear are repaired:
//!   - a *power cut* leaves each 512-byte disk sector (aligned to the file, not to the block)
//!     holding either its old or its new bytes. Only sectors the XOR changes can differ; every
//!     combination of flipping them is tried until the block hashes to *new* (written) or *old*
//!     (then applied). A 4 KiB block spans at most 9 sectors: at most 2⁹ hashes;
//!   - a *killed process* leaves a prefix of the block new and the rest old, because the kernel
//!     copies a write in ascending page order (see [`crate::io`]). Every cut point where the
//!     XOR is non-zero is tried: at most one hash per changed byte.
//!
//!   A block that matches no candidate is reported and left as it is.

use rayon::prelude::*;

use crate::blockhash::subtree_cv;
use crate::io::FileIo;
use crate::journal::{Journal, JournalError};
use crate::record::{HASH_PREFIX, Record, apply_xor, hash_prefix};

/// Sectors a power cut tears a block into.
pub const SECTOR: usize = 512;
/// Most differing sectors a torn-block repair tries (2^this combinations).
pub const MAX_TORN_SECTORS: usize = 16;
/// Payload and block bytes applied per parallel batch.
const BATCH_BYTES: usize = 64 << 20;

/// What rolling forward found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    roll(journal, files, true)
}

/// [`roll_forward`] of a journal whose writer checked, under the lock it still holds, that
/// every block holds its old bytes: each record's XOR is applied without hashing the block.
/// `sections` (file, start, end) say where each file's records are, as the writer noted them:
/// the files are written in parallel (a buffered write holds its file's lock, so writes to one
/// file do not overlap, but writes to different files do).
pub fn roll_forward_checked_by_writer(
    journal: &Journal,
    files: &[Box<dyn FileIo>],
    sections: &[(u32, u64, u64)],
) -> Result<ApplyStats, ApplyError> {
    let mut by_file: Vec<Vec<(u64, u64)>> = vec![Vec::new(); files.len()];
    for &(f, start, end) in sections {
        if let Some(v) = by_file.get_mut(f as usize) {
            v.push((start, end));
        }
    }
    let stats: Vec<ApplyStats> = by_file
        .par_iter()
        .map(|ranges| {
            let mut stats = ApplyStats::default();
            for &range in ranges {
                roll_range(journal, files, false, range, &mut stats)?;
            }
            Ok::<_, ApplyError>(stats)
        })
        .collect::<Result<_, _>>()?;
    Ok(stats
        .into_iter()
        .fold(ApplyStats::default(), |a, b| ApplyStats {
            applied: a.applied + b.applied,
            already_new: a.already_new + b.already_new,
            repaired: a.repaired + b.repaired,
        }))
}

fn roll(
    journal: &Journal,
    files: &[Box<dyn FileIo>],
    judge: bool,
) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    roll_range(journal, files, judge, (0, u64::MAX), &mut stats)?;
    Ok(stats)
}

/// Applies the records between journal offsets `range`, adding what it found to `stats`.
fn roll_range(
    journal: &Journal,
    files: &[Box<dyn FileIo>],
    judge: bool,
    range: (u64, u64),
    stats: &mut ApplyStats,
) -> Result<(), ApplyError> {
    journal.for_each_batch_in(range, BATCH_BYTES, |batch: Vec<Record>| {
        let runs = runs(&batch);
        let apply =
            |run: &&[Record]| apply_run(journal, files[run[0].file as usize].as_ref(), run, judge);
        let bytes: u64 = batch.iter().map(|r| u64::from(r.len)).sum();
        // Short runs that need no hashing are written one after the other: threads writing one
        // file wait on its lock, and the waiting costs more than it saves (scattered 4 KiB
        // writes into the page cache on the H200 host: 9-10 us each from one thread, 21-24 us
        // each from 16). Callers write different files in parallel.
        let outcomes: Vec<Vec<Outcome>> = if !judge && bytes < runs.len() as u64 * PARALLEL_RUN {
            runs.iter().map(apply).collect::<Result<_, ApplyError>>()?
        } else {
            runs.par_iter()
                .map(apply)
                .collect::<Result<_, ApplyError>>()?
        };
        for o in outcomes.into_iter().flatten() {
            match o {
                Outcome::Applied => stats.applied += 1,
                Outcome::AlreadyNew => stats.already_new += 1,
                Outcome::Repaired => stats.repaired += 1,
            }
        }
        Ok::<_, ApplyError>(())
    })
}

/// Average run length from which the runs of a batch are applied on all cores.
const PARALLEL_RUN: u64 = 64 << 10;

/// Most records written with one `pwrite`.
const MAX_RUN: usize = 64;

/// Splits records into runs of adjacent blocks of one file (at most [`MAX_RUN`] each), so a
/// dense change costs one write per run instead of one per 4 KiB block.
fn runs(batch: &[Record]) -> Vec<&[Record]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=batch.len() {
        let split = i == batch.len()
            || i - start == MAX_RUN
            || batch[i].file != batch[i - 1].file
            || batch[i].offset != batch[i - 1].offset + u64::from(batch[i - 1].len);
        if split {
            out.push(&batch[start..i]);
            start = i;
        }
    }
    out
}

/// Applies a run of adjacent records: each block is judged on its own, then the run is written
/// back at once (blocks already new are written unchanged).
fn apply_run(
    journal: &Journal,
    file: &dyn FileIo,
    run: &[Record],
    judge: bool,
) -> Result<Vec<Outcome>, ApplyError> {
    let len: usize = run.iter().map(|r| r.len as usize).sum();
    RUN.with_borrow_mut(|bytes| {
        bytes.resize(len, 0);
        apply_run_in(journal, file, run, judge, bytes)
    })
}

thread_local! {
    /// Each applying thread's buffer for a run of blocks, reused.
    static RUN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`apply_run`] with a buffer of the run's length.
fn apply_run_in(
    journal: &Journal,
    file: &dyn FileIo,
    run: &[Record],
    judge: bool,
    bytes: &mut [u8],
) -> Result<Vec<Outcome>, ApplyError> {
    let first = &run[0];
    let io = |source| ApplyError::Io {
        file: journal.header.files[first.file as usize].name.clone(),
        source,
    };
    file.read_at(first.offset, bytes).map_err(io)?;
    let mut outcomes = Vec::with_capacity(run.len());
    let mut at = 0;
    for r in run {
        let block = &mut bytes[at..at + r.len as usize];
        outcomes.push(if judge {
            apply_record(journal, r, block)?
        } else {
            apply_xor(&r.payload, block).ok_or_else(|| malformed(journal, r))?;
            Outcome::Applied
        });
        at += r.len as usize;
    }
    if outcomes.iter().any(|o| !matches!(o, Outcome::AlreadyNew)) {
        file.write_at(first.offset, bytes).map_err(io)?;
    }
    Ok(outcomes)
}

enum Outcome {
    Applied,
    AlreadyNew,
    Repaired,
}

fn prefix_of(r: &Record, block: &[u8]) -> [u8; HASH_PREFIX] {
    hash_prefix(&subtree_cv(r.offset - r.tensor_offset, block))
}

/// The error of a record whose payload does not decode.
fn malformed(journal: &Journal, r: &Record) -> ApplyError {
    ApplyError::Journal(JournalError::Corrupt {
        path: journal.path.clone(),
        what: format!(
            "record for {} at byte {} has a malformed payload",
            journal.header.files[r.file as usize].name, r.offset
        ),
    })
}

/// Judges one block (its current bytes in `block`) and turns it into its new bytes in place.
fn apply_record(journal: &Journal, r: &Record, block: &mut [u8]) -> Result<Outcome, ApplyError> {
    let name = || journal.header.files[r.file as usize].name.clone();
    let corrupt = || malformed(journal, r);
    let now = prefix_of(r, block);
    if now == r.new {
        return Ok(Outcome::AlreadyNew);
    }
    if now == r.old {
        apply_xor(&r.payload, block).ok_or_else(corrupt)?;
        return Ok(Outcome::Applied);
    }
    let mut delta = vec![0u8; block.len()];
    apply_xor(&r.payload, &mut delta).ok_or_else(corrupt)?;
    let unrecognised = || ApplyError::Unrecognised {
        file: name(),
        offset: r.offset,
        end: r.offset + u64::from(r.len),
        target: journal.header.target_generation,
    };
    let in_sector = (r.offset % SECTOR as u64) as usize;
    let repaired = repair_torn_at(block, &delta, in_sector, |candidate| {
        let p = prefix_of(r, candidate);
        if p == r.new {
            Some(false)
        } else if p == r.old {
            Some(true)
        } else {
            None
        }
    });
    let Some(mut fixed) = repaired else {
        return Err(unrecognised());
    };
    if fixed.1 {
        // The candidate is the old block: apply the record to it.
        for (c, d) in fixed.0.iter_mut().zip(&delta) {
            *c ^= d;
        }
    }
    block.copy_from_slice(&fixed.0);
    Ok(Outcome::Repaired)
}

/// Searches the blocks a tear can have produced from `current` and the XOR `delta` of its old
/// and new bytes (see the module documentation). `judge` says whether a candidate is the new
/// block (`Some(false)`), the old one (`Some(true)`) or neither (`None`); the first match is
/// returned with that verdict. `offset_in_sector` is where the block starts within its first
/// 512-byte disk sector.
fn repair_torn_at(
    current: &[u8],
    delta: &[u8],
    offset_in_sector: usize,
    mut judge: impl FnMut(&[u8]) -> Option<bool>,
) -> Option<(Vec<u8>, bool)> {
    let mut candidate = current.to_vec();
    // A killed writer: new prefix, old suffix. Flipping the suffix from `cut` on makes it all new.
    let cuts = std::iter::once(0).chain((0..delta.len()).filter(|&i| delta[i] != 0).map(|i| i + 1));
    for cut in cuts {
        candidate.copy_from_slice(current);
        for (c, d) in candidate[cut..].iter_mut().zip(&delta[cut..]) {
            *c ^= d;
        }
        if let Some(old) = judge(&candidate) {
            return Some((candidate, old));
        }
    }
    // A power cut: any subset of the file-aligned sectors the XOR changes.
    let first = SECTOR - offset_in_sector;
    let bounds: Vec<(usize, usize)> = std::iter::once(0)
        .chain((first..delta.len()).step_by(SECTOR))
        .map(|start| {
            (
                start,
                (if start == 0 { first } else { start + SECTOR }).min(delta.len()),
            )
        })
        .filter(|&(a, b)| a < b && delta[a..b].iter().any(|&d| d != 0))
        .collect();
    if bounds.len() > MAX_TORN_SECTORS {
        return None;
    }
    for mask in 1u32..(1u32 << bounds.len()) {
        candidate.copy_from_slice(current);
        for (bit, &(a, b)) in bounds.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                for (c, d) in candidate[a..b].iter_mut().zip(&delta[a..b]) {
                    *c ^= d;
                }
            }
        }
        if let Some(old) = judge(&candidate) {
            return Some((candidate, old));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge<'a>(old: &'a [u8], new: &'a [u8]) -> impl FnMut(&[u8]) -> Option<bool> + 'a {
        move |c| {
            if c == new {
                Some(false)
            } else if c == old {
                Some(true)
            } else {
                None
            }
        }
    }

    fn blocks() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
        let mut new = old.clone();
        for i in (3..4096).step_by(61) {
            new[i] ^= 0x3c;
        }
        let delta: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
        (old, new, delta)
    }

    #[test]
    fn a_kill_tear_at_any_byte_is_repaired() {
        let (old, new, delta) = blocks();
        for cut in [1, 7, 8, 100, 2048, 4095] {
            let torn: Vec<u8> = new[..cut].iter().chain(&old[cut..]).copied().collect();
            let (fixed, was_old) = repair_torn_at(&torn, &delta, 300, judge(&old, &new)).unwrap();
            assert!(
                (fixed == new && !was_old) || (fixed == old && was_old),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_power_cut_tear_at_file_aligned_sectors_is_repaired() {
        let (old, new, delta) = blocks();
        // The block starts 300 bytes into a disk sector: sectors end at 212, 724, ...
        let in_sector = 300;
        let bounds: Vec<usize> = std::iter::once(0)
            .chain((212..4096).step_by(512))
            .chain([4096])
            .collect();
        for pattern in [0b1u32, 0b1010_1010, 0b1_0000_0001, 0b0_1111_0000] {
            let mut torn = old.clone();
            for (k, w) in bounds.windows(2).enumerate() {
                if pattern & (1 << k) != 0 {
                    torn[w[0]..w[1]].copy_from_slice(&new[w[0]..w[1]]);
                }
            }
            let (fixed, _) = repair_torn_at(&torn, &delta, in_sector, judge(&old, &new)).unwrap();
            assert!(fixed == new || fixed == old, "pattern {pattern:b}");
        }
        // Something that is no mix of old and new is not "repaired".
        let mut garbage = old.clone();
        garbage[10] ^= 0xff;
        assert!(repair_torn_at(&garbage, &delta, in_sector, judge(&old, &new)).is_none());
    }
}
