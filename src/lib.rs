//! apollo-checkpoint keeps a model's safetensors files on disk up to date with the weights a
//! running server holds, writing only the blocks that changed.
//!
//! The library owns all the logic; the `apollo-checkpoint` binary only parses arguments, calls
//! [`Checkpoint`] and maps errors to exit codes. Subsystems, one module each:
//!
//! - [`io`]: the one I/O layer every model-file read, write and sync goes through.
//! - [`model`]: model directories and strict safetensors header parsing.
//! - [`blockhash`]: what a block hash is, and how 4 KiB blocks are compared at the speed of larger ones.
//! - [`index`]: the SQLite block index, its migrations and the generation history.
//! - [`source`]: [`WeightSource`], where live weights come from.
//! - [`cuda`]: reading live weights through CUDA IPC handles (the only raw CUDA calls).
//! - [`handles`]: manifests of live weights written by the export hook, and `diagnose`.
//! - [`names`]: which tensor of the files an engine parameter is (the files decide).
//! - [`experts`]: fused mixture-of-experts parameters split into per-expert views.
//! - [`layout`]: how HF tensors lie in a serving engine's packed, tensor-parallel parameters.
//! - [`plan`]: deciding which blocks changed, without reading the model files.
//! - [`journal`]: the fsynced undo/redo journal that makes a sync all-or-nothing.
//! - [`apply`]: rolling a journal forward onto the files, idempotently, repairing torn blocks.
//! - [`lock`]: the state-directory lock (one writer or many readers).
//! - [`delta`]: the delta file format `export-delta` writes and `apply-delta` reads.
//! - [`fileformat`]: the hashed append-only writer and checks the journal and delta formats share.
//! - [`replica`]: `export-delta` and `apply-delta`, the nightly copy to a backup host.
//! - [`checkpoint`]: the operations `init`, `sync`, `recover`, `status` and `verify`.
//! - [`synthetic`]: synthetic Qwen3.5-shaped models for the demo, the benchmark and tests.

pub mod apply;
pub mod blockhash;
pub mod checkpoint;
pub mod cuda;
pub mod delta;
pub mod experts;
pub mod fileformat;
pub mod handles;
pub mod index;
pub mod io;
pub mod journal;
pub mod layout;
pub mod lock;
pub mod model;
pub mod names;
pub mod plan;
pub mod replica;
pub mod source;
pub mod synthetic;

pub use checkpoint::{
    Checkpoint, Error, InitReport, RecoverReport, Retention, RollbackReport, StatusReport,
    SyncReport, VerifyReport,
};
pub use source::{SafetensorsSource, WeightSource};
