//! The GPU kernels' code (src/live/blake3.cu), compiled for the CPU with the host C++ compiler,
//! against the reference: every block hash equals `blockhash::subtree_cv` of the same bytes for
//! every allowed block size, partial last blocks, tiny tensors and unaligned data, and the
//! gather copies every run where it belongs. The same source is what the GPU runs (as PTX);
//! `scripts/gpu_hash_test.py` checks it there. Skips, saying so, without a C++ compiler.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use apollo_checkpoint::blockhash::subtree_cv;
use apollo_checkpoint::synthetic::Rng;

fn compiler() -> Option<&'static str> {
    ["c++", "g++", "clang++"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
}

fn build(dir: &Path) -> Option<std::path::PathBuf> {
    let Some(cxx) = compiler() else {
        eprintln!("skipping: no C++ compiler here to build the kernel's host harness");
        return None;
    };
    let exe = dir.join("harness");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel/host_harness.cpp");
    let o = Command::new(cxx)
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(exe)
}

#[test]
fn kernel_block_hashes_equal_the_reference_and_the_gather_copies_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(exe) = build(tmp.path()) else { return };
    let mut rng = Rng::new(77);
    let mut data = vec![0u8; 5 << 20];
    rng.fill(&mut data);
    // (start in data, length, offset in the tensor, block size): boundary sizes around chunks
    // and blocks, every allowed block size up to 2 MiB here, odd and unaligned starts.
    let mut jobs: Vec<(usize, usize, u64, u64)> = Vec::new();
    for bs in [1024u64, 2048, 4096, 8192, 65536, 1 << 20, 2 << 20] {
        for len in [
            1usize, 63, 64, 65, 1023, 1024, 1025, 2047, 3000, 4095, 4096, 4097, 10_000,
        ] {
            jobs.push((7, len, 0, bs));
        }
        jobs.push((0, (bs as usize) * 2 + 777, bs * 3, bs));
    }
    jobs.push((1, 5 * 4096 + 5, 4096 * 9, 4096)); // an odd address
    jobs.push((2, 3 * 4096, 1 << 40, 4096)); // a far offset: counters past 32 bits
    let mut spec = String::new();
    for (start, len, off, bs) in &jobs {
        writeln!(spec, "{start} {len} {off} {bs}").unwrap();
    }
    let runs: Vec<(usize, usize, usize)> = vec![
        (0, 4096, 0),
        (8192, 4096, 4096),
        (5, 100, 8192),
        (16, 32, 8292),
    ];
    let mut rspec = String::new();
    for (s, l, d) in &runs {
        writeln!(rspec, "{s} {l} {d}").unwrap();
    }
    let p = |n: &str| tmp.path().join(n);
    std::fs::write(p("data"), &data).unwrap();
    std::fs::write(p("jobs"), spec).unwrap();
    std::fs::write(p("runs"), rspec).unwrap();
    let o = Command::new(&exe)
        .args([p("data"), p("jobs"), p("runs"), p("cvs"), p("staged")])
        .output()
        .unwrap();
    assert!(o.status.success(), "harness failed: {o:?}");
    let cvs = std::fs::read(p("cvs")).unwrap();
    let mut at = 0;
    for (start, len, off, bs) in &jobs {
        let bytes = &data[*start..start + len];
        for (k, block) in bytes.chunks(*bs as usize).enumerate() {
            let want = subtree_cv(off + k as u64 * bs, block);
            assert_eq!(
                &cvs[at..at + 32],
                &want[..],
                "block {k} of {len} bytes at tensor offset {off}, block size {bs}"
            );
            at += 32;
        }
    }
    assert_eq!(at, cvs.len());
    let staged = std::fs::read(p("staged")).unwrap();
    for (s, l, d) in &runs {
        assert_eq!(&staged[*d..d + l], &data[*s..s + l]);
    }
}

/// The PTX the binary embeds was generated from the kernel source as it is (rerun
/// `scripts/build_ptx.py` after changing `src/live/blake3.cu`).
#[test]
fn the_embedded_ptx_comes_from_the_current_kernel_source() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read(root.join("src/live/blake3.cu")).unwrap();
    let ptx = apollo_checkpoint::live::gpu::PTX;
    let recorded = ptx
        .lines()
        .find_map(|l| l.strip_prefix("// source blake3: "))
        .expect("the PTX names its source's hash");
    assert_eq!(
        recorded,
        blake3::hash(&source).to_hex().as_str(),
        "src/live/blake3.ptx is stale: run scripts/build_ptx.py"
    );
    for entry in ["apollo_block_cvs", "apollo_gather"] {
        assert!(ptx.contains(&format!(".entry {entry}")), "{entry} missing");
    }
}
