//! Blob bytes as page-cache mappings: chunks mapped (and populated off the async runtime) from a file, each
//! registered by address so the listener can send the same bytes again with `sendfile(2)` instead of
//! copying them. A leaf: the cache's fill and reader and the server's connection loop all use it, and it
//! uses none of them.
//!
//! Blob files are never truncated or rewritten (a fill appends; eviction unlinks), and callers map only
//! below a file's written prefix, so a mapped page always has data behind it.

use bytes::{Bytes, BytesMut};
use memmap2::{Advice, Mmap, MmapOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How the connection will send a body's chunks, which decides how they are prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Delivery {
    /// The chunks' bytes are read (copied into the socket or encrypted): each mapping is populated on the
    /// blocking pool first, so reading it never waits for the disk nor meets an I/O error as a SIGBUS.
    #[default]
    Read,
    /// The listener hands mapped chunks to `sendfile(2)` and never reads them (plain TCP; it inserts this
    /// into each request's extensions). Chunks whose pages are all in the page cache are mapped right away
    /// without being populated, which skips most of a chunk's cost (filling and then tearing down page tables
    /// for memory nobody reads); the others are populated as for `Read`, so sendfile does not wait for the
    /// disk either.
    SendFile,
}

/// Maps `len` bytes at `pos` and faults them in here, on the blocking pool: the runtime thread that later
/// copies them into the socket then neither waits for the disk nor meets an I/O error as a SIGBUS (a failed
/// populate is an error here). Falls back to a read on kernels without `MADV_POPULATE_READ` (before 5.14).
pub fn map_chunk(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    match map(file, pos, len)? {
        Some(map) => Ok(Bytes::from_owner(map)),
        None => read_exact_at(file, pos, len),
    }
}

/// [`map_chunk`] for a response body: the mapping is registered, so [`file_region`] finds its file.
pub fn map_to_send(file: &Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    match map(file, pos, len)? {
        Some(map) => Ok(register(map, file, pos)),
        None => read_exact_at(file, pos, len),
    }
}

/// A registered mapping of `pos..pos + len` that is not populated, if every page of it is in the page cache
/// now (`mincore(2)` answers from the page cache for a file mapping); `None` otherwise. Only for
/// [`Delivery::SendFile`]: it does no I/O, so it runs on the async runtime. Should something read such a
/// chunk after all, its pages fault in from the page cache.
///
/// `exact`: pages of this range may still be on their way from the disk (the file was not all in the page
/// cache when the response began, so the kernel's read-ahead behind `sendfile` is reading ahead of it).
/// `cachestat(2)` counts such a page as cached, and `sendfile` would wait for it on the async runtime (42 ms
/// was seen), so then `mincore(2)`, which counts only pages whose read has completed, decides.
pub fn map_resident(file: &Arc<File>, pos: u64, len: usize, exact: bool) -> io::Result<Option<Bytes>> {
    let cached = cached(file, pos, len)?;
    if cached == Some(false) {
        return Ok(None);
    }
    // SAFETY: as in `map`: read-only, and the file is never truncated below `pos + len`.
    let map = unsafe { MmapOptions::new().offset(pos).len(len).map(&**file)? };
    let resident = match cached {
        Some(yes) if !exact => yes,
        _ => resident(&map, page_size())?,
    };
    Ok(resident.then(|| register(map, file, pos)))
}

/// Whether every page of `pos..pos + len` of `file` is in the page cache (`false` where the kernel cannot
/// tell): one `cachestat(2)`, cheap enough for the start of every response.
pub fn all_cached(file: &File, pos: u64, len: u64) -> bool {
    usize::try_from(len).is_ok_and(|len| matches!(cached(file, pos, len), Ok(Some(true))))
}

/// `cachestat(2)` is 451 on every architecture (the unified syscall table); the libc crate does not name it
/// for x86_64 yet.
const SYS_CACHESTAT: libc::c_long = 451;
/// Cleared when the kernel lacks `cachestat` (before 6.5) or a seccomp filter refuses it.
static HAS_CACHESTAT: AtomicBool = AtomicBool::new(true);

