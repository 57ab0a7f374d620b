//! Checks the GPU kernels on real live weights (run by `scripts/gpu_hash_test.py` on a GPU host
//! while a producer holds the weights): for every block size, the hash of every block computed
//! on the GPU equals BLAKE3 on the host of the same bytes read through the IPC mappings, and a
//! capture of scattered blocks returns exactly those bytes with their hashes. Prints one line
//! per check (`PASS:`/`FAIL:`) and the GPU's hashing throughput; exits 1 on any failure.
//!
//!     gpu_hash_check MODEL_DIR HANDLES

use std::time::Instant;

use apollo_checkpoint::WeightSource;
use apollo_checkpoint::blockhash::hash_units;
use apollo_checkpoint::live;
use apollo_checkpoint::source::BlockRun;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_dir, handles] = args.as_slice() else {
        anyhow::bail!("usage: gpu_hash_check MODEL_DIR HANDLES");
    };
    let source = live::open(
        handles.as_ref(),
        model_dir.as_ref(),
        live::gpu::GpuBudget::default(),
        &live::cuda::GpuContexts::default(),
    )?;
    if let Err(why) = source.reader().gpu_hashing() {
        anyhow::bail!("the GPU cannot hash: {why}");
    }
    let tensors = source.tensors().to_vec();
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut b = vec![0u8; t.len as usize];
            source.read(i, 0, &mut b).map(|()| b)
        })
        .collect::<Result<_, _>>()?;
    let mut failed = 0;
    let mut check = |name: String, ok: bool| {
        println!("{}: {name}", if ok { "PASS" } else { "FAIL" });
        failed += u32::from(!ok);
    };
    for bs in [1024u64, 4096, 65536, 1 << 20, 16 << 20] {
        let runs: Vec<BlockRun> = tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.len > 0)
            .map(|(i, t)| BlockRun {
                tensor: i,
                first: 0,
                count: t.len.div_ceil(bs),
            })
            .collect();
        let n: usize = runs.iter().map(|r| r.count as usize).sum();
        let mut gpu = vec![[0u8; 32]; n];
        let start = Instant::now();
        source.hash_blocks(&runs, bs, &mut gpu)?;
        let secs = start.elapsed().as_secs_f64();
        let mut host = vec![[0u8; 32]; n];
        let mut at = 0;
        for r in &runs {
            hash_units(0, bs, &data[r.tensor], &mut host[at..at + r.count as usize]);
            at += r.count as usize;
        }
        let bytes: u64 = tensors.iter().map(|t| t.len).sum();
        check(
            format!(
                "block size {bs}: {n} block hashes on the GPU equal the host's ({:.1} GB/s)",
                bytes as f64 / secs / 1e9
            ),
            gpu == host,
        );
        // Every other block of every tensor, captured.
        let scattered: Vec<BlockRun> = runs
            .iter()
            .flat_map(|r| {
                (0..r.count).step_by(2).map(move |b| BlockRun {
                    tensor: r.tensor,
                    first: b,
                    count: 1,
                })
            })
            .collect();
        let lens: Vec<(u64, u64)> = scattered
            .iter()
            .map(|r| r.span(bs, tensors[r.tensor].len))
            .collect();
        let total: u64 = lens.iter().map(|l| l.1).sum();
        let mut bytes = vec![0u8; total as usize];
        let mut cvs = vec![[0u8; 32]; scattered.len()];
        let stats = source.capture(&scattered, bs, &mut bytes, &mut cvs)?;
        let mut same = true;
        let mut at = 0usize;
        for (i, (r, (off, len))) in scattered.iter().zip(&lens).enumerate() {
            let want = &data[r.tensor][*off as usize..(off + len) as usize];
            let got = &bytes[at..at + *len as usize];
            let mut cv = [[0u8; 32]; 1];
            hash_units(*off, bs, want, &mut cv);
            same &= got == want && cvs[i] == cv[0];
            at += *len as usize;
        }
        check(
            format!(
                "block size {bs}: capture of {} scattered blocks: bytes and hashes ({} bytes in {} copies)",
                scattered.len(),
                stats.gpu_bytes_copied,
                stats.gpu_copies
            ),
            same,
        );
    }
    println!("{failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
