//! Crash safety under injected faults: a sync stopped after every I/O step, failed with ENOSPC
//! or EIO at every step, or cut by a power loss at every fsync (unsynced writes and directory
//! entries dropped, one model page torn at 512-byte sectors). After each, `recover` must leave
//! every model file byte-identical to before or after the sync, `verify` clean, and a following
//! sync of the same weights must write nothing.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use apollo_checkpoint::checkpoint::ExportReport;
use apollo_checkpoint::io::{FileIo, FileStat, Io, OpenMode, RealIo};
use apollo_checkpoint::synthetic::Rng;
use apollo_checkpoint::{Checkpoint, RecoveryAction, SafetensorsSource};

use crate::util::{
    T, checkpoint, checkpoint_after_reboot, deltas_in, mixed_tensors, model_files, run, s, stderr,
    write_model,
};

/// What to do to the Nth I/O step.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Count steps only.
    None,
    /// Step N and every later one fail: the process stopped there.
    Crash(u64),
    /// Step N fails with this errno; later steps go through.
    Fail(u64, i32),
    /// At the Nth durability step (file or directory sync) power is lost: everything not yet
    /// durable is undone, one model page is torn, and every later step fails.
    PowerCut(u64, u64),
    /// Nothing fails; power is lost just after the operation returned (see `cut_power`).
    PowerCutAfter(u64),
}

impl Fault {
    /// Whether the machine restarts after this fault (recovery then runs in another boot).
    pub fn reboots(self) -> bool {
        matches!(self, Fault::PowerCut(..) | Fault::PowerCutAfter(_))
    }
}

#[derive(Debug)]
enum DirOp {
    Created(PathBuf),
    Renamed(PathBuf, PathBuf),
    Removed(PathBuf, Vec<u8>),
}

struct PendingWrite {
    path: PathBuf,
    offset: u64,
    old: Vec<u8>,
    len: usize,
    prior_len: u64,
}

#[derive(Default)]
struct State {
    steps: u64,
    syncs: u64,
    dead: bool,
    pending: Vec<PendingWrite>,
    dir_ops: Vec<(PathBuf, DirOp)>,
    failed_sync: Vec<PathBuf>,
    retried_failed_sync: bool,
    first_model_write: Option<u64>,
}

/// The fault-injecting I/O layer.
#[derive(Clone)]
pub struct FaultIo {
    inner: RealIo,
    fault: Fault,
    state: Arc<Mutex<State>>,
}

fn crashed() -> std::io::Error {
    std::io::Error::other("simulated crash")
}

fn parent(p: &Path) -> PathBuf {
    p.parent().unwrap().to_path_buf()
}

impl FaultIo {
    pub fn new(fault: Fault) -> Self {
        FaultIo {
            inner: RealIo::new(),
            fault,
            state: Arc::default(),
        }
    }

    pub fn steps(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        (s.steps, s.syncs)
    }

    /// The step number of the first write to a model file (the journal is committed by then).
    pub fn first_model_write(&self) -> Option<u64> {
        self.state.lock().unwrap().first_model_write
    }

    /// Loses power now: after an operation returned, if its fault is `PowerCutAfter`.
    pub fn cut_power_if_due(&self) {
        if let Fault::PowerCutAfter(seed) = self.fault {
            let mut s = self.state.lock().unwrap();
            power_cut(&mut s, seed);
            s.dead = true;
        }
    }

    pub fn retried_failed_sync(&self) -> bool {
        self.state.lock().unwrap().retried_failed_sync
    }

    /// Counts a step; decides whether it runs. `durable` marks file and directory syncs.
    fn step(&self, durable: bool) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.dead {
            return Err(crashed());
        }
        let n = s.steps;
        s.steps += 1;
        let k = s.syncs;
        if durable {
            s.syncs += 1;
        }
        match self.fault {
            Fault::Crash(at) if n >= at => {
                s.dead = true;
                Err(crashed())
            }
            Fault::Fail(at, errno) if n == at => Err(std::io::Error::from_raw_os_error(errno)),
            Fault::PowerCut(at, seed) if durable && k == at => {
                power_cut(&mut s, seed);
                s.dead = true;
                Err(crashed())
            }
            _ => Ok(()),
        }
    }
}