/// Whether every page of `pos..pos + len` of `file` is in the page cache, by `cachestat(2)`: one walk of the
/// file's page cache, far cheaper than `mincore`'s lookup per page. `None` where the kernel cannot tell.
fn cached(file: &File, pos: u64, len: usize) -> io::Result<Option<bool>> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if !HAS_CACHESTAT.load(Ordering::Relaxed) || len == 0 {
        return Ok(None);
    }
    let range = Range { off: pos, len: len as u64 };
    let mut stat = Stat::default();
    // SAFETY: the descriptor is open, and both structs have the kernel's layout (five and two u64s).
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range, &mut stat, 0u32) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) => {
                HAS_CACHESTAT.store(false, Ordering::Relaxed);
                Ok(None)
            }
            _ => Err(e),
        };
    }
    let page = page_size() as u64;
    let pages = (pos + len as u64 - 1) / page - pos / page + 1;
    Ok(Some(stat.nr_cache >= pages))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// `mincore(2)` over a mapping: for a file mapping it answers from the page cache, one lookup per page.
fn resident(map: &Mmap, page: usize) -> io::Result<bool> {
    // The mapping itself starts at the page below the first byte (mmap offsets are page-aligned).
    let first = map.as_ptr() as usize & !(page - 1);
    let span = map.as_ptr() as usize + map.len() - first;
    let mut pages = vec![0u8; span.div_ceil(page)];
    // SAFETY: `first..first + span` lies within the live mapping, and `pages` has one byte per page of it.
    let rc = unsafe { libc::mincore(first as *mut libc::c_void, span, pages.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pages.iter().all(|p| p & 1 == 1))
}

fn register(map: Mmap, file: &Arc<File>, pos: u64) -> Bytes {
    let (start, len) = (map.as_ptr() as usize, map.len());
    REGIONS.lock().unwrap().insert(start, Region { len, file: file.clone(), pos });
    Bytes::from_owner(Registered(map))
}

/// A populated read-only mapping, or `None` where the kernel cannot populate one.
fn map(file: &File, pos: u64, len: usize) -> io::Result<Option<Mmap>> {
    // SAFETY: the mapping is read-only and the file is never truncated below `pos + len` (see the module doc),
    // so the memory stays valid and unchanged for as long as the `Bytes` lives.
    let map = unsafe { MmapOptions::new().offset(pos).len(len).map(file)? };
    match map.advise(Advice::PopulateRead) {
        Ok(()) => Ok(Some(map)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A mapped body chunk: where its bytes live in which file.
struct Region {
    len: usize,
    file: Arc<File>,
    pos: u64,
}

/// Live body mappings by start address. An entry lives exactly as long as its mapping (removed before the
/// unmap), so an address found here is never a stale or reused one.
static REGIONS: Mutex<BTreeMap<usize, Region>> = Mutex::new(BTreeMap::new());

struct Registered(Mmap);

impl AsRef<[u8]> for Registered {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        REGIONS.lock().unwrap().remove(&(self.0.as_ptr() as usize));
    }
}

/// When `bytes` (by address) lie inside a live body chunk: the file and the offset they were mapped from,
/// where the same bytes can be read again (with `sendfile(2)`). `None` for any other memory.
pub fn file_region(bytes: &[u8]) -> Option<(Arc<File>, u64)> {
    region_at(bytes.as_ptr() as usize, bytes.len())
}

pub(crate) fn region_at(addr: usize, len: usize) -> Option<(Arc<File>, u64)> {
    if len == 0 {
        return None;
    }
    let regions = REGIONS.lock().unwrap();
    let (&start, r) = regions.range(..=addr).next_back()?;
    (addr + len <= start + r.len).then(|| (r.file.clone(), r.pos + (addr - start) as u64))
}

fn read_exact_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], pos + filled as u64) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shorter than expected"));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cachestat_agrees_with_mincore() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 64 * 4096 + 100]).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        let check = |what: &str| {
            for (pos, len) in [(0u64, 4096usize), (5, 10 * 4096), (32 * 4096 + 1, 32 * 4096 + 99), (0, 64 * 4096 + 100)]
            {
                let map = unsafe { MmapOptions::new().offset(pos).len(len).map(&f).unwrap() };
                let by_mincore = resident(&map, page_size()).unwrap();
                if let Some(by_cachestat) = cached(&f, pos, len).unwrap() {
                    assert_eq!(by_cachestat, by_mincore, "{what}: {pos}+{len}");
                }
            }
        };
        check("written");
        // Clean pages of a disk file leave the page cache on request (tmpfs keeps them: both say resident).
        // SAFETY: plain advice on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 32 * 4096, 0, libc::POSIX_FADV_DONTNEED) };
        check("second half dropped");
    }
}
