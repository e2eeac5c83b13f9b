//! Blob bodies: a byte range of a committed file, or of a growing one that follows its fill.
//! From a growing file the last byte is held back until the fill is verified, so no client ever completes
//! a response whose bytes turned out wrong: it sees a broken connection instead.
//!
//! Each chunk is a read-only `mmap` of the file's page cache handed to hyper as `Bytes`, so the only copy is
//! the one into the socket, and chunks are registered by address so that the listener can skip even that
//! copy with `sendfile(2)` on plain TCP ([`file_region`]); such chunks are not even populated when their
//! pages are already in the page cache ([`Delivery::SendFile`]). Blob files are never truncated or rewritten (a
//! fill appends; eviction unlinks), and every chunk lies below the written prefix, so a mapped page always
//! has data behind it, and the file holds the same bytes at the same offsets.

use super::fill::{Fill, FillState};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use memmap2::{Advice, Mmap, MmapOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Large chunks keep per-chunk overhead (syscalls, task hand-offs, HTTP/2 frames) small next to the bytes moved.
/// Resident memory is about two chunks per connection (one queued in hyper, one being prepared).
const CHUNK: u64 = 1024 * 1024;

/// Chunks for [`Delivery::SendFile`] that need no populating: their pages are never touched, so they add
/// nothing to resident memory, and larger ones spread the cost of `mmap`/`munmap` over more bytes.
const SEND_CHUNK: u64 = 8 * CHUNK;

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

/// Where a body's bytes come from.
pub enum Source {
    /// A committed, verified file.
    Committed(Arc<File>),
    /// A file still being written by a fill.
    Filling(Arc<Fill>),
}

struct State {
    file: Arc<File>,
    delivery: Delivery,
    fill: Option<Arc<Fill>>,
    progress: Option<watch::Receiver<FillState>>,
    /// Set once a fill abandoned caching: the rest comes straight from the upstream.
    direct: Option<Direct>,
    pos: u64,
    end: u64,
}

struct Direct {
    body: futures_util::stream::BoxStream<'static, Result<Bytes, crate::upstream::Error>>,
    /// Bytes still to drop from the front (an upstream that ignored the range sent the whole blob).
    skip: u64,
}

/// How far a reader of a growing file may go.
enum Limit {
    /// Up to this offset, from the file.
    File(u64),
    /// The fill abandoned caching; continue from the upstream.
    Direct,
}

/// Streams `start..end` of the source in large reads on the blocking pool.
pub fn body(
    source: Source,
    start: u64,
    end: u64,
    delivery: Delivery,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = match source {
        Source::Committed(file) => State { file, delivery, fill: None, progress: None, direct: None, pos: start, end },
        Source::Filling(fill) => State {
            file: fill.file.clone(),
            delivery,
            progress: Some(fill.subscribe()),
            fill: Some(fill),
            direct: None,
            pos: start,
            end,
        },
    };
    futures_util::stream::try_unfold(state, |mut st| async move {
        loop {
            if st.pos >= st.end {
                return Ok(None);
            }
            if let Some(direct) = &mut st.direct {
                let chunk = next_direct(direct, st.end - st.pos).await?;
                st.pos += chunk.len() as u64;
                return Ok(Some((chunk, st)));
            }
            let limit = match &mut st.progress {
                None => st.end,
                Some(rx) => match readable_limit(rx, st.pos, st.end).await? {
                    Limit::File(limit) => limit,
                    Limit::Direct => {
                        let fill = st.fill.as_ref().expect("a growing file has a fill");
                        st.direct = Some(open_direct(fill, st.pos, st.end).await?);
                        continue;
                    }
                },
            };
            let resident = match st.delivery {
                Delivery::SendFile => map_resident(&st.file, st.pos, (limit - st.pos).min(SEND_CHUNK) as usize)?,
                Delivery::Read => None,
            };
            let want = (limit - st.pos).min(CHUNK) as usize;
            let chunk = match resident {
                Some(chunk) => chunk,
                None => {
                    let (file, pos) = (st.file.clone(), st.pos);
                    tokio::task::spawn_blocking(move || map_to_send(&file, pos, want))
                        .await
                        .map_err(io::Error::other)??
                }
            };
            st.pos += chunk.len() as u64;
            return Ok(Some((chunk, st)));
        }
    })
}

/// Asks the fill's upstream for `pos..end` (these bytes are not verified by wharf; the client checks the
/// digest as always).
async fn open_direct(fill: &Fill, pos: u64, end: u64) -> io::Result<Direct> {
    let (client, repo) = fill.origin().ok_or_else(|| io::Error::other("fill has no origin"))?;
    let blob = client.get_blob(repo, &fill.digest, Some((pos, end - 1))).await.map_err(io::Error::other)?;
    let skip = if blob.partial.is_some() { 0 } else { pos };
    Ok(Direct { body: blob.body, skip })
}

async fn next_direct(direct: &mut Direct, remaining: u64) -> io::Result<Bytes> {
    use futures_util::StreamExt;
    loop {
        let Some(chunk) = direct.body.next().await else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "upstream ended early"));
        };
        let mut chunk = chunk.map_err(io::Error::other)?;
        if direct.skip >= chunk.len() as u64 {
            direct.skip -= chunk.len() as u64;
            continue;
        }
        let skip = std::mem::take(&mut direct.skip) as usize;
        chunk = chunk.slice(skip..);
        chunk.truncate(remaining.min(chunk.len() as u64) as usize);
        return Ok(chunk);
    }
}

