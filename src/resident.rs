//! `sync --every`: one process that syncs on a schedule, and at once when asked.
//!
//! A sync started by cron pays for a fresh process each time. For live weights on a GPU most
//! of that is the GPU context: 0.12–0.14 s to create it and 0.07 s to tear it down at exit on
//! the H200 host, against 0.04 s for the sync itself when nothing changed in 17 GB. A resident
//! process keeps its contexts ([`crate::live::cuda::GpuContexts`]) from one sync to the next;
//! everything else (the manifests, the producer's allocations, the index, the lock, the
//! journal) is opened and closed by each sync exactly as a one-shot `sync` does, so nothing of
//! the producer's memory is held between syncs and a crash mid-sync is recovered as usual.
//!
//! [`Schedule`] decides when the next sync starts:
//! - every `every`, on a fixed grid from the first sync (a tick missed because a sync ran
//!   longer is skipped, never queued);
//! - at once on `SIGUSR1` (several while a sync runs count as one);
//! - never again after `SIGTERM`, `SIGINT` or `SIGHUP`: the sync under way finishes first, so
//!   stopping the service never leaves a journal to recover.

use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};

/// Why the next sync starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Its time on the grid came.
    Tick,
    /// `SIGUSR1` asked for it.
    Asked,
}

/// When the syncs of a resident process start; see the module documentation.
pub struct Schedule {
    every: Duration,
    first: Instant,
    signals: Receiver<i32>,
    handle: Handle,
}

impl Schedule {
    /// A schedule of one sync every `every` from now, listening for its signals from now on
    /// (`SIGTERM` and the others no longer end the process at once).
    pub fn new(every: Duration) -> std::io::Result<Self> {
        let mut signals = Signals::new([SIGUSR1, SIGTERM, SIGINT, SIGHUP])?;
        let handle = signals.handle();
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if tx.send(signal).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Schedule {
            every: every.max(Duration::from_millis(1)),
            first: Instant::now(),
            signals: rx,
            handle,
        })
    }

    /// Waits until the next sync should start, or returns `None` when a stop signal came (also
    /// one that came during the sync just finished).
    pub fn wait(&self) -> Option<Wake> {
        let mut asked = false;
        for signal in self.signals.try_iter() {
            if signal == SIGUSR1 {
                asked = true;
            } else {
                return None;
            }
        }
        if asked {
            return Some(Wake::Asked);
        }
        loop {
            let now = Instant::now();
            let next = self.next_tick(now);
            match self.signals.recv_timeout(next - now) {
                Ok(SIGUSR1) => return Some(Wake::Asked),
                // A stop signal, or the listener gone.
                Ok(_) | Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) if Instant::now() >= next => {
                    return Some(Wake::Tick);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// The first tick of the grid after `now`.
    fn next_tick(&self, now: Instant) -> Instant {
        let every = self.every.as_nanos();
        let ticks = (now - self.first).as_nanos() / every + 1;
        let after = u64::try_from(ticks * every).unwrap_or(u64::MAX);
        self.first + Duration::from_nanos(after)
    }
}

impl Drop for Schedule {
    fn drop(&mut self) {
        self.handle.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raise(signal: i32) {
        signal_hook::low_level::raise(signal).expect("a signal can be raised");
    }

    /// One test for all signal cases: the handlers are process-wide, so two schedules waiting
    /// in parallel tests would see each other's signals. Times are checked from below (a
    /// loaded machine can only make a wait longer).
    #[test]
    fn ticks_keep_their_grid_and_signals_wake_or_stop() {
        let ms = Duration::from_millis;
        let s = Schedule::new(ms(200)).unwrap();
        // A tick on the grid, whenever the previous sync ended.
        std::thread::sleep(ms(50));
        assert_eq!(s.wait(), Some(Wake::Tick));
        assert!(s.first.elapsed() >= ms(200), "{:?}", s.first.elapsed());
        // A sync longer than the interval skips the ticks it missed: the next is on the grid.
        std::thread::sleep(ms(450));
        assert_eq!(s.wait(), Some(Wake::Tick));
        let at = s.first.elapsed();
        assert!(
            at >= ms(800),
            "a missed tick was not skipped: woke at {at:?}"
        );
        // SIGUSR1s that came during a sync: one sync, at once, then the grid again.
        raise(SIGUSR1);
        raise(SIGUSR1);
        std::thread::sleep(ms(20));
        assert_eq!(s.wait(), Some(Wake::Asked));
        assert_eq!(s.wait(), Some(Wake::Tick), "two SIGUSR1s made two syncs");
        // SIGUSR1 while waiting wakes it before the tick.
        let raiser = std::thread::spawn(move || {
            std::thread::sleep(ms(30));
            raise(SIGUSR1);
        });
        assert_eq!(s.wait(), Some(Wake::Asked));
        raiser.join().unwrap();
        // A stop signal during a sync wins over a SIGUSR1 that came with it.
        raise(SIGUSR1);
        raise(SIGTERM);
        std::thread::sleep(ms(20));
        assert_eq!(s.wait(), None);
    }

    #[test]
    fn the_grid_is_counted_from_the_first_sync() {
        let s = Schedule::new(Duration::from_secs(10)).unwrap();
        let first = s.first;
        assert_eq!(s.next_tick(first), first + Duration::from_secs(10));
        assert_eq!(
            s.next_tick(first + Duration::from_secs(25)),
            first + Duration::from_secs(30)
        );
        assert_eq!(
            s.next_tick(first + Duration::from_secs(30)),
            first + Duration::from_secs(40)
        );
    }
}
