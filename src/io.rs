//! The one small I/O layer every model-file read, write and sync goes through.
//!
//! Why it exists: crash safety is only testable if a test can see and control every byte that
//! reaches the disk. Code above this layer never touches `std::fs` for model files; it asks an
//! [`Io`] for a [`FileIo`] and reads, writes and syncs through it. Tests plug in their own `Io`
//! (counting reads, failing the Nth operation, dropping writes that were never synced).
//!
//! Invariants of the real implementation ([`RealIo`]):
//! - Model files are mapped read-only with `memmap2`; reads copy out of the map. Writes go
//!   through `pwrite` on the same file into the same page cache, so the map sees them at once.
//!   The map is private to this module: the only `unsafe` blocks for mapping files live here.
//!   Why not write into a writable map: on the 2-core VM we measure on, dirtying scattered
//!   pages through a shared writable map costs a write fault per page and, when the pages are
//!   cleaned for writeback, a TLB shootdown across every CPU running the process; perf showed
//!   those two at 31% of `apply-delta`'s time for 8k scattered blocks, and `pwrite` halved it.
//!   Pages that were never mapped writable need neither.
//!   What a scattered `pwrite` costs is the kernel's: where a file's page cache is held in large
//!   folios (ext4 on recent kernels, for files written in large chunks, as model files are), each
//!   write walks every block of its folio twice (begin and commit), so one byte costs about as
//!   much as 4 KiB (`examples/page_writes`: 6-11 us per write on the VM, 2.8-3.8 us into small
//!   folios). A writable map would not help: ext4 marks every block of a folio dirty at its
//!   first write fault (`block_page_mkwrite`), so writeback would write the whole folio.
//! - [`FileIo::sync`] is `fsync`: when it returns `Ok`, every write made before it is durable.
//! - A process killed in the middle of a write leaves a *prefix* of the new bytes followed by
//!   the old ones, never an arbitrary mix: the kernel copies a `pwrite` into the page cache in
//!   ascending page order and acts on a fatal signal only between pages. Recovery relies on
//!   that to repair a block torn by a kill.
//! - After a failed write or sync the handle is *poisoned*: every later call fails. A failed
//!   `fsync` is never retried as if it had worked, because the kernel may already have dropped
//!   the dirty pages it could not write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::Mmap;

/// How a model file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only.
    Read,
    /// Read and write in place (never created, never resized).
    ReadWrite,
}

/// Identity of a file on disk, used to notice a file replaced or edited behind our back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStat {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Inode number.
    pub inode: u64,
    /// Status change time, nanoseconds since the Unix epoch: set by the kernel on every write
    /// and metadata change, and not settable, so an edit with the mtime put back still shows.
    /// 0: not recorded (an index from before it was).
    pub ctime_ns: i64,
}

