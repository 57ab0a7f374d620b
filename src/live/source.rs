//! The HF view of live parameters as a [`WeightSource`]: every HF tensor read, hashed and
//! captured through the [`LayoutMap`]'s segments.
//!
//! Where the parameters live on a device that can hash and copy in place ([`DeviceReader`], the
//! GPU), the source splits each request into runs of blocks that lie inside one segment — one
//! contiguous range of one parameter on one device — and hands those to the device: blocks are
//! hashed where they live and only their hashes, or the changed blocks gathered into large
//! transfers, cross to the host. A block that spans segments (a row-parallel tensor whose rows
//! are split across ranks, or a tensor-parallel boundary inside a block) takes the host path:
//! its pieces are copied and it is hashed on the CPU.

use crate::blockhash::{self, Cv};
use crate::live::layout::{HfTensor, LayoutMap, Segment};
use crate::source::{
    BlockRun, CaptureBuffer, CaptureStats, SourceError, SourceTensor, WeightSource,
};

/// One run of a live parameter's bytes, hashed block by block (or copied) where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamJob {
    /// The parameter.
    pub param: usize,
    /// Byte offset of the run in the parameter.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of the run's first byte in its HF tensor (a multiple of the block size).
    pub tensor_offset: u64,
    /// Where its bytes go in the capture buffer.
    pub dst: u64,
    /// Index of its first block's hash in the output.
    pub out: u64,
}

/// A reader whose parameters can be hashed and copied where they live.
pub trait DeviceReader: Sync {
    /// Writes the hash of every block (`block_size`) of every job to `out[job.out..]`.
    fn hash_jobs(
        &self,
        jobs: &[ParamJob],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError>;

    /// A buffer of `len` bytes the device copies into fastest (pinned host memory).
    fn capture_buffer(&self, len: usize) -> Result<Box<dyn CaptureBuffer>, SourceError> {
        Ok(Box::new(vec![0u8; len]))
    }

    /// Copies every job's bytes to `bytes[job.dst..]` and the hashes of the copied blocks to
    /// `cvs[job.out..]`, consistently (see [`WeightSource::capture`]).
    fn capture_jobs(
        &self,
        jobs: &[ParamJob],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
    ) -> Result<CaptureStats, SourceError>;
}

/// A strided copy out of one live parameter: `rows` pieces of `width` bytes, the i-th from byte
/// `src + i·src_pitch` of the parameter, each to `i·dst_pitch` of the destination (a
/// row-parallel shard's rows into their places in the HF tensor's rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    /// Offset of the first piece in the parameter.
    pub src: u64,
    /// Bytes from one piece to the next in the parameter.
    pub src_pitch: u64,
    /// Bytes of each piece.
    pub width: u64,
    /// Pieces.
    pub rows: u64,
    /// Bytes from one piece to the next in the destination.
    pub dst_pitch: u64,
}

