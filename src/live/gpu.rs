//! Hashing and copying live weights where they live: the kernels of `src/live/blake3.cu`
//! (embedded as PTX, JIT-compiled by the driver: nothing but the NVIDIA driver is needed) run
//! on the GPU that holds the weights, through the IPC mappings [`super::cuda`] opened.
//!
//! - [`Gpu::hash`]: the hash of every block of many runs, one launch per up to
//!   [`GpuBudget::cvs`] bytes of hashes; only the hashes (32 bytes per block) cross PCIe.
//! - [`Gpu::capture`]: changed blocks gathered on the GPU into a staging buffer laid out like
//!   the host buffer, the staged copy hashed, and copied to the host with one transfer per
//!   staging fill. Then the live blocks are hashed again: a block whose live hash is no longer
//!   the hash of its copy changed while it was being copied (training runs meanwhile), and is
//!   copied again, up to [`ATTEMPTS`] times; if some block never holds still, the capture fails
//!   and nothing is committed. Every block hash returned is the hash of the bytes returned.
//!
//! Memory on each GPU: a [`GpuBudget`] (144 MiB by default) of job tables, hashes and staging,
//! allocated at first use and freed with the reader; on the host, a pinned buffer for the
//! hashes.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg, result, sys,
};
use cudarc::nvrtc::Ptx;

use crate::blockhash::Cv;
use crate::source::{CaptureBuffer, CaptureStats, SourceError};

/// The kernels, as PTX generated from `src/live/blake3.cu` by `scripts/build_ptx.py`.
pub const PTX: &str = include_str!("blake3.ptx");
/// The same, compiled for sm_80 (A100-class, and the sm_8x GPUs after it).
pub const CUBIN_SM80: &[u8] = include_bytes!("blake3.sm80.cubin");
/// The same, compiled for sm_90 (H100, H200).
pub const CUBIN_SM90: &[u8] = include_bytes!("blake3.sm90.cubin");
/// The tool's own memory on each GPU (`sync --gpu-memory`), in three buffers allocated at first
/// use: job tables (40 bytes a job), block hashes computed per launch, and the staging buffer a
/// capture gathers into; split 1 : 4 : 4. The host holds a pinned buffer for the hashes, grown as a
/// launch needs it, up to the hashes' size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuBudget {
    /// Bytes of job tables, at most.
    pub jobs: usize,
    /// Bytes of block hashes computed per launch, at most.
    pub cvs: usize,
    /// Bytes of the staging buffer.
    pub stage: usize,
}

impl GpuBudget {
    /// The default: 144 MiB (16 + 64 + 64).
    pub const DEFAULT_BYTES: u64 = 144 << 20;
    /// The least that works: 36 MiB (4 + 16 + 16: the staging buffer holds the largest block,
    /// [`crate::blockhash::MAX_BLOCK_SIZE`]).
    pub const MIN_BYTES: u64 = 9 * crate::blockhash::MAX_BLOCK_SIZE / 4;

    /// `total` bytes split 1 : 4 : 4, each a whole number of MiB; refused below
    /// [`GpuBudget::MIN_BYTES`].
    pub fn from_total(total: u64) -> Result<GpuBudget, String> {
        if total < Self::MIN_BYTES {
            return Err(format!(
                "{total} bytes is below the least the GPU path needs ({} MiB)",
                Self::MIN_BYTES >> 20
            ));
        }
        let ninth = usize::try_from((total / 9) >> 20).unwrap_or(usize::MAX >> 24) << 20;
        Ok(GpuBudget {
            jobs: ninth,
            cvs: 4 * ninth,
            stage: 4 * ninth,
        })
    }

    /// Bytes of GPU memory these buffers take.
    pub fn total(&self) -> u64 {
        (self.jobs + self.cvs + self.stage) as u64
    }
}

