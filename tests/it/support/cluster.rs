//! Several wharf instances on loopback addresses (127.0.0.2 and up bind with no setup), each with its own
//! data directory and peer listener, sharing one peer key.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::wharf::Wharf;
use std::path::{Path, PathBuf};

/// The shared peer key the tests' clusters use.
pub const KEY: &str = "wharf-integration-test-peer-key-0123456789";

/// One node: the process and its peer address (`ip:port`, also its id).
pub struct Node {
    pub wharf: Wharf,
    pub peer: String,
    pub ip: String,
}

impl Node {
    /// `http://ADDR` of the client API.
    pub fn url(&self) -> String {
        self.wharf.url()
    }
}

/// A free TCP port on `ip` (bound and released; the tests' peers bind it right after).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).expect("bind a loopback address").local_addr().unwrap().port()
}

/// Writes the key file into `dir`.
pub fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("peer-keys");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    path
}

/// Peer addresses for `n` nodes on 127.0.0.2, .3, … with free ports.
pub fn addresses(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let ip = format!("127.0.0.{}", i + 2);
            let port = free_port(&ip);
            format!("{ip}:{port}")
        })
        .collect()
}

/// The flags that make a node of a cluster: its peer listener, the static peer list, the key.
pub fn peer_args(peer: &str, peers: &[String], key_file: &Path) -> Vec<String> {
    vec![
        "--peer-listen".into(),
        peer.into(),
        "--peers".into(),
        peers.join(","),
        "--peer-key-file".into(),
        key_file.display().to_string(),
    ]
}

/// Starts a node at `peer` (its client API on the same address, port 0) with `args` added.
pub fn start_node(peer: &str, data_dir: &Path, args: &[String]) -> Node {
    let ip = peer.rsplit_once(':').unwrap().0.to_owned();
    let wharf = Wharf::start_at(&format!("{ip}:0"), data_dir, args);
    Node { wharf, peer: peer.to_owned(), ip }
}

/// A cluster of `n` nodes that all list each other; `args` (upstreams, limits) go to every node.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub peers: Vec<String>,
    pub key_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes (or `n` independent instances when `clustered` is false, for comparison).
    pub fn start(n: usize, args: &[String], clustered: bool) -> Cluster {
        let dir = tempfile::Builder::new().prefix("wharf-cluster-").tempdir().unwrap();
        let key_file = key_file(dir.path());
        let peers = addresses(n);
        let nodes = peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                let data = dir.path().join(format!("node{i}"));
                let mut all = args.to_vec();
                if clustered {
                    all.extend(peer_args(peer, &peers, &key_file));
                }
                start_node(peer, &data, &all)
            })
            .collect();
        Cluster { nodes, peers, key_file, dir }
    }

    /// The node that owns `key` (a digest, or `<registry>/<repo>:<tag>`) when every node is up.
    pub fn owner(&self, key: &str) -> usize {
        let owner = owner_of(&self.peers, key);
        self.peers.iter().position(|p| *p == owner).unwrap()
    }

    /// Node indexes in the order `key` ranks them (owner first).
    pub fn ranking(&self, key: &str) -> Vec<usize> {
        wharf::cluster::hrw::rank(self.peers.iter().map(String::as_str), key)
            .into_iter()
            .map(|p| self.peers.iter().position(|q| q == p).unwrap())
            .collect()
    }
}

/// The owner of `key` among `peers`, as every wharf computes it.
pub fn owner_of(peers: &[String], key: &str) -> String {
    wharf::cluster::hrw::rank(peers.iter().map(String::as_str), key)[0].to_owned()
}
