//! Weight sources: where the live weights come from.
//!
//! A [`WeightSource`] presents tensors by their HuggingFace names, dtypes and shapes, and gives
//! their bytes. It can also *hash where its data lives*: the sync engine asks a source for the
//! chaining values of whole groups and blocks ([`WeightSource::hash_units`]) rather than for the
//! bytes, so a source that holds its data on a GPU can hash there and ship only 32 bytes per
//! group across PCIe. The default implementation reads the bytes and hashes them on the CPU.
//!
//! [`SafetensorsSource`] is the CPU source: a directory of safetensors files in the same HF layout
//! as the model (sharded any way), read with `pread` (a file truncated meanwhile is an error, not
//! SIGBUS) and hashed on all cores.

use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::blockhash::{self, Cv};
use crate::io::RealIo;
use crate::model::{ModelError, ModelLayout};

/// A tensor a source offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTensor {
    /// HuggingFace name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Length in bytes.
    pub len: u64,
}

/// Errors of weight sources.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source directory is not a valid model.
    #[error("source: {0}")]
    Model(#[from] ModelError),
    /// An OS error on a source file.
    #[error("source {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The source file changed size between parsing and mapping.
    #[error("source {path} changed while it was being opened; retry when the source is stable")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A source file is shorter than when it was opened: another process is rewriting it.
    #[error(
        "source {path} shrank while this sync read it (is another process rewriting it?); nothing was written: run the sync again once the source is complete"
    )]
    Shrunk {
        /// The file.
        path: PathBuf,
    },
    /// The live weights kept changing while they were captured: no consistent copy was made.
    #[error(
        "the live weights kept changing while they were copied ({blocks} blocks still moving after {attempts} attempts); nothing was written. Run the sync again when training pauses, or between steps"
    )]
    Unstable {
        /// Blocks that changed during the last attempt.
        blocks: u64,
        /// Capture attempts made.
        attempts: u32,
    },
    /// A read outside a tensor was requested (a bug in the caller).
    #[error("source tensor {tensor}: range {offset}+{len} is outside its {tensor_len} bytes")]
    OutOfRange {
        /// The tensor.
        tensor: String,
        /// Start of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// The tensor's length.
        tensor_len: u64,
    },
}

/// Consecutive blocks of one source tensor: blocks `first..first + count` at the block size in
/// use (the tensor's last block may be partial).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRun {
    /// Source tensor index.
    pub tensor: usize,
    /// First block.
    pub first: u64,
    /// Blocks.
    pub count: u64,
}

impl BlockRun {
    /// The run's bytes in a tensor of `len` bytes: (offset, length).
    pub fn span(&self, block_size: u64, len: u64) -> (u64, u64) {
        let start = self.first * block_size;
        let end = ((self.first + self.count) * block_size).min(len);
        (start, end.saturating_sub(start))
    }
}

/// What copying live bytes off a device cost (all zeros for host sources).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureStats {
    /// Bytes copied from GPU memory to the host.
    pub gpu_bytes_copied: u64,
    /// Device-to-host copies made.
    pub gpu_copies: u64,
    /// Blocks copied again because they changed while being copied.
    pub recaptured_blocks: u64,
}

impl CaptureStats {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: CaptureStats) {
        self.gpu_bytes_copied += other.gpu_bytes_copied;
        self.gpu_copies += other.gpu_copies;
        self.recaptured_blocks += other.recaptured_blocks;
    }
}

/// Host memory that captures are copied into: a plain vector, or pinned memory a GPU copies
/// into at full speed.
pub trait CaptureBuffer: std::ops::DerefMut<Target = [u8]> + Send {}

impl CaptureBuffer for Vec<u8> {}

/// Live weights, by HF tensor name.
pub trait WeightSource: Sync {
    /// A short description for logs and the generation record.
    fn describe(&self) -> String;

    /// The tensors offered.
    fn tensors(&self) -> &[SourceTensor];

