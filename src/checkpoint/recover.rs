//! `recover`: finish or discard a write interrupted by a crash. `sync` and `apply-delta` run it
//! first by themselves.

use std::time::Instant;

use super::txn::{Committed, Mode, NewHashes};
use super::{Checkpoint, Error, RecoverReport, RecoveryAction, seconds_since};
use crate::apply::ApplyStats;
use crate::journal::{Journal, JournalState};
use crate::lock::LockKind;

impl Checkpoint {
    /// Finishes or discards an interrupted write, taking the lock.
    pub fn recover(&self) -> Result<RecoverReport, Error> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.recover_locked()
    }

    /// [`Self::recover`] under the exclusive lock: a committed journal is rolled forward, an
    /// uncommitted one discarded; with none, the previous write's pages are made durable.
    pub(crate) fn recover_locked(&self) -> Result<RecoverReport, Error> {
        let start = Instant::now();
        let path = self.journal_path();
        let nothing = |action, generation| RecoverReport {
            action,
            generation,
            blocks: ApplyStats::default(),
            seconds: seconds_since(start),
        };
        match Journal::open(self.io.as_ref(), &path)? {
            JournalState::Absent => match self.flush_previous()? {
                Some(report) => Ok(report),
                None => Ok(nothing(RecoveryAction::None, self.current_generation()?)),
            },
            JournalState::Uncommitted => {
                // The commit record never became durable, so no model byte was written.
                self.io.remove_file(&path).map_err(Self::io_err(&path))?;
                self.io
                    .sync_dir(&self.state_dir)
                    .map_err(Self::io_err(&self.state_dir))?;
                Ok(nothing(
                    RecoveryAction::Discarded,
                    self.current_generation()?,
                ))
            }
            JournalState::Committed(journal) => Ok(Committed::found(self, *journal)
                .finish(Mode::Recover, None, NewHashes::ReadBack, start)?
                .report),
        }
    }
}
