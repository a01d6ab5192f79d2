//! The narrow I/O seam of the WAL: a directory of append-only files. `FsDir` is
//! the real filesystem; `SimDir` keeps, per file, the durable image apart from
//! unsynced writes, so tests can fail a write or sync at a chosen call and take
//! the image a crash would leave (synced bytes plus a prefix of the rest).
//!
//! A preallocating `FsDir` (the daemon's) writes zeros ahead of the end of the
//! file it appends to, a chunk at a time, in the same write and sync as a
//! batch. A batch then overwrites blocks the file already has: its
//! `fdatasync` writes the data alone, not the inode's new size and blocks as
//! well (on this machine's disk 110 → 78 µs and 46 → 30 µs of CPU per
//! write + sync). The zeros past the last record are what recovery already
//! takes for the unwritten end of the last segment; a segment the log moves
//! on from is cut to its last record first ([`WalFile::seal`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An append-only file of the WAL.
pub trait WalFile: Send {
    /// The whole content.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Appends at the end.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes and makes that durable.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Cuts any space written ahead of the end, durably: the log moves on to
    /// a new segment, and only the last segment may end in zeros.
    fn seal(&mut self) -> io::Result<()>;
}

/// The directory holding WAL segments.
pub trait WalDir: Send + Sync {
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new, empty file (fails if it exists) and makes its entry durable.
    fn create(&self, name: &str) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file for reading and appending.
    fn open(&self, name: &str) -> io::Result<Box<dyn WalFile>>;
    /// Deletes a file and makes that durable.
    fn remove(&self, name: &str) -> io::Result<()>;
}

/// Zeros the daemon keeps written ahead of the WAL's end: one write of
/// this size per this many bytes of log (at most a quarter of a segment).
pub fn write_ahead_bytes(segment_bytes_max: u64) -> u64 {
    (1 << 20).min(segment_bytes_max / 4)
}

/// The real filesystem.
#[derive(Debug, Clone)]
pub struct FsDir {
    /// The directory.
    path: PathBuf,
    /// Zeros written ahead of the end of an appended file (0: none).
    ahead: u64,
}

impl FsDir {
    /// Uses `path`, creating it if needed.
    pub fn new(path: &Path) -> io::Result<FsDir> {
        super::create_private_dir(path)?;
        Ok(FsDir {
            path: path.to_path_buf(),
            ahead: 0,
        })
    }

    /// As [`FsDir::new`], writing `ahead` bytes of zeros ahead of the end of
    /// each file appended to, whenever less than half of that is left.
    pub fn preallocating(path: &Path, ahead: u64) -> io::Result<FsDir> {
        let mut dir = FsDir::new(path)?;
        dir.ahead = ahead;
        Ok(dir)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn file(&self, file: File) -> io::Result<Box<dyn WalFile>> {
        let len = file.metadata()?.len();
        Ok(Box::new(FsFile {
            file,
            end: len,
            len,
            ahead: self.ahead,
        }))
    }
}

/// Zeros to write ahead from.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

struct FsFile {
    file: File,
    /// Where the next append lands: the end of what was appended.
    end: u64,
    /// The file's length: past `end` it holds zeros written ahead.
    len: u64,
    /// Zeros to keep ahead of `end`; 0 once writing them failed (a full
    /// disk: the batches themselves get the space that is left).
    ahead: u64,
}

impl FsFile {
    /// Writes zeros from the file's end until `ahead` bytes lie past `end`.
    fn write_ahead(&mut self) -> io::Result<()> {
        let target = self.end + self.ahead;
        while self.len < target {
            let n = (target - self.len).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], self.len)?;
            self.len += n as u64;
        }
        Ok(())
    }
}

impl WalFile for FsFile {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        use std::io::Seek;
        let mut buf = Vec::new();
        self.file.seek(io::SeekFrom::Start(0))?;
        self.file.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let first = self.end == 0;
        self.file.write_all_at(buf, self.end)?;
        self.end += buf.len() as u64;
        self.len = self.len.max(self.end);
        // Not with a file's first write (its header): zeros that landed
        // without the header would be a segment recovery cannot read.
        if self.ahead > 0 && !first && self.len - self.end < self.ahead / 2 {
            // Synced with the batch. Failing here loses nothing: the batch
            // is written, and a partial run of zeros is more of the same.
            if let Err(e) = self.write_ahead() {
                tracing::warn!(error = %e, "cannot write the WAL's space ahead; appending without it");
                self.ahead = 0;
                // Part of the zeros may have landed past `len`.
                self.len = self.file.metadata().map_or(u64::MAX, |m| m.len()).max(self.end);
            }
        }
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()?;
        (self.end, self.len) = (len, len);
        Ok(())
    }

    fn seal(&mut self) -> io::Result<()> {
        // The file's own length: zeros of a failed write ahead may lie past `len`.
        if self.file.metadata()?.len() > self.end {
            self.truncate(self.end)?;
        }
        Ok(())
    }
}

impl WalDir for FsDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            if let Some(n) = entry?.file_name().to_str() {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn WalFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        // Not O_APPEND: appends are positioned writes, before the zeros ahead.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path.join(name))?;
        self.sync_dir()?;
        self.file(file)
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn WalFile>> {
        let file = OpenOptions::new().read(true).write(true).open(self.path.join(name))?;
        self.file(file)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))?;
        self.sync_dir()
    }
}

/// One simulated file.
#[derive(Debug, Clone, Default)]
struct SimFile {
    /// What survives a crash.
    durable: Vec<u8>,
    /// Appended since the last sync; a crash keeps some prefix of it.
    pending: Vec<u8>,
}