impl Default for GpuBudget {
    fn default() -> Self {
        Self::from_total(Self::DEFAULT_BYTES).expect("the default is above the minimum")
    }
}
/// Copies of a block that keeps changing, at most.
pub const ATTEMPTS: u32 = 4;
/// Threads per block of the kernels.
const THREADS: u32 = 128;
/// Bytes one thread block of the gather kernel copies, at most (a multiple of 16).
const GATHER_PIECE: u64 = 256 << 10;

/// One run to hash, as the kernel reads it (`struct Job` in blake3.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Job {
    ptr: u64,
    len: u64,
    offset: u64,
    first: u64,
    block_size: u64,
}

/// One run to gather (`struct Run` in blake3.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    src: u64,
    len: u64,
    dst: u64,
}

/// A run of live bytes at a device address: what the GPU side works on.
#[derive(Clone, Copy, Debug)]
pub struct DevRun {
    /// Device address of the run's first byte.
    pub ptr: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of its first byte in its tensor (a multiple of the block size).
    pub tensor_offset: u64,
    /// Where its bytes go in the host buffer.
    pub dst: u64,
    /// Index of its first block hash in the output.
    pub out: u64,
}

/// Device memory freed on drop (in its context).
struct DeviceBuf {
    ptr: u64,
    len: usize,
}

/// Host memory pinned for transfers, freed on drop.
struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain host memory owned by this struct, used under the scratch mutex only.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    const EMPTY: PinnedBuf = PinnedBuf {
        ptr: std::ptr::null_mut(),
        len: 0,
    };

    fn as_mut(&mut self, n: usize) -> &mut [u8] {
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: `ptr` holds `len` bytes of pinned memory owned by this struct; `n <= len`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n.min(self.len)) }
    }
}

/// Pinned host memory a GPU copies captures into at full speed, freed (in its context) on drop.
pub struct PinnedCapture {
    ctx: Arc<CudaContext>,
    buf: PinnedBuf,
}

impl std::ops::Deref for PinnedCapture {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `buf.ptr` holds `buf.len` bytes of pinned memory owned by this struct.
        unsafe { std::slice::from_raw_parts(self.buf.ptr, self.buf.len) }
    }
}

impl std::ops::DerefMut for PinnedCapture {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut(self.buf.len)
    }
}

impl CaptureBuffer for PinnedCapture {}

impl Drop for PinnedCapture {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            // Leak rather than free in another context.
            self.buf.len = 0;
            self.buf.ptr = std::ptr::null_mut();
        }
    }
}

/// Buffers of one GPU, allocated at first use.
struct Scratch {
    jobs: DeviceBuf,
    cvs: DeviceBuf,
    stage: DeviceBuf,
    host_cvs: PinnedBuf,
}

/// The kernels of one GPU.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    hash_fn: CudaFunction,
    gather_fn: CudaFunction,
    scratch: Mutex<Option<Scratch>>,
    budget: GpuBudget,
}

fn driver(what: &'static str) -> impl Fn(result::DriverError) -> SourceError {
    move |e| SourceError::Io {
        path: std::path::PathBuf::from("<GPU>"),
        source: std::io::Error::other(format!("{what}: {e:?}")),
    }
}

impl Gpu {
    /// Loads the kernels into `ctx`: the machine code for its GPU if shipped, else the PTX
    /// (JIT-compiled by the driver); an error says why neither loads (e.g. a driver too old).
    pub fn load(ctx: &Arc<CudaContext>, budget: GpuBudget) -> Result<Gpu, String> {
        let cubin = match ctx.compute_capability() {
            Ok((9, 0)) => Some(CUBIN_SM90),
            Ok((8, _)) => Some(CUBIN_SM80),
            _ => None,
        };
        let module = cubin
            .and_then(|c| ctx.load_module(Ptx::from_binary(c.to_vec())).ok())
            .map_or_else(|| ctx.load_module(Ptx::from_src(PTX)), Ok)
            .map_err(|e| format!("the driver cannot load the hashing kernels ({e:?})"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| format!("kernel {name}: {e:?}"))
        };
        Ok(Gpu {
            ctx: Arc::clone(ctx),
            stream: ctx.default_stream(),
            hash_fn: f("apollo_block_cvs")?,
            gather_fn: f("apollo_gather")?,
            scratch: Mutex::new(None),
            budget,
        })
    }