/// Waits until bytes at `pos` may be sent and returns how far: up to what was written, but short of `end`
/// until the fill is verified.
async fn readable_limit(rx: &mut watch::Receiver<FillState>, pos: u64, end: u64) -> io::Result<Limit> {
    loop {
        let limit = match &*rx.borrow_and_update() {
            FillState::Failed(e) => return Err(io::Error::other(format!("fill failed: {e}"))),
            FillState::Uncached { .. } => return Ok(Limit::Direct),
            FillState::Done { size } if *size < end => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than the range"));
            }
            FillState::Done { .. } => end,
            FillState::Streaming { written, .. } => (*written).min(end - 1),
            FillState::Starting => pos,
        };
        if limit > pos {
            return Ok(Limit::File(limit));
        }
        rx.changed().await.map_err(|_| io::Error::other("fill vanished"))?;
    }
}

/// Maps `len` bytes at `pos` and faults them in here, on the blocking pool: the runtime thread that later
/// copies them into the socket then neither waits for the disk nor meets an I/O error as a SIGBUS (a failed
/// populate is an error here). Falls back to a read on kernels without `MADV_POPULATE_READ` (before 5.14).
pub(super) fn map_chunk(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    match map(file, pos, len)? {
        Some(map) => Ok(Bytes::from_owner(map)),
        None => read_exact_at(file, pos, len),
    }
}

/// [`map_chunk`] for a response body: the mapping is registered, so [`file_region`] finds its file.
fn map_to_send(file: &Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    match map(file, pos, len)? {
        Some(map) => Ok(register(map, file, pos)),
        None => read_exact_at(file, pos, len),
    }
}

/// A registered mapping of `pos..pos + len` that is not populated, if every page of it is in the page cache
/// now (`mincore(2)` answers from the page cache for a file mapping); `None` otherwise. Only for
/// [`Delivery::SendFile`]: it does no I/O, so it runs on the async runtime. Should something read such a
/// chunk after all, its pages fault in from the page cache.
fn map_resident(file: &Arc<File>, pos: u64, len: usize) -> io::Result<Option<Bytes>> {
    let cached = cached(file, pos, len)?;
    if cached == Some(false) {
        return Ok(None);
    }
    // SAFETY: as in `map`: read-only, and the file is never truncated below `pos + len`.
    let map = unsafe { MmapOptions::new().offset(pos).len(len).map(&**file)? };
    let resident = match cached {
        Some(yes) => yes,
        None => resident(&map, page_size())?,
    };
    Ok(resident.then(|| register(map, file, pos)))
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

fn region_at(addr: usize, len: usize) -> Option<(Arc<File>, u64)> {
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
    use crate::cache::Error;
    use crate::oci::Digest;
    use futures_util::StreamExt;
    use std::io::Write;

    fn fill_in(dir: &std::path::Path) -> Arc<Fill> {
        let f =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("t")).unwrap();
        Arc::new(Fill::new(Digest::sha256_of(b"0123456789"), Arc::new(f)))
    }

    #[tokio::test]
    async fn follows_a_growing_file_and_holds_the_last_byte_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let fill = fill_in(dir.path());
        let fill_state = fill.clone();
        let mut s = Box::pin(body(Source::Filling(fill.clone()), 0, 10, Delivery::Read));
        (&*fill.file).write_all(b"01234").unwrap();
        fill_state.state_for_test(FillState::Streaming { written: 5, total: Some(10) });
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"01234"));
        (&*fill.file).write_all(b"56789").unwrap();
        fill_state.state_for_test(FillState::Streaming { written: 10, total: Some(10) });
        assert_eq!(s.next().await.unwrap().unwrap(), Bytes::from_static(b"5678"));
        let next = tokio::spawn(async move { s.next().await.map(|r| r.unwrap()) });
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "the last byte must wait for verification");
        fill_state.done(10);
        assert_eq!(next.await.unwrap().unwrap(), Bytes::from_static(b"9"));
    }

    #[tokio::test]
    async fn a_failed_fill_ends_readers_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let fill = fill_in(dir.path());
        (&*fill.file).write_all(b"0123456789").unwrap();
        fill.state_for_test(FillState::Streaming { written: 10, total: Some(10) });
        let mut s = Box::pin(body(Source::Filling(fill.clone()), 0, 10, Delivery::Read));
        assert_eq!(s.next().await.unwrap().unwrap().len(), 9);
        fill.fail(Error::SizeMismatch { announced: 10, received: 11 });
        assert!(s.next().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn body_chunks_know_their_file_region() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * CHUNK as usize).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let f = Arc::new(File::open(dir.path().join("f")).unwrap());
        for delivery in [Delivery::Read, Delivery::SendFile] {
            let chunks: Vec<Bytes> =
                body(Source::Committed(f.clone()), 5, 3 * CHUNK, delivery).map(Result::unwrap).collect().await;
            assert_eq!(chunks.concat(), &data[5..], "{delivery:?}");
            let mut pos = 5u64;
            for c in &chunks {
                let (file, at) = file_region(&c[10..20]).expect("a body chunk is a registered mapping");
                assert_eq!(at, pos + 10);
                let mut back = [0u8; 10];
                file.read_exact_at(&mut back, at).unwrap();
                assert_eq!(&back[..], &c[10..20], "the region names the bytes' own place in the file");
                pos += c.len() as u64;
            }
            let addr = chunks[0].as_ptr() as usize;
            drop(chunks);
            assert!(region_at(addr, 1).is_none(), "a dropped chunk stays registered");
        }
        assert!(file_region(b"not a mapping").is_none());
    }

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

    #[tokio::test]
    async fn committed_ranges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let f = Arc::new(File::open(dir.path().join("f")).unwrap());
        let got: Vec<_> = body(Source::Committed(f), 2, 7, Delivery::Read).collect().await;
        assert_eq!(got.into_iter().map(Result::unwrap).collect::<Vec<_>>().concat(), b"23456");
    }
}
