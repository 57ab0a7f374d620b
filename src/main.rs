//! The `apollo-checkpoint` command line: parses arguments, calls the library, prints the result
//! and maps errors to exit codes (see the README's table).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use apollo_checkpoint::blockhash::DEFAULT_BLOCK_SIZE;
use apollo_checkpoint::checkpoint::CommandTarget;
use apollo_checkpoint::human_bytes;
use apollo_checkpoint::io::RealIo;
use apollo_checkpoint::live::cuda::GpuContexts;
use apollo_checkpoint::mac::Key;
use apollo_checkpoint::resident::Schedule;
use apollo_checkpoint::{
    Checkpoint, Error, RecoverReport, RecoveryAction, SafetensorsSource, StatusReport, SyncReport,
    VerifyReport,
};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// `println!` that does not panic when stdout is closed (`status | head -1`): the rest of the
/// output is dropped quietly and the command ends as it would have.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("apollo-checkpoint: writing to stdout: {e}");
            }
        }
    }};
}

/// Keep a model's safetensors files up to date with live weights, writing only what changed.
#[derive(Parser, Debug)]
#[command(name = "apollo-checkpoint", version, about, long_about = None, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log lines on stderr: -v what happens, -vv timings of every step (RUST_LOG, e.g.
    /// `RUST_LOG=apollo_checkpoint=debug`, overrides both).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress bar and no summary on stderr: only warnings and errors (and --json output).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

/// Set by `--quiet`: summaries are not printed.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `eprintln!` for summaries, which `--quiet` silences.
macro_rules! say {
    ($($arg:tt)*) => {{
        if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($arg)*);
        }
    }};
}

/// Log lines go to stderr through `tracing`: warnings by default, more with `-v`/`-vv`, or what
/// `RUST_LOG` says; colored only on a terminal and never with `NO_COLOR` set.
fn init_logging(verbose: u8, quiet: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let (filter, timed) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => (EnvFilter::new(spec), true),
        _ => (
            EnvFilter::new(format!("apollo_checkpoint={level}")),
            verbose > 0,
        ),
    };
    let color = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .with_target(false);
    // A warning alone reads like the summaries around it; a trace of steps wants its times.
    if timed {
        log.init();
    } else {
        log.without_time().init();
    }
}

#[derive(Args, Debug)]
struct Target {
    /// The model directory: model.safetensors, or shards named by model.safetensors.index.json.
    #[arg(long, value_name = "DIR", env = "APOLLO_MODEL_DIR")]
    model_dir: PathBuf,
    /// Where the index lives [default: <model-dir>/.apollo-checkpoint].
    #[arg(long, value_name = "DIR", env = "APOLLO_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text on stderr.
    #[arg(long)]
    json: bool,
    /// If another apollo-checkpoint holds the model's lock, wait up to this long for it
    /// instead of failing at once (exit 75): seconds (`30`, `2.5`) or a duration (`5m`,
    /// `1h 30m`); `inf` waits as long as it takes [default: 0, and 10m for `verify` and
    /// `retention` without changes, which wait for a running writer].
    #[arg(long, value_name = "DURATION", value_parser = parse_wait, env = "APOLLO_WAIT")]
    wait: Option<f64>,
    /// Write model files that are symbolic links, through them (into the files they point to).
    /// Without it a writing command refuses them: in a Hugging Face cache the target is a blob
    /// other revisions share.
    #[arg(long)]
    follow_symlinks: bool,
    /// After the run, success or not, write its metrics (Prometheus text format) to PATH,
    /// atomically: for node_exporter's textfile collector (a `.prom` file in its directory).
    #[arg(long, value_name = "PATH", env = "APOLLO_METRICS_FILE")]
    metrics_file: Option<PathBuf>,
}

/// `--help`'s examples.
const EXAMPLES: &str = "\
Examples:
  apollo-checkpoint init --model-dir /models/Qwen3.5-27B
  apollo-checkpoint sync --model-dir /models/Qwen3.5-27B --handles /run/apollo --json --wait 5m
  apollo-checkpoint sync --model-dir /models/Qwen3.5-27B --from /scratch/live-weights -v
  apollo-checkpoint status --model-dir /models/Qwen3.5-27B      # exit 78: something needs you
  apollo-checkpoint rollback --model-dir /models/Qwen3.5-27B --to 41
  apollo-checkpoint retention --model-dir /models/Qwen3.5-27B --generations 24 --bytes 20GiB
  apollo-checkpoint report --model-dir /models/Qwen3.5-27B --svg changes.svg --generations 40..
  APOLLO_MODEL_DIR=/models/Qwen3.5-27B apollo-checkpoint verify

Environment: APOLLO_MODEL_DIR, APOLLO_STATE_DIR, APOLLO_WAIT, APOLLO_HASH_ON, APOLLO_KEY_FILE,
APOLLO_REPLICA_DIR stand for the options of those names; RUST_LOG, NO_COLOR.";

/// Seconds a reader waits for a running writer when `--wait` is not given.
const READER_WAIT: f64 = 600.0;

