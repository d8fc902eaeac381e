//! Fuzz the config loader: any text must give a `Config` or a located `ConfigError`, never a panic
//! (the locating walk re-parses the text with spans, so it is fuzzed too).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = flowthrough::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
