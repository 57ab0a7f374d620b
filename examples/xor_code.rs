//! Measures the XOR coder (`record::encode_xor`) on a training step's change: 1% of the bf16
//! elements of 4 KiB blocks changed. Prints one line: GiB/s, one thread, best of 5.

use std::time::Instant;

use apollo_checkpoint::record::encode_xor;
use apollo_checkpoint::synthetic::Rng;

fn main() {
    let len = 256usize << 20;
    let mut old = vec![0u8; len];
    let mut rng = Rng::new(3);
    rng.fill(&mut old);
    let mut new = old.clone();
    for _ in 0..len / 200 {
        let at = (rng.next_u64() as usize % (len / 2)) * 2;
        new[at] ^= (rng.next_u64() as u8) | 1;
    }
    let mut out = Vec::with_capacity(8192);
    let mut best = f64::MAX;
    let mut coded = 0;
    for _ in 0..5 {
        let t = Instant::now();
        coded = 0;
        for (o, n) in old.chunks(4096).zip(new.chunks(4096)) {
            out.clear();
            encode_xor(o, n, &mut out);
            coded += out.len();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "encode_xor: {:.2} GiB/s ({coded} bytes coded for {len}, best of 5, 1 thread)",
        len as f64 / best / (1u64 << 30) as f64
    );
}
