//! Image references (`[registry/]name[:tag][@digest]`) from the warm list, `wharf prefetch` and the admin API's
//! `POST /prefetch` and `DELETE /images/…`. A split image written back as `name:tag` or `name@digest` splits to
//! the same parts; a routed image names a configured registry and a valid repository; a tag, even one a digest
//! overrides, is a valid tag.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use wharf::config::Config;
use wharf::oci::{Reference, RepoName};
use wharf::upstream::Upstreams;
use wharf::warm::{split_image, target};

fn upstreams() -> &'static Upstreams {
    static UPSTREAMS: OnceLock<Upstreams> = OnceLock::new();
    UPSTREAMS.get_or_init(|| Upstreams::from_config(&Config::default(), Arc::default()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Ok(image) = std::str::from_utf8(data) else { return };
    let Ok((name, reference)) = split_image(image) else {
        assert!(target(upstreams(), image).is_err());
        return;
    };
    assert!(!name.is_empty() && !name.contains('@'), "{image:?}");
    // A `:` in the last component is a tag separator when written back; such a name is invalid anyway.
    if name.rsplit('/').next().unwrap().contains(':') {
        assert!(target(upstreams(), image).is_err(), "{image:?}");
        return;
    }
    if let Some((_, tag)) = image.split('@').next().unwrap().rsplit('/').next().unwrap().rsplit_once(':') {
        assert!(matches!(Reference::parse(tag), Ok(Reference::Tag(_))), "{image:?}");
    }
    let again = match &reference {
        Reference::Tag(t) => format!("{name}:{t}"),
        Reference::Digest(d) => format!("{name}@{d}"),
    };
    assert_eq!(split_image(&again).unwrap(), (name, reference.clone()), "{image:?} -> {again:?}");
    if let Ok(t) = target(upstreams(), image) {
        assert_eq!(t.reference, reference);
        assert!(upstreams().get(&t.client.name).is_some_and(|c| Arc::ptr_eq(&c, &t.client)));
        assert_eq!(RepoName::parse(t.repo.as_str()).as_ref(), Ok(&t.repo), "{image:?}");
    }
});