/// Raw access to live parameters by index (one rank's GPU memory, or host buffers).
pub trait ParamReader: Sync {
    /// Copies `buf.len()` bytes of parameter `param` from `offset`.
    fn read_param(&self, param: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Copies the pieces of `copy` out of parameter `param` into `buf` (which starts where the
    /// first piece goes). Readers that can, do it in one transfer (the GPU: a 2D copy); the
    /// default reads each piece.
    fn read_param_2d(
        &self,
        param: usize,
        copy: Strided,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        read_pieces(self, param, copy, buf)
    }
    /// A short description.
    fn describe(&self) -> String;

    /// The device side of this reader, if its parameters can be hashed and copied in place.
    fn device(&self) -> Option<&dyn DeviceReader> {
        None
    }
}

/// Reads the pieces of `copy` one [`ParamReader::read_param`] each.
pub fn read_pieces<R: ParamReader + ?Sized>(
    reader: &R,
    param: usize,
    copy: Strided,
    buf: &mut [u8],
) -> Result<(), SourceError> {
    for i in 0..copy.rows {
        let at = (i * copy.dst_pitch) as usize;
        reader.read_param(
            param,
            copy.src + i * copy.src_pitch,
            &mut buf[at..at + copy.width as usize],
        )?;
    }
    Ok(())
}

/// Live parameters held in host memory (tests, and sources that copy whole parameters).
#[derive(Clone, Debug, Default)]
pub struct HostParams(pub Vec<Vec<u8>>);

impl ParamReader for HostParams {
    fn read_param(&self, param: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        crate::source::copy_out(&self.0[param], offset, buf, || {
            format!("live parameter {param}")
        })
    }

    fn describe(&self) -> String {
        format!("host memory ({} parameters)", self.0.len())
    }

    fn device(&self) -> Option<&dyn DeviceReader> {
        Some(self)
    }
}

/// Host memory standing in for a device (tests of the job split, and host-held parameters):
/// jobs are hashed and copied on the CPU.
impl DeviceReader for HostParams {
    fn hash_jobs(
        &self,
        jobs: &[ParamJob],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        for j in jobs {
            let data = self.job_bytes(j)?;
            let n = j.len.div_ceil(block_size) as usize;
            blockhash::hash_units(
                j.tensor_offset,
                block_size,
                data,
                &mut out[j.out as usize..j.out as usize + n],
            );
        }
        Ok(CaptureStats::default())
    }

    fn capture_jobs(
        &self,
        jobs: &[ParamJob],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        for j in jobs {
            let data = self.job_bytes(j)?;
            bytes[j.dst as usize..(j.dst + j.len) as usize].copy_from_slice(data);
        }
        self.hash_jobs(jobs, block_size, cvs)
    }
}

impl HostParams {
    fn job_bytes(&self, j: &ParamJob) -> Result<&[u8], SourceError> {
        let p = &self.0[j.param];
        usize::try_from(j.src)
            .ok()
            .and_then(|s| p.get(s..s.checked_add(j.len as usize)?))
            .ok_or_else(|| SourceError::OutOfRange {
                tensor: format!("live parameter {}", j.param),
                offset: j.src,
                len: j.len,
                tensor_len: p.len() as u64,
            })
    }
}

/// A [`WeightSource`] that presents the HF tensors of a [`LayoutMap`], reading their bytes from
/// the live parameters through the map (no copy of a whole packed parameter is made).
pub struct LayoutSource<R: ParamReader> {
    map: LayoutMap,
    tensors: Vec<SourceTensor>,
    order: Vec<String>,
    reader: R,
    in_place: bool,
    /// Seconds it took to open (manifests, names, GPU contexts and mappings).
    open_seconds: f64,
}

impl<R: ParamReader> LayoutSource<R> {
    /// Presents `map`'s tensors, read through `reader`.
    pub fn new(map: LayoutMap, reader: R) -> Self {
        let order: Vec<String> = map.tensors.keys().cloned().collect();
        let tensors = order
            .iter()
            .map(|n| {
                let t = &map.tensors[n];
                SourceTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    len: t.len,
                }
            })
            .collect();
        LayoutSource {
            map,
            tensors,
            order,
            reader,
            in_place: true,
            open_seconds: 0.0,
        }
    }

    /// Records how long opening the source took (reported in a sync's `phases.open`).
    #[must_use]
    pub fn opened_in(mut self, seconds: f64) -> Self {
        self.open_seconds = seconds;
        self
    }

    /// Whether to hash and gather on the reader's device when it has one (the default), or to
    /// copy the bytes to the host and hash there (`--hash-on cpu`).
    #[must_use]
    pub fn with_hashing_in_place(mut self, on: bool) -> Self {
        self.in_place = on;
        self
    }

    /// The reader.
    pub fn reader(&self) -> &R {
        &self.reader
    }

    fn device(&self) -> Option<&dyn DeviceReader> {
        self.reader.device().filter(|_| self.in_place)
    }

    fn hf(&self, tensor: usize) -> &HfTensor {
        &self.map.tensors[&self.order[tensor]]
    }

    /// Splits `runs` into device jobs (runs of blocks inside one segment) and host blocks
    /// (blocks that span segments): (jobs, host blocks as (tensor, block, output index, byte
    /// offset in the capture buffer)).
    fn split(&self, runs: &[BlockRun], block_size: u64) -> (Vec<ParamJob>, Vec<HostBlock>) {
        let mut jobs = Vec::new();
        let mut host = Vec::new();
        let (mut out, mut dst) = (0u64, 0u64);
        for r in runs {
            let t = self.hf(r.tensor);
            let (start, len) = r.span(block_size, t.len);
            let end_block = r.first + r.count;
            let mut k = r.first;
            while k < end_block {
                let b0 = k * block_size;
                let b_end = ((k + 1) * block_size).min(t.len);
                let seg = segment_at(t, b0);
                let seg_end = seg.dst + seg.len;
                let at_out = out + (k - r.first);
                let at_dst = dst + (b0 - start);
                if b_end > seg_end {
                    host.push(HostBlock {
                        tensor: r.tensor,
                        block: k,
                        out: at_out,
                        dst: at_dst,
                    });
                    k += 1;
                    continue;
                }
                // Every following block that ends inside this segment joins the job.
                let last = if seg_end >= t.len {
                    end_block - 1
                } else {
                    (seg_end / block_size).saturating_sub(1).max(k)
                };
                let n = (last + 1).min(end_block) - k;
                let job_end = ((k + n) * block_size).min(t.len);
                jobs.push(ParamJob {
                    param: seg.param,
                    src: seg.src + (b0 - seg.dst),
                    len: job_end - b0,
                    tensor_offset: b0,
                    dst: at_dst,
                    out: at_out,
                });
                k += n;
            }
            out += r.count;
            dst += len;
        }
        (jobs, host)
    }
}

/// A block hashed (or copied) on the host: it spans segments.
#[derive(Clone, Copy, Debug)]
struct HostBlock {
    tensor: usize,
    block: u64,
    out: u64,
    dst: u64,
}

/// The segment holding byte `at` of `t`.
fn segment_at(t: &HfTensor, at: u64) -> &Segment {
    let i = t.segments.partition_point(|s| s.dst + s.len <= at);
    &t.segments[i]
}

impl<R: ParamReader> WeightSource for LayoutSource<R> {
    fn describe(&self) -> String {
        format!("layout map over {}", self.reader.describe())
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn is_partial(&self) -> bool {
        true
    }

    fn open_seconds(&self) -> f64 {
        self.open_seconds
    }

    fn read(&self, tensor: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let t = &self.map.tensors[&self.order[tensor]];
        crate::source::check_range(&t.name, t.len, offset, buf.len())?;
        for (at, (param, copy)) in strided_copies(t, offset, buf.len() as u64) {
            self.reader
                .read_param_2d(param, copy, &mut buf[at as usize..])?;
        }
        Ok(())
    }

    fn hashes_in_place(&self) -> bool {
        self.device().is_some()
    }

    fn capture_buffer(&self, len: usize) -> Result<Box<dyn CaptureBuffer>, SourceError> {
        match self.device() {
            Some(d) => d.capture_buffer(len),
            None => Ok(Box::new(vec![0u8; len])),
        }
    }

    fn hash_blocks(
        &self,
        runs: &[BlockRun],
        block_size: u64,
        out: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        let Some(device) = self.device() else {
            return crate::source::hash_blocks_on_host(self, runs, block_size, out);
        };
        let (jobs, host) = self.split(runs, block_size);
        let stats = device.hash_jobs(&jobs, block_size, out)?;
        let hashed = self.host_blocks(&host, block_size, None)?;
        for (h, cv) in host.iter().zip(hashed) {
            out[h.out as usize] = cv;
        }
        Ok(stats)
    }

    fn capture(
        &self,
        runs: &[BlockRun],
        block_size: u64,
        bytes: &mut [u8],
        cvs: &mut [Cv],
    ) -> Result<CaptureStats, SourceError> {
        let Some(device) = self.device() else {
            return crate::source::capture_on_host(self, runs, block_size, bytes, cvs);
        };
        let (jobs, host) = self.split(runs, block_size);
        let stats = device.capture_jobs(&jobs, block_size, bytes, cvs)?;
        let hashed = self.host_blocks(&host, block_size, Some(bytes))?;
        for (h, cv) in host.iter().zip(hashed) {
            cvs[h.out as usize] = cv;
        }
        Ok(stats)
    }
}

/// Bytes of HF tensor data the host path reads at once per thread.
const HOST_CHUNK: u64 = 8 << 20;

impl<R: ParamReader> LayoutSource<R> {
    /// Reads and hashes blocks that span segments on the host; with `bytes`, also copies each to
    /// its place there. Consecutive blocks are read together, in chunks of [`HOST_CHUNK`] bytes
    /// on every core, each chunk with one strided copy per parameter run
    /// ([`strided_copies`]), never one copy per block.
    fn host_blocks(
        &self,
        blocks: &[HostBlock],
        block_size: u64,
        mut bytes: Option<&mut [u8]>,
    ) -> Result<Vec<Cv>, SourceError> {
        use rayon::prelude::*;
        let per_chunk = (HOST_CHUNK / block_size).max(1) as usize;
        let mut chunks: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, h) in blocks.iter().enumerate() {
            match chunks.last_mut() {
                Some(c)
                    if c.len() < per_chunk
                        && blocks[c.end - 1].tensor == h.tensor
                        && blocks[c.end - 1].block + 1 == h.block =>
                {
                    c.end = i + 1;
                }
                _ => chunks.push(i..i + 1),
            }
        }
        let read = |c: &std::ops::Range<usize>| {
            let first = &blocks[c.start];
            let len = self.hf(first.tensor).len;
            let off = first.block * block_size;
            let end = ((blocks[c.end - 1].block + 1) * block_size).min(len);
            let mut buf = vec![0u8; (end - off) as usize];
            self.read(first.tensor, off, &mut buf)?;
            let cvs: Vec<Cv> = buf
                .chunks(block_size as usize)
                .enumerate()
                .map(|(k, b)| blockhash::subtree_cv(off + k as u64 * block_size, b))
                .collect();
            Ok::<_, SourceError>((buf, cvs))
        };
        // A wave of chunks per pass, so that at most one chunk per thread is held at a time.
        let wave = rayon::current_num_threads().max(1);
        let mut out = Vec::with_capacity(blocks.len());
        for group in chunks.chunks(wave) {
            let done: Vec<(Vec<u8>, Vec<Cv>)> =
                group.par_iter().map(read).collect::<Result<_, _>>()?;
            for (c, (buf, cvs)) in group.iter().zip(done) {
                if let Some(bytes) = bytes.as_deref_mut() {
                    for (h, b) in blocks[c.clone()]
                        .iter()
                        .zip(buf.chunks(block_size as usize))
                    {
                        bytes[h.dst as usize..h.dst as usize + b.len()].copy_from_slice(b);
                    }
                }
                out.extend(cvs);
            }
        }
        Ok(out)
    }
}

/// The copies that read bytes `offset..offset + len` of `t` from its live parameters: per
/// parameter, its pieces in that range grouped into strided runs (pieces of one width at
/// constant pitches on both sides: a row-parallel shard's rows), each as (offset in the
/// destination, copy). A tensor of `rows` rows split over `tp` ranks thus reads with `tp`
/// copies, not `rows × tp`.
pub fn strided_copies(t: &HfTensor, offset: u64, len: u64) -> Vec<(u64, (usize, Strided))> {
    /// A piece: (offset in the parameter, offset in the destination, bytes).
    type Piece = (u64, u64, u64);
    let mut by_param: Vec<(usize, Vec<Piece>)> = Vec::new();
    for (seg, within, n) in t.pieces(offset, len) {
        let piece = (seg.src + within, seg.dst + within - offset, n);
        match by_param.iter_mut().find(|(p, _)| *p == seg.param) {
            Some((_, list)) => list.push(piece),
            None => by_param.push((seg.param, vec![piece])),
        }
    }
    let mut out = Vec::new();
    for (param, pieces) in by_param {
        let mut i = 0;
        while i < pieces.len() {
            let (src, dst, width) = pieces[i];
            let mut copy = Strided {
                src,
                src_pitch: 0,
                width,
                rows: 1,
                dst_pitch: 0,
            };
            // Pitches at least one piece wide on both sides (what a 2D copy takes).
            let pitches = pieces.get(i + 1).and_then(|&(s2, d2, w2)| {
                let sp = s2.checked_sub(src).filter(|&p| p >= width)?;
                let dp = d2.checked_sub(dst).filter(|&p| p >= width)?;
                (w2 == width).then_some((sp, dp))
            });
            if let Some((sp, dp)) = pitches {
                copy.src_pitch = sp;
                copy.dst_pitch = dp;
                copy.rows = 2;
                while let Some(&(s, d, w)) = pieces.get(i + copy.rows as usize) {
                    let k = copy.rows;
                    if w != width || s != src + k * copy.src_pitch || d != dst + k * copy.dst_pitch
                    {
                        break;
                    }
                    copy.rows += 1;
                }
            }
            i += copy.rows as usize;
            out.push((dst, (param, copy)));
        }
    }
    out
}