/// Which I/O call fails, counted from 1 over the life of the `SimDir`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// The n-th `append` fails (and writes nothing).
    pub fail_append_at: Option<u64>,
    /// The n-th `sync_data` fails (the pending bytes stay unsynced).
    pub fail_sync_at: Option<u64>,
    /// The n-th `append` writes the first half of its buffer, then fails: a
    /// short write on a full disk.
    pub short_append_at: Option<u64>,
    /// Every `truncate` and `remove` fails (the undo of a failed write).
    pub fail_undo: bool,
    /// Every `sync_data` takes this long: a slow disk.
    pub sync_delay: std::time::Duration,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<String, SimFile>,
    faults: Faults,
    appends: u64,
    syncs: u64,
}

/// An in-memory directory with a crash model, for tests.
#[derive(Debug, Clone, Default)]
pub struct SimDir {
    /// Shared by every handle, like a real directory.
    state: Arc<Mutex<SimState>>,
    /// While true, `sync_data` waits (a slow disk a test holds still).
    held: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

struct SimHandle {
    dir: SimDir,
    name: String,
}

impl SimDir {
    /// An empty directory.
    pub fn new() -> SimDir {
        SimDir::default()
    }

    /// Injects failures.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Holds every `sync_data` from now until [`SimDir::release_syncs`]:
    /// the writer waits inside the sync, its bytes written but not durable.
    pub fn hold_syncs(&self) {
        *self.held.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Lets held and later syncs run.
    pub fn release_syncs(&self) {
        *self.held.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.held.1.notify_all();
    }

    /// Bytes written to `name` and not yet synced (0 if there is no such file).
    pub fn unsynced_bytes(&self, name: &str) -> usize {
        self.lock().files.get(name).map_or(0, |f| f.pending.len())
    }

    /// `(appends, syncs)` so far.
    pub fn io_counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.appends, s.syncs)
    }

    /// The directory a crash would leave: each file's synced bytes plus the first
    /// `keep(name, pending_len)` of its unsynced bytes.
    pub fn crash_image(&self, mut keep: impl FnMut(&str, usize) -> usize) -> SimDir {
        let s = self.lock();
        let files = s
            .files
            .iter()
            .map(|(name, f)| {
                let n = keep(name, f.pending.len()).min(f.pending.len());
                let mut durable = f.durable.clone();
                durable.extend_from_slice(&f.pending[..n]);
                (
                    name.clone(),
                    SimFile {
                        durable,
                        pending: Vec::new(),
                    },
                )
            })
            .collect();
        SimDir {
            state: Arc::new(Mutex::new(SimState {
                files,
                ..SimState::default()
            })),
            held: Arc::default(),
        }
    }

    /// Copies of the files as a crash would leave them with nothing unsynced kept.
    pub fn durable_files(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock()
            .files
            .iter()
            .map(|(n, f)| (n.clone(), f.durable.clone()))
            .collect()
    }

    /// A directory holding exactly these (durable) files.
    pub fn from_files(files: BTreeMap<String, Vec<u8>>) -> SimDir {
        let files = files
            .into_iter()
            .map(|(n, d)| {
                (
                    n,
                    SimFile {
                        durable: d,
                        pending: Vec::new(),
                    },
                )
            })
            .collect();
        SimDir {
            state: Arc::new(Mutex::new(SimState {
                files,
                ..SimState::default()
            })),
            held: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl WalFile for SimHandle {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let s = self.dir.lock();
        let f = s
            .files
            .get(&self.name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut all = f.durable.clone();
        all.extend_from_slice(&f.pending);
        Ok(all)
    }
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut s = self.dir.lock();
        s.appends += 1;
        if s.faults.fail_append_at == Some(s.appends) {
            return Err(io::Error::other("injected write failure"));
        }
        let short = s.faults.short_append_at == Some(s.appends);
        let f = s
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if short {
            f.pending.extend_from_slice(&buf[..buf.len() / 2]);
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        f.pending.extend_from_slice(buf);
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        {
            let (held, cv) = &*self.dir.held;
            let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
            while *h {
                h = cv.wait(h).unwrap_or_else(|e| e.into_inner());
            }
        }
        let delay = self.dir.lock().faults.sync_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut s = self.dir.lock();
        s.syncs += 1;
        if s.faults.fail_sync_at == Some(s.syncs) {
            return Err(io::Error::other("injected fsync failure"));
        }
        let f = s
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let pending = std::mem::take(&mut f.pending);
        f.durable.extend_from_slice(&pending);
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut s = self.dir.lock();
        if s.faults.fail_undo {
            return Err(io::Error::other("injected truncate failure"));
        }
        let f = s
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut all = std::mem::take(&mut f.durable);
        all.append(&mut f.pending);
        all.truncate(len as usize);
        f.durable = all;
        Ok(())
    }

    fn seal(&mut self) -> io::Result<()> {
        Ok(()) // nothing is written ahead here
    }
}

impl WalDir for SimDir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.lock().files.keys().cloned().collect())
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn WalFile>> {
        let mut s = self.lock();
        if s.files.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        s.files.insert(name.to_string(), SimFile::default());
        drop(s);
        Ok(Box::new(SimHandle {
            dir: self.clone(),
            name: name.to_string(),
        }))
    }
    fn open(&self, name: &str) -> io::Result<Box<dyn WalFile>> {
        if !self.lock().files.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(Box::new(SimHandle {
            dir: self.clone(),
            name: name.to_string(),
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.lock();
        if s.faults.fail_undo {
            return Err(io::Error::other("injected remove failure"));
        }
        s.files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}