/// `--wait`: seconds (at least 0), a duration (`5m`, `1h 30m`, `500ms`), or `inf`.
fn parse_wait(s: &str) -> Result<f64, String> {
    let t = s.trim();
    match t.parse::<f64>() {
        Ok(w) if w >= 0.0 => return Ok(w),
        Ok(_) => {}
        Err(_) => {
            if let Ok(d) = humantime::parse_duration(t) {
                return Ok(d.as_secs_f64());
            }
        }
    }
    Err(format!(
        "{s:?} is not a wait: give seconds (0 or more, e.g. 30 or 2.5), a duration (5m, 1h 30m) or inf"
    ))
}

/// `--every`: a duration of at least one second (`90`, `10m`, `1h 30m`).
fn parse_every(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let d = t
        .parse::<f64>()
        .ok()
        .and_then(|secs| std::time::Duration::try_from_secs_f64(secs).ok())
        .or_else(|| humantime::parse_duration(t).ok());
    match d {
        Some(d) if d >= std::time::Duration::from_secs(1) => Ok(d),
        _ => Err(format!(
            "{s:?} is not an interval: give seconds (at least 1) or a duration (10m, 1h 30m)"
        )),
    }
}

/// `--tag`: KEY=VALUE, the key letters, digits, `_`, `-` or `.`.
fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) =>
        {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not a tag: give KEY=VALUE, the key of letters, digits, _ - or . (e.g. step=41200)"
        )),
    }
}

/// `--gpu-memory`: a size, split into the GPU path's buffers.
fn parse_gpu_memory(s: &str) -> Result<apollo_checkpoint::live::gpu::GpuBudget, String> {
    apollo_checkpoint::live::gpu::GpuBudget::from_total(parse_bytes(s)?)
}

