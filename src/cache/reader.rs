//! Blob bodies: a byte range of a committed file, or of a growing one that follows its fill.
//! From a growing file the last byte is held back until the fill is verified, so no client ever completes
//! a response whose bytes turned out wrong: it sees a broken connection instead.
//!
//! Each chunk is a read-only `mmap` of the file's page cache handed to hyper as `Bytes`, so the only copy is
//! the one into the socket, and chunks are registered by address so that the listener can skip even that
//! copy with `sendfile(2)` on plain TCP ([`crate::pages::file_region`]); such chunks are not even populated when their
//! pages are already in the page cache ([`Delivery::SendFile`]). Blob files are never truncated or rewritten (a
//! fill appends; eviction unlinks), and every chunk lies below the written prefix, so a mapped page always
//! has data behind it, and the file holds the same bytes at the same offsets.

use super::fill::{Fill, FillState};
pub use crate::pages::Delivery;
use crate::pages::{all_cached, map_resident, map_to_send};
use bytes::Bytes;
use futures_util::Stream;
use std::fs::File;
use std::io;
use std::sync::Arc;
use tokio::sync::watch;

/// Large chunks keep per-chunk overhead (syscalls, task hand-offs, HTTP/2 frames) small next to the bytes moved.
/// Resident memory is about two chunks per connection (one queued in hyper, one being prepared).
const CHUNK: u64 = 1024 * 1024;

/// Chunks for [`Delivery::SendFile`] that need no populating: their pages are never touched, so they add
/// nothing to resident memory, and larger ones spread the cost of `mmap`/`munmap` over more bytes.
const SEND_CHUNK: u64 = 8 * CHUNK;

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
    /// Residency is checked page by page ([`map_resident`]'s `exact`): set for a committed file not all in
    /// the page cache when the response began (decided at the first chunk sent with sendfile). A growing
    /// file's pages were just written, so they are never still being read.
    exact: Option<bool>,
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
        Source::Committed(file) => {
            State { file, delivery, fill: None, progress: None, direct: None, pos: start, end, exact: None }
        }
        Source::Filling(fill) => State {
            file: fill.file.clone(),
            delivery,
            progress: Some(fill.subscribe()),
            fill: Some(fill),
            direct: None,
            pos: start,
            end,
            exact: Some(false),
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
                Delivery::SendFile => {
                    let (file, pos, end) = (&st.file, st.pos, st.end);
                    let exact = *st.exact.get_or_insert_with(|| !all_cached(file, pos, end - pos));
                    map_resident(&st.file, st.pos, (limit - st.pos).min(SEND_CHUNK) as usize, exact)?
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Error;
    use crate::oci::Digest;
    use crate::pages::{file_region, region_at};
    use futures_util::StreamExt;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

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

    #[tokio::test]
    async fn committed_ranges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let f = Arc::new(File::open(dir.path().join("f")).unwrap());
        let got: Vec<_> = body(Source::Committed(f), 2, 7, Delivery::Read).collect().await;
        assert_eq!(got.into_iter().map(Result::unwrap).collect::<Vec<_>>().concat(), b"23456");
    }
}
