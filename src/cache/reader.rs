//! Blob bodies: a byte range of a committed file, or of a growing one that follows its fill.
//! From a growing file the last byte is held back until the fill is verified, so no client ever completes
//! a response whose bytes turned out wrong: it sees a broken connection instead.

use super::fill::{Fill, FillState};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::watch;

/// Large reads keep per-chunk overhead (syscalls, task hand-offs, frames) small: see clients-and-limits.md §5b.
const CHUNK: u64 = 1024 * 1024;

/// Where a body's bytes come from.
pub enum Source {
    /// A committed, verified file.
    Committed(Arc<File>),
    /// A file still being written by a fill.
    Filling(Arc<Fill>),
}

struct State {
    file: Arc<File>,
    progress: Option<watch::Receiver<FillState>>,
    pos: u64,
    end: u64,
}

/// Streams `start..end` of the source in large reads on the blocking pool.
pub fn body(source: Source, start: u64, end: u64) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = match source {
        Source::Committed(file) => State { file, progress: None, pos: start, end },
        Source::Filling(fill) => State { file: fill.file.clone(), progress: Some(fill.subscribe()), pos: start, end },
    };
    futures_util::stream::try_unfold(state, |mut st| async move {
        if st.pos >= st.end {
            return Ok(None);
        }
        let limit = match &mut st.progress {
            None => st.end,
            Some(rx) => readable_limit(rx, st.pos, st.end).await?,
        };
        let want = (limit - st.pos).min(CHUNK) as usize;
        let (file, pos) = (st.file.clone(), st.pos);
        let chunk =
            tokio::task::spawn_blocking(move || read_exact_at(&file, pos, want)).await.map_err(io::Error::other)??;
        st.pos += chunk.len() as u64;
        Ok(Some((chunk, st)))
    })
}

/// Waits until bytes at `pos` may be sent and returns how far: up to what was written, but short of `end`
/// until the fill is verified.
async fn readable_limit(rx: &mut watch::Receiver<FillState>, pos: u64, end: u64) -> io::Result<u64> {
    loop {
        let limit = match &*rx.borrow_and_update() {
            FillState::Failed(e) => return Err(io::Error::other(format!("fill failed: {e}"))),
            FillState::Done { size } if *size < end => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than the range"));
            }
            FillState::Done { .. } => end,
            FillState::Streaming { written, .. } => (*written).min(end - 1),
            FillState::Starting => pos,
        };
        if limit > pos {
            return Ok(limit);
        }
        rx.changed().await.map_err(|_| io::Error::other("fill vanished"))?;
    }
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
        let mut s = Box::pin(body(Source::Filling(fill.clone()), 0, 10));
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
        let mut s = Box::pin(body(Source::Filling(fill.clone()), 0, 10));
        assert_eq!(s.next().await.unwrap().unwrap().len(), 9);
        fill.fail(Error::SizeMismatch { announced: 10, received: 11 });
        assert!(s.next().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn committed_ranges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let f = Arc::new(File::open(dir.path().join("f")).unwrap());
        let got: Vec<_> = body(Source::Committed(f), 2, 7).collect().await;
        assert_eq!(got.into_iter().map(Result::unwrap).collect::<Vec<_>>().concat(), b"23456");
    }
}