/// A size in bytes: a number, or with a unit (`4KiB`, `20GiB`, `500MB`, `1.5 GiB`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s.trim()).map_err(|e| {
        format!("{s:?} is not a size ({e}): give bytes, e.g. 4096, 4KiB, 20GiB or 500MB")
    })
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Index the model: hash every block of its files (all cores).
    Init {
        #[command(flatten)]
        target: Target,
        /// Bytes per block, a power of two from 1024 to 16 MiB; fixed for the index's life.
        #[arg(long, value_name = "SIZE", default_value_t = DEFAULT_BLOCK_SIZE, value_parser = parse_bytes)]
        block_size: u64,
    },
    /// Bring the model files up to date with live weights, writing only changed blocks.
    ///
    /// Indexes the model first if it has no index yet.
    Sync {
        #[command(flatten)]
        target: Target,
        /// The live weights: a safetensors directory in the same HuggingFace layout.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "handles",
            conflicts_with = "handles"
        )]
        from: Option<PathBuf>,
        /// The live weights: a manifest of CUDA IPC handles written by
        /// scripts/vllm_export_hook.py, or a folder of them (one per rank).
        #[arg(long, value_name = "PATH")]
        handles: Option<PathBuf>,
        /// Where live weights are hashed: on their GPU (only hashes, and the changed blocks,
        /// cross PCIe), on the host, or auto (the GPU for --handles when its driver can run the
        /// hashing kernels, else the host, saying why).
        #[arg(long, value_enum, default_value_t = HashOn::Auto, env = "APOLLO_HASH_ON")]
        hash_on: HashOn,
        /// The most GPU memory the tool itself allocates on each GPU of --handles (job tables,
        /// hashes, staging; at least 36MiB). Less makes more, smaller transfers.
        #[arg(long, value_name = "SIZE", default_value = "144MiB", value_parser = parse_gpu_memory, env = "APOLLO_GPU_MEMORY")]
        gpu_memory: apollo_checkpoint::live::gpu::GpuBudget,
        /// Leave the tensors whose names match GLOB untouched (`*` matches anything, dots
        /// included: `mtp.*`), e.g. those a trainer does not save; they are listed in the
        /// output. Repeatable.
        #[arg(long, value_name = "GLOB")]
        ignore: Vec<String>,
        /// Record KEY=VALUE with the generation this sync makes (e.g. `--tag step=41200`),
        /// shown by `log`, `status` and `rollback`. Repeatable.
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_tag)]
        tag: Vec<(String, String)>,
        /// Stay running and sync every DURATION (`10m`, `1h`), and at once on SIGUSR1; SIGTERM,
        /// SIGINT or SIGHUP stop it after the sync under way. Between syncs it keeps only its
        /// GPU contexts (each sync opens and closes the live weights like a one-shot sync), so a
        /// sync skips their setup: for a systemd service instead of a timer (see
        /// scripts/systemd). A sync that fails for a temporary reason (exit 75: the lock busy,
        /// weights that kept changing) is reported and the next one runs; any other failure
        /// ends the process with its exit code.
        #[arg(long, value_name = "DURATION", value_parser = parse_every)]
        every: Option<std::time::Duration>,
    },
    /// Finish or discard a write interrupted by a crash (sync does this first by itself).
    ///
    /// A committed journal is rolled forward, so the files hold the new generation; an
    /// uncommitted one is discarded (the files were not touched).
    Recover {
        #[command(flatten)]
        target: Target,
    },
    /// Restore the files to an earlier generation from the retained undo data.
    ///
    /// Journaled like a sync (a crash during it is recovered) and recorded as a new generation,
    /// so a rollback can itself be rolled back.
    Rollback {
        #[command(flatten)]
        target: Target,
        /// The generation to restore [default: the one before the current].
        #[arg(long, value_name = "GEN")]
        to: Option<u64>,
    },
    /// Show or set how much undo data (for rollback) is kept: the last N generations, at most
    /// M bytes, whichever is less. Applied at the next sync.
    Retention {
        #[command(flatten)]
        target: Target,
        /// Keep the undo data of this many generations.
        #[arg(long, value_name = "N")]
        generations: Option<u64>,
        /// Keep at most this much undo data (bytes, or with a unit: 20GiB, 500MB).
        #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
        bytes: Option<u64>,
    },
    /// Write the changes since the last export as one immutable delta file (plus a JSON manifest
    /// and changed-files.txt) into an outbox folder, for `apply-delta` on a backup host.
    ExportDelta {
        #[command(flatten)]
        target: Target,
        /// The outbox folder (created if needed).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Base generation [default: the target of the last export].
        #[arg(long, value_name = "GEN", conflicts_with = "full")]
        since: Option<u64>,
        /// Ship whole files, for a replica that has nothing yet.
        #[arg(long)]
        full: bool,
        /// Only remove the delta files whose target generation is at most GEN (the backup host
        /// has applied them); export nothing.
        #[arg(long, value_name = "GEN", conflicts_with_all = ["since", "full"])]
        prune_through: Option<u64>,
        /// Authenticate the delta: write a BLAKE3 keyed MAC of it and its manifest next to it
        /// (`<delta>.mac`). The key file holds 64 hex digits and must be private (chmod 600).
        #[arg(long, value_name = "FILE", env = "APOLLO_KEY_FILE")]
        key_file: Option<PathBuf>,
    },
    /// Apply delta files to a replica (on the backup host): verified, journaled, recoverable.
    ///
    /// A replica without state adopts the model files copied into it (checked against the
    /// delta's base), or is created from a full delta.
    ApplyDelta {
        /// The replica directory.
        #[arg(long, value_name = "DIR", env = "APOLLO_REPLICA_DIR")]
        replica_dir: PathBuf,
        /// Where the replica's index lives [default: <replica-dir>/.apollo-checkpoint].
        #[arg(long, value_name = "DIR", env = "APOLLO_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Print one JSON object on stdout instead of text on stderr.
        #[arg(long)]
        json: bool,
        /// Wait up to this long for the replica's lock instead of failing at once (exit 75):
        /// seconds or a duration (`5m`); `inf` waits as long as it takes.
        #[arg(long, value_name = "DURATION", value_parser = parse_wait, env = "APOLLO_WAIT")]
        wait: Option<f64>,
        /// Write replica files that are symbolic links, through them.
        #[arg(long)]
        follow_symlinks: bool,
        /// Refuse any delta without a valid MAC by this key (`export-delta --key-file` with the
        /// same key writes them). The key file must be private (chmod 600).
        #[arg(long, value_name = "FILE", env = "APOLLO_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// After the run, success or not, write its metrics (Prometheus text format) to PATH,
        /// atomically: the replica's generation, last run time and exit code.
        #[arg(long, value_name = "PATH", env = "APOLLO_METRICS_FILE")]
        metrics_file: Option<PathBuf>,
        /// The delta files (.apd), in any order.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Compare the live weights described by export-hook manifests with the model files:
    /// matched, live-only and disk-only tensors, and every dtype or shape mismatch.
    Diagnose {
        /// The model directory.
        #[arg(long, value_name = "DIR", env = "APOLLO_MODEL_DIR")]
        model_dir: PathBuf,
        /// A manifest written by scripts/vllm_export_hook.py, or a folder of them (one per rank).
        #[arg(long, value_name = "PATH")]
        handles: PathBuf,
        /// Print one JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script to stdout (e.g. `apollo-checkpoint completions bash >
    /// /etc/bash_completion.d/apollo-checkpoint`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `apollo-checkpoint man > apollo-checkpoint.1`.
    Man,
    /// List the generations, newest first: kind, time, source, blocks and bytes changed,
    /// seconds, tags.
    Log {
        #[command(flatten)]
        target: Target,
        /// Show at most this many.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u64,
    },
    /// Bytes changed per layer and tensor kind over a range of generations; `--svg` draws them
    /// as a heat map (with the bytes each generation changed).
    Report {
        #[command(flatten)]
        target: Target,
        /// Write the heat map to this SVG file (replaced atomically).
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        /// Which generations: `A..B` (both included), `A..`, `..B` or `N` [default: the newest
        /// 100 after init].
        #[arg(long, value_name = "A..B")]
        generations: Option<apollo_checkpoint::changemap::GenerationRange>,
    },
    /// Show the generation, the last sync, the files and anything that needs attention.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Rehash the model files and compare with the index; exit 1 on any difference.
    Verify {
        #[command(flatten)]
        target: Target,
        /// Re-index whatever differs from the files as they are now (records a new generation).
        #[arg(long)]
        repair: bool,
    },
}

/// `--hash-on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum HashOn {
    /// The GPU for GPU sources, else the host.
    Auto,
    /// The GPU (an error if the weights are not on one or its driver cannot run the kernels).
    Gpu,
    /// The host.
    Cpu,
}

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => {
            // A bad command line with --json among the arguments still gets its JSON object.
            let json = std::env::args_os().any(|a| a == "--json");
            if json && e.use_stderr() {
                let command = std::env::args().nth(1).unwrap_or_default();
                let _ = JSON.set(JsonContext {
                    command,
                    model_dir: None,
                });
                let text = e.to_string();
                let message = text.lines().next().unwrap_or_default();
                print_json_error(message.trim_start_matches("error: "), "usage", 2);
            }
            e.exit();
        }
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The subcommand's name as clap knows it (and as typed).
    let command = matches.subcommand_name().unwrap_or_default();
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    init_logging(cli.verbose, cli.quiet);
    if let Some(context) = cli.command.json_context(command) {
        let _ = JSON.set(context);
    }
    let started = std::time::Instant::now();
    // A resident sync writes the metrics of each of its syncs itself.
    let resident = matches!(&cli.command, Command::Sync { every: Some(_), .. });
    let metrics = cli.command.metrics_target().filter(|_| !resident);
    let code = match run(cli) {
        Ok(code) => code,
        Err(err) => report_error(&err),
    };
    if let Some((path, model_dir, state_dir)) = metrics {
        let seconds = started.elapsed().as_secs_f64();
        write_metrics_to(
            &path,
            &model_dir,
            state_dir.as_deref(),
            command,
            code,
            seconds,
        );
    }
    ExitCode::from(code)
}

