//! Makes synthetic Qwen3.5-shaped models and training-like changes, for the demo and benchmark.
//!
//! ```text
//! synth generate DIR SIZE_BYTES [SHARD_BYTES] [SEED]
//! synth mutate DIR sparse|dense|whole [SEED]
//! ```
//! `mutate` prints one JSON object with what it changed.

use std::path::Path;
use std::process::ExitCode;

use apollo_checkpoint::synthetic::{self, Change};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let num = |i: usize, default: u64| arg(i).map_or(Ok(default), str::parse::<u64>);
    let result: Result<(), String> = match arg(0) {
        Some("generate") if args.len() >= 3 => (|| {
            let size = num(2, 0).map_err(|e| e.to_string())?;
            let shard = num(3, 512 << 20).map_err(|e| e.to_string())?;
            let seed = num(4, 1).map_err(|e| e.to_string())?;
            let tensors = synthetic::qwen35_of_size(size);
            synthetic::write_model(Path::new(&args[1]), &tensors, shard, seed).map_err(|e| e.to_string())
        })(),
        Some("mutate") if args.len() >= 3 => (|| {
            let change = match args[2].as_str() {
                "sparse" => Change::Sparse { fraction: 0.005, block_size: 4096 },
                "dense" => Change::Dense { fraction: 0.01 },
                "whole" => Change::WholeTensor,
                other => return Err(format!("unknown change {other:?}: sparse, dense or whole")),
            };
            let seed = num(3, 1).map_err(|e| e.to_string())?;
            let stats = synthetic::mutate(Path::new(&args[1]), change, seed).map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string(&stats).map_err(|e| e.to_string())?);
            Ok(())
        })(),
        _ => Err("usage: synth generate DIR SIZE_BYTES [SHARD_BYTES] [SEED] | synth mutate DIR sparse|dense|whole [SEED]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synth: {e}");
            ExitCode::FAILURE
        }
    }
}
