//! Required external tools: a missing tool fails the test with an install hint; tests never skip silently.

use std::path::PathBuf;

/// Returns the path of `bin`, or panics naming the Debian package that provides it.
pub fn require(bin: &str) -> PathBuf {
    let package = match bin {
        "docker-registry" => "docker-registry",
        "skopeo" => "skopeo",
        "containerd" | "ctr" => "containerd",
        "dnsmasq" => "dnsmasq-base",
        other => other,
    };
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join(bin);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{bin}` is required by this test: run `apt-get install {package}` (or `.ci/run`, which installs it)");
}
