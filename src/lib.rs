//! apollo-checkpoint keeps a model's safetensors files on disk up to date with the weights a
//! running server holds, writing only the blocks that changed.
//!
//! The library owns all the logic; the `apollo-checkpoint` binary only parses arguments, calls
//! [`Checkpoint`] and maps errors to exit codes. Subsystems, one module each:
//!
//! - [`io`]: the one I/O layer every model-file read, write and sync goes through.
//! - [`model`]: model directories and strict safetensors header parsing.
//! - [`blockhash`]: what a block hash is, and how 4 KiB blocks are compared at the speed of larger ones.
//! - [`changemap`]: the bytes each generation changed per layer and tensor kind, and their heat map.
//! - [`index`]: the SQLite block index, its migrations and the generation history.
//! - [`source`]: [`WeightSource`], where live weights come from.
//! - [`live`]: the live GPU source: manifests of CUDA IPC handles, names decided by the files,
//!   vLLM's packed, sharded and expert layouts mapped to HF tensors, reading through cudarc.
//! - [`plan`]: deciding which blocks changed, without reading the model files.
//! - [`journal`]: the fsynced undo/redo journal that makes a sync all-or-nothing.
//! - [`apply`]: rolling a journal forward onto the files, idempotently, repairing torn blocks.
//! - [`lock`]: the state-directory lock (one writer or many readers).
//! - [`delta`]: the delta file format `export-delta` writes and `apply-delta` reads.
//! - [`record`]: the one record codec of the journal and delta formats, and the XOR code.
//! - [`fileformat`]: the hashed append-only writer and checks the journal and delta formats share.
//! - [`checkpoint`]: the operations, one file each (init, sync, recover, rollback, inspect,
//!   export-delta, apply-delta), the write transaction, errors and reports.
//! - [`resident`]: when a resident `sync --every` syncs: its schedule and signals.
//! - [`synthetic`]: synthetic Qwen3.5-shaped models for the demo, the benchmark and tests.

pub mod apply;
pub mod blockhash;
pub mod changemap;
pub mod checkpoint;
pub mod delta;
pub mod fileformat;
pub mod index;
pub mod io;
pub mod journal;
pub mod live;
pub mod lock;
pub mod mac;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod record;
pub mod resident;
pub mod source;
pub mod synthetic;

pub use checkpoint::{
    Checkpoint, Error, ErrorKind, InitReport, RecoverReport, RecoveryAction, Retention,
    RollbackReport, StatusReport, SyncReport, VerifyReport,
};
pub use source::{SafetensorsSource, WeightSource};

/// Bytes as people read them: `512 B`, `4.00 KiB`, `1.50 GiB` (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
