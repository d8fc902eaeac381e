//! Mapping: templates, packages, locales, phone numbers and time zones — OCI-P commands in, typed
//! Webex plans out.
//!
//! Pure functions only: this module imports no I/O module, so every rule is tested without servers.

mod template;

pub use template::*;

use std::collections::BTreeMap;

/// BroadWorks language names → ISO-639-1 codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanguageTable {
    names: BTreeMap<String, String>,
}

impl LanguageTable {
    pub fn with_overrides(overrides: &BTreeMap<String, String>) -> Self {
        LanguageTable {
            names: overrides.clone(),
        }
    }
}

/// True for a two-letter lowercase ISO-639-1 code.
pub fn is_language_code(code: &str) -> bool {
    code.len() == 2 && code.bytes().all(|b| b.is_ascii_lowercase())
}
