//! [`HugeMap`]: a read-only file mapping laid out so the kernel can map the file's page
//! cache 2 MiB at a time.
//!
//! A streamed unit's pages are mapped in before its turn and released after it, on every
//! pass. With 4 KiB page-table entries that costs about 0.3 µs a page on the machines
//! measured (10–13 ms to map and release SmolLM2's 93 MB, more than a whole decode step
//! in RAM). Linux (6.x, with a file system that keeps large folios: ext4 since 6.16,
//! xfs, btrfs) can instead map a 2 MiB folio of the page cache with one PMD entry, which
//! makes the same 93 MB cost 0.3 ms. It does so when:
//!
//! - the mapping's address is 2 MiB-aligned where the file offset is (so the folio's
//!   file offset and its virtual address agree modulo 2 MiB): we map the file at a
//!   2 MiB-aligned address;
//! - the page cache holds 2 MiB folios for the range: read-ahead through a mapping
//!   advised `MADV_HUGEPAGE` allocates them, so we advise it; a file whose cache was
//!   filled in small pages (by `write`, say) keeps them until they are dropped, which is
//!   why [`drop_written_pages`] is called on the files Spillway writes itself.
//!
//! Where any of this is missing (another kernel, file system, or `transparent_hugepage`
//! set to `never`) the mapping works as an ordinary one; only the speed differs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `MADV_POPULATE_READ` (Linux 5.14; not in every libc's headers).
const MADV_POPULATE_READ: libc::c_int = 22;

/// The size of a PMD mapping on x86-64 and aarch64 with 4 KiB pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// A whole file mapped read-only at a 2 MiB-aligned address, advised `MADV_HUGEPAGE`.
pub struct HugeMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value until it is dropped.
#[allow(unsafe_code)]
unsafe impl Send for HugeMap {}
#[allow(unsafe_code)]
unsafe impl Sync for HugeMap {}

impl HugeMap {
    /// Maps all of `file`.
    ///
    /// # Safety
    /// As for any file mapping: the bytes change if the file is rewritten in place, and
    /// reading pages a truncation removed raises `SIGBUS` (see `guarded_map`).
    #[allow(unsafe_code)]
    pub unsafe fn map(file: &File) -> std::io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("the file is larger than the address space"))?;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        let page = page_size();
        let mapped = len.div_ceil(page) * page;
        let reserved = mapped + HUGE_PAGE;
        // SAFETY: plain libc calls. The reservation is ours; the file is mapped over its
        // aligned part with MAP_FIXED (replacing only our own reservation), and the
        // reservation's slack on either side is unmapped.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let base = base as usize;
            let start = base.next_multiple_of(HUGE_PAGE);
            let ptr = libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            );
            if ptr == libc::MAP_FAILED {
                let error = std::io::Error::last_os_error();
                libc::munmap(base as *mut libc::c_void, reserved);
                return Err(error);
            }
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            let end = start + mapped;
            if base + reserved > end {
                libc::munmap(end as *mut libc::c_void, base + reserved - end);
            }
            // Advice only: a kernel without file THP refuses it, and the map is as fast
            // as an ordinary one.
            libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
            Ok(Self {
                ptr: ptr as *mut u8,
                len,
            })
        }
    }

    /// Reads `len` bytes at `offset` into the page cache and maps them, before they are
    /// used: `MADV_POPULATE_READ` (Linux 5.14), which maps a 2 MiB folio with one call
    /// where `MADV_WILLNEED` walks the cache a page at a time; `MADV_WILLNEED` where the
    /// kernel does not know it. Failure (a read error) costs only speed here: the reader
    /// meets the same error at its own fault.
    pub fn will_need(&self, offset: usize, len: usize) {
        if !self.advise(offset, len, MADV_POPULATE_READ) {
            self.advise(offset, len, libc::MADV_WILLNEED);
        }
    }

    /// Drops this process' pages of `len` bytes at `offset`: they stay in the page cache,
    /// and a later read maps them again with the same contents.
    ///
    /// A range of at least 2 MiB is released from the 2 MiB boundary at or below its
    /// start to the one at or below its end: releasing part of a 2 MiB mapping would
    /// split it into 4 KiB entries for good (a streamed unit of SmolLM2 is about 2 MiB,
    /// so nearly every huge page straddles two units), while units released in file order
    /// each release the huge page they share with the one before. What this keeps mapped
    /// is under 2 MiB past the range. Smaller ranges are released page by page.
    pub fn dont_need(&self, offset: usize, len: usize) {
        let (offset, len) = huge_page_release(offset, len);
        let _ = self.advise(offset, len, libc::MADV_DONTNEED);
    }

    /// `madvise` over the pages that hold `[offset, offset + len)`, clamped to the map;
    /// whether the kernel took it.
    fn advise(&self, offset: usize, len: usize, advice: libc::c_int) -> bool {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return true;
        }
        let start = offset - offset % page_size();
        // SAFETY: the range lies inside our read-only file mapping. WILLNEED only starts
        // reads; DONTNEED on a shared file mapping only unmaps this process' pages (a
        // later read faults the same bytes back in). Failure is harmless.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(
                self.ptr.add(start) as *mut libc::c_void,
                end - start,
                advice,
            ) == 0
        }
    }
}