/// Undoes everything not durable, tearing one page of one unsynced model-file write.
fn power_cut(s: &mut State, seed: u64) {
    let mut rng = Rng::new(seed);
    // The writes in file and offset order, not in the order they happened: files are written in
    // parallel, and the choice of a seed must not depend on how the threads interleaved.
    let mut model_writes: Vec<usize> = (0..s.pending.len())
        .filter(|&i| {
            s.pending[i]
                .path
                .extension()
                .is_some_and(|e| e == "safetensors")
        })
        .collect();
    model_writes.sort_by_key(|&i| (&s.pending[i].path, s.pending[i].offset, i));
    let torn = (!model_writes.is_empty())
        .then(|| model_writes[rng.below(model_writes.len() as u64) as usize]);
    for (i, w) in s.pending.iter().enumerate().rev() {
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(&w.path) else {
            continue;
        };
        if Some(i) == torn {
            // Keep the new bytes of a random subset of the disk sectors (512 bytes, aligned to
            // the file) of one page (4096 bytes, aligned to the file) the write touched.
            let first_page = w.offset / 4096;
            let last_page = (w.offset + w.len as u64 - 1) / 4096;
            let page = (first_page + rng.below(last_page - first_page + 1)) * 4096;
            let mut at = w.offset;
            while at < w.offset + w.old.len() as u64 {
                let end = ((at / 512 + 1) * 512).min(w.offset + w.old.len() as u64);
                let in_page = at >= page && at < page + 4096;
                if !(in_page && rng.below(2) == 0) {
                    let (a, b) = ((at - w.offset) as usize, (end - w.offset) as usize);
                    f.write_all_at(&w.old[a..b], at).unwrap();
                }
                at = end;
            }
        } else {
            f.write_all_at(&w.old, w.offset).unwrap();
        }
        if f.metadata().unwrap().len() > w.prior_len {
            f.set_len(w.prior_len).unwrap();
        }
    }
    s.pending.clear();
    for (_, op) in s.dir_ops.drain(..).rev() {
        match op {
            DirOp::Created(p) => {
                let _ = std::fs::remove_file(&p);
            }
            DirOp::Renamed(from, to) => {
                std::fs::rename(&to, &from).unwrap();
            }
            DirOp::Removed(p, content) => std::fs::write(&p, content).unwrap(),
        }
    }
}

struct FaultFile {
    inner: Box<dyn FileIo>,
    io: FaultIo,
}

