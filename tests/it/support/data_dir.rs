//! What a data directory may hold: verified blobs and manifests, sled's metadata, and temporary files only
//! while no wharf runs on it.

use super::images::{sha256, sha256_file};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Audits the data directory: every file under `blobs/` and `manifests/` must hash to its name (`verified`
/// remembers files already hashed, by path and size), `meta/` is sled's, and `tmp/` must be empty unless
/// `allow_tmp`. Returns the number of temporary files found.
pub fn audit(data: &Path, allow_tmp: bool, verified: &mut HashMap<PathBuf, u64>) -> usize {
    let mut tmp = 0;
    let mut todo = vec![data.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let (path, meta) = (entry.path(), entry.metadata().unwrap());
            let rel = path.strip_prefix(data).unwrap().to_path_buf();
            let top = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
            if meta.is_dir() {
                if top != "meta" {
                    todo.push(path);
                }
                continue;
            }
            match top.as_str() {
                "tmp" => {
                    assert!(allow_tmp, "temporary file {} survived a start-up or a clean shutdown", rel.display());
                    tmp += 1;
                }
                "blobs" | "manifests" => {
                    if verified.get(&path) == Some(&meta.len()) {
                        continue;
                    }
                    let name = format!("sha256:{}", path.file_name().unwrap().to_string_lossy());
                    let bytes_hash = if top == "blobs" {
                        sha256_file(&path)
                    } else {
                        // "<media type>\n<exact bytes>"
                        let raw = std::fs::read(&path).unwrap();
                        let nl = raw.iter().position(|b| *b == b'\n').expect("manifest file has a type line");
                        sha256(&raw[nl + 1..])
                    };
                    assert_eq!(bytes_hash, name, "{} holds bytes of another digest (or a partial file)", rel.display());
                    verified.insert(path, meta.len());
                }
                _ => panic!("unexpected file in the data directory: {}", rel.display()),
            }
        }
    }
    tmp
}

/// Total size of the files under `DATA/blobs`.
pub fn blob_bytes(data: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![data.join("blobs")];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}
