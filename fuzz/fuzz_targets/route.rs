//! Routing a request to an upstream: containerd's `ns` query parameter, a registry path prefix, or the default.
//! Input: the query string on the first line, the path after `/v2/` on the second.
//!
//! Checks: only configured registries are ever chosen (an unknown `ns` is refused, and so is an unknown
//! host-like first path component: Docker's rule makes it a registry host; any other first component is part of
//! the name); the registry is the one `ns` or the path prefix names, else the default; the
//! upstream name is the path's name (minus the registry prefix, plus `library/` on Docker Hub) and is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use wharf::api::ns_param;
use wharf::api::path::{Endpoint, parse};
use wharf::config::{Config, Overrides};
use wharf::oci::RepoName;
use wharf::upstream::{RouteError, Upstreams, is_host_like};

fn upstreams() -> &'static Upstreams {
    static UPSTREAMS: OnceLock<Upstreams> = OnceLock::new();
    UPSTREAMS.get_or_init(|| {
        // The built-in registries plus one with a port, as `--upstream` adds it.
        let o = Overrides {
            upstreams: vec![("myreg.example:5000".into(), "http://127.0.0.1:1".into())],
            ..Default::default()
        };
        Upstreams::from_config(&Config::load(None, &o).unwrap(), Arc::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (query, path) = s.split_once('\n').unwrap_or(("", s));
    let ns = ns_param(query);
    let name = match parse(path) {
        Ok(Endpoint::Manifest(n, _) | Endpoint::Blob(n, _) | Endpoint::Referrers(n, _) | Endpoint::TagsList(n)) => n,
        // Still route the raw path: the warm list and the admin API route names that came from no URL.
        Ok(Endpoint::Upload) | Err(_) => path,
    };
    let u = upstreams();
    let result = u.route(ns.as_deref(), name);
    let (first, rest) = name.split_once('/').map_or((name, None), |(f, r)| (f, Some(r)));
    let (client, repo) = match result {
        Ok(ok) => ok,
        Err(RouteError::UnknownRegistry(_)) => {
            // An unconfigured `ns`, or (no `ns`) a host-like first component that is not a configured registry.
            let unknown_ns = ns.as_deref().is_some_and(|ns| u.get(ns).is_none());
            let unknown_host = ns.is_none() && rest.is_some() && is_host_like(first) && u.get(first).is_none();
            assert!(unknown_ns || unknown_host, "{ns:?} {name:?}");
            return;
        }
        Err(RouteError::ForeignName(n)) => {
            // Docker Hub's repository names hold no host-like component.
            let (component, _) = n.split_once('/').expect("a component before a slash");
            assert!(is_host_like(component), "{ns:?} {name:?}");
            return;
        }
        Err(RouteError::Name(_)) => return,
    };
    assert!(u.get(&client.name).is_some_and(|c| Arc::ptr_eq(&c, &client)));
    let upstream_name = match ns.as_deref() {
        Some(ns) => {
            let reg = u.get(ns).expect("an ns that routed is configured");
            assert!(Arc::ptr_eq(&reg, &client), "{ns:?} went to {}", client.name);
            match rest {
                Some(r) if u.get(first).is_some_and(|c| Arc::ptr_eq(&c, &client)) => r,
                _ => name,
            }
        }
        None => match (u.get(first), rest) {
            (Some(reg), Some(r)) => {
                assert!(Arc::ptr_eq(&reg, &client), "{name:?} went to {}", client.name);
                r
            }
            _ => {
                assert_eq!(client.name, "docker.io", "{name:?}");
                assert!(rest.is_none() || !is_host_like(first), "{name:?}: a host-like prefix went to the default");
                name
            }
        },
    };
    if client.name == "docker.io"
        && let Some((component, _)) = upstream_name.split_once('/')
    {
        assert!(!is_host_like(component), "{name:?}: a host-like component went to Docker Hub");
    }
    if client.name == "docker.io" && !upstream_name.contains('/') {
        assert_eq!(repo.as_str(), format!("library/{upstream_name}"));
    } else {
        assert_eq!(repo.as_str(), upstream_name);
    }
    assert_eq!(RepoName::parse(repo.as_str()).as_ref(), Ok(&repo), "{name:?}");
});