impl std::ops::Deref for HugeMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives (or is a
        // dangling, well-aligned pointer for an empty file).
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr, self.len)
        }
    }
}

impl Drop for HugeMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly what `map` mapped.
            #[allow(unsafe_code)]
            unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            }
        }
    }
}

/// The range [`HugeMap::dont_need`] releases for `len` bytes at `offset`.
fn huge_page_release(offset: usize, len: usize) -> (usize, usize) {
    if len < HUGE_PAGE {
        return (offset, len);
    }
    let start = offset - offset % HUGE_PAGE;
    let end = offset.saturating_add(len);
    (start, end - end % HUGE_PAGE - start)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(1)
}

/// Writes `path`'s dirty pages to disk and drops its page cache, so that the first read
/// through a [`HugeMap`] fills the cache again in 2 MiB folios (a file just written holds
/// its cache in the small folios `write` made, which are mapped 4 KiB at a time until
/// they leave the cache). The cost is one read of the file from disk; errors are only
/// logged (the file stays as good as it was).
pub fn drop_written_pages(path: &Path) {
    let result = File::open(path).and_then(|file| {
        file.sync_data()?;
        // SAFETY: posix_fadvise has no memory-safety preconditions.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(rc))
        }
    });
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), "cannot drop the written pages: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write");
        (dir, File::open(&path).expect("open"))
    }

    #[test]
    fn the_map_reads_the_file_at_a_huge_page_aligned_address() {
        for len in [1, 4095, 4097, HUGE_PAGE + 12_345] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let (_dir, file) = file_with(&bytes);
            #[allow(unsafe_code)]
            let map = unsafe { HugeMap::map(&file) }.expect("map");
            assert_eq!(map.as_ptr() as usize % HUGE_PAGE, 0, "len {len}");
            assert_eq!(&map[..], &bytes[..], "len {len}");
            // Released pages read back the same bytes.
            map.dont_need(1, len);
            map.will_need(0, len);
            assert_eq!(&map[..], &bytes[..], "len {len} after release");
            // Ranges past the end are clamped, not an error or a crash.
            map.dont_need(len, 10);
            map.dont_need(len / 2, usize::MAX);
            assert_eq!(&map[..], &bytes[..], "len {len} after clamped release");
        }
    }

    #[test]
    fn large_releases_end_on_huge_page_boundaries_and_cover_every_page_once_in_order() {
        const MIB: usize = 1 << 20;
        assert_eq!(huge_page_release(5, 100), (5, 100), "small: as asked");
        assert_eq!(huge_page_release(3 * MIB, 2 * MIB), (2 * MIB, 2 * MIB));
        assert_eq!(huge_page_release(4 * MIB, 4 * MIB), (4 * MIB, 4 * MIB));
        // Consecutive units of 2.1 MiB released in order: every whole huge page before
        // the last unit's end is released by exactly one of them, and none is split.
        let unit = 2 * MIB + MIB / 10;
        let mut released = Vec::new();
        for i in 0..30 {
            let (start, len) = huge_page_release(i * unit, unit);
            assert_eq!((start % HUGE_PAGE, len % HUGE_PAGE), (0, 0), "unit {i}");
            released.extend((start..start + len).step_by(HUGE_PAGE));
        }
        let end = 30 * unit;
        let whole: Vec<usize> = (0..end - end % HUGE_PAGE).step_by(HUGE_PAGE).collect();
        assert_eq!(released, whole);
    }

    #[test]
    fn an_empty_file_maps_to_no_bytes() {
        let (_dir, file) = file_with(&[]);
        #[allow(unsafe_code)]
        let map = unsafe { HugeMap::map(&file) }.expect("map");
        assert!(map.is_empty());
        map.dont_need(0, 100);
    }

    #[test]
    fn dropping_the_written_pages_keeps_the_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        std::fs::write(&path, b"weights").expect("write");
        drop_written_pages(&path);
        drop_written_pages(&dir.path().join("missing")); // logged, not a panic
        assert_eq!(std::fs::read(&path).expect("read"), b"weights");
    }
}
