//! Reading live weights from another process's GPU memory through CUDA IPC handles (cudarc).
//!
//! [`CudaIpcReader`] opens each distinct allocation of a set of manifests once, on the GPU whose
//! UUID the manifest names, and copies bytes device→host through bounded pinned staging buffers,
//! one per thread (never the whole model in host memory): with one buffer, each thread's copy
//! out of the pinned buffer into its own memory serialises every other thread's transfer; with
//! several, one thread's DMA overlaps another's host copy. It owns the mappings and closes them,
//! and frees the staging buffers, when dropped. cudarc is built with dynamic loading: without a CUDA driver
//! the binary still runs its CPU paths, and opening a reader fails with a clear error.
//!
//! All raw CUDA calls of the project are in this module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, DriverError, result, sys};

use crate::blockhash::Cv;
use crate::live::gpu::{DevRun, Gpu, GpuBudget};
use crate::live::handles::ManifestTensor;
use crate::live::source::{DeviceReader, ParamJob};
use crate::live::source::{ParamReader, Strided};
use crate::source::CaptureStats;
use crate::source::SourceError;

/// Bytes of each pinned staging buffer.
pub const STAGING_BYTES: usize = 16 << 20;

/// Why live weights cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library on this machine.
    #[error(
        "no CUDA driver (libcuda.so) on this machine: --handles needs the GPU host the weights live on"
    )]
    NoDriver,
    /// The process that owns the weights is gone.
    #[error(
        "the process that exported the handles (pid {pid}) is gone; export fresh handles from the running server"
    )]
    ProducerGone {
        /// Its pid.
        pid: u32,
    },
    /// No local GPU has the manifest's UUID.
    #[error(
        "tensor {tensor} lives on GPU {uuid}, which this machine does not see (check CUDA_VISIBLE_DEVICES)"
    )]
    DifferentGpu {
        /// The tensor.
        tensor: String,
        /// The GPU's UUID.
        uuid: String,
    },
    /// The handle could not be opened (stale, foreign, or from another boot).
    #[error(
        "tensor {tensor}: its IPC handle cannot be opened ({error}); the handles are stale or not from this machine: export fresh ones"
    )]
    BadHandle {
        /// The tensor.
        tensor: String,
        /// The driver's error.
        error: String,
    },
    /// Another driver error.
    #[error("CUDA: {what}: {error}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        error: String,
    },
}

fn driver(what: &str) -> impl FnOnce(DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver {
        what: what.to_string(),
        error: format!("{e:?}"),
    }
}

