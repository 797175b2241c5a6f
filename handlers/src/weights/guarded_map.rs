//! [`GuardedMap`]: a read-only file mapping that survives its file changing underneath.
//!
//! A mapped file that another process truncates (`cp new.mar store/x.mar` truncates the
//! file in place before writing it) makes every later read of the lost pages raise
//! `SIGBUS`, which kills the process. Spillway maps the weights of every model it
//! serves, so one careless copy into the model store would lose every in-flight request
//! of every model. A guarded mapping instead:
//!
//! - registers its address range in a fixed table that a `SIGBUS` handler (installed
//!   once, chaining to whatever handler was there before) reads: a fault inside a
//!   registered range has a page of zeros mapped over the faulting page, so the read
//!   completes, and the mapping is marked faulted;
//! - keeps its file open and remembers its length and modification time, so a rewrite
//!   that keeps the length (no fault at all) is noticed too.
//!
//! [`GuardedMap::changed`] says whether either happened. The reads made after the change
//! returned zeros or new bytes, so whoever read them must treat their results as
//! garbage: the handler reports the model's weights as changed (see
//! [`crate::Handler::weights_changed`]), the server fails the requests that ran on them
//! and reloads the model from the file as it now is.
//!
//! A file replaced by renaming a new one over it (a new inode) is not a change: the
//! mapping keeps the old file's bytes alive until the model lets go of them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use super::huge_map::HugeMap;

use crate::HandlerError;

/// How many mappings can be guarded at once (a slot per mapped file or archive entry);
/// past that a mapping is made unguarded, with a warning.
const SLOTS: usize = 4096;

/// One registered address range. `end == 0` marks a free slot.
struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// Faults the handler absorbed, over the process' life (for tests and logs).
static ABSORBED: AtomicUsize = AtomicUsize::new(0);

/// The page size, read when the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// What the length and modification time of a file were when it was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    len: u64,
    modified: Option<SystemTime>,
}

impl Identity {
    fn of(file: &File) -> std::io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// A whole file mapped read-only, its range guarded against the file shrinking.
pub struct GuardedMap {
    path: PathBuf,
    map: HugeMap,
    /// Kept open to see the mapped inode's length and time, whatever its name is now.
    file: File,
    identity: Identity,
    /// The slot guarding `map`, `None` when the table was full (or the file empty).
    slot: Option<usize>,
}

impl GuardedMap {
    /// Maps the file at `path`.
    pub fn open(path: &Path) -> Result<Self, HandlerError> {
        let io = |source| HandlerError::Io {
            path: path.to_path_buf(),
            source,
        };
        install_handler();
        let file = File::open(path).map_err(io)?;
        let identity = Identity::of(&file).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. A file truncated
        // underneath raises SIGBUS on the lost pages: the slot registered below lets the
        // handler map zeros there instead and mark the mapping faulted, which
        // `changed` reports to whoever reads it.
        #[allow(unsafe_code)]
        let map = unsafe { HugeMap::map(&file) }.map_err(io)?;
        let slot = (!map.is_empty())
            .then(|| claim(map.as_ptr() as usize, map.len()))
            .flatten();
        if slot.is_none() && !map.is_empty() {
            tracing::warn!(path = %path.display(), "{SLOTS} files are mapped: this one is not guarded against truncation");
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            file,
            identity,
            slot,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the kernel to start reading `len` bytes at `offset` (advice only: failure
    /// costs speed, never correctness).
    pub fn will_need(&self, offset: usize, len: usize) {
        self.map.will_need(offset, len);
    }

    /// Drops this process' pages of `len` bytes at `offset` (they stay in the page
    /// cache; a later read, such as a quantized weight used in place on the next pass,
    /// maps the same bytes again, or past a truncation the guard's zeros).
    pub fn dont_need(&self, offset: usize, len: usize) {
        self.map.dont_need(offset, len);
    }

    /// Why the bytes read from this mapping can no longer be trusted, if they cannot:
    /// the file was truncated under it (a read faulted) or rewritten (its length or
    /// modification time moved).
    pub fn changed(&self) -> Option<String> {
        if self
            .slot
            .is_some_and(|i| TABLE[i].faulted.load(Ordering::Acquire))
        {
            return Some("it was truncated while mapped".into());
        }
        match Identity::of(&self.file) {
            Ok(now) if now == self.identity => None,
            Ok(now) if now.len != self.identity.len => Some(format!(
                "it was rewritten while mapped ({} bytes, now {})",
                self.identity.len, now.len
            )),
            Ok(_) => Some("it was rewritten while mapped (its modification time moved)".into()),
            Err(e) => Some(format!("it can no longer be examined: {e}")),
        }
    }
}

impl std::ops::Deref for GuardedMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // Freed before the mapping goes (right after this), so the handler never
        // guards an address range that something else may be mapped at next.
        if let Some(i) = self.slot {
            release(i);
        }
    }
}

/// Registers `[start, start + len)`; `None` when every slot is taken.
fn claim(start: usize, len: usize) -> Option<usize> {
    let index = TABLE.iter().position(|slot| {
        slot.claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    let slot = &TABLE[index];
    slot.faulted.store(false, Ordering::Release);
    slot.start.store(start, Ordering::Release);
    slot.end.store(start + len, Ordering::Release);
    Some(index)
}

fn release(index: usize) {
    let slot = &TABLE[index];
    slot.end.store(0, Ordering::Release);
    slot.start.store(0, Ordering::Release);
    slot.claimed.store(false, Ordering::Release);
}

/// Faults absorbed so far by the handler, process-wide.
pub fn faults_absorbed() -> usize {
    ABSORBED.load(Ordering::Relaxed)
}

/// The `SIGBUS` action that was installed before ours, called for faults outside every
/// guarded mapping. Set once, before our handler is installed.
static PREVIOUS: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: plain libc calls on zeroed structs.
        #[allow(unsafe_code)]
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::Relaxed);
            }
            let mut previous: libc::sigaction = std::mem::zeroed();
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            // Read the previous action first and store it, then install ours.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return;
            }
            let _ = PREVIOUS.set(previous);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!("cannot install the SIGBUS handler: a mapped file truncated under the server will end it");
            }
        }
    });
}