impl Io for FaultIo {
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Box<dyn FileIo>> {
        if self.state.lock().unwrap().dead {
            return Err(crashed());
        }
        Ok(Box::new(FaultFile {
            inner: self.inner.open(path, mode)?,
            io: self.clone(),
        }))
    }
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn FileIo>> {
        self.step(false)?;
        let inner = self.inner.create(path)?;
        self.state
            .lock()
            .unwrap()
            .dir_ops
            .push((parent(path), DirOp::Created(path.to_path_buf())));
        Ok(Box::new(FaultFile {
            inner,
            io: self.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.step(false)?;
        self.inner.rename(from, to)?;
        // Durable once the target's directory is synced (the state dir is synced right after).
        self.state.lock().unwrap().dir_ops.push((
            parent(to),
            DirOp::Renamed(from.to_path_buf(), to.to_path_buf()),
        ));
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.step(false)?;
        let content = std::fs::read(path).unwrap_or_default();
        self.inner.remove_file(path)?;
        self.state
            .lock()
            .unwrap()
            .dir_ops
            .push((parent(path), DirOp::Removed(path.to_path_buf(), content)));
        Ok(())
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.step(true)?;
        self.inner.sync_dir(path)?;
        self.state
            .lock()
            .unwrap()
            .dir_ops
            .retain(|(d, _)| d != path);
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.step(false)?;
        self.inner.create_dir_all(path)
    }
    fn bytes_read(&self) -> u64 {
        self.inner.bytes_read()
    }
}

impl FileIo for FaultFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn stat(&self) -> std::io::Result<FileStat> {
        self.inner.stat()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.io.state.lock().unwrap().dead {
            return Err(crashed());
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        {
            let mut s = self.io.state.lock().unwrap();
            let model = self
                .inner
                .path()
                .extension()
                .is_some_and(|e| e == "safetensors");
            if model && s.first_model_write.is_none() {
                s.first_model_write = Some(s.steps);
            }
        }
        self.io.step(false)?;
        let path = self.inner.path().to_path_buf();
        let f = std::fs::File::open(&path)?;
        let prior_len = f.metadata()?.len();
        let avail = prior_len.saturating_sub(offset).min(data.len() as u64) as usize;
        let mut old = vec![0u8; avail];
        f.read_exact_at(&mut old, offset)?;
        self.inner.write_at(offset, data)?;
        self.io.state.lock().unwrap().pending.push(PendingWrite {
            path,
            offset,
            old,
            len: data.len(),
            prior_len,
        });
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let path = self.inner.path().to_path_buf();
        {
            let mut s = self.io.state.lock().unwrap();
            if s.failed_sync.contains(&path) {
                s.retried_failed_sync = true;
            }
        }
        if let Err(e) = self.io.step(true) {
            self.io.state.lock().unwrap().failed_sync.push(path);
            return Err(e);
        }
        self.inner.sync()?;
        self.io
            .state
            .lock()
            .unwrap()
            .pending
            .retain(|w| w.path != path);
        Ok(())
    }
}

/// Model files only (not the state directory), by name.
/// Copies a model directory with its state and makes the index trust the copy (new inodes).
fn trusted_copy(from: &Path, to: &Path) {
    copy_dir(from, to);
    let r = checkpoint(to).verify(true).unwrap();
    assert!(
        r.mismatched_block_count == 0 && (r.clean || r.repaired),
        "{r:?}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A model indexed at generation 0, its live weights after a training-like change, and the
/// bytes of the model files before and after a clean sync.
struct Scenario {
    tmp: tempfile::TempDir,
    template: PathBuf,
    live: PathBuf,
    before: BTreeMap<String, Vec<u8>>,
    after: BTreeMap<String, Vec<u8>>,
}

fn scenario(seed: u64) -> Scenario {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("template");
    let live = tmp.path().join("live");
    let mut tensors: Vec<T> = mixed_tensors(seed);
    write_model(&template, &tensors, 3);
    checkpoint(&template).init(4096).unwrap();
    // One sync first, so the faulty one is not the first generation and undo data exists.
    let mut rng = Rng::new(seed);
    tensors[0].data[7] ^= 1;
    write_model(&live, &tensors, 1);
    checkpoint(&template)
        .sync(&SafetensorsSource::open(&live).unwrap())
        .unwrap();
    // Then the change under test: sparse bytes in every tensor plus one dense tensor.
    for t in &mut tensors {
        for _ in 0..3 {
            if !t.data.is_empty() {
                let i = rng.below(t.data.len() as u64) as usize;
                t.data[i] ^= 0x11;
            }
        }
    }
    for b in tensors[1].data.iter_mut().step_by(97) {
        *b ^= 0x22;
    }
    write_model(&live, &tensors, 1);
    let before = model_files(&template);
    let clean = tmp.path().join("clean");
    trusted_copy(&template, &clean);
    let r = checkpoint(&clean)
        .sync(&SafetensorsSource::open(&live).unwrap())
        .unwrap();
    assert!(r.blocks_changed > 20, "{r:?}");
    let after = model_files(&clean);
    Scenario {
        tmp,
        template,
        live,
        before,
        after,
    }
}

/// The checkpoint that recovers after `fault`: in another boot after a power cut.
fn recovering(dir: &Path, fault: Fault) -> Checkpoint {
    if fault.reboots() {
        checkpoint_after_reboot(dir)
    } else {
        checkpoint(dir)
    }
}

/// Runs one faulty sync on a fresh copy of the template, then recovers with the real I/O layer
/// and checks the promise. Returns the I/O layer, whether recovery ended at the new state, and
/// how many torn blocks it repaired.
fn check(sc: &Scenario, fault: Fault, what: &str) -> (FaultIo, bool, u64) {
    let dir = sc.tmp.path().join("run");
    let _ = std::fs::remove_dir_all(&dir);
    trusted_copy(&sc.template, &dir);
    let io = FaultIo::new(fault);
    let result = Checkpoint::new(&dir, None, Arc::new(io.clone()))
        .sync(&SafetensorsSource::open(&sc.live).unwrap());
    if !fault.reboots() {
        // The index never names a generation the files do not hold: its commit (written while
        // the files are) comes only once every block is written.
        let index =
            apollo_checkpoint::index::BlockIndex::open_read_only(&dir.join(".apollo-checkpoint"))
                .unwrap();
        let base = checkpoint(&sc.template).status().unwrap().generation;
        if index.generation().unwrap() != base {
            assert_eq!(
                model_files(&dir),
                sc.after,
                "{what}: the index names the new generation before the files hold it"
            );
        }
    }
    io.cut_power_if_due();
    let rec = recovering(&dir, fault)
        .recover()
        .unwrap_or_else(|e| panic!("{what}: recover failed: {e}"));
    let files = model_files(&dir);
    let at_after = files == sc.after;
    assert!(
        at_after || files == sc.before,
        "{what}: files are neither before nor after (sync said {result:?}, recover {rec:?})"
    );
    if result.is_ok() {
        assert!(at_after, "{what}: sync succeeded but the files are not new");
    }
    let v = checkpoint(&dir).verify(false).unwrap();
    assert!(v.clean, "{what}: verify after recover: {v:?}");
    // A sync of the weights the files now hold writes nothing.
    let now = sc.tmp.path().join("now");
    let _ = std::fs::remove_dir_all(&now);
    std::fs::create_dir_all(&now).unwrap();
    for (name, bytes) in &files {
        std::fs::write(now.join(name), bytes).unwrap();
    }
    std::fs::copy(
        dir.join("model.safetensors.index.json"),
        now.join("model.safetensors.index.json"),
    )
    .unwrap();
    let again = checkpoint(&dir)
        .sync(&SafetensorsSource::open(&now).unwrap())
        .unwrap();
    assert_eq!(
        again.blocks_changed, 0,
        "{what}: a no-change sync after recovery changed blocks"
    );
    assert!(
        again.recovered.is_none(),
        "{what}: recovery left a journal behind"
    );
    // And the live weights still sync to the new state.
    checkpoint(&dir)
        .sync(&SafetensorsSource::open(&sc.live).unwrap())
        .unwrap();
    assert_eq!(
        model_files(&dir),
        sc.after,
        "{what}: the next real sync did not reach the new state"
    );
    (io, at_after, rec.blocks.repaired)
}

fn clean_run(sc: &Scenario) -> FaultIo {
    let dir = sc.tmp.path().join("count");
    let _ = std::fs::remove_dir_all(&dir);
    trusted_copy(&sc.template, &dir);
    let io = FaultIo::new(Fault::None);
    Checkpoint::new(&dir, None, Arc::new(io.clone()))
        .sync(&SafetensorsSource::open(&sc.live).unwrap())
        .unwrap();
    assert_eq!(model_files(&dir), sc.after);
    io
}

fn clean_run_steps(sc: &Scenario) -> (u64, u64) {
    clean_run(sc).steps()
}

#[test]
fn a_sync_stopped_after_any_io_step_recovers_to_old_or_new() {
    let sc = scenario(41);
    let (steps, _) = clean_run_steps(&sc);
    assert!(steps > 20, "{steps} steps");
    let mut outcomes = HashMap::new();
    for n in 0..=steps {
        let (_, at_after, _) = check(&sc, Fault::Crash(n), &format!("crash at step {n}"));
        *outcomes.entry(at_after).or_insert(0) += 1;
    }
    // Early crashes end at the old generation, late ones at the new: both paths were taken.
    assert!(outcomes.len() == 2, "{outcomes:?}");
}

#[test]
fn a_sync_failing_with_enospc_or_eio_at_any_step_recovers_and_never_retries_a_failed_fsync() {
    const ENOSPC: i32 = 28;
    const EIO: i32 = 5;
    const EROFS: i32 = 30;
    let sc = scenario(42);
    let (steps, _) = clean_run_steps(&sc);
    for errno in [ENOSPC, EIO, EROFS] {
        for n in 0..steps {
            let (io, _, _) = check(
                &sc,
                Fault::Fail(n, errno),
                &format!("errno {errno} at step {n}"),
            );
            assert!(
                !io.retried_failed_sync(),
                "errno {errno} at step {n}: a failed fsync was retried"
            );
        }
    }
}

#[test]
fn a_power_cut_at_any_fsync_recovers_to_old_or_new_even_with_a_torn_page() {
    let sc = scenario(43);
    let (_, syncs) = clean_run_steps(&sc);
    assert!(syncs >= 5, "{syncs} syncs");
    let mut outcomes = HashMap::new();
    let mut repaired = 0;
    for k in 0..syncs {
        for seed in 0..6 {
            let (_, at_after, r) = check(
                &sc,
                Fault::PowerCut(k, seed),
                &format!("power cut at sync {k}, seed {seed}"),
            );
            *outcomes.entry(at_after).or_insert(0) += 1;
            repaired += r;
        }
    }
    // Power lost after the sync returned, before the kernel wrote its pages back: the
    // generation it reported is what recovery gives back. (No fsync follows the first write to
    // the files within a sync, so these are the cuts that tear its pages: enough seeds that
    // one tears a block into neither old nor new.)
    for seed in 0..32 {
        let (_, at_after, r) = check(
            &sc,
            Fault::PowerCutAfter(seed),
            &format!("power cut after the sync, seed {seed}"),
        );
        assert!(at_after, "power cut after the sync, seed {seed}");
        repaired += r;
    }
    assert!(outcomes.len() == 2, "{outcomes:?}");
    assert!(
        repaired > 0,
        "no power cut tore a block that recovery then repaired"
    );
}

/// Rolls `start` (a copy) back to generation `to` through a faulty I/O layer, recovers, and
/// checks the files are exactly the state before or after the rollback.
fn check_rollback(sc: &Scenario, start: &Path, to: u64, fault: Fault, what: &str) -> bool {
    let dir = sc.tmp.path().join("rb-run");
    let _ = std::fs::remove_dir_all(&dir);
    trusted_copy(start, &dir);
    let io = FaultIo::new(fault);
    let result = Checkpoint::new(&dir, None, Arc::new(io.clone())).rollback(Some(to));
    io.cut_power_if_due();
    recovering(&dir, fault)
        .recover()
        .unwrap_or_else(|e| panic!("{what}: recover failed: {e}"));
    let files = model_files(&dir);
    let rolled_back = files == sc.before;
    assert!(
        rolled_back || files == sc.after,
        "{what}: neither before nor after the rollback ({result:?})"
    );
    if result.is_ok() {
        assert!(
            rolled_back,
            "{what}: rollback succeeded but the files are not the old generation"
        );
    }
    let v = checkpoint(&dir).verify(false).unwrap();
    assert!(v.clean, "{what}: verify after recover: {v:?}");
    rolled_back
}

#[test]
fn a_rollback_stopped_or_cut_at_any_step_recovers_to_old_or_new() {
    let sc = scenario(44);
    // `clean` holds the new state at generation 2; rolling back to 1 restores `before`.
    let start = sc.tmp.path().join("clean");
    let count = sc.tmp.path().join("rb-count");
    trusted_copy(&start, &count);
    let io = FaultIo::new(Fault::None);
    Checkpoint::new(&count, None, Arc::new(io.clone()))
        .rollback(Some(1))
        .unwrap();
    assert_eq!(model_files(&count), sc.before);
    let (steps, syncs) = io.steps();
    let mut outcomes = HashMap::new();
    for n in 0..=steps {
        let r = check_rollback(
            &sc,
            &start,
            1,
            Fault::Crash(n),
            &format!("rollback crash at step {n}"),
        );
        *outcomes.entry(r).or_insert(0) += 1;
    }
    for k in 0..syncs {
        for seed in 0..3 {
            let r = check_rollback(
                &sc,
                &start,
                1,
                Fault::PowerCut(k, seed),
                &format!("rollback power cut at sync {k}, seed {seed}"),
            );
            *outcomes.entry(r).or_insert(0) += 1;
        }
    }
    for seed in 0..3 {
        let what = format!("power cut after the rollback, seed {seed}");
        let r = check_rollback(&sc, &start, 1, Fault::PowerCutAfter(seed), &what);
        assert!(r, "{what}");
    }
    assert!(outcomes.len() == 2, "{outcomes:?}");
}

/// A copy of the scenario's model whose sync crashed right after its journal committed, before
/// any model byte was written.
fn crashed_after_commit(sc: &Scenario, name: &str) -> PathBuf {
    let first_write = clean_run(sc)
        .first_model_write()
        .expect("the sync writes the model");
    let dir = sc.tmp.path().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    trusted_copy(&sc.template, &dir);
    let io = FaultIo::new(Fault::Crash(first_write));
    assert!(
        Checkpoint::new(&dir, None, Arc::new(io))
            .sync(&SafetensorsSource::open(&sc.live).unwrap())
            .is_err()
    );
    assert!(dir.join(".apollo-checkpoint/journal").exists());
    assert_eq!(model_files(&dir), sc.before);
    dir
}

#[test]
fn a_committed_but_corrupt_journal_is_refused_and_the_model_left_as_it_is() {
    let sc = scenario(45);
    let dir = crashed_after_commit(&sc, "corrupt");
    let journal = dir.join(".apollo-checkpoint/journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&journal, &bytes).unwrap();
    let live = s(&sc.live).to_string();
    for args in [
        vec!["recover", "--model-dir", s(&dir)],
        vec!["sync", "--model-dir", s(&dir), "--from", &live],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("committed but corrupt"),
            "{}",
            stderr(&o)
        );
        assert_eq!(model_files(&dir), sc.before, "{args:?} touched the model");
    }
    let st = checkpoint(&dir).status().unwrap();
    assert!(
        st.pending.iter().any(|p| p.contains("interrupted write")),
        "{:?}",
        st.pending
    );
    // Every other writer refuses while it is pending.
    let e = checkpoint(&dir).verify(true).unwrap_err();
    assert!(
        matches!(e, apollo_checkpoint::Error::JournalPending { .. }),
        "{e}"
    );
    assert_eq!(e.exit_code(), 78);
}

#[test]
fn a_truncated_journal_is_discarded_and_the_model_left_as_it_is() {
    let sc = scenario(46);
    let dir = crashed_after_commit(&sc, "truncated");
    let journal = dir.join(".apollo-checkpoint/journal");
    let len = std::fs::metadata(&journal).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let r = checkpoint(&dir).recover().unwrap();
    assert_eq!(r.action, RecoveryAction::Discarded);
    assert_eq!(model_files(&dir), sc.before);
    assert!(!journal.exists());
    assert!(checkpoint(&dir).verify(false).unwrap().clean);
}

#[test]
fn a_journal_from_another_model_is_refused() {
    let (a, b) = (scenario(47), scenario(48));
    let dir_a = crashed_after_commit(&a, "foreign-a");
    let dir_b = b.tmp.path().join("foreign-b");
    trusted_copy(&b.template, &dir_b);
    std::fs::copy(
        dir_a.join(".apollo-checkpoint/journal"),
        dir_b.join(".apollo-checkpoint/journal"),
    )
    .unwrap();
    let o = run(&["recover", "--model-dir", s(&dir_b)]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("belongs to model"), "{}", stderr(&o));
    assert_eq!(model_files(&dir_b), b.before);
}

#[test]
fn disk_full_while_journaling_fails_the_sync_leaves_the_model_untouched_and_nothing_pending() {
    const ENOSPC: i32 = 28;
    let sc = scenario(49);
    let first_write = clean_run(&sc).first_model_write().unwrap();
    for n in 0..first_write {
        let dir = sc.tmp.path().join("full");
        let _ = std::fs::remove_dir_all(&dir);
        trusted_copy(&sc.template, &dir);
        let io = FaultIo::new(Fault::Fail(n, ENOSPC));
        let err = Checkpoint::new(&dir, None, Arc::new(io))
            .sync(&SafetensorsSource::open(&sc.live).unwrap())
            .unwrap_err();
        assert!(
            err.to_string().contains("No space left on device"),
            "step {n}: {err}"
        );
        assert_eq!(err.exit_code(), 74);
        assert_eq!(model_files(&dir), sc.before, "step {n}");
        assert!(
            !dir.join(".apollo-checkpoint/journal").exists(),
            "step {n}: the failed journal was left behind"
        );
        // Space is back: the next sync works.
        checkpoint(&dir)
            .sync(&SafetensorsSource::open(&sc.live).unwrap())
            .unwrap();
        assert_eq!(model_files(&dir), sc.after);
    }
}

#[test]
fn sync_recovers_an_interrupted_write_first_and_says_so() {
    let sc = scenario(50);
    let dir = crashed_after_commit(&sc, "resume");
    let o = run(&["sync", "--model-dir", s(&dir), "--from", s(&sc.live)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("recovered: rolled an interrupted write forward to generation 2"),
        "{err}"
    );
    assert!(
        err.contains("no change"),
        "the recovered write already holds the live weights: {err}"
    );
    assert_eq!(model_files(&dir), sc.after);
}

/// Model files of `dir` copied into a fresh directory, without any state: a replica made by cp.
fn files_only_copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Exports generation 1 → 2 of the scenario's clean model once per I/O step, each time from a
/// fresh copy into an empty outbox with `fault(step)` injected, and hands `check` the step, the
/// copy, the outbox, the export's result and the delta a faultless export writes. Returns the
/// number of steps.
fn export_at_every_step(
    sc: &Scenario,
    name: &str,
    fault: impl Fn(u64) -> Fault,
    mut check: impl FnMut(u64, &Path, &Path, Result<ExportReport, apollo_checkpoint::Error>, &[u8]),
) -> u64 {
    let model = sc.tmp.path().join("clean"); // generation 2, holding `after`
    let count_out = sc.tmp.path().join(format!("{name}-count"));
    let io = FaultIo::new(Fault::None);
    Checkpoint::new(&model, None, Arc::new(io.clone()))
        .export_delta(&count_out, Some(1), false)
        .unwrap();
    let reference = std::fs::read(deltas_in(&count_out)[0].clone()).unwrap();
    let (steps, _) = io.steps();
    for n in 0..=steps {
        let dir = sc.tmp.path().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        trusted_copy(&model, &dir);
        let outbox = sc.tmp.path().join(format!("{name}-out"));
        let _ = std::fs::remove_dir_all(&outbox);
        let first = Checkpoint::new(&dir, None, Arc::new(FaultIo::new(fault(n)))).export_delta(
            &outbox,
            Some(1),
            false,
        );
        check(n, &dir, &outbox, first, &reference);
    }
    steps
}

#[test]
fn an_export_stopped_at_any_step_is_simply_repeated() {
    let sc = scenario(51);
    export_at_every_step(
        &sc,
        "exp",
        Fault::Crash,
        |n, dir, outbox, first, reference| {
            let rerun = checkpoint(dir)
                .export_delta(outbox, Some(1), false)
                .unwrap();
            assert!(rerun.exported, "crash at {n}");
            let files = deltas_in(outbox);
            assert_eq!(files.len(), 1, "crash at {n}: {files:?}");
            if first.is_ok() {
                assert_eq!(
                    std::fs::read(&files[0]).unwrap().len(),
                    reference.len(),
                    "crash at {n}"
                );
            }
            // The delta is whole and takes a copy of the old files to the new ones.
            let replica = sc.tmp.path().join("exp-replica");
            files_only_copy(&sc.template, &replica);
            checkpoint(&replica)
                .apply_delta(&files)
                .unwrap_or_else(|e| panic!("crash at {n}: {e}"));
            assert_eq!(model_files(&replica), sc.after, "crash at {n}");
        },
    );
}

/// A disk that fills up at any step of an export leaves no temporary in the outbox (one was
/// left behind), and the next export goes through.
#[test]
fn an_export_failing_with_enospc_leaves_no_temporary_behind() {
    let sc = scenario(53);
    let mut failed = 0;
    let enospc = |n| Fault::Fail(n, 28);
    let steps = export_at_every_step(&sc, "nospace", enospc, |n, dir, outbox, first, _| {
        failed += usize::from(first.is_err());
        let temporaries: Vec<String> = std::fs::read_dir(outbox)
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(
            temporaries.is_empty(),
            "ENOSPC at step {n}: {temporaries:?} left"
        );
        assert!(
            checkpoint(dir)
                .export_delta(outbox, Some(1), false)
                .unwrap()
                .exported,
            "ENOSPC at step {n}"
        );
    });
    assert!(
        failed > 3,
        "only {failed} of {steps} steps failed the export"
    );
}

#[test]
fn an_apply_stopped_or_cut_at_any_step_recovers_to_old_or_new() {
    let sc = scenario(52);
    let model = sc.tmp.path().join("clean");
    let outbox = sc.tmp.path().join("outbox");
    checkpoint(&model)
        .export_delta(&outbox, Some(1), false)
        .unwrap();
    let deltas = deltas_in(&outbox);
    let count = sc.tmp.path().join("apply-count");
    files_only_copy(&sc.template, &count);
    let io = FaultIo::new(Fault::None);
    Checkpoint::new(&count, None, Arc::new(io.clone()))
        .apply_delta(&deltas)
        .unwrap();
    assert_eq!(model_files(&count), sc.after);
    let (steps, syncs) = io.steps();
    let mut faults: Vec<Fault> = (0..=steps).map(Fault::Crash).collect();
    faults.extend((0..syncs).flat_map(|k| (0..3).map(move |seed| Fault::PowerCut(k, seed))));
    faults.extend((0..3).map(Fault::PowerCutAfter));
    for fault in faults {
        let replica = sc.tmp.path().join("apply-run");
        files_only_copy(&sc.template, &replica);
        let io = FaultIo::new(fault);
        let first = Checkpoint::new(&replica, None, Arc::new(io.clone())).apply_delta(&deltas);
        io.cut_power_if_due();
        // recover, then the next apply, finish the job; in between the files are old or new.
        if replica.join(".apollo-checkpoint").exists() {
            recovering(&replica, fault)
                .recover()
                .unwrap_or_else(|e| panic!("{fault:?}: recover: {e}"));
        }
        let now = model_files(&replica);
        assert!(
            now == sc.before || now == sc.after,
            "{fault:?}: the replica is neither generation ({first:?})"
        );
        if first.is_ok() {
            assert!(now == sc.after, "{fault:?}: applied, then lost");
        }
        checkpoint(&replica)
            .apply_delta(&deltas)
            .unwrap_or_else(|e| panic!("{fault:?}: the next apply: {e}"));
        assert_eq!(model_files(&replica), sc.after, "{fault:?}");
        assert!(
            checkpoint(&replica).verify(false).unwrap().clean,
            "{fault:?}"
        );
    }
}

/// A sync leaves its pages to the page cache: in the same boot the next writer (here
/// `recover`) only fsyncs, reading no model byte; after a power cut that took the pages,
/// recovery rolls the retired journal forward (the index's commit was durable).
#[test]
fn unflushed_writes_are_fsynced_in_the_same_boot_and_rolled_forward_after_a_reboot() {
    use std::sync::atomic::Ordering::Relaxed;
    let sc = scenario(46);
    let live = || SafetensorsSource::open(&sc.live).unwrap();

    let dir = sc.tmp.path().join("same-boot");
    trusted_copy(&sc.template, &dir);
    checkpoint(&dir).sync(&live()).unwrap();
    let marker = dir.join(".apollo-checkpoint/unflushed.json");
    assert!(marker.exists());
    let st = checkpoint(&dir).status().unwrap();
    assert!(st.pending.is_empty(), "{:?}", st.pending);
    let io = RealIo::new();
    let r = Checkpoint::new(&dir, None, Arc::new(io.clone()))
        .recover()
        .unwrap();
    assert_eq!(r.action, RecoveryAction::Flushed);
    assert_eq!(io.stats().bytes_read.load(Relaxed), 0);
    assert!(io.stats().syncs.load(Relaxed) > 0);
    assert!(!marker.exists());
    assert_eq!(model_files(&dir), sc.after);

    let dir = sc.tmp.path().join("rebooted");
    trusted_copy(&sc.template, &dir);
    let state = dir.join(".apollo-checkpoint");
    let generation = checkpoint(&dir).status().unwrap().generation.unwrap();
    let io = FaultIo::new(Fault::PowerCutAfter(9));
    Checkpoint::new(&dir, None, Arc::new(io.clone()))
        .sync(&live())
        .unwrap();
    io.cut_power_if_due();
    assert_ne!(model_files(&dir), sc.after, "the power cut lost nothing");
    let marker = state.join("unflushed.json");
    assert!(marker.exists());
    let rebooted = checkpoint_after_reboot(&dir);
    let st = rebooted.status().unwrap();
    assert_eq!(st.generation, Some(generation + 1));
    assert!(
        st.pending.iter().any(|p| p.contains("recover")),
        "{:?}",
        st.pending
    );
    assert!(!rebooted.verify(false).unwrap().clean);
    let r = rebooted.recover().unwrap();
    assert_eq!(r.action, RecoveryAction::RolledForward);
    assert_eq!(r.generation, generation + 1);
    assert_eq!(model_files(&dir), sc.after);
    assert!(!marker.exists());
    let st = checkpoint(&dir).status().unwrap();
    assert_eq!(st.generation, Some(generation + 1));
    assert!(st.pending.is_empty(), "{:?}", st.pending);
    assert!(checkpoint(&dir).verify(false).unwrap().clean);
}

/// The index's commit of a journaled write is left in the WAL unsynced, and neither the commit
/// nor the end of the process copies it into `index.db`; the next writer makes it durable before
/// it removes the marker. A power cut that loses it (the index files as they were before the
/// sync) with the model pages: recovery after the reboot redoes both from the retired journal.
#[test]
fn an_index_commit_lost_with_the_power_is_redone_from_the_retired_journal() {
    let sc = scenario(47);
    let live = || SafetensorsSource::open(&sc.live).unwrap();
    let index_alone = |state: &Path| {
        // index.db without its WAL: what a checkpoint made durable in the database itself.
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(state.join("index.db"), copy.path().join("index.db")).unwrap();
        let conn = rusqlite::Connection::open(copy.path().join("index.db")).unwrap();
        conn.query_row("SELECT max(generation) FROM generations", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
    };

    let dir = sc.tmp.path().join("same-boot");
    trusted_copy(&sc.template, &dir);
    let state = dir.join(".apollo-checkpoint");
    let generation = checkpoint(&dir).status().unwrap().generation.unwrap();
    let db_before = std::fs::read(state.join("index.db")).unwrap();
    checkpoint(&dir).sync(&live()).unwrap();
    assert_eq!(std::fs::read(state.join("index.db")).unwrap(), db_before);
    assert!(std::fs::metadata(state.join("index.db-wal")).unwrap().len() > 0);
    assert_eq!(
        checkpoint(&dir).status().unwrap().generation,
        Some(generation + 1)
    );
    let r = checkpoint(&dir).recover().unwrap();
    assert_eq!(r.action, RecoveryAction::Flushed);
    assert_eq!(index_alone(&state), generation + 1);

    let dir = sc.tmp.path().join("rebooted");
    trusted_copy(&sc.template, &dir);
    let state = dir.join(".apollo-checkpoint");
    let saved: Vec<(PathBuf, Option<Vec<u8>>)> = ["index.db", "index.db-wal"]
        .iter()
        .map(|f| (state.join(f), std::fs::read(state.join(f)).ok()))
        .collect();
    let io = FaultIo::new(Fault::PowerCutAfter(5));
    Checkpoint::new(&dir, None, Arc::new(io.clone()))
        .sync(&live())
        .unwrap();
    io.cut_power_if_due();
    for (path, bytes) in &saved {
        match bytes {
            Some(b) => std::fs::write(path, b).unwrap(),
            None => drop(std::fs::remove_file(path)),
        }
    }
    let _ = std::fs::remove_file(state.join("index.db-shm"));
    assert_ne!(model_files(&dir), sc.after, "the power cut lost nothing");
    let rebooted = checkpoint_after_reboot(&dir);
    let st = rebooted.status().unwrap();
    assert_eq!(st.generation, Some(generation), "the commit was lost");
    assert!(
        st.pending.iter().any(|p| p.contains("recover")),
        "{:?}",
        st.pending
    );
    let r = rebooted.recover().unwrap();
    assert_eq!(r.action, RecoveryAction::RolledForward);
    assert_eq!(r.generation, generation + 1);
    assert_eq!(model_files(&dir), sc.after);
    assert_eq!(index_alone(&state), generation + 1);
    let st = checkpoint(&dir).status().unwrap();
    assert_eq!(st.generation, Some(generation + 1));
    assert!(st.pending.is_empty(), "{:?}", st.pending);
    assert!(checkpoint(&dir).verify(false).unwrap().clean);
    let again = checkpoint(&dir).sync(&live()).unwrap();
    assert_eq!(again.blocks_changed, 0);
}