    /// Copies `buf.len()` bytes of tensor `tensor` starting at `offset` into `buf`.
    fn read(&self, tensor: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Whether this source may hold only some of the model's tensors: a serving engine does not
    /// load everything a checkpoint holds (e.g. `mtp.*`). Model tensors such a source lacks are
    /// left untouched and listed; for a complete source (the default) they are an error.
    fn is_partial(&self) -> bool {
        false
    }

    /// Seconds it took to open the source, when it knows (reported in a sync's `phases.open`).
    fn open_seconds(&self) -> f64 {
        0.0
    }

    /// Writes to `out` the chaining values (see [`crate::blockhash`]) of `out.len()` consecutive
    /// units of `unit` bytes of tensor `tensor`, starting at unit `first`; the tensor's last unit
    /// may be partial. Sources that can hash where their data lives override this; the default
    /// reads the bytes and hashes on the CPU.
    fn hash_units(
        &self,
        tensor: usize,
        unit: u64,
        first: u64,
        out: &mut [Cv],
    ) -> Result<(), SourceError> {
        let len = self.tensors()[tensor].len;
        let start = first * unit;
        let end = (start + out.len() as u64 * unit).min(len);
        let mut buf = vec![0u8; end.saturating_sub(start) as usize];
        self.read(tensor, start, &mut buf)?;
        blockhash::hash_units(start, unit, &buf, out);
        Ok(())
    }

    /// A buffer of `len` bytes for [`Self::capture`] to copy into fastest.
    fn capture_buffer(&self, len: usize) -> Result<Box<dyn CaptureBuffer>, SourceError> {
        Ok(Box::new(vec![0u8; len]))
    }

    /// Whether hashing where the data lives is cheap enough to hash every block rather than
    /// compare 16 KiB groups first (a GPU: the weights never cross PCIe to be compared).
    fn hashes_in_place(&self) -> bool {
        false
    }

    /// Writes the hash of every block of every run, in order, to `out`.
    fn hash_blocks(
        &self,
        runs: &[BlockRun],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        hash_blocks_on_host(self, runs, block_size, out)
    }

    /// Copies the bytes of every run, concatenated in order, into `bytes`, and writes the hash of
    /// each of their blocks, *of the bytes copied*, to `cvs`. A source whose bytes can change
    /// meanwhile makes the copy consistent: every block's copy equals what it holds once the
    /// copy is done, or the capture fails with [`SourceError::Unstable`].
    fn capture(
        &self,
        runs: &[BlockRun],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        capture_on_host(self, runs, block_size, bytes, cvs)
    }
}

/// [`WeightSource::hash_blocks`] through [`WeightSource::hash_units`], runs in parallel.
pub fn hash_blocks_on_host<S: WeightSource + ?Sized>(
    source: &S,
    runs: &[BlockRun],
    block_size: u64,
    out: &mut [Cv],
) -> Result<CaptureStats, SourceError> {
    for_each_run(runs, out, 1, |r, out| {
        source.hash_units(r.tensor, block_size, r.first, out)
    })?;
    Ok(CaptureStats::default())
}

/// Bytes one worker of [`capture_on_host`] reads and hashes at a time, at most.
const HOST_CAPTURE_PIECE: u64 = 1 << 20;

/// [`WeightSource::capture`] on the host: every run read and its blocks hashed, in parallel.
pub fn capture_on_host<S: WeightSource + ?Sized>(
    source: &S,
    runs: &[BlockRun],
    block_size: u64,
    bytes: &mut [u8],
    cvs: &mut [Cv],
) -> Result<CaptureStats, SourceError> {
    use rayon::prelude::*;
    // A dense change is a few long runs: cut into pieces, so that every core reads and hashes.
    let per_piece = (HOST_CAPTURE_PIECE / block_size).max(1);
    let mut pieces = Vec::with_capacity(runs.len());
    let mut rest: &mut [u8] = bytes;
    let mut rest_cvs: &mut [Cv] = cvs;
    for r in runs {
        let tensor_len = source.tensors()[r.tensor].len;
        let mut first = r.first;
        while first < r.first + r.count {
            let count = per_piece.min(r.first + r.count - first);
            let piece = BlockRun {
                tensor: r.tensor,
                first,
                count,
            };
            let (start, len) = piece.span(block_size, tensor_len);
            let (b, tail) = rest.split_at_mut(len as usize);
            let (c, ctail) = rest_cvs.split_at_mut(count as usize);
            pieces.push((r.tensor, start, b, c));
            rest = tail;
            rest_cvs = ctail;
            first += count;
        }
    }
    pieces
        .into_par_iter()
        .try_for_each(|(tensor, start, b, c)| {
            source.read(tensor, start, b)?;
            blockhash::hash_units(start, block_size, b, c);
            Ok::<_, SourceError>(())
        })?;
    Ok(CaptureStats::default())
}

/// Calls `f` for every run with its slice of `out` (`per_block` entries per block), in parallel.
pub fn for_each_run<T: Send>(
    runs: &[BlockRun],
    out: &mut [T],
    per_block: usize,
    f: impl Fn(&BlockRun, &mut [T]) -> Result<(), SourceError> + Sync,
) -> Result<(), SourceError> {
    use rayon::prelude::*;
    let mut pieces = Vec::with_capacity(runs.len());
    let mut rest: &mut [T] = out;
    for r in runs {
        let (head, tail) = rest.split_at_mut(r.count as usize * per_block);
        pieces.push((r, head));
        rest = tail;
    }
    pieces.into_par_iter().try_for_each(|(r, o)| f(r, o))
}

/// A directory of safetensors files in HF layout, read with `pread`.
///
/// Not memory-mapped: a trainer may rewrite (truncate) a file while a sync reads it, and a read
/// of a mapped page beyond the new end is SIGBUS, which kills the process without a word. A
/// `pread` that comes back short is an error instead ([`SourceError::Shrunk`]), before anything
/// is written.
pub struct SafetensorsSource {
    dir: PathBuf,
    tensors: Vec<SourceTensor>,
    /// (file index, absolute offset) per tensor.
    places: Vec<(usize, u64)>,
    files: Vec<(PathBuf, File)>,
}

impl std::fmt::Debug for SafetensorsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSource")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// Bytes read and hashed at a time by [`SafetensorsSource::hash_units`], at most.
const READ_CHUNK: u64 = 1 << 20;

thread_local! {
    /// Each hashing thread's read buffer, reused.
    static CHUNK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl SafetensorsSource {
    /// Opens and strictly validates the model in `dir`.
    pub fn open(dir: &Path) -> Result<Self, SourceError> {
        let layout = ModelLayout::open(dir, &RealIo::new())?;
        let mut files = Vec::with_capacity(layout.files.len());
        for (i, f) in layout.files.iter().enumerate() {
            let path = layout.file_path(i);
            let file = File::open(&path).map_err(|source| SourceError::Io {
                path: path.clone(),
                source,
            })?;
            let size = file
                .metadata()
                .map_err(|source| SourceError::Io {
                    path: path.clone(),
                    source,
                })?
                .len();
            if size != f.stat.size {
                return Err(SourceError::Changed { path });
            }
            files.push((path, file));
        }
        let tensors = layout
            .tensors
            .iter()
            .map(|t| SourceTensor {
                name: t.entry.name.clone(),
                dtype: t.entry.dtype,
                shape: t.entry.shape.clone(),
                len: t.entry.len,
            })
            .collect();
        let places = layout
            .tensors
            .iter()
            .map(|t| (t.file, t.entry.offset))
            .collect();
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            tensors,
            places,
            files,
        })
    }

