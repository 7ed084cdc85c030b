//! The configuration loader on arbitrary text.
//!
//! Invariants: loading never panics, never hangs or allocates without bound
//! (libFuzzer's -timeout and -rss_limit_mb catch both), and every error names
//! the configuration file, so an operator always knows which file is wrong.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandpipe_config::Config;

const FILE: &str = "/etc/sandpipe/fuzz.yaml";

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new(FILE), text) {
        let message = e.to_string();
        assert!(
            message.contains(FILE),
            "an error without the file: {message}"
        );
    }
});