/// Writes `--metrics-file` of `target`, if given, for a run that ended with `code`.
fn write_metrics(command: &str, code: u8, seconds: f64, target: &Target) {
    if let Some(path) = &target.metrics_file {
        let state_dir = target.state_dir.as_deref();
        write_metrics_to(path, &target.model_dir, state_dir, command, code, seconds);
    }
}

fn write_metrics_to(
    path: &Path,
    model_dir: &Path,
    state_dir: Option<&Path>,
    command: &str,
    code: u8,
    seconds: f64,
) {
    let status = Checkpoint::new(model_dir, state_dir, Arc::new(RealIo::new())).status();
    let sync = LAST_SYNC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let run = apollo_checkpoint::metrics::RunMetrics {
        command,
        exit_code: code,
        seconds,
        ended: std::time::SystemTime::now(),
        sync: sync.as_ref(),
        status: status.as_ref().ok(),
    };
    if let Err(e) = apollo_checkpoint::metrics::write(path, &run) {
        tracing::warn!("--metrics-file: {e}");
    }
}

/// Says what went wrong on stderr (and as a JSON object on stdout with `--json`); returns the
/// exit code it maps to.
fn report_error(err: &anyhow::Error) -> u8 {
    // Library errors reach here as they are (never behind context), so their kind decides
    // the exit code; anything else is unexpected (1).
    let lib = err.downcast_ref::<Error>();
    let code = lib.map_or(1, Error::exit_code);
    let message = error_chain(err);
    eprintln!("apollo-checkpoint: error: {message}");
    if JSON.get().is_some() {
        let kind = lib.map_or_else(
            || "unexpected".to_string(),
            |e| {
                serde_json::to_value(e.kind())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            },
        );
        print_json_error(&message, &kind, code);
    }
    code
}

/// Where `sync` reads live weights.
struct Live {
    from: Option<PathBuf>,
    handles: Option<PathBuf>,
    hash_on: HashOn,
    gpu_memory: apollo_checkpoint::live::gpu::GpuBudget,
}

/// One sync: the live weights opened (GPU contexts from `contexts`), the model synced, the
/// live weights closed again.
fn sync_once(
    cp: &Checkpoint,
    target: &Target,
    live: &Live,
    contexts: &GpuContexts,
) -> anyhow::Result<SyncReport> {
    let announce = |cp: &Checkpoint| -> anyhow::Result<()> {
        if !target.json && !cp.is_initialized()? {
            say!(
                "no index for {} yet: indexing it first",
                target.model_dir.display()
            );
        }
        Ok(())
    };
    let report = if let Some(handles) = &live.handles {
        let source =
            apollo_checkpoint::live::open(handles, &target.model_dir, live.gpu_memory, contexts)?
                .with_hashing_in_place(live.hash_on != HashOn::Cpu);
        if let Err(why) = source.reader().gpu_hashing() {
            if live.hash_on == HashOn::Gpu {
                return Err(Error::Usage(format!("--hash-on gpu: {why}")).into());
            }
            if !target.json && live.hash_on == HashOn::Auto {
                tracing::warn!("hashing on the host: {why}");
            }
        }
        announce(cp)?;
        let started = std::time::Instant::now();
        let report = cp.sync(&source)?;
        let synced = std::time::Instant::now();
        drop(source);
        tracing::debug!(
            sync_seconds = (synced - started).as_secs_f64(),
            release_seconds = synced.elapsed().as_secs_f64(),
            "GPU mappings released"
        );
        report
    } else {
        let from = live
            .from
            .as_ref()
            .expect("clap requires --from or --handles");
        let source = SafetensorsSource::open(from).map_err(Error::from)?;
        announce(cp)?;
        cp.sync(&source)?
    };
    *LAST_SYNC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report.clone());
    Ok(report)
}

