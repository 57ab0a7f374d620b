//! Measures how fast live weights come off the GPU through CUDA IPC: reads every tensor of the
//! manifests (all ranks) in 64 MiB pieces on all cores, for each staging-buffer count given, and
//! prints one JSON line per count. Run on the GPU host while the producer holds the weights:
//!
//!     cargo run --release --example ipc_read -- HANDLES [BUFFERS...]   (default: 1 4)

use std::time::Instant;

use apollo_checkpoint::live::cuda::{CudaIpcReader, GpuContexts};
use apollo_checkpoint::live::gpu::GpuBudget;
use apollo_checkpoint::live::handles::{manifest_paths, read_all};
use apollo_checkpoint::live::source::ParamReader;
use rayon::prelude::*;

/// Bytes read at a time (what a sync asks for at most).
const PIECE: u64 = 64 << 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(handles) = args.first() else {
        anyhow::bail!("usage: ipc_read HANDLES [BUFFERS...]");
    };
    let tensors = read_all(&manifest_paths(handles.as_ref())?)?.tensors;
    let counts: Vec<usize> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?
    } else {
        vec![1, 4]
    };
    let pieces: Vec<(usize, u64, u64)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            (0..t.nbytes.div_ceil(PIECE))
                .map(move |k| (i, k * PIECE, PIECE.min(t.nbytes - k * PIECE)))
        })
        .collect();
    let total: u64 = tensors.iter().map(|t| t.nbytes).sum();
    for buffers in counts {
        let reader = CudaIpcReader::open_with(
            &tensors,
            buffers,
            GpuBudget::default(),
            &GpuContexts::default(),
        )?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = Instant::now();
            pieces.par_iter().try_for_each_init(
                || vec![0u8; PIECE as usize],
                |buf, &(i, off, len)| reader.read_param(i, off, &mut buf[..len as usize]),
            )?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "{}",
            serde_json::json!({
                "buffers": buffers, "threads": rayon::current_num_threads(), "bytes": total,
                "best_of_3_s": best, "gib_per_s": total as f64 / best / f64::from(1u32 << 30),
            })
        );
    }
    Ok(())
}