    /// Reads `buf.len()` bytes of `tensor` from `offset` (checked against the tensor's length).
    fn read_at(&self, tensor: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        use std::os::unix::fs::FileExt;
        let t = &self.tensors[tensor];
        check_range(&t.name, t.len, offset, buf.len())?;
        let (file, start) = self.places[tensor];
        let (path, f) = &self.files[file];
        match f.read_exact_at(buf, start + offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(SourceError::Shrunk { path: path.clone() })
            }
            Err(source) => Err(SourceError::Io {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// Refuses a read of `len` bytes at `offset` that is not inside tensor `name` of `tensor_len`
/// bytes.
pub(crate) fn check_range(
    name: &str,
    tensor_len: u64,
    offset: u64,
    len: usize,
) -> Result<(), SourceError> {
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > tensor_len)
    {
        return Err(SourceError::OutOfRange {
            tensor: name.to_string(),
            offset,
            len: len as u64,
            tensor_len,
        });
    }
    Ok(())
}

/// Fills `buf` from `data` at `offset`, or fails naming `tensor()` if the range is not inside.
pub(crate) fn copy_out(
    data: &[u8],
    offset: u64,
    buf: &mut [u8],
    tensor: impl FnOnce() -> String,
) -> Result<(), SourceError> {
    let range = usize::try_from(offset)
        .ok()
        .and_then(|o| Some(o..o.checked_add(buf.len())?))
        .filter(|r| r.end <= data.len())
        .ok_or_else(|| SourceError::OutOfRange {
            tensor: tensor(),
            offset,
            len: buf.len() as u64,
            tensor_len: data.len() as u64,
        })?;
    buf.copy_from_slice(&data[range]);
    Ok(())
}

impl WeightSource for SafetensorsSource {
    fn describe(&self) -> String {
        format!("safetensors:{}", self.dir.display())
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn read(&self, tensor: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_at(tensor, offset, buf)
    }

    fn hash_units(
        &self,
        tensor: usize,
        unit: u64,
        first: u64,
        out: &mut [Cv],
    ) -> Result<(), SourceError> {
        let len = self.tensors[tensor].len;
        // Whole units per read, at least one.
        let per_read = (READ_CHUNK / unit).max(1) as usize;
        CHUNK.with_borrow_mut(|buf| {
            for (i, cvs) in out.chunks_mut(per_read).enumerate() {
                let start = ((first + (i * per_read) as u64) * unit).min(len);
                let end = (start + cvs.len() as u64 * unit).min(len);
                buf.resize((end - start) as usize, 0);
                self.read_at(tensor, start, buf)?;
                blockhash::hash_units(start, unit, buf, cvs);
            }
            Ok(())
        })
    }
}
