//! containerd's config file and a registry's `hosts.toml`, as the tests and the bench's scenario 12 write them.
//! Free of the rest of the test harness: the bench includes this file with `#[path]`.

use std::path::Path;

/// A version-2 config with its root under `root` and its state (the gRPC socket) under `state`: the non-native
/// snapshotters, `opt` and tracing off, so it starts in well under a second and touches nothing on the host.
/// With `cri_hosts`, the CRI plugin is on (image service only: the native snapshotter, no CNI), resolving
/// registries through that hosts directory as a node's `config_path` does; without it, CRI is off too.
pub fn config_toml(root: &Path, state: &Path, cri_hosts: Option<&Path>) -> String {
    let (r, s) = (root.display(), state.display());
    let cri = cri_hosts.map(|hosts| {
        // No CNI configuration: containerd logs that pods cannot have networks, which images do not need.
        format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  \
             stream_server_port = \"0\"\n  enable_selinux = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"native\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{r}/cni/bin\"\n  conf_dir = \"{r}/cni/conf\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            hosts.display()
        )
    });
    let disabled = [
        "io.containerd.grpc.v1.cri",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.overlayfs",
        "io.containerd.internal.v1.opt",
        "io.containerd.internal.v1.tracing",
        "io.containerd.tracing.processor.v1.otlp",
    ];
    let disabled: String = disabled
        .iter()
        .filter(|p| cri.is_none() || **p != "io.containerd.grpc.v1.cri")
        .map(|p| format!("  \"{p}\",\n"))
        .collect();
    format!(
        "version = 2\nroot = \"{r}/root\"\nstate = \"{s}\"\ntemp = \"{r}/tmp\"\n\
         disabled_plugins = [\n{disabled}]\n\n\
         [grpc]\n  address = \"{s}/containerd.sock\"\n\n\
         [ttrpc]\n  address = \"{s}/containerd.ttrpc.sock\"\n\n\
         [debug]\n  address = \"\"\n  level = \"info\"\n{}",
        cri.unwrap_or_default()
    )
}

/// Writes `DIR/<registry>/hosts.toml` naming `url` (plain http) as the only pull and resolve host; `server`
/// points at 127.0.0.1:1, where nothing listens, so a pull can only succeed through `url`.
pub fn write_hosts_dir(dir: &Path, registry: &str, url: &str) {
    let d = dir.join(registry);
    std::fs::create_dir_all(&d).expect("create hosts dir");
    let toml =
        format!("server = \"http://127.0.0.1:1\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    std::fs::write(d.join("hosts.toml"), toml).expect("write hosts.toml");
}