/// The `SIGBUS` handler: only atomics and `mmap`, both safe in a signal handler.
#[allow(unsafe_code)]
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let address = unsafe { (*info).si_addr() } as usize;
    for slot in &TABLE {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if start <= address && address < end {
            let page = PAGE.load(Ordering::Relaxed);
            let base = address & !(page - 1);
            // SAFETY: the page lies inside a live read-only mapping of ours (its slot is
            // freed before it is unmapped); replacing it with a private page of zeros
            // changes what later reads see, which `faulted` tells their readers.
            let zeros = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zeros != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                ABSORBED.fetch_add(1, Ordering::Relaxed);
                return; // the read is retried, and finds the zeros
            }
            break;
        }
    }
    // Not ours (or zeros could not be mapped): what would have happened without us.
    // SAFETY: calling the previous handler as the kernel would have, or restoring the
    // default action.
    unsafe {
        match PREVIOUS.get() {
            Some(previous)
                if previous.sa_sigaction != libc::SIG_DFL
                    && previous.sa_sigaction != libc::SIG_IGN =>
            {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let chained: extern "C" fn(
                        libc::c_int,
                        *mut libc::siginfo_t,
                        *mut libc::c_void,
                    ) = std::mem::transmute(previous.sa_sigaction);
                    chained(signal, info, context);
                } else {
                    let chained: extern "C" fn(libc::c_int) =
                        std::mem::transmute(previous.sa_sigaction);
                    chained(signal);
                }
            }
            _ => {
                // The default action: returning re-runs the faulting read, which now
                // ends the process as it would have.
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weights.bin");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, bytes).expect("write");
        (dir, path)
    }

    #[test]
    fn a_file_truncated_under_its_mapping_reads_as_zeros_and_is_reported_not_fatal() {
        let page = 4096 * 16;
        let (_dir, path) = file_of(page * 4);
        let map = GuardedMap::open(&path).expect("open");
        assert_eq!(map.changed(), None);
        assert_eq!(map[page * 3 + 5], ((page * 3 + 5) % 251) as u8 + 1);
        let before = faults_absorbed();
        // What `cp new old` does first: truncate the file in place.
        File::create(&path).expect("truncate");
        // Without the guard these reads end the test binary with a bus error.
        let tail: u64 = map[page * 2..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail, 0, "the lost pages read as zeros");
        assert!(faults_absorbed() > before, "the faults were absorbed");
        let why = map.changed().expect("reported");
        assert!(why.contains("truncated"), "{why}");
    }

    #[test]
    fn a_rewrite_that_keeps_the_length_is_reported_and_a_rename_over_the_file_is_not() {
        let (dir, path) = file_of(10_000);
        let map = GuardedMap::open(&path).expect("open");
        // Replaced by rename: the mapping keeps the old inode, whose bytes are unchanged.
        let fresh = dir.path().join("fresh.bin");
        std::fs::write(&fresh, vec![9u8; 10_000]).expect("write");
        std::fs::rename(&fresh, &path).expect("rename");
        assert_eq!(
            map.changed(),
            None,
            "a new inode under the name is not a change"
        );
        assert_eq!(map[0], 1);

        let (_dir, path) = file_of(10_000);
        let map = GuardedMap::open(&path).expect("open");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing");
        file.write_all(&[7u8; 100]).expect("overwrite");
        file.sync_all().expect("sync");
        assert_eq!(map[0], 7, "a shared mapping sees the new bytes");
        let why = map.changed().expect("reported");
        assert!(why.contains("rewritten"), "{why}");
    }

    #[test]
    fn faults_outside_every_guarded_mapping_still_end_the_process() {
        // Checked in a child process: a truncated file mapped without a guard, read
        // after this module's handler is installed, must still raise the bus error.
        if std::env::var_os("SPILLWAY_UNGUARDED_FAULT_CHILD").is_some() {
            let (_keep, guarded) = file_of(8192);
            let _installed = GuardedMap::open(&guarded).expect("open");
            let (_dir, path) = file_of(4096 * 32);
            let file = File::open(&path).expect("open");
            #[allow(unsafe_code)]
            // SAFETY: this child exists to fault on the truncated mapping.
            let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
            File::create(&path).expect("truncate");
            let sum: u64 = map.iter().map(|&b| u64::from(b)).sum();
            println!("survived with {sum}");
            std::process::exit(0);
        }
        let status = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "weights::guarded_map::tests::faults_outside_every_guarded_mapping_still_end_the_process",
                "--nocapture",
            ])
            .env("SPILLWAY_UNGUARDED_FAULT_CHILD", "1")
            .output()
            .expect("child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.status.signal(),
            Some(libc::SIGBUS),
            "the child ended by SIGBUS: {status:?}"
        );
    }
}
