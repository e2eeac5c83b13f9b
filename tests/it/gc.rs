//! Bounded disk: eviction keeps the cache within its budget, least recently used first, and never takes a
//! pinned blob or one being streamed. In process (the cache API directly) so the order of events is exact.

use crate::support::fake_upstream::{FakeUpstream, blob_path};
use std::sync::Arc;
use wharf::cache::Cache;
use wharf::config::{Config, Overrides};
use wharf::oci::{Digest, RepoName};
use wharf::upstream::RegistryClient;

const MIB: usize = 1 << 20;

struct Setup {
    cache: Cache,
    client: Arc<RegistryClient>,
    repo: RepoName,
    dir: tempfile::TempDir,
}

/// A cache with a 10 MiB budget and no minimum age (a pass goes down to the budget).
fn setup(fake: &FakeUpstream) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        upstreams: vec![("fake.test".into(), fake.url())],
        default_registry: Some("fake.test".into()),
        ..Default::default()
    };
    let mut config = Config::load(None, &overrides).unwrap();
    config.cache.max_bytes = 10 * MIB as u64;
    config.cache.min_age = 0;
    // Only the byte budget here: the host disk's fullness must not decide what these tests evict.
    config.cache.high_watermark = 100;
    config.cache.low_watermark = 100;
    let state = wharf::state::AppState::open(config, tokio_util::task::TaskTracker::new()).unwrap();
    let client = state.upstreams.get("fake.test").unwrap();
    Setup { cache: state.cache, client, repo: RepoName::parse("test/app").unwrap(), dir }
}

impl Setup {
    async fn pull(&self, digest: &str) {
        let d: Digest = digest.parse().unwrap();
        self.cache.ensure_blob(&self.client, &self.repo, &d).await.unwrap();
    }

    /// A read that counts as an access (the handle is dropped at once).
    async fn touch(&self, digest: &str) {
        let d: Digest = digest.parse().unwrap();
        self.cache.blob(&self.client, &self.repo, &d).await.unwrap();
    }

    fn cached(&self, digest: &str) -> bool {
        blob_path(self.dir.path(), digest).is_file()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_smaller_than_the_images_evicts_least_recently_used_first() {
    let fake = FakeUpstream::start().await;
    let (a, _) = fake.add_random_blob(4 * MIB);
    let (b, _) = fake.add_random_blob(4 * MIB);
    let (c, _) = fake.add_random_blob(4 * MIB);
    let s = setup(&fake);
    s.pull(&a).await;
    s.pull(&b).await;
    s.touch(&a).await; // b is now the least recently used
    s.pull(&c).await;
    assert!(
        s.cached(&a) && s.cached(&c),
        "recently used blobs kept: a={} b={} c={}",
        s.cached(&a),
        s.cached(&b),
        s.cached(&c)
    );
    assert!(!s.cached(&b), "the least recently used blob is evicted");
    let usage = s.cache.usage();
    assert!(usage.blob_bytes <= 10 * MIB as u64, "over budget: {usage:?}");
    assert_eq!(usage.blob_bytes, 8 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_minimum_age_even_blobs_used_this_millisecond_can_go() {
    let fake = FakeUpstream::start().await;
    let (a, _) = fake.add_random_blob(4 * MIB);
    let (b, _) = fake.add_random_blob(4 * MIB);
    let (c, _) = fake.add_random_blob(4 * MIB);
    let s = setup(&fake);
    s.pull(&a).await;
    s.pull(&b).await;
    // Access stamps are strictly increasing: a burst of reads runs them ahead of the wall clock.
    for _ in 0..2000 {
        s.touch(&b).await;
    }
    s.touch(&a).await;
    s.pull(&c).await;
    assert!(!s.cached(&b), "b, the least recently used, was kept (the pass stopped at a stamp ahead of the clock)");
    assert!(s.cached(&a) && s.cached(&c));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_blob_survives_and_the_next_one_goes() {
    let fake = FakeUpstream::start().await;
    let (a, _) = fake.add_random_blob(4 * MIB);
    let (b, _) = fake.add_random_blob(4 * MIB);
    let (c, _) = fake.add_random_blob(4 * MIB);
    let s = setup(&fake);
    s.pull(&a).await;
    s.pull(&b).await;
    s.cache.set_pins("docker.io/library/keep:1", &[a.parse().unwrap()]).unwrap();
    s.pull(&c).await;
    assert!(s.cached(&a), "pinned blob evicted");
    assert!(!s.cached(&b), "the oldest unpinned blob should have gone");
    assert!(s.cache.usage().blob_bytes <= 10 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_being_streamed_is_not_evicted_mid_response() {
    let fake = FakeUpstream::start().await;
    let (a, data_a) = fake.add_random_blob(4 * MIB);
    let (b, _) = fake.add_random_blob(4 * MIB);
    let (c, _) = fake.add_random_blob(4 * MIB);
    let s = setup(&fake);
    s.pull(&a).await;
    s.pull(&b).await;
    // A response for `a` starts (its handle holds the serve guard), then `b` is read more recently.
    let (handle, _) = s.cache.blob(&s.client, &s.repo, &a.parse().unwrap()).await.unwrap();
    s.touch(&b).await;
    s.pull(&c).await;
    assert!(s.cached(&a), "the blob being streamed was evicted");
    assert!(!s.cached(&b), "with `a` in use, `b` is the one to go");
    // The response still delivers every byte.
    use futures_util::TryStreamExt;
    let body: Vec<u8> = wharf::cache::reader::body(handle.source, 0, data_a.len() as u64, Default::default())
        .try_fold(Vec::new(), |mut v, c| async move {
            v.extend_from_slice(&c);
            Ok(v)
        })
        .await
        .unwrap();
    assert!(body == data_a);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_larger_than_the_budget_is_served_but_not_kept() {
    let fake = FakeUpstream::start().await;
    let (big, _) = fake.add_random_blob(12 * MIB);
    let s = setup(&fake);
    s.pull(&big).await;
    assert!(!s.cached(&big), "a blob over the budget was committed");
    assert_eq!(s.cache.usage().blob_bytes, 0);
    assert_eq!(std::fs::read_dir(s.dir.path().join("tmp")).unwrap().count(), 0, "temporary file left behind");
}
