//! Manifests and indexes as the warm list, `POST /prefetch` and `wharf prefetch` walk them.
//!
//! Input: NUL-separated parts (JSON cannot contain a raw NUL): `platforms \0 top \0 child \0 child …`, where
//! `platforms` is a comma-separated `os/arch[/variant]` list (empty: the node's) and the children are served, in
//! order, for each manifest the walk asks for by digest. Input without a NUL is the top manifest alone.
//!
//! Checks: only JSON objects parse; platform matching agrees with the descriptor; the walk's plan starts with
//! the top manifest, names each manifest and blob once, takes blobs only from the manifests it read, and its
//! summary (the warm list's report) is computed without overflow.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::pin::pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use wharf::oci::manifest::{Descriptor, References};
use wharf::oci::{Digest, Reference};
use wharf::warm::{Error, Fetch, Report, resolve};

fuzz_target!(|data: &[u8]| {
    let mut parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let platforms: Vec<String> = if parts.len() > 1 {
        let first = String::from_utf8_lossy(parts.remove(0)).into_owned();
        first.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect()
    } else {
        Vec::new()
    };
    for part in &parts {
        check_references(part);
    }

    let fake =
        Fake { top: parts[0], children: Mutex::new(parts[1..].iter().copied().collect()), read: Mutex::default() };
    let result = ready(resolve(&fake, &Reference::Tag("latest".into()), &platforms));
    let report = Report::new("docker.io/library/fuzz:latest", &result);
    let Ok(plan) = result else { return };
    let read = fake.read.into_inner().unwrap();
    assert_eq!(plan.digest, Digest::sha256_of(parts[0]));
    assert_eq!(plan.manifests.first(), Some(&plan.digest));
    assert_eq!(plan.manifests.iter().collect::<HashSet<_>>().len(), plan.manifests.len());
    assert_eq!(plan.blobs.iter().map(|b| &b.digest).collect::<HashSet<_>>().len(), plan.blobs.len());
    let from_read: HashSet<&Digest> = read.iter().flat_map(|r| r.blobs().map(|b| &b.digest)).collect();
    assert!(plan.blobs.iter().all(|b| from_read.contains(&b.digest)));
    assert_eq!(plan.digests().len(), plan.manifests.len() + plan.blobs.len());
    assert!(report.ok && report.bytes == plan.total_bytes());
});

/// Parsing alone: only a JSON object is a manifest; platform matching agrees with the descriptor's fields.
fn check_references(bytes: &[u8]) {
    let Some(refs) = References::parse(bytes) else { return };
    assert_eq!(bytes.trim_ascii_start().first(), Some(&b'{'));
    assert_eq!(refs.blobs().count(), refs.config.iter().count() + refs.layers.len());
    for p in refs.manifests.iter().filter_map(|m| m.platform.as_ref()) {
        let fields = [Some(&p.os), Some(&p.architecture), p.variant.as_ref()];
        if fields.iter().flatten().any(|f| f.contains('/')) {
            continue;
        }
        let os_arch = format!("{}/{}", p.os, p.architecture);
        assert!(p.matches(&os_arch), "{p:?}");
        if let Some(v) = &p.variant {
            assert!(p.matches(&format!("{os_arch}/{v}")), "{p:?}");
            assert!(!p.matches(&format!("{os_arch}/{v}x")), "{p:?}");
        }
        assert!(!p.matches(&format!("{os_arch}x")), "{p:?}");
    }
}

/// Serves the top manifest for the tag and the children in order for digests, as a verified cache would:
/// under the digest asked for.
struct Fake<'a> {
    top: &'a [u8],
    children: Mutex<std::collections::VecDeque<&'a [u8]>>,
    read: Mutex<Vec<References>>,
}

impl Fetch for Fake<'_> {
    async fn manifest(&self, reference: &Reference) -> Result<(Digest, Bytes), Error> {
        let (digest, bytes) = match reference {
            Reference::Tag(_) => (Digest::sha256_of(self.top), self.top),
            Reference::Digest(d) => {
                let next = self.children.lock().unwrap().pop_front();
                (d.clone(), next.ok_or_else(|| Error::Cache("no such manifest".into()))?)
            }
        };
        if let Some(r) = References::parse(bytes) {
            self.read.lock().unwrap().push(r);
        }
        Ok((digest, Bytes::copy_from_slice(bytes)))
    }

    async fn blob(&self, blob: &Descriptor, progress: &(dyn Fn(u64) + Sync)) -> Result<u64, Error> {
        progress(blob.size);
        Ok(blob.size)
    }
}

/// The fake never waits, so one poll finishes the walk.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("the fake fetcher never waits"),
    }
}