/// Removes the undo data a sync pruned, once its report is out (see
/// `Checkpoint::with_deferred_undo_removal`); a failure is a warning, and the next sync tries
/// again.
fn remove_discarded(cp: &Checkpoint) {
    let lap = std::time::Instant::now();
    match cp.remove_discarded() {
        Ok((files, bytes)) if files > 0 => tracing::debug!(
            files,
            bytes,
            seconds = lap.elapsed().as_secs_f64(),
            "pruned undo data removed"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("removing pruned undo data: {e:#}"),
    }
}

/// Prints a sync's report: JSON, or its summary on stderr.
fn print_sync(target: &Target, report: &SyncReport) -> anyhow::Result<()> {
    if target.json {
        return print_json(report);
    }
    if let Some(r) = &report.recovered {
        say!("{}", recover_summary(r));
    }
    say!("{}", sync_summary(report));
    if !report.untouched.is_empty() {
        say!(
            "left untouched ({} tensors the live weights do not hold, or --ignore names): {}",
            report.untouched.len(),
            report.untouched.join(", ")
        );
    }
    Ok(())
}

/// The report of this run's last sync, for `--metrics-file`.
static LAST_SYNC: std::sync::Mutex<Option<SyncReport>> = std::sync::Mutex::new(None);

/// The version of the JSON objects `--json` prints (README, "JSON output"; the schema is
/// `src/output.schema.json`). Raised when a field changes meaning or goes away.
const SCHEMA_VERSION: u32 = 1;

/// What every `--json` object says about the run that printed it.
struct JsonContext {
    command: String,
    model_dir: Option<PathBuf>,
}

/// Set when the command prints JSON.
static JSON: std::sync::OnceLock<JsonContext> = std::sync::OnceLock::new();

impl Command {
    /// The model a command names with `--model-dir` (and the common options), if it does.
    fn target(&self) -> Option<&Target> {
        match self {
            Command::Init { target, .. }
            | Command::Sync { target, .. }
            | Command::Recover { target }
            | Command::Rollback { target, .. }
            | Command::Retention { target, .. }
            | Command::ExportDelta { target, .. }
            | Command::Status { target }
            | Command::Log { target, .. }
            | Command::Report { target, .. }
            | Command::Verify { target, .. } => Some(target),
            Command::ApplyDelta { .. }
            | Command::Diagnose { .. }
            | Command::Completions { .. }
            | Command::Man => None,
        }
    }

    /// The JSON context of a command (named `name`) run with `--json`.
    fn json_context(&self, name: &str) -> Option<JsonContext> {
        let (json, dir) = match (self.target(), self) {
            (Some(target), _) => (target.json, &target.model_dir),
            (
                None,
                Command::ApplyDelta {
                    json, replica_dir, ..
                },
            ) => (*json, replica_dir),
            (
                None,
                Command::Diagnose {
                    json, model_dir, ..
                },
            ) => (*json, model_dir),
            (None, _) => return None,
        };
        json.then(|| JsonContext {
            command: name.to_string(),
            model_dir: Some(dir.clone()),
        })
    }

    /// `--metrics-file`, with the model and state directories it describes.
    fn metrics_target(&self) -> Option<(PathBuf, PathBuf, Option<PathBuf>)> {
        if let Command::ApplyDelta {
            metrics_file: Some(path),
            replica_dir,
            state_dir,
            ..
        } = self
        {
            return Some((path.clone(), replica_dir.clone(), state_dir.clone()));
        }
        let target = self.target()?;
        let path = target.metrics_file.clone()?;
        Some((path, target.model_dir.clone(), target.state_dir.clone()))
    }
}

/// The JSON object of a failure, on stdout (the text stays on stderr).
fn print_json_error(message: &str, kind: &str, exit_code: u8) {
    let _ = print_json(&serde_json::json!({
        "error": message,
        "kind": kind,
        "exit_code": exit_code,
    }));
}

/// The error and its causes, each cause once: our errors already name their cause in their
/// message (`{path}: {source}`), so a cause already in the text is not repeated.
fn error_chain(err: &anyhow::Error) -> String {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// The checkpoint a command works on; `--wait` as given, else 0 (a writer fails at once when
/// the model is busy: overlapping cron runs).
fn checkpoint(target: &Target) -> Checkpoint {
    checkpoint_waiting(target, target.wait.unwrap_or(0.0))
}

/// [`checkpoint`] for a reader: without `--wait` it waits for a running writer.
fn reader_checkpoint(target: &Target) -> Checkpoint {
    checkpoint_waiting(target, target.wait.unwrap_or(READER_WAIT))
}

fn checkpoint_waiting(target: &Target, wait: f64) -> Checkpoint {
    // Infinite (or too large to represent): the lock waits without a deadline.
    let wait = std::time::Duration::try_from_secs_f64(wait).unwrap_or(std::time::Duration::MAX);
    Checkpoint::new(
        &target.model_dir,
        target.state_dir.as_deref(),
        Arc::new(RealIo::new()),
    )
    .with_progress(!target.json && !QUIET.load(std::sync::atomic::Ordering::Relaxed))
    .with_wait(wait)
    .with_follow_symlinks(target.follow_symlinks)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Init { target, block_size } => {
            let report = checkpoint(&target).init(block_size)?;
            if target.json {
                print_json(&report)?;
            } else {
                say!(
                    "indexed {}: {} files, {} tensors, {} in {} blocks of {} in {:.2} s (generation 0)",
                    target.model_dir.display(),
                    report.files,
                    report.tensors,
                    human_bytes(report.bytes_hashed),
                    report.blocks,
                    human_bytes(report.block_size),
                    report.seconds
                );
            }
        }
        Command::Sync {
            target,
            from,
            handles,
            hash_on,
            gpu_memory,
            ignore,
            tag,
            every,
        } => {
            let cp = checkpoint(&target)
                .with_ignore(&ignore)?
                .with_tags(tag.into_iter().collect())
                .with_deferred_undo_removal(true);
            if hash_on == HashOn::Gpu && handles.is_none() {
                return Err(Error::Usage(
                    "--hash-on gpu needs live weights on a GPU (--handles); --from files are hashed on the host".into(),
                )
                .into());
            }
            let live = Live {
                from,
                handles,
                hash_on,
                gpu_memory,
            };
            let Some(every) = every else {
                let report = sync_once(&cp, &target, &live, &GpuContexts::default())?;
                print_sync(&target, &report)?;
                remove_discarded(&cp);
                return Ok(0);
            };
            // Resident: the GPU contexts outlive each sync; see apollo_checkpoint::resident.
            let contexts = GpuContexts::default();
            let schedule = Schedule::new(every).context("listening for signals")?;
            let started = std::time::Instant::now();
            say!(
                "syncing {} every {}, and at once on SIGUSR1 (pid {}); SIGTERM stops after the sync under way",
                target.model_dir.display(),
                humantime::format_duration(every),
                std::process::id()
            );
            loop {
                let lap = std::time::Instant::now();
                let outcome = sync_once(&cp, &target, &live, &contexts);
                let code = match &outcome {
                    Ok(_) => 0,
                    Err(err) => err.downcast_ref::<Error>().map_or(1, Error::exit_code),
                };
                // The metrics first: whoever reads the output finds them up to date.
                write_metrics("sync", code, lap.elapsed().as_secs_f64(), &target);
                if code != 0 && code != 75 {
                    return outcome.map(|_| code);
                }
                match outcome {
                    Ok(report) => print_sync(&target, &report)?,
                    Err(err) => {
                        report_error(&err);
                    }
                }
                remove_discarded(&cp);
                if schedule.wait().is_none() {
                    break;
                }
            }
            say!(
                "stopped by a signal after {}",
                humantime::format_duration(std::time::Duration::from_secs(
                    started.elapsed().as_secs()
                ))
            );
        }
        Command::Rollback { target, to } => {
            let r = checkpoint(&target).rollback(to)?;
            if target.json {
                print_json(&r)?;
            } else {
                say!(
                    "rolled back from generation {} to the bytes of generation {}{}: {} blocks ({}) written; recorded as generation {}",
                    r.from_generation,
                    r.restored_generation,
                    if r.restored_tags.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", tags_text(&r.restored_tags, ""))
                    },
                    r.blocks_changed,
                    human_bytes(r.bytes_changed),
                    r.generation
                );
            }
        }
        Command::Retention {
            target,
            generations,
            bytes,
        } => {
            let cp = if generations.is_none() && bytes.is_none() {
                reader_checkpoint(&target)
            } else {
                checkpoint(&target)
            };
            let r = cp.retention(generations, bytes)?;
            if target.json {
                print_json(&r)?;
            } else {
                out!(
                    "undo data kept: the last {} generations, at most {}",
                    r.generations,
                    human_bytes(r.bytes)
                );
            }
        }
        Command::ExportDelta {
            target,
            out,
            since,
            full,
            prune_through,
            key_file,
        } => {
            let key = key_file
                .as_deref()
                .map(Key::read)
                .transpose()
                .map_err(Error::from)?;
            let cp = checkpoint(&target).with_key(key);
            if let Some(through) = prune_through {
                let pruned = cp.prune_exports(&out, through)?;
                if target.json {
                    print_json(&serde_json::json!({ "pruned": pruned }))?;
                } else {
                    say!(
                        "pruned {} delta file(s) through generation {through}",
                        pruned.len()
                    );
                }
                return Ok(0);
            }
            let r = cp.export_delta(&out, since, full)?;
            if target.json {
                print_json(&r)?;
            } else {
                for n in &r.notes {
                    tracing::warn!("{n}");
                }
                match &r.file {
                    Some(f) => say!(
                        "exported generation {} to {}: {} ({} records, {} whole blocks)",
                        r.target_generation,
                        f.display(),
                        human_bytes(r.bytes),
                        r.records,
                        r.full_blocks
                    ),
                    None => say!(
                        "nothing to export: the last export already reached generation {}",
                        r.target_generation
                    ),
                }
            }
        }
        Command::ApplyDelta {
            replica_dir,
            state_dir,
            json,
            wait,
            follow_symlinks,
            key_file,
            metrics_file,
            files,
        } => {
            let key = key_file
                .as_deref()
                .map(Key::read)
                .transpose()
                .map_err(Error::from)?;
            let target = Target {
                model_dir: replica_dir,
                state_dir,
                json,
                wait,
                follow_symlinks,
                metrics_file,
            };
            let r = checkpoint(&target).with_key(key).apply_delta(&files)?;
            if json {
                print_json(&r)?;
            } else {
                for d in &r.deltas {
                    say!(
                        "{}: {} (generation {}, {} blocks)",
                        d.file.display(),
                        d.outcome,
                        d.target_generation,
                        d.blocks
                    );
                }
                say!(
                    "replica {} is at generation {}",
                    target.model_dir.display(),
                    r.generation
                );
            }
        }
        Command::Diagnose {
            model_dir,
            handles,
            json,
        } => {
            let model = apollo_checkpoint::model::ModelLayout::open(&model_dir, &RealIo::new())
                .map_err(Error::from)?;
            let live = apollo_checkpoint::live::open_live(&handles, &model_dir, &model)
                .map_err(Error::from)?;
            let d = apollo_checkpoint::live::diagnose(&model, &live);
            if json {
                print_json(&d)?;
            } else {
                out!(
                    "live parameters: {} (from {} manifest(s)), as {} HF tensors",
                    d.live_params,
                    d.manifests,
                    live.map.tensors.len()
                );
                out!("matched:         {}", d.matched.len());
                let unmatched: Vec<String> = d.unmatched.iter().map(ToString::to_string).collect();
                for (what, list) in [
                    ("live only (would not be synced)", &d.live_only),
                    ("  engine names behind them", &unmatched),
                    ("disk only (left untouched)", &d.disk_only),
                    ("dtype or shape differs", &d.mismatched),
                    ("notes", &d.notes),
                ] {
                    out!("{what}: {}", list.len());
                    for n in list {
                        out!("  {n}");
                    }
                }
                if !d.ok {
                    out!(
                        "not ok: a sync would refuse these live weights (exit 1); fix the names, dtypes or shapes listed above"
                    );
                }
            }
            if !d.ok {
                return Ok(1);
            }
        }
        Command::Recover { target } => {
            let report = checkpoint(&target).recover()?;
            if target.json {
                print_json(&report)?;
            } else {
                say!("{}", recover_summary(&report));
            }
        }
        Command::Log { target, limit } => {
            let r = reader_checkpoint(&target).log(limit)?;
            if target.json {
                print_json(&r)?;
            } else {
                out!(
                    "generation  kind      created                   blocks      changed  seconds  tags / source"
                );
                for g in &r.generations {
                    out!(
                        "{:>10}  {:<8}  {:<24}  {:>8}  {:>11}  {:>7.2}  {}{}",
                        g.generation,
                        g.kind.to_string(),
                        time_ms(g.created_at_ms),
                        g.blocks_changed,
                        human_bytes(g.bytes_changed),
                        g.seconds,
                        tags_text(&g.tags, " "),
                        g.source
                    );
                }
            }
        }
        Command::Report {
            target,
            svg,
            generations,
        } => {
            let r = reader_checkpoint(&target)
                .report(generations.unwrap_or_default(), svg.as_deref())?;
            if target.json {
                print_json(&r)?;
            } else {
                let total: u64 = r.generations.iter().map(|g| g.bytes_changed).sum();
                out!(
                    "generations {}..{}: {} generation(s), {} of tensor data changed",
                    r.first_generation,
                    r.last_generation,
                    r.generations.len(),
                    human_bytes(total)
                );
                out!(
                    "by layer:\n{}by tensor kind:\n{}",
                    apollo_checkpoint::changemap::totals_text(&r.layers, r.generations.len()),
                    apollo_checkpoint::changemap::totals_text(&r.kinds, r.generations.len())
                );
                if let Some(path) = &r.svg {
                    say!("heat map written to {}", path.display());
                }
            }
        }
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "apollo-checkpoint", &mut out);
        }
        Command::Man => {
            let mut out = std::io::stdout().lock();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(anyhow::Error::from(e).context("writing the man page"));
                }
                _ => {}
            }
        }
        Command::Status { target } => {
            let report = checkpoint(&target).status()?;
            if target.json {
                print_json(&report)?;
            } else {
                print_status(&report);
            }
            if report.exit_code() != 0 {
                for why in &report.attention {
                    eprintln!("apollo-checkpoint: status: {why}");
                }
                return Ok(report.exit_code());
            }
        }
        Command::Verify { target, repair } => {
            let cp = if repair {
                checkpoint(&target)
            } else {
                reader_checkpoint(&target)
            };
            let report = cp.verify(repair)?;
            if target.json {
                print_json(&report)?;
            } else {
                print_verify(
                    &report,
                    &CommandTarget {
                        model_dir: target.model_dir.clone(),
                        state_dir: target.state_dir.clone(),
                    },
                );
            }
            if !report.clean && !report.repaired {
                return Ok(1);
            }
        }
    }
    Ok(0)
}

