//! `Authorization` values clients send to wharf: the client token they carry and, for Basic, the credentials
//! wharf may check upstream. Never a panic; Basic credentials re-encoded parse to the same; a bearer token is
//! the value's tail, trimmed.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use wharf::access::presented_token;
use wharf::upstream::creds::Credentials;

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data);
    let token = presented_token(&value);
    match Credentials::from_basic_header(&value) {
        Some(Credentials::Basic { username, password }) => {
            assert!(!username.contains(':'), "the user name ends at the first colon: {username:?}");
            let again =
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")));
            let round = Credentials::from_basic_header(&again);
            assert_eq!(round, Some(Credentials::Basic { username, password: password.clone() }));
            assert_eq!(token.as_deref(), Some(password.as_str()), "a Basic password is the presented token");
        }
        Some(Credentials::Bearer(_)) => panic!("a Basic header parsed as a bearer token"),
        None => {
            if let Some(t) = &token {
                assert_eq!(t.trim(), t, "bearer tokens are trimmed");
                let lower = value.trim_start().to_ascii_lowercase();
                assert!(lower.starts_with("bearer"), "a token from a value that is neither Basic nor Bearer");
            }
        }
    }
});