impl FileStat {
    /// Reads size, mtime, inode and ctime from filesystem metadata.
    pub fn from_metadata(meta: &std::fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        FileStat {
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            inode: meta.ino(),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether a file now at `self` is still the file recorded as `recorded`: same size, mtime
    /// and inode, and the same ctime where one was recorded.
    pub fn same_file_as(&self, recorded: &FileStat) -> bool {
        self.size == recorded.size
            && self.mtime_ns == recorded.mtime_ns
            && self.inode == recorded.inode
            && (recorded.ctime_ns == 0 || self.ctime_ns == recorded.ctime_ns)
    }
}

/// A factory of open files: the seam where tests inject faults.
pub trait Io: Send + Sync {
    /// Opens an existing file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileIo>>;
    /// Creates a new empty file (failing if it exists) for writing; it grows as it is written.
    /// Its directory entry is durable only after [`Io::sync_dir`] of its parent.
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileIo>>;
    /// Renames a file; durable only after [`Io::sync_dir`] of both parents.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file; durable only after [`Io::sync_dir`] of its parent.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of a directory (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a directory and its parents, then makes the new entries durable.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Bytes read from model files (memory-mapped ones) through this layer so far.
    fn bytes_read(&self) -> u64;
    /// Names this boot of the machine: the same string means no crash or power cut has dropped
    /// the page cache since, so writes made before are still there to be made durable. Empty
    /// when unknown, which never counts as the same boot.
    fn boot_id(&self) -> String {
        this_boot()
    }
}

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`), empty if unknown.
pub fn this_boot() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// One open file.
pub trait FileIo: Send + Sync {
    /// The path it was opened with.
    fn path(&self) -> &Path;
    /// Its length in bytes when it was opened (model files never change length).
    fn len(&self) -> u64;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Current size, mtime and inode.
    fn stat(&self) -> io::Result<FileStat>;
    /// Fills `buf` from `offset`; fails if the range is not inside the file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`; fails if the range is not inside the file (model files never
    /// grow; files made by [`Io::create`] grow to hold what is written).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every earlier write durable.
    fn sync(&self) -> io::Result<()>;
}

/// Byte and call counters shared by all files a [`RealIo`] opened.
#[derive(Debug, Default)]
pub struct IoStats {
    /// Bytes copied out of model files by `read_at`.
    pub bytes_read: AtomicU64,
    /// Bytes copied into model files by `write_at`.
    pub bytes_written: AtomicU64,
    /// Successful `sync` calls.
    pub syncs: AtomicU64,
}

/// The real filesystem, through memory maps.
#[derive(Debug, Default, Clone)]
pub struct RealIo {
    stats: Arc<IoStats>,
    boot_id: Option<String>,
}

impl RealIo {
    /// A new real I/O layer with its own counters.
    pub fn new() -> Self {
        RealIo::default()
    }

    /// A real I/O layer that reports `boot_id` as this boot's: tests use it to play the
    /// machine coming back from a power cut.
    pub fn with_boot_id(boot_id: &str) -> Self {
        RealIo {
            boot_id: Some(boot_id.to_string()),
            ..RealIo::default()
        }
    }

    /// Counters of everything done through this layer so far.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }
}

impl Io for RealIo {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileIo>> {
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)?;
        let len = file.metadata()?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and only ever accessed through `MappedFile`, which
            // copies bytes out of it, so Rust never holds a reference into it across a call.
            // Its bytes may change under a copy: by our own `pwrite` (never to a block being
            // read at the same time) or by another process, which the block hashes then
            // detect. If another process truncates the file while it is mapped, an access past
            // the new end raises SIGBUS; apollo-checkpoint holds the state-dir lock and checks
            // size and mtime before mapping, and documents that model files must not be edited
            // by other programs while it runs.
            Some(unsafe { Mmap::map(&file)? })
        };
        Ok(Box::new(MappedFile {
            path: path.to_path_buf(),
            file,
            len,
            writable: mode == OpenMode::ReadWrite,
            map,
            poisoned: Poison::default(),
            stats: Arc::clone(&self.stats),
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FileIo>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(PlainFile {
            path: path.to_path_buf(),
            file,
            poisoned: Poison::default(),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        sync_dir(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(path);
        while let Some(p) = cur {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            cur = p.parent();
        }
        std::fs::create_dir_all(path)?;
        for dir in missing.iter().rev() {
            if let Some(parent) = dir.parent() {
                sync_dir(if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                })?;
            }
        }
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.stats.bytes_read.load(Ordering::Relaxed)
    }

    fn boot_id(&self) -> String {
        self.boot_id.clone().unwrap_or_else(this_boot)
    }
}

/// Fsyncs a directory so that entries created or renamed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Maps a file read-only for hashing: used for weight sources, which are never written.
///
/// The returned map stays valid if the file is later changed by someone else, but its contents
/// may then change under the reader (a hash computed over it is then simply of other bytes), and
/// truncation raises SIGBUS. Sources are expected to be stable while a sync runs.
pub fn map_read_only(file: &File) -> io::Result<Option<Mmap>> {
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: see the function's documentation: the map is only read, and a concurrent change
    // by another process alters the bytes read (detected by hashes), never memory safety beyond
    // the documented SIGBUS on truncation.
    Ok(Some(unsafe { Mmap::map(file)? }))
}

/// Refuses all I/O on a handle after one of its writes or syncs failed.
#[derive(Debug, Default)]
struct Poison(AtomicBool);

impl Poison {
    fn check(&self, path: &Path) -> io::Result<()> {
        if self.0.load(Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "{}: an earlier write or sync failed; this handle refuses further I/O",
                path.display()
            )));
        }
        Ok(())
    }

    /// Passes `r` through, poisoning the handle if it is an error.
    fn guard<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.0.store(true, Ordering::Release);
        }
        r
    }
}

struct MappedFile {
    path: PathBuf,
    file: File,
    len: u64,
    writable: bool,
    /// `None` for an empty file, which cannot be mapped.
    map: Option<Mmap>,
    poisoned: Poison,
    stats: Arc<IoStats>,
}

impl MappedFile {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: range {offset}+{len} is past the end of the file ({} bytes)",
                        self.path.display(),
                        self.len
                    ),
                )
            })?;
        Ok(offset as usize..end as usize)
    }
}

impl FileIo for MappedFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn stat(&self) -> io::Result<FileStat> {
        Ok(FileStat::from_metadata(&self.file.metadata()?))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.poisoned.check(&self.path)?;
        let range = self.range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let map = self
            .map
            .as_ref()
            .expect("a non-empty range of an empty file was rejected above");
        buf.copy_from_slice(&map[range]);
        self.stats
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.poisoned.check(&self.path)?;
        let range = self.range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.path.display()),
            ));
        }
        let r = std::os::unix::fs::FileExt::write_all_at(&self.file, data, range.start as u64);
        self.poisoned.guard(r)?;
        self.stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.poisoned.check(&self.path)?;
        let r = if self.writable {
            self.file.sync_all()
        } else {
            Ok(())
        };
        let r = self.poisoned.guard(r);
        if r.is_ok() {
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// A file written with `pwrite` that grows as it is written: the journal.
struct PlainFile {
    path: PathBuf,
    file: File,
    poisoned: Poison,
}

impl FileIo for PlainFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    fn stat(&self) -> io::Result<FileStat> {
        Ok(FileStat::from_metadata(&self.file.metadata()?))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.poisoned.check(&self.path)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.poisoned.check(&self.path)?;
        let r = self.file.write_all_at(data, offset);
        self.poisoned.guard(r)
    }

    fn sync(&self) -> io::Result<()> {
        self.poisoned.check(&self.path)?;
        let r = self.file.sync_all();
        self.poisoned.guard(r)
    }
}