/// Prints one JSON object on stdout; a closed pipe is not an error.
fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut object = serde_json::Map::new();
    if let Some(c) = JSON.get() {
        object.insert("schema_version".into(), SCHEMA_VERSION.into());
        object.insert("command".into(), c.command.clone().into());
        object.insert(
            "at".into(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        object.insert(
            "model_dir".into(),
            c.model_dir.as_ref().map_or(serde_json::Value::Null, |d| {
                d.to_string_lossy().into_owned().into()
            }),
        );
    }
    match serde_json::to_value(value).context("encoding JSON")? {
        serde_json::Value::Object(fields) => object.extend(fields),
        other => {
            object.insert("result".into(), other);
        }
    }
    let mut out = std::io::stdout().lock();
    let r = serde_json::to_writer(&mut out, &object)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out));
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// `[step=41200 run=a]` followed by `sep`, or nothing without tags.
fn tags_text(tags: &apollo_checkpoint::index::Tags, sep: &str) -> String {
    if tags.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("[{}]{sep}", pairs.join(" "))
}

fn sync_summary(r: &SyncReport) -> String {
    let first = if r.initialized_first {
        " (indexed first)"
    } else {
        ""
    };
    if r.changed {
        format!(
            "generation {}: {} blocks changed in {} tensors, {} written ({} bytes differed) of {} compared, {} files, {:.3} s{first}",
            r.generation,
            r.blocks_changed,
            r.tensors_changed,
            human_bytes(r.bytes_changed),
            r.bytes_differing,
            human_bytes(r.bytes_compared),
            r.files_changed.len(),
            r.seconds
        )
    } else {
        format!(
            "no change: {} in {} tensors compared, model is at generation {}, {:.3} s{first}",
            human_bytes(r.bytes_compared),
            r.tensors,
            r.generation,
            r.seconds
        )
    }
}

