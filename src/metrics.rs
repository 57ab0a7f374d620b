//! `--metrics-file`: what a run did, in the Prometheus text exposition format, for
//! node_exporter's textfile collector (the convention for cron jobs: one `.prom` file per job,
//! replaced atomically, so the collector never reads half of one).
//!
//! Every run writes `apollo_checkpoint_last_run_*` (when it ended, its exit code, how long it
//! took, labelled by command); a sync adds what it did (`apollo_checkpoint_sync_*`, seconds per
//! phase); and whenever the model is indexed, where it stands (`apollo_checkpoint_generation`,
//! undo data, the export backlog, things needing a person). The encoding is
//! `prometheus-client`'s.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::checkpoint::{Error, StatusReport, SyncReport, write_atomic};
use crate::io::RealIo;

/// A gauge of `f64` values.
type F64Gauge = Gauge<f64, AtomicU64>;
/// Gauges by label pairs.
type Labelled = Family<Vec<(String, String)>, F64Gauge>;

/// What one run of a command did.
#[derive(Debug)]
pub struct RunMetrics<'a> {
    /// The subcommand (`sync`, `export-delta`, ...).
    pub command: &'a str,
    /// Its exit code.
    pub exit_code: u8,
    /// Its wall time, seconds.
    pub seconds: f64,
    /// When it ended.
    pub ended: SystemTime,
    /// What a sync did, if it was one that succeeded.
    pub sync: Option<&'a SyncReport>,
    /// Where the model stands afterwards, if it could be read.
    pub status: Option<&'a StatusReport>,
}

/// `metrics` in the text exposition format.
pub fn encode_text(metrics: &RunMetrics<'_>) -> String {
    let mut registry = Registry::with_prefix("apollo_checkpoint");
    let command = vec![("command".to_string(), metrics.command.to_string())];
    let r = &mut registry;
    let labelled = |r: &mut Registry, name: &str, help: &str, value: f64| {
        let family = Labelled::default();
        family.get_or_create(&command).set(value);
        r.register(name, help, family);
    };
    let ended = metrics
        .ended
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    labelled(
        r,
        "last_run_timestamp_seconds",
        "When the last run of the command ended, Unix seconds",
        ended,
    );
    labelled(
        r,
        "last_run_exit_code",
        "Exit code of the last run (0 success; the README lists the others)",
        f64::from(metrics.exit_code),
    );
    labelled(
        r,
        "last_run_duration_seconds",
        "Wall time of the last run",
        metrics.seconds,
    );
    let plain = |r: &mut Registry, name: &str, help: &str, value: f64| {
        let g = F64Gauge::default();
        g.set(value);
        r.register(name, help, g);
    };
    if let Some(s) = metrics.sync {
        plain(
            r,
            "sync_blocks_changed",
            "Blocks the last successful sync wrote",
            s.blocks_changed as f64,
        );
        plain(
            r,
            "sync_bytes_changed",
            "Bytes the last successful sync wrote (whole blocks)",
            s.bytes_changed as f64,
        );
        plain(
            r,
            "sync_bytes_compared",
            "Bytes the last successful sync compared",
            s.bytes_compared as f64,
        );
        plain(
            r,
            "sync_journal_bytes",
            "Bytes of the last successful sync's journal (its undo data)",
            s.journal_bytes as f64,
        );
        plain(
            r,
            "sync_gpu_bytes_copied",
            "Bytes the last successful sync copied from GPU memory",
            s.capture.gpu_bytes_copied as f64,
        );
        let phases = Labelled::default();
        let p = &s.phases;
        for (name, v) in [
            ("open", p.open),
            ("flush", p.flush),
            ("check", p.check),
            ("index_read", p.index_read),
            ("plan", p.plan),
            ("capture", p.capture),
            ("journal", p.journal),
            ("apply", p.apply),
            ("commit", p.commit),
            ("retire", p.retire),
        ] {
            phases
                .get_or_create(&vec![("phase".to_string(), name.to_string())])
                .set(v);
        }
        r.register(
            "sync_phase_seconds",
            "Seconds of each phase of the last successful sync",
            phases,
        );
    }
    if let Some(st) = metrics.status.filter(|s| s.initialized) {
        plain(
            r,
            "generation",
            "The model's current generation",
            st.generation.unwrap_or(0) as f64,
        );
        plain(
            r,
            "undo_bytes",
            "Bytes of undo data kept (rollback, export)",
            st.undo_bytes as f64,
        );
        plain(
            r,
            "undo_generations",
            "Generations of undo data kept",
            st.undo_generations as f64,
        );
        plain(
            r,
            "export_backlog_generations",
            "Generations not yet exported by export-delta",
            st.unexported_generations as f64,
        );
        plain(
            r,
            "export_backlog_bytes",
            "Undo bytes of generations not yet exported",
            st.unexported_bytes as f64,
        );
        plain(
            r,
            "attention",
            "Things needing a person (status exits 78 when not 0)",
            st.attention.len() as f64,
        );
    }
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String does not fail");
    text
}

/// Writes `metrics` to `path` atomically (a hidden temporary, fsynced, renamed: the collector
/// reads only `*.prom` files, and never a partial one).
pub fn write(path: &Path, metrics: &RunMetrics<'_>) -> Result<(), Error> {
    write_atomic(&RealIo::new(), path, encode_text(metrics).as_bytes())
}
