//! Integration tests: real safetensors files, real SQLite, real fsync, the built binary.

mod bad_inputs;
mod cli;
mod diagnose;
mod exit_codes;
mod faults;
mod gpu_kernel;
mod handles;
mod journal_size;
mod json_contract;
mod kill;
mod layout;
mod live_names;
mod memory;
mod model_dir;
mod nightly;
mod readers;
mod replica;
mod report;
mod resident;
mod robustness;
mod rollback;
mod sync;
mod trust;
mod util;