fn recover_summary(r: &RecoverReport) -> String {
    match r.action {
        RecoveryAction::None => format!(
            "nothing to recover: the model is at generation {}",
            r.generation
        ),
        RecoveryAction::Discarded => format!(
            "recovered: discarded an uncommitted journal (the files were not touched); the model is at generation {}",
            r.generation
        ),
        RecoveryAction::Flushed => format!(
            "nothing to recover: the last write's pages are now on disk; the model is at generation {}",
            r.generation
        ),
        RecoveryAction::RolledForward => format!(
            "recovered: rolled an interrupted write forward to generation {} ({} blocks written, {} already written, {} torn blocks repaired)",
            r.generation, r.blocks.applied, r.blocks.already_new, r.blocks.repaired
        ),
    }
}

fn time_ms(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_status(r: &StatusReport) {
    out!("model dir:   {}", r.model_dir.display());
    out!("state dir:   {}", r.state_dir.display());
    if !r.initialized {
        for p in &r.pending {
            out!("pending:     {p}");
        }
        return;
    }
    let total: u64 = r.files.iter().map(|f| f.size).sum();
    out!(
        "index:       {} tensors, blocks of {}, {} on disk",
        r.tensors,
        human_bytes(r.block_size.unwrap_or(0)),
        human_bytes(r.index_bytes)
    );
    if let Some(g) = &r.last_generation {
        out!(
            "generation:  {} ({}, {}, {} blocks / {} changed){}",
            g.generation,
            g.kind,
            time_ms(g.created_at_ms),
            g.blocks_changed,
            human_bytes(g.bytes_changed),
            if g.tags.is_empty() {
                String::new()
            } else {
                format!(" {}", tags_text(&g.tags, ""))
            }
        );
    }
    if let Some(s) = &r.last_sync {
        out!(
            "last sync:   {}, {} blocks changed, {} compared in {:.3} s",
            time_ms(s.at_ms),
            s.report.blocks_changed,
            human_bytes(s.report.bytes_compared),
            s.report.seconds
        );
    } else {
        out!("last sync:   never");
    }
    out!(
        "undo data:   {} generations, {} (keeps the last {} generations, at most {})",
        r.undo_generations,
        human_bytes(r.undo_bytes),
        r.retain_generations.unwrap_or(0),
        human_bytes(r.retain_bytes.unwrap_or(0))
    );
    match r.exported_through {
        Some(e) => out!(
            "exported:    through generation {e}; {} generations not yet exported ({} of undo data kept for them)",
            r.unexported_generations,
            human_bytes(r.unexported_bytes)
        ),
        None => {
            out!("exported:    never (export-delta --full or --since GEN starts a replica)");
        }
    }
    out!("files:       {} ({})", r.files.len(), human_bytes(total));
    for f in &r.files {
        out!("  {:<40} {:>12}  {}", f.name, human_bytes(f.size), f.state);
    }
    if r.pending.is_empty() {
        out!("pending:     nothing");
    }
    for p in &r.pending {
        out!("pending:     {p}");
    }
}

fn print_verify(r: &VerifyReport, args: &CommandTarget) {
    for p in &r.file_problems {
        eprintln!("file changed: {p}");
    }
    for b in &r.mismatched_blocks {
        eprintln!(
            "mismatch: {} tensor {} block {} (bytes {}..{})",
            b.file,
            b.tensor,
            b.block,
            b.offset,
            b.offset + b.len
        );
    }
    if r.mismatched_block_count > r.mismatched_blocks.len() as u64 {
        eprintln!("... {} mismatched blocks in all", r.mismatched_block_count);
    }
    if r.clean {
        say!(
            "verified {}: clean ({} checked in {:.2} s)",
            args.model_dir.display(),
            human_bytes(r.bytes_checked),
            r.seconds
        );
    } else if r.repaired {
        say!(
            "re-indexed {} from the files as they are: now generation {}",
            args.model_dir.display(),
            r.generation
        );
    } else {
        eprintln!(
            "verify failed: the files differ from the index; if the change is wanted, run `apollo-checkpoint verify --repair {args}`"
        );
    }
}
