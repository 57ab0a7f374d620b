//! The state-directory lock: one writer, or any number of readers, per model.
//!
//! Every command that writes the model or the state holds an exclusive `flock` (through `fs2`) on
//! `<state-dir>/lock` for its whole run; readers (`status`, `verify` without `--repair`) hold it
//! shared. A writer records its pid and command line in the file after taking the lock, so a
//! second writer can say who holds it. Overlapping cron runs are therefore safe: the second one
//! fails at once (exit 75) or, with `--wait`, waits.
//!
//! The lock is released when the [`StateLock`] is dropped or the process dies (the kernel drops
//! `flock`s with the last file descriptor), so a killed sync never leaves a stale lock; the pid
//! written in the file is only informative.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs2::FileExt;

/// File name of the lock inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Shared (readers) or exclusive (writers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Readers: status, verify.
    Shared,
    /// Writers: init, sync, recover, rollback, verify --repair.
    Exclusive,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "{path}: the model is locked by {holder}; try again when it finishes, or pass --wait SECONDS"
    )]
    Busy {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as far as is known.
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("{path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    kind: LockKind,
}

impl StateLock {
    /// Takes the lock of `state_dir` (which must exist), waiting up to `wait` for it.
    pub fn acquire(state_dir: &Path, kind: LockKind, wait: Duration) -> Result<Self, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // No deadline: wait as long as it takes (`--wait inf`).
        let deadline = Instant::now().checked_add(wait);
        loop {
            let r = match kind {
                LockKind::Shared => FileExt::try_lock_shared(&file),
                LockKind::Exclusive => FileExt::try_lock_exclusive(&file),
            };
            match r {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return Err(LockError::Busy {
                            path: path.clone(),
                            holder: describe_holder(&mut file),
                        });
                    }
                    std::thread::sleep(left.map_or(Duration::from_millis(50), |l| {
                        l.min(Duration::from_millis(50))
                    }));
                }
                Err(e) => return Err(io(e)),
            }
        }
        if kind == LockKind::Exclusive {
            // Arguments that are not UTF-8 (paths) are shown lossily: this line is informative.
            let cmd: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let line = format!("pid {} running `{}`\n", std::process::id(), cmd.join(" "));
            let written = file
                .set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(line.as_bytes()));
            written.map_err(io)?;
        }
        Ok(StateLock { file, kind })
    }

    /// The kind held.
    pub fn kind(&self) -> LockKind {
        self.kind
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Unlocking cannot meaningfully fail; closing the descriptor releases it regardless.
        let _ = FileExt::unlock(&self.file);
    }
}

/// Who holds the lock: the writer recorded in the file, or readers.
fn describe_holder(file: &mut File) -> String {
    // If a shared lock can be taken, only readers hold it.
    if FileExt::try_lock_shared(file).is_ok() {
        let _ = FileExt::unlock(file);
        return "a reader (status or verify)".into();
    }
    let mut text = String::new();
    let recorded = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut text));
    match recorded {
        Ok(_) if !text.trim().is_empty() => text.trim().to_string(),
        _ => "another apollo-checkpoint process".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let w = StateLock::acquire(dir.path(), LockKind::Exclusive, Duration::ZERO).unwrap();
        let e = StateLock::acquire(dir.path(), LockKind::Exclusive, Duration::ZERO).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(StateLock::acquire(dir.path(), LockKind::Shared, Duration::ZERO).is_err());
        drop(w);
        let r1 = StateLock::acquire(dir.path(), LockKind::Shared, Duration::ZERO).unwrap();
        let _r2 = StateLock::acquire(dir.path(), LockKind::Shared, Duration::ZERO).unwrap();
        let e = StateLock::acquire(dir.path(), LockKind::Exclusive, Duration::from_millis(120))
            .unwrap_err();
        assert!(e.to_string().contains("a reader"), "{e}");
        assert_eq!(r1.kind(), LockKind::Shared);
    }
}