    fn alloc(len: usize) -> Result<DeviceBuf, SourceError> {
        // SAFETY: the context is current (bound by the caller); the buffer is freed once, in
        // `DeviceBuf::drop`.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(driver("allocating GPU memory"))?;
        Ok(DeviceBuf { ptr, len })
    }

    fn with_scratch<T>(
        &self,
        f: impl FnOnce(&Gpu, &mut Scratch) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the GPU context"))?;
        let mut guard = self
            .scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(Scratch {
                jobs: Self::alloc(self.budget.jobs)?,
                cvs: Self::alloc(self.budget.cvs)?,
                stage: Self::alloc(self.budget.stage)?,
                host_cvs: PinnedBuf::EMPTY,
            });
        }
        f(self, guard.as_mut().expect("allocated above"))
    }

    /// `len` bytes of pinned host memory for captures.
    pub fn capture_buffer(&self, len: usize) -> Result<PinnedCapture, SourceError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the GPU context"))?;
        // SAFETY: the context is current; the buffer is freed once, by `PinnedBuf::drop`.
        // Portable: pinned for every context, so copies from any of the GPUs run at full speed.
        let ptr = unsafe { result::malloc_host(len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(driver("allocating pinned memory"))?;
        Ok(PinnedCapture {
            ctx: Arc::clone(&self.ctx),
            buf: PinnedBuf {
                ptr: ptr.cast(),
                len,
            },
        })
    }

    /// Hashes every block of `runs` (`block_size` bytes, the last of a run possibly partial)
    /// into `out[run.out..]`.
    pub fn hash(
        &self,
        runs: &[DevRun],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        self.with_scratch(|gpu, s| gpu.hash_in(s, runs, block_size, out))
    }

    fn hash_in(
        &self,
        s: &mut Scratch,
        runs: &[DevRun],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        let mut stats = CaptureStats::default();
        let max_blocks = (self.budget.cvs / 32) as u64;
        let max_jobs = self.budget.jobs / std::mem::size_of::<Job>();
        let mut jobs: Vec<Job> = Vec::new();
        // (job's first block in the launch, its output index, blocks) for the copy out.
        let mut places: Vec<(u64, u64, u64)> = Vec::new();
        let mut total = 0u64;
        let mut pending = runs.iter().copied().peekable();
        let mut carry: Option<DevRun> = None;
        loop {
            let next = carry.take().or_else(|| pending.next());
            let launch_now = next.is_none() || jobs.len() == max_jobs || total == max_blocks;
            if launch_now && !jobs.is_empty() {
                self.launch_hash(s, &jobs, total, &mut stats)?;
                let host = s.host_cvs.as_mut(total as usize * 32);
                for &(first, at, n) in &places {
                    let (src, at, n) = ((first * 32) as usize, at as usize, n as usize);
                    out[at..at + n]
                        .as_flattened_mut()
                        .copy_from_slice(&host[src..src + n * 32]);
                }
                jobs.clear();
                places.clear();
                total = 0;
            }
            let Some(r) = next else { break };
            if r.len == 0 {
                continue;
            }
            let blocks = r.len.div_ceil(block_size);
            let room = max_blocks - total;
            let take = blocks.min(room);
            let len = (take * block_size).min(r.len);
            jobs.push(Job {
                ptr: r.ptr,
                len,
                offset: r.tensor_offset,
                first: total,
                block_size,
            });
            places.push((total, r.out, take));
            total += take;
            if take < blocks {
                carry = Some(DevRun {
                    ptr: r.ptr + len,
                    len: r.len - len,
                    tensor_offset: r.tensor_offset + len,
                    dst: r.dst + len,
                    out: r.out + take,
                });
            }
        }
        Ok(stats)
    }

    /// Hashes `total` blocks of `jobs` into the scratch's pinned host buffer.
    fn launch_hash(
        &self,
        s: &mut Scratch,
        jobs: &[Job],
        total: u64,
        stats: &mut CaptureStats,
    ) -> Result<(), SourceError> {
        // SAFETY: `Job` is plain old data (`repr(C)`, no padding: five u64).
        let bytes = unsafe {
            std::slice::from_raw_parts(jobs.as_ptr().cast::<u8>(), std::mem::size_of_val(jobs))
        };
        // SAFETY: the job table fits `s.jobs` (callers keep to the budget's job bytes); synchronous copy.
        unsafe { result::memcpy_htod_sync(s.jobs.ptr, bytes) }
            .map_err(driver("copying the job table"))?;
        let (njobs, out) = (jobs.len() as u32, s.cvs.ptr);
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(u64::from(THREADS)) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.hash_fn);
        launch.arg(&s.jobs.ptr).arg(&njobs).arg(&total).arg(&out);
        // SAFETY: the arguments match `apollo_block_cvs(const Job*, u32, u64, u32*)`; every job
        // addresses live bytes inside an opened allocation (the layout map's segments, within
        // the manifest's sizes) or the staging buffer; `total` hashes fit `s.cvs`.
        unsafe { launch.launch(cfg) }.map_err(driver("launching the hashing kernel"))?;
        self.stream
            .synchronize()
            .map_err(driver("hashing on the GPU"))?;
        let need = total as usize * 32;
        if s.host_cvs.len < need {
            // Grown as needed (pinning takes time in proportion to the size, and a sync that
            // hashes 64 KiB summaries needs 1/16 of the room of one that hashes 4 KiB blocks):
            // the next power of two, within the budget.
            let len = need
                .next_power_of_two()
                .max(1 << 20)
                .min(self.budget.cvs.max(need));
            s.host_cvs = PinnedBuf::EMPTY;
            // SAFETY: the context is current; the buffer is freed once, in `PinnedBuf::drop`.
            let ptr = unsafe { result::malloc_host(len, 0) }
                .map_err(driver("allocating pinned memory"))?;
            s.host_cvs = PinnedBuf {
                ptr: ptr.cast(),
                len,
            };
        }
        let host = s.host_cvs.as_mut(need);
        // SAFETY: `host` holds `total` hashes of pinned memory; synchronous copy.
        unsafe { result::memcpy_dtoh_sync(host, out) }.map_err(driver("copying hashes"))?;
        stats.gpu_bytes_copied += total * 32;
        stats.gpu_copies += 1;
        Ok(())
    }

    /// Copies the bytes of `runs` to `bytes[run.dst..]` consistently and their block hashes to
    /// `cvs[run.out..]` (see the module documentation).
    pub fn capture(
        &self,
        runs: &[DevRun],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        // No run longer than the staging buffer: longer ones are cut at block boundaries.
        let stage = (self.budget.stage as u64 / block_size).max(1) * block_size;
        let mut cut = Vec::with_capacity(runs.len());
        for r in runs.iter().filter(|r| r.len > 0) {
            let mut off = 0;
            while off < r.len {
                let len = stage.min(r.len - off);
                cut.push(DevRun {
                    ptr: r.ptr + off,
                    len,
                    tensor_offset: r.tensor_offset + off,
                    dst: r.dst + off,
                    out: r.out + off / block_size,
                });
                off += len;
            }
        }
        self.with_scratch(|gpu, s| {
            let mut stats = CaptureStats::default();
            for fill in fills(&cut, self.budget.stage as u64) {
                gpu.capture_fill(s, &cut[fill], block_size, bytes, cvs, &mut stats)?;
            }
            Ok(stats)
        })
    }

    /// One staging fill: `runs` span at most the staging buffer's bytes of the host buffer.
    fn capture_fill(
        &self,
        s: &mut Scratch,
        runs: &[DevRun],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
        stats: &mut CaptureStats,
    ) -> Result<(), SourceError> {
        let base = runs.iter().map(|r| r.dst).min().unwrap_or(0);
        let mut device = OnGpu { gpu: self, s, base };
        capture_consistently(&mut device, runs, block_size, bytes, cvs, stats)
    }

    /// Gathers `runs` into the staging buffer at `run.dst - base`.
    fn gather(&self, s: &mut Scratch, runs: &[DevRun], base: u64) -> Result<(), SourceError> {
        // One thread block copies one piece: long runs are cut so that a fill of a few large
        // runs still keeps every multiprocessor busy (one block per 64 MiB run copied at a
        // fraction of the GPU's bandwidth: 1.7 s of a 17 GB dense sync).
        let pieces = gather_pieces(runs, base);
        let max = self.budget.jobs / std::mem::size_of::<Run>();
        for table in pieces.chunks(max) {
            // SAFETY: `Run` is plain old data (`repr(C)`, three u64).
            let raw = unsafe {
                std::slice::from_raw_parts(
                    table.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(table),
                )
            };
            // SAFETY: the table fits `s.jobs` (at most the budget's job bytes); synchronous copy.
            unsafe { result::memcpy_htod_sync(s.jobs.ptr, raw) }
                .map_err(driver("copying the gather table"))?;
            let n = table.len() as u32;
            let cfg = LaunchConfig {
                grid_dim: (n.min(65_535), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = self.stream.launch_builder(&self.gather_fn);
            launch.arg(&s.jobs.ptr).arg(&n).arg(&s.stage.ptr);
            // SAFETY: the arguments match `apollo_gather(const Run*, u32, u8*)`; every source
            // range lies in an opened allocation and every destination inside the staging
            // buffer (a fill spans at most the staging buffer).
            unsafe { launch.launch(cfg) }.map_err(driver("launching the gather kernel"))?;
        }
        self.stream
            .synchronize()
            .map_err(driver("gathering on the GPU"))
    }
}

/// What a consistent capture needs from the device holding the live bytes.
pub(crate) trait Capturer {
    /// Copies `runs` to `bytes[run.dst..]` (through the device's staging, which mirrors the host
    /// buffer: bytes between the runs that are copied along are ones copied before, at the same
    /// places) and writes the hashes of the copied blocks to `cvs[run.out..]`.
    fn copy(
        &mut self,
        runs: &[DevRun],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
        stats: &mut CaptureStats,
    ) -> Result<(), SourceError>;

    /// Writes the hashes of the live blocks of `runs` to `out[run.out..]`.
    fn hash_live(
        &mut self,
        runs: &[DevRun],
        block_size: u64,
        out: &mut [Cv],
        stats: &mut CaptureStats,
    ) -> Result<(), SourceError>;
}

/// Copies `runs` so that every block's copy is what the block holds once the copy is done:
/// after each copy the live blocks are hashed again, and those whose hash is no longer their
/// copy's (they changed meanwhile) are copied again, up to [`ATTEMPTS`] times in all; a block
/// still moving then fails the capture ([`SourceError::Unstable`]).
pub(crate) fn capture_consistently(
    device: &mut impl Capturer,
    runs: &[DevRun],
    block_size: u64,
    bytes: &mut [u8],
    cvs: &mut [Cv],
    stats: &mut CaptureStats,
) -> Result<(), SourceError> {
    let mut todo: Vec<DevRun> = runs.to_vec();
    for attempt in 1..=ATTEMPTS {
        device.copy(&todo, block_size, bytes, cvs, stats)?;
        let relative: Vec<DevRun> = todo
            .iter()
            .scan(0u64, |at, r| {
                let out = *at;
                *at += r.len.div_ceil(block_size);
                Some(DevRun { out, ..*r })
            })
            .collect();
        let nblocks: u64 = todo.iter().map(|r| r.len.div_ceil(block_size)).sum();
        let mut live = vec![[0u8; 32]; nblocks as usize];
        device.hash_live(&relative, block_size, &mut live, stats)?;
        // Blocks whose live bytes moved on since their copy: copy them again.
        let mut moved = Vec::new();
        for (r, rel) in todo.iter().zip(&relative) {
            for k in 0..r.len.div_ceil(block_size) {
                if live[(rel.out + k) as usize] != cvs[(r.out + k) as usize] {
                    let off = k * block_size;
                    moved.push(DevRun {
                        ptr: r.ptr + off,
                        len: block_size.min(r.len - off),
                        tensor_offset: r.tensor_offset + off,
                        dst: r.dst + off,
                        out: r.out + k,
                    });
                }
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        stats.recaptured_blocks += moved.len() as u64;
        if attempt == ATTEMPTS {
            return Err(SourceError::Unstable {
                blocks: moved.len() as u64,
                attempts: ATTEMPTS,
            });
        }
        todo = moved;
    }
    Ok(())
}

/// A staging fill on the GPU: the staging buffer mirrors the host buffer from `base` on.
struct OnGpu<'a> {
    gpu: &'a Gpu,
    s: &'a mut Scratch,
    base: u64,
}

impl Capturer for OnGpu<'_> {
    fn copy(
        &mut self,
        runs: &[DevRun],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
        stats: &mut CaptureStats,
    ) -> Result<(), SourceError> {
        let (gpu, base) = (self.gpu, self.base);
        let first = runs.iter().map(|r| r.dst).min().unwrap_or(base);
        let end = runs.iter().map(|r| r.dst + r.len).max().unwrap_or(first);
        gpu.gather(self.s, runs, base)?;
        let staged: Vec<DevRun> = runs
            .iter()
            .map(|r| DevRun {
                ptr: self.s.stage.ptr + (r.dst - base),
                ..*r
            })
            .collect();
        stats.add(gpu.hash_in(self.s, &staged, block_size, cvs)?);
        let host = &mut bytes[first as usize..end as usize];
        // SAFETY: staging bytes `first - base .. end - base` (within the staging buffer) hold the
        // gathered runs (and, between them, bytes copied before to the same places);
        // synchronous copy into the host buffer.
        unsafe { result::memcpy_dtoh_sync(host, self.s.stage.ptr + (first - base)) }
            .map_err(driver("copying changed blocks"))?;
        stats.gpu_bytes_copied += end - first;
        stats.gpu_copies += 1;
        Ok(())
    }

    fn hash_live(
        &mut self,
        runs: &[DevRun],
        block_size: u64,
        out: &mut [Cv],
        stats: &mut CaptureStats,
    ) -> Result<(), SourceError> {
        stats.add(self.gpu.hash_in(self.s, runs, block_size, out)?);
        Ok(())
    }
}

/// The gather table of `runs` (destinations relative to `base`), each cut into pieces of at
/// most [`GATHER_PIECE`] bytes: one thread block copies one piece.
fn gather_pieces(runs: &[DevRun], base: u64) -> Vec<Run> {
    runs.iter()
        .flat_map(|r| {
            (0..r.len.div_ceil(GATHER_PIECE)).map(move |i| {
                let off = i * GATHER_PIECE;
                Run {
                    src: r.ptr + off,
                    len: GATHER_PIECE.min(r.len - off),
                    dst: r.dst - base + off,
                }
            })
        })
        .collect()
}

/// `runs` cut into staging fills: consecutive runs spanning at most `stage` bytes of the host
/// buffer (no run is longer).
fn fills(runs: &[DevRun], stage: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < runs.len() {
        let base = runs[start].dst;
        let mut end = start + 1;
        while end < runs.len() && runs[end].dst + runs[end].len - base <= stage {
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            // Leak rather than free in another context.
            if let Some(s) = self
                .scratch
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                std::mem::forget(s);
            }
        }
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `malloc_sync` and is freed only here, with its context
        // current (`Gpu::drop` leaks the scratch when it cannot bind it).
        let _ = unsafe { result::free_sync(self.ptr) };
        let _ = self.len;
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from `malloc_host` and is freed only here.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}

#[cfg(test)]
mod tests {
    /// The pieces of a gather copy exactly the runs' bytes to the runs' places (simulated on
    /// host memory: addresses are offsets into one "device" array), keep 16-byte alignment
    /// wherever the run had it, and none is longer than a piece.
    #[test]
    fn gather_pieces_copy_exactly_the_runs() {
        let device: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
        // (device offset, length, staging destination): the destinations do not overlap.
        let runs = [
            (0u64, 1u64 << 20, 4096u64),      // four whole pieces
            (5 << 20 >> 2, 300_001, 2 << 20), // a length not a multiple of 16
            (2 << 20, 17, 3 << 20),           // tiny
            (1 << 20, 0, (3 << 20) + 64),     // empty
        ];
        let base = 4096;
        let dev_runs: Vec<DevRun> = runs
            .iter()
            .map(|&(ptr, len, dst)| DevRun {
                ptr,
                len,
                tensor_offset: 0,
                dst,
                out: 0,
            })
            .collect();
        let pieces = gather_pieces(&dev_runs, base);
        assert!(pieces.iter().all(|p| p.len <= GATHER_PIECE && p.len > 0));
        let mut stage = vec![0u8; 4 << 20];
        for p in &pieces {
            let (src, dst, len) = (p.src as usize, p.dst as usize, p.len as usize);
            stage[dst..dst + len].copy_from_slice(&device[src..src + len]);
            if p.len == GATHER_PIECE {
                assert_eq!((p.src | p.dst) % 16, 0, "{p:?}");
            }
        }
        for &(ptr, len, dst) in &runs {
            let (ptr, len, at) = (ptr as usize, len as usize, (dst - base) as usize);
            assert!(
                stage[at..at + len] == device[ptr..ptr + len],
                "run at {ptr}"
            );
        }
        assert_eq!(pieces.len(), 4 + 2 + 1);
    }

    use super::*;

    #[test]
    fn the_gpu_memory_budget_is_split_and_never_exceeded() {
        let d = GpuBudget::default();
        assert_eq!((d.jobs, d.cvs, d.stage), (16 << 20, 64 << 20, 64 << 20));
        let least = GpuBudget::from_total(GpuBudget::MIN_BYTES).unwrap();
        assert_eq!(
            (least.jobs, least.cvs, least.stage),
            (4 << 20, 16 << 20, 16 << 20)
        );
        assert!(GpuBudget::from_total(GpuBudget::MIN_BYTES - 1).is_err());
        for total in [
            36u64 << 20,
            100 << 20,
            512 << 20,
            (512 << 20) + 12_345,
            4 << 30,
        ] {
            let b = GpuBudget::from_total(total).unwrap();
            assert!(
                b.total() <= total && b.total() + (9 << 20) > total,
                "{total}: {b:?}"
            );
            assert!(
                b.stage as u64 >= crate::blockhash::MAX_BLOCK_SIZE,
                "the staging buffer holds the largest block"
            );
        }
    }
    use crate::blockhash::hash_units;

    /// Host memory standing in for a GPU whose weights a trainer keeps writing: after each
    /// copy, the blocks listed in `writes` (one list per attempt) change.
    struct Moving {
        live: Vec<u8>,
        writes: Vec<Vec<usize>>,
        copies: usize,
    }

    impl Capturer for Moving {
        fn copy(
            &mut self,
            runs: &[DevRun],
            block_size: u64,
            bytes: &mut [u8],
            cvs: &mut [Cv],
            _stats: &mut CaptureStats,
        ) -> Result<(), SourceError> {
            for r in runs {
                let src = &self.live[r.ptr as usize..(r.ptr + r.len) as usize];
                bytes[r.dst as usize..(r.dst + r.len) as usize].copy_from_slice(src);
                let n = r.len.div_ceil(block_size) as usize;
                let out = &mut cvs[r.out as usize..r.out as usize + n];
                hash_units(r.tensor_offset, block_size, src, out);
            }
            // The trainer writes while the copy is in flight.
            if let Some(blocks) = self.writes.get(self.copies) {
                for &b in blocks {
                    self.live[b * block_size as usize] ^= 0x11;
                }
            }
            self.copies += 1;
            Ok(())
        }

        fn hash_live(
            &mut self,
            runs: &[DevRun],
            block_size: u64,
            out: &mut [Cv],
            _stats: &mut CaptureStats,
        ) -> Result<(), SourceError> {
            for r in runs {
                let src = &self.live[r.ptr as usize..(r.ptr + r.len) as usize];
                let n = r.len.div_ceil(block_size) as usize;
                hash_units(
                    r.tensor_offset,
                    block_size,
                    src,
                    &mut out[r.out as usize..][..n],
                );
            }
            Ok(())
        }
    }

    fn capture(
        writes: Vec<Vec<usize>>,
    ) -> (
        Result<(), SourceError>,
        Moving,
        Vec<u8>,
        Vec<Cv>,
        CaptureStats,
    ) {
        let bs = 1024u64;
        let live: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 7) as u8).collect();
        let mut dev = Moving {
            live,
            writes,
            copies: 0,
        };
        // Two runs: blocks 0..4 and 8..16 of one tensor.
        let runs = [
            DevRun {
                ptr: 0,
                len: 4 * bs,
                tensor_offset: 0,
                dst: 0,
                out: 0,
            },
            DevRun {
                ptr: 8 * bs,
                len: 8 * bs,
                tensor_offset: 8 * bs,
                dst: 4 * bs,
                out: 4,
            },
        ];
        let mut bytes = vec![0u8; 12 * bs as usize];
        let mut cvs = vec![[0u8; 32]; 12];
        let mut stats = CaptureStats::default();
        let r = capture_consistently(&mut dev, &runs, bs, &mut bytes, &mut cvs, &mut stats);
        (r, dev, bytes, cvs, stats)
    }

    #[test]
    fn blocks_that_change_during_the_copy_are_copied_again_until_they_hold_still() {
        // Blocks 1 and 9 change during the first copy, block 9 again during the second.
        let (r, dev, bytes, cvs, stats) = capture(vec![vec![1, 9], vec![9]]);
        r.unwrap();
        assert_eq!((dev.copies, stats.recaptured_blocks), (3, 3));
        // Every copy is what the block holds now, and every hash is its copy's.
        assert_eq!(&bytes[..4096], &dev.live[..4096]);
        assert_eq!(&bytes[4096..], &dev.live[8192..]);
        let mut want = vec![[0u8; 32]; 12];
        hash_units(0, 1024, &dev.live[..4096], &mut want[..4]);
        hash_units(8192, 1024, &dev.live[8192..], &mut want[4..]);
        assert_eq!(cvs, want);
    }

    #[test]
    fn a_block_that_never_holds_still_fails_the_capture() {
        let (r, dev, ..) = capture(vec![vec![2]; ATTEMPTS as usize]);
        assert!(
            matches!(
                r,
                Err(SourceError::Unstable {
                    blocks: 1,
                    attempts: ATTEMPTS
                })
            ),
            "{r:?}"
        );
        assert_eq!(dev.copies, ATTEMPTS as usize);
    }
}
