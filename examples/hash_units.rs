//! Measures BLAKE3 chaining-value throughput by subtree size, single-threaded, to choose the
//! comparison group size (see src/blockhash.rs). Prints one line per size.

use std::time::Instant;

use apollo_checkpoint::blockhash::{Cv, hash_units};
use apollo_checkpoint::synthetic::Rng;

fn main() {
    let mut data = vec![0u8; 256 << 20];
    Rng::new(1).fill(&mut data);
    for unit in [4096u64, 8192, 16384, 32768, 65536, 131_072, 1 << 20] {
        let mut out = vec![[0u8; 32] as Cv; data.len().div_ceil(unit as usize)];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            hash_units(0, unit, &data, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "unit {unit:>8}: {:.3} s/GiB ({:.2} GiB/s, best of 5, 1 thread)",
            best * 4.0,
            0.25 / best
        );
    }
}
