//! Measures what a sparse sync's apply pays per block: scattered 4 KiB `pwrite`s into a file's
//! cached pages, as `apply` writes them. Usage: `page_writes DIR [WRITES]`.
//!
//! Writes a 1 GiB file in DIR, fsyncs it (every page cached and clean, as after the previous
//! sync's flush), then times, per call, medians of 3 rounds of WRITES (default 5000) calls at
//! scattered offsets (the same 4 KiB-aligned-plus-100 offsets, so a block spans two pages as a
//! tensor's blocks do):
//!
//! - `read_4k`: `pread` of 4 KiB (page cache to user: the syscall and a copy);
//! - `write_1b_dirty`: `pwrite` of 1 byte into a page already dirty (syscall, no new dirty page);
//! - `write_4k_clean`: `pwrite` of 4 KiB dirtying two clean pages (what apply does);
//! - `write_4k_dirty`: the same again (pages already dirty);
//! - `write_4k_clean_x4`: four threads, four files, each dirtying clean pages, per call;
//! - `write_4k_clean_small_folios`: `write_4k_clean` on a file written 4 KiB at a time, whose
//!   page cache holds 4 KiB folios (the others were written 8 MiB at a time, as model files
//!   are: a kernel with large folios for the filesystem caches them in folios of up to 2 MiB,
//!   and ext4 walks every block of a folio on each write to it).
//!
//! Prints one JSON object: microseconds per call.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

const FILE_BYTES: u64 = 1 << 30;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: page_writes DIR [WRITES]");
    let writes: u64 = args.next().map_or(5000, |w| w.parse().expect("WRITES"));
    let path = |i| Path::new(&dir).join(format!("page_writes_{i}.bin"));
    let files: Vec<File> = (0..4)
        .map(|i| make(&path(i), 8 << 20))
        .collect::<Result<_, _>>()?;
    let small = make(&path(4), 4096)?;
    let stride = (FILE_BYTES / writes) & !4095;
    let offsets: Vec<u64> = (0..writes).map(|i| i * stride + 100).collect();
    let block = vec![0x5au8; 4096];
    let mut buf = vec![0u8; 4096];
    let per_call = |f: &mut dyn FnMut(u64) -> std::io::Result<()>| -> std::io::Result<f64> {
        let t = Instant::now();
        for &o in &offsets {
            f(o)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / writes as f64)
    };
    let clean = |files: &[File]| files.iter().try_for_each(File::sync_all);
    let (mut read, mut byte, mut fresh, mut dirty, mut four, mut smalls) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        clean(&files)?;
        let f = &files[0];
        read.push(per_call(&mut |o| f.read_exact_at(&mut buf, o))?);
        fresh.push(per_call(&mut |o| f.write_all_at(&block, o))?);
        dirty.push(per_call(&mut |o| f.write_all_at(&block, o))?);
        byte.push(per_call(&mut |o| f.write_all_at(&block[..1], o))?);
        small.sync_all()?;
        smalls.push(per_call(&mut |o| small.write_all_at(&block, o))?);
        clean(&files)?;
        let t = Instant::now();
        std::thread::scope(|s| {
            for f in &files {
                let (offsets, block) = (&offsets, &block);
                s.spawn(move || offsets.iter().try_for_each(|&o| f.write_all_at(block, o)));
            }
        });
        four.push(t.elapsed().as_secs_f64() * 1e6 / (4 * writes) as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2] * 100.0).round() / 100.0
    };
    println!(
        "{{\"writes\": {writes}, \"read_4k\": {}, \"write_1b_dirty\": {}, \"write_4k_clean\": {}, \"write_4k_dirty\": {}, \"write_4k_clean_x4\": {}, \"write_4k_clean_small_folios\": {}}}",
        median(&mut read),
        median(&mut byte),
        median(&mut fresh),
        median(&mut dirty),
        median(&mut four),
        median(&mut smalls)
    );
    for i in 0..5 {
        std::fs::remove_file(path(i))?;
    }
    Ok(())
}

/// A file of [`FILE_BYTES`] written in full, `chunk` bytes per write, its pages cached.
fn make(path: &Path, chunk: usize) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = vec![0xa5u8; chunk];
    for at in (0..FILE_BYTES).step_by(chunk.len()) {
        f.write_all_at(&chunk, at)?;
    }
    f.sync_all()?;
    Ok(f)
}