fn uuid_hex(s: &str) -> String {
    s.strip_prefix("GPU-")
        .unwrap_or(s)
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The GPU contexts a reader opens, by device ordinal: held here, a context outlives the
/// readers that use it.
///
/// Creating a context is most of what a fresh process spends before it can sync (0.12–0.14 s
/// per GPU on the H200 host, against 0.003 s to open the IPC handles of a 17 GB model). A
/// resident `sync --every` keeps one `GpuContexts` for its life and opens a reader per sync
/// with it: every sync still opens (and at its end closes) the producer's allocations, so
/// nothing of the producer's memory is held between syncs, only the contexts. A one-shot
/// reader gets a `GpuContexts` of its own, dropped with it. Each context is the device's
/// primary context (the one PyTorch also uses), retained once per ordinal.
#[derive(Default)]
pub struct GpuContexts {
    by_ordinal: Mutex<HashMap<usize, Arc<CudaContext>>>,
}

impl GpuContexts {
    /// The context of GPU `ordinal`, created at its first use.
    fn get(&self, ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
        let mut held = self
            .by_ordinal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ctx) = held.get(&ordinal) {
            return Ok(Arc::clone(ctx));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("opening a GPU"))?;
        held.insert(ordinal, Arc::clone(&ctx));
        Ok(ctx)
    }

    /// How many contexts are held.
    pub fn len(&self) -> usize {
        self.by_ordinal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Pinned {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pinned buffer is plain host memory owned by this struct; it is only touched while
// its mutex in the reader is held.
unsafe impl Send for Pinned {}

impl Drop for Pinned {
    /// Frees the buffer. The context it was allocated in must be current on this thread: the
    /// reader binds it before its staging buffers are dropped.
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `result::malloc_host` (a `Pinned` is built from nothing else)
        // and is freed only here.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

struct Mapping {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    /// Index of its GPU in `CudaIpcReader::gpus`.
    gpu: usize,
}

/// Live parameters of another process, read through their CUDA IPC handles.
pub struct CudaIpcReader {
    mappings: Vec<Mapping>,
    /// Per parameter: (mapping, byte offset in the allocation, bytes).
    params: Vec<(usize, u64, u64)>,
    /// Host-path staging buffers, allocated at first use.
    staging: Vec<Mutex<Option<Pinned>>>,
    staging_ctx: Arc<CudaContext>,
    /// The hashing and gather kernels of each GPU the weights are on, or why they are not
    /// there (then everything takes the host path).
    gpus: Result<Vec<Gpu>, String>,
    describe: String,
}

impl CudaIpcReader {
    /// Opens every distinct allocation of `tensors` (the manifests' entries, in the order the
    /// layout map numbers them).
    ///
    /// It allocates one staging buffer per thread of rayon's pool (16 MiB each). Measured on an
    /// H200 host with 16 cores, reading 16 GiB of live weights on all cores
    /// (`examples/ipc_read.rs`): 1.5–1.6 GiB/s with one buffer, 5.8 with 4, 10.4 with 8, 12.5
    /// with 16 of 16 MiB (16.5 with 16 of 64 MiB) — the copy out of the pinned buffer into the
    /// reader's memory, not the DMA, is what one buffer serialises.
    /// The kernels take at most `budget` of memory on each GPU.
    /// The GPU contexts are taken from `held` (created there when missing).
    pub fn open(
        tensors: &[ManifestTensor],
        budget: GpuBudget,
        held: &GpuContexts,
    ) -> Result<Self, CudaError> {
        Self::open_with(tensors, rayon::current_num_threads(), budget, held)
    }

    /// [`CudaIpcReader::open`] with `buffers` pinned staging buffers (at least one).
    pub fn open_with(
        tensors: &[ManifestTensor],
        buffers: usize,
        budget: GpuBudget,
        held: &GpuContexts,
    ) -> Result<Self, CudaError> {
        // SAFETY: only tries to load the library; no CUDA function is called.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        for pid in tensors.iter().filter_map(|t| t.pid) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(CudaError::ProducerGone { pid });
            }
        }
        // A context (a costly setup, and GPU memory) only on the GPUs the manifests name: a
        // device's UUID is read without one.
        let lap = std::time::Instant::now();
        result::init().map_err(driver("initializing CUDA"))?;
        tracing::debug!(seconds = lap.elapsed().as_secs_f64(), "CUDA initialized");
        let lap = std::time::Instant::now();
        let count = result::device::get_count().map_err(driver("counting GPUs"))?;
        let wanted: std::collections::HashSet<String> =
            tensors.iter().map(|t| uuid_hex(&t.device_uuid)).collect();
        let mut by_uuid: HashMap<String, Arc<CudaContext>> = HashMap::new();
        for ordinal in 0..count {
            let dev = result::device::get(ordinal).map_err(driver("opening a GPU"))?;
            let uuid = result::device::get_uuid(dev).map_err(driver("reading a GPU's UUID"))?;
            let raw: Vec<u8> = uuid.bytes.iter().map(|b| *b as u8).collect();
            let hex = crate::blockhash::hex(&raw);
            if wanted.contains(&hex) {
                by_uuid.insert(hex, held.get(ordinal as usize)?);
            }
        }
        tracing::debug!(
            gpus = by_uuid.len(),
            seconds = lap.elapsed().as_secs_f64(),
            "GPU contexts ready"
        );
        let lap = std::time::Instant::now();
        let mut mappings: Vec<Mapping> = Vec::new();
        let mut opened: HashMap<(String, String), usize> = HashMap::new();
        let mut params = Vec::with_capacity(tensors.len());
        let mut reader_ctx = None;
        // The GPUs in use, by UUID: their index in `gpus`.
        let mut gpu_of: HashMap<String, usize> = HashMap::new();
        let mut contexts: Vec<Arc<CudaContext>> = Vec::new();
        for t in tensors {
            let ctx =
                by_uuid
                    .get(&uuid_hex(&t.device_uuid))
                    .ok_or_else(|| CudaError::DifferentGpu {
                        tensor: t.name.clone(),
                        uuid: t.device_uuid.clone(),
                    })?;
            reader_ctx.get_or_insert_with(|| Arc::clone(ctx));
            let key = (uuid_hex(&t.device_uuid), t.ipc_handle.clone());
            let index = if let Some(&i) = opened.get(&key) {
                i
            } else {
                ctx.bind_to_thread()
                    .map_err(driver("binding a GPU context"))?;
                let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
                for (i, b) in handle.reserved.iter_mut().enumerate() {
                    let byte = u8::from_str_radix(&t.ipc_handle[2 * i..2 * i + 2], 16).unwrap_or(0);
                    *b = byte as std::ffi::c_char;
                }
                let mut ptr: sys::CUdeviceptr = 0;
                // SAFETY: `ptr` is a valid out-pointer and the context of the handle's GPU is
                // current; the mapping is recorded and closed exactly once in `Drop`.
                let rc = unsafe {
                    sys::cuIpcOpenMemHandle_v2(
                        &raw mut ptr,
                        handle,
                        sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                    )
                };
                if rc != sys::CUresult::CUDA_SUCCESS {
                    return Err(CudaError::BadHandle {
                        tensor: t.name.clone(),
                        error: format!("{rc:?}"),
                    });
                }
                let gpu = *gpu_of.entry(key.0.clone()).or_insert_with(|| {
                    contexts.push(Arc::clone(ctx));
                    contexts.len() - 1
                });
                mappings.push(Mapping {
                    ctx: Arc::clone(ctx),
                    ptr,
                    gpu,
                });
                opened.insert(key, mappings.len() - 1);
                mappings.len() - 1
            };
            params.push((index, t.offset, t.nbytes));
        }
        tracing::debug!(
            allocations = mappings.len(),
            tensors = tensors.len(),
            seconds = lap.elapsed().as_secs_f64(),
            "IPC handles opened"
        );
        let lap = std::time::Instant::now();
        let staging_ctx = match reader_ctx {
            Some(c) => c,
            None => held.get(0)?,
        };
        let staging = (0..buffers.max(1)).map(|_| Mutex::new(None)).collect();
        let gpus: Result<Vec<Gpu>, String> =
            contexts.iter().map(|c| Gpu::load(c, budget)).collect();
        tracing::debug!(
            seconds = lap.elapsed().as_secs_f64(),
            "hashing kernels loaded"
        );
        let describe = format!(
            "CUDA IPC ({} tensors in {} allocations; {})",
            tensors.len(),
            mappings.len(),
            match &gpus {
                Ok(_) => "hashed on the GPU".to_string(),
                Err(why) => format!("hashed on the host: {why}"),
            }
        );
        Ok(CudaIpcReader {
            mappings,
            params,
            staging,
            staging_ctx,
            gpus,
            describe,
        })
    }

    /// Whether the weights are hashed and gathered on their GPUs, or why not.
    pub fn gpu_hashing(&self) -> Result<(), &str> {
        self.gpus.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The device runs of `jobs` on each GPU: (GPU, runs), with every job checked to lie inside
    /// its parameter.
    fn device_runs(&self, jobs: &[ParamJob]) -> Result<Vec<(usize, Vec<DevRun>)>, SourceError> {
        let mut by_gpu: Vec<(usize, Vec<DevRun>)> = Vec::new();
        for j in jobs {
            let (m, base, nbytes) = self.params[j.param];
            if j.src.checked_add(j.len).is_none_or(|e| e > nbytes) {
                return Err(SourceError::OutOfRange {
                    tensor: format!("live parameter {}", j.param),
                    offset: j.src,
                    len: j.len,
                    tensor_len: nbytes,
                });
            }
            let mapping = &self.mappings[m];
            let run = DevRun {
                ptr: mapping.ptr + base + j.src,
                len: j.len,
                tensor_offset: j.tensor_offset,
                dst: j.dst,
                out: j.out,
            };
            match by_gpu.iter_mut().find(|(g, _)| *g == mapping.gpu) {
                Some((_, runs)) => runs.push(run),
                None => by_gpu.push((mapping.gpu, vec![run])),
            }
        }
        Ok(by_gpu)
    }
}

impl DeviceReader for CudaIpcReader {
    fn capture_buffer(
        &self,
        len: usize,
    ) -> Result<Box<dyn crate::source::CaptureBuffer>, SourceError> {
        let gpus = self
            .gpus
            .as_ref()
            .expect("device() is None without kernels");
        Ok(Box::new(gpus[0].capture_buffer(len)?))
    }

    fn hash_jobs(
        &self,
        jobs: &[ParamJob],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        let gpus = self
            .gpus
            .as_ref()
            .expect("device() is None without kernels");
        let mut stats = CaptureStats::default();
        for (g, runs) in self.device_runs(jobs)? {
            stats.add(gpus[g].hash(&runs, block_size, out)?);
        }
        Ok(stats)
    }

    fn capture_jobs(
        &self,
        jobs: &[ParamJob],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        let gpus = self
            .gpus
            .as_ref()
            .expect("device() is None without kernels");
        let mut stats = CaptureStats::default();
        for (g, runs) in self.device_runs(jobs)? {
            stats.add(gpus[g].capture(&runs, block_size, bytes, cvs)?);
        }
        Ok(stats)
    }
}

impl CudaIpcReader {
    /// Checks that `len` bytes from `offset` lie inside parameter `param`.
    fn check_param(&self, param: usize, offset: u64, len: u64) -> Result<(), SourceError> {
        let (_, _, nbytes) = self.params[param];
        if offset.checked_add(len).is_none_or(|e| e > nbytes) {
            return Err(SourceError::OutOfRange {
                tensor: format!("live parameter {param}"),
                offset,
                len,
                tensor_len: nbytes,
            });
        }
        Ok(())
    }

    /// Runs `f` with the device address of parameter `param` and a pinned staging buffer (ours
    /// under its lock), the parameter's context current on this thread.
    fn with_staging<T>(
        &self,
        param: usize,
        f: impl FnOnce(
            sys::CUdeviceptr,
            &mut Pinned,
            &dyn Fn(String) -> SourceError,
        ) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let (m, base, _) = self.params[param];
        let mapping = &self.mappings[m];
        // A free staging buffer if there is one, else wait for this thread's.
        let mut guard = self
            .staging
            .iter()
            .find_map(|b| b.try_lock().ok())
            .unwrap_or_else(|| {
                let i = rayon::current_thread_index().unwrap_or(0) % self.staging.len();
                self.staging[i]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
        let io = |e: String| SourceError::Io {
            path: std::path::PathBuf::from(format!("<GPU live parameter {param}>")),
            source: std::io::Error::other(e),
        };
        if guard.is_none() {
            self.staging_ctx
                .bind_to_thread()
                .map_err(|e| io(format!("{e:?}")))?;
            // SAFETY: the staging context is current on this thread; the buffer is owned by a
            // `Pinned`, which frees it once when dropped.
            let host = unsafe { result::malloc_host(STAGING_BYTES, 0) }
                .map_err(|e| io(format!("allocating pinned memory: {e:?}")))?;
            *guard = Some(Pinned {
                ptr: host.cast(),
                len: STAGING_BYTES,
            });
        }
        let staging = guard.as_mut().expect("allocated above");
        mapping
            .ctx
            .bind_to_thread()
            .map_err(|e| io(format!("{e:?}")))?;
        f(mapping.ptr + base, staging, &io)
    }
}

impl ParamReader for CudaIpcReader {
    fn read_param(&self, param: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.check_param(param, offset, buf.len() as u64)?;
        self.with_staging(param, |dev, staging, io| {
            let mut done = 0usize;
            while done < buf.len() {
                let n = (buf.len() - done).min(staging.len);
                let src = dev + offset + done as u64;
                // SAFETY: the staging buffer holds `staging.len >= n` bytes of pinned memory and
                // is ours under its lock, so no one else reads or writes it while this slice
                // lives.
                let pinned = unsafe { std::slice::from_raw_parts_mut(staging.ptr, n) };
                // SAFETY: `src..src+n` lies inside the opened allocation (the manifest's offset
                // and size, checked above against the tensor's bytes); the copy is synchronous.
                unsafe { result::memcpy_dtoh_sync(pinned, src) }
                    .map_err(|e| io(format!("copying from the GPU: {e:?}")))?;
                buf[done..done + n].copy_from_slice(pinned);
                done += n;
            }
            Ok(())
        })
    }

    /// One 2D copy (cuMemcpy2D) per staging buffer's worth of pieces, instead of a copy each.
    fn read_param_2d(
        &self,
        param: usize,
        copy: Strided,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        let span = (copy.rows.max(1) - 1)
            .checked_mul(copy.src_pitch)
            .and_then(|s| s.checked_add(copy.width))
            .unwrap_or(u64::MAX);
        self.check_param(param, copy.src, span)?;
        let last = (copy.rows.max(1) - 1) * copy.dst_pitch + copy.width;
        assert!(
            buf.len() as u64 >= last,
            "the caller's buffer holds every piece"
        );
        let width = copy.width as usize;
        if copy.rows <= 1 || width > STAGING_BYTES {
            return crate::live::source::read_pieces(self, param, copy, buf);
        }
        self.with_staging(param, |dev, staging, io| {
            let per = (staging.len / width) as u64;
            let mut i = 0;
            while i < copy.rows {
                let h = per.min(copy.rows - i);
                let m = sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    srcHost: std::ptr::null(),
                    srcDevice: dev + copy.src + i * copy.src_pitch,
                    srcArray: std::ptr::null_mut(),
                    srcPitch: copy.src_pitch as usize,
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                    dstHost: staging.ptr.cast(),
                    dstDevice: 0,
                    dstArray: std::ptr::null_mut(),
                    dstPitch: width,
                    WidthInBytes: width,
                    Height: h as usize,
                };
                // SAFETY: the source rows lie inside the opened allocation (checked above: the
                // last piece ends within the parameter); the destination is the pinned staging
                // buffer, ours under its lock, which holds `h · width <= staging.len` bytes; the
                // copy is synchronous.
                unsafe { sys::cuMemcpy2D_v2(&raw const m) }
                    .result()
                    .map_err(|e| io(format!("copying from the GPU (2D): {e:?}")))?;
                // SAFETY: as above; the copy has completed, nothing else writes the buffer.
                let pinned = unsafe { std::slice::from_raw_parts(staging.ptr, h as usize * width) };
                for (r, piece) in pinned.chunks(width).enumerate() {
                    let at = ((i + r as u64) * copy.dst_pitch) as usize;
                    buf[at..at + width].copy_from_slice(piece);
                }
                i += h;
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn device(&self) -> Option<&dyn DeviceReader> {
        self.gpus.is_ok().then_some(self as &dyn DeviceReader)
    }
}

impl Drop for CudaIpcReader {
    fn drop(&mut self) {
        for m in &self.mappings {
            if m.ctx.bind_to_thread().is_ok() {
                // SAFETY: `m.ptr` was returned by cuIpcOpenMemHandle and is closed only here.
                let _ = unsafe { sys::cuIpcCloseMemHandle(m.ptr) };
            }
        }
        // The staging buffers are freed when the fields drop, right after this, in the context
        // they were allocated in. If it cannot be bound, leak them rather than free them in
        // another context.
        if self.staging_ctx.bind_to_thread().is_err() {
            for b in self.staging.drain(..) {
                std::mem::forget(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_compare_as_hex_digits() {
        assert_eq!(
            uuid_hex("GPU-1a2b3c4d-0000-1111-2222-33334444aaaa"),
            "1a2b3c4d00001111222233334444aaaa"
        );
        assert_eq!(uuid_hex("1A2B"), "1a2b");
    }
}
