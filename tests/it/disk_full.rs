//! ENOSPC during a fill, on a real small filesystem (a 6 MiB tmpfs): the client still gets every byte, the
//! partial file is removed, the error is logged and counted, and wharf keeps serving.

use crate::support::fake_upstream::{FakeUpstream, blob_path, client, get_ok, wait_until};
use crate::support::wharf::Wharf;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: usize = 1 << 20;

/// A tmpfs mounted for the test, unmounted on drop. Needs root (CI runs as root); fails loudly otherwise.
struct SmallFs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: usize) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs failed: this test needs root (it runs as root in CI)");
        SmallFs { path, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_during_a_fill_still_serves_the_client_and_leaves_nothing() {
    let fs = SmallFs::mount(6);
    let fake = FakeUpstream::start().await;
    let (big, data) = fake.add_random_blob(10 * MIB);
    let (small, small_data) = fake.add_random_blob(MIB / 2);
    let data_dir = fs.path.join("data");
    let wharf = Wharf::start(&data_dir, &fake.wharf_args());
    let c = client();

    get_ok(&c, &format!("{}/v2/test/app/blobs/{big}", wharf.url()), &data).await;
    assert!(!blob_path(&data_dir, &big).exists(), "a blob that did not fit was committed");
    wait_until("the partial file is removed", || files_under(&data_dir.join("tmp")).is_empty()).await;
    assert!(wharf.log().contains("disk full during a fill"), "not logged:\n{}", wharf.log());
    let metrics = c.get(format!("{}/metrics", wharf.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("wharf_uncached_blobs_total{reason=\"disk_full\"} 1"), "{metrics}");

    // Still serving, and still caching what fits.
    get_ok(&c, &format!("{}/v2/test/app/blobs/{small}", wharf.url()), &small_data).await;
    assert!(blob_path(&data_dir, &small).is_file());
    get_ok(&c, &format!("{}/v2/test/app/blobs/{big}", wharf.url()), &data).await;
}
