//! Language → Webex locale (SPEC §3): BroadWorks language names or codes become one of the locales
//! Webex supports, via a configurable name table and the template's country and default.

use std::collections::BTreeMap;

/// One row of the SPEC §3 table: an ISO-639-1 code, its supported locales, and the locale a bare
/// code falls back to when the template's country does not give a supported one.
struct Row {
    code: &'static str,
    locales: &'static [&'static str],
    default: &'static str,
}

const LOCALES: &[Row] = &[
    Row {
        code: "en",
        locales: &["en_US", "en_AU", "en_GB", "en_CA"],
        default: "en_US",
    },
    Row {
        code: "fr",
        locales: &["fr_FR", "fr_CA"],
        default: "fr_FR",
    },
    Row {
        code: "cs",
        locales: &["cs_CZ"],
        default: "cs_CZ",
    },
    Row {
        code: "da",
        locales: &["da_DK"],
        default: "da_DK",
    },
    Row {
        code: "de",
        locales: &["de_DE"],
        default: "de_DE",
    },
    Row {
        code: "hu",
        locales: &["hu_HU"],
        default: "hu_HU",
    },
    Row {
        code: "id",
        locales: &["id_ID"],
        default: "id_ID",
    },
    Row {
        code: "it",
        locales: &["it_IT"],
        default: "it_IT",
    },
    Row {
        code: "ja",
        locales: &["ja_JP"],
        default: "ja_JP",
    },
    Row {
        code: "ko",
        locales: &["ko_KR"],
        default: "ko_KR",
    },
    Row {
        code: "es",
        locales: &["es_ES", "es_CO", "es_MX"],
        default: "es_ES",
    },
    Row {
        code: "nl",
        locales: &["nl_NL"],
        default: "nl_NL",
    },
    Row {
        code: "nb",
        locales: &["nb_NO"],
        default: "nb_NO",
    },
    Row {
        code: "pl",
        locales: &["pl_PL"],
        default: "pl_PL",
    },
    Row {
        code: "pt",
        locales: &["pt_PT", "pt_BR"],
        default: "pt_PT",
    },
    Row {
        code: "ru",
        locales: &["ru_RU"],
        default: "ru_RU",
    },
    Row {
        code: "ro",
        locales: &["ro_RO"],
        default: "ro_RO",
    },
    Row {
        code: "zh",
        locales: &["zh_CN", "zh_TW"],
        default: "zh_CN",
    },
    Row {
        code: "sv",
        locales: &["sv_SE"],
        default: "sv_SE",
    },
    Row {
        code: "ar",
        locales: &["ar_SA"],
        default: "ar_SA",
    },
    Row {
        code: "tr",
        locales: &["tr_TR"],
        default: "tr_TR",
    },
];

/// Locales Webex Meetings sites do not support: Meetings falls back to English for these users.
const MEETINGS_UNSUPPORTED: &[&str] = &["es_CO", "id_ID", "nb_NO", "pt_PT"];

/// The locale when BroadWorks sends no language at all (SPEC §3 rule 3).
const NO_LANGUAGE: &str = "en_US";

/// Built-in BroadWorks language names. Values are ISO-639-1 codes, so the template's country picks
/// the locale (rule 2). A few names that already say the region map to that locale instead: a bare
/// "zh" would turn "Chinese (Traditional)" into Simplified zh_CN outside Taiwan, which is wrong.
/// `[languages]` in the config (two-letter codes only) overrides or extends this table.
const BUILTIN_NAMES: &[(&str, &str)] = &[
    ("English", "en"),
    ("French", "fr"),
    ("French (Canada)", "fr_CA"),
    ("Canadian French", "fr_CA"),
    ("German", "de"),
    ("Spanish", "es"),
    ("Italian", "it"),
    ("Japanese", "ja"),
    ("Korean", "ko"),
    ("Dutch", "nl"),
    ("Norwegian", "nb"),
    ("Norwegian Bokmal", "nb"),
    ("Norwegian Bokmål", "nb"),
    ("Polish", "pl"),
    ("Portuguese", "pt"),
    ("Portuguese (Brazil)", "pt_BR"),
    ("Brazilian Portuguese", "pt_BR"),
    ("Russian", "ru"),
    ("Romanian", "ro"),
    ("Chinese", "zh"),
    ("Chinese (Simplified)", "zh_CN"),
    ("Simplified Chinese", "zh_CN"),
    ("Chinese (Traditional)", "zh_TW"),
    ("Traditional Chinese", "zh_TW"),
    ("Swedish", "sv"),
    ("Arabic", "ar"),
    ("Turkish", "tr"),
    ("Czech", "cs"),
    ("Danish", "da"),
    ("Hungarian", "hu"),
    ("Indonesian", "id"),
];

/// BroadWorks language names → language codes, matched case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanguageTable {
    /// Lowercased names → `xx` or `xx_YY`, sorted by name: a lookup binary-searches, and an
    /// ASCII query (the usual case) is lowercased as it is compared instead of into a new String.
    names: Vec<(String, String)>,
}

impl LanguageTable {
    /// The built-in names with the config's `[languages]` entries on top (same name, any case,
    /// replaces the built-in).
    pub fn with_overrides(overrides: &BTreeMap<String, String>) -> Self {
        let builtin = BUILTIN_NAMES.iter().map(|(n, c)| (*n, *c));
        let configured = overrides.iter().map(|(n, c)| (n.as_str(), c.as_str()));
        let names: BTreeMap<String, String> = builtin
            .chain(configured)
            .map(|(name, code)| (name.trim().to_lowercase(), code.to_owned()))
            .collect();
        LanguageTable {
            names: names.into_iter().collect(),
        }
    }

    /// The code for a language name, if the table knows it.
    pub fn lookup(&self, name: &str) -> Option<&str> {
        let name = name.trim();
        // For ASCII, `to_lowercase` is `to_ascii_lowercase`, byte by byte.
        let found = if name.is_ascii() {
            let name = name.bytes().map(|b| b.to_ascii_lowercase());
            self.names
                .binary_search_by(|(key, _)| key.bytes().cmp(name.clone()))
        } else {
            let name = name.to_lowercase();
            self.names
                .binary_search_by(|(key, _)| key.as_str().cmp(&name))
        };
        found.ok().map(|i| self.names[i].1.as_str())
    }
}

/// True for a two-letter lowercase ISO-639-1 code (the form `[languages]` values take).
pub fn is_language_code(code: &str) -> bool {
    code.len() == 2 && code.bytes().all(|b| b.is_ascii_lowercase())
}

/// True for a locale of the SPEC §3 table, written exactly as Webex wants it (`fr_CA`).
pub fn is_supported_locale(locale: &str) -> bool {
    LOCALES.iter().any(|row| row.locales.contains(&locale))
}

/// The row of `fr`, `FR`, `fr_CA`, `fr-ca`, with the region as written (`ca`); `None` for
/// anything that is not a code or names a language Webex does not support. ISO-639-1 `no`
/// (Norwegian) is Webex's `nb`. Borrows and compares in place: this runs for every user added.
fn parse_code(value: &str) -> Option<(&'static Row, Option<&str>)> {
    let letters = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic());
    let (language, region) = match value.split_once(['_', '-']) {
        Some((l, r)) if letters(l) && letters(r) => (l, Some(r)),
        None if letters(value) => (value, None),
        _ => return None,
    };
    let language = if language.eq_ignore_ascii_case("no") {
        "nb"
    } else {
        language
    };
    let row = LOCALES
        .iter()
        .find(|row| row.code.eq_ignore_ascii_case(language))?;
    Some((row, region))
}

/// Rule 1 for a code with a region: the row's locale with that region (any case), if Webex
/// supports it (every supported locale is in its language's row).
fn exact_locale(row: &Row, region: &str) -> Option<&'static str> {
    row.locales
        .iter()
        .find(|l| {
            l.split_once('_')
                .is_some_and(|(_, r)| r.eq_ignore_ascii_case(region))
        })
        .copied()
}

/// Rule 2: the language with the template's country when Webex supports that locale, else the
/// language's sensible default.
fn locale_for_language(row: &Row, country: &str) -> &'static str {
    row.locales
        .iter()
        .find(|l| l.split_once('_') == Some((row.code, country)))
        .copied()
        .unwrap_or(row.default)
}

/// The Webex locale for a BroadWorks `language` value (SPEC §3). Log lines for the operator are
/// appended to `notes`.
///
/// A full locale Webex does not support but whose language it does (`fr_BE`) is treated as its
/// language (rule 2 → `fr_FR`, or `fr_CA` under a CA template): the user keeps their language.
/// An absent or blank value gives `en_US`, as the SPEC's "none at all" says, not the template
/// default, which is for languages Webex does not support.
pub fn resolve_locale(
    value: Option<&str>,
    languages: &LanguageTable,
    country: &str,
    default_language: &str,
    notes: &mut Vec<String>,
) -> String {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return NO_LANGUAGE.to_owned();
    };
    let code = languages.lookup(value).unwrap_or(value);
    let locale = parse_code(code).map(|(row, region)| {
        region
            .and_then(|r| exact_locale(row, r))
            .unwrap_or_else(|| locale_for_language(row, country))
    });
    let locale = match locale {
        Some(locale) => locale.to_owned(),
        None => {
            notes.push(format!(
                "language \"{value}\" is not a language Webex supports (or a name missing from [languages]); using the template default {default_language}"
            ));
            default_language.to_owned()
        }
    };
    if MEETINGS_UNSUPPORTED.contains(&locale.as_str()) {
        notes.push(format!(
            "locale {locale} is not supported by Webex Meetings sites; Meetings will show English to this user"
        ));
    }
    locale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LanguageTable {
        LanguageTable::with_overrides(&BTreeMap::new())
    }

    /// Resolves under a template with this country and default `de_DE` (a default that no rule
    /// below produces by accident).
    fn resolve(value: Option<&str>, country: &str) -> (String, Vec<String>) {
        let mut notes = Vec::new();
        let locale = resolve_locale(value, &table(), country, "de_DE", &mut notes);
        (locale, notes)
    }

    fn locale(value: &str, country: &str) -> String {
        resolve(Some(value), country).0
    }

    const SPEC_TABLE: &[(&str, &[&str], &str)] = &[
        ("en", &["en_US", "en_AU", "en_GB", "en_CA"], "en_US"),
        ("fr", &["fr_FR", "fr_CA"], "fr_FR"),
        ("cs", &["cs_CZ"], "cs_CZ"),
        ("da", &["da_DK"], "da_DK"),
        ("de", &["de_DE"], "de_DE"),
        ("hu", &["hu_HU"], "hu_HU"),
        ("id", &["id_ID"], "id_ID"),
        ("it", &["it_IT"], "it_IT"),
        ("ja", &["ja_JP"], "ja_JP"),
        ("ko", &["ko_KR"], "ko_KR"),
        ("es", &["es_ES", "es_CO", "es_MX"], "es_ES"),
        ("nl", &["nl_NL"], "nl_NL"),
        ("nb", &["nb_NO"], "nb_NO"),
        ("pl", &["pl_PL"], "pl_PL"),
        ("pt", &["pt_PT", "pt_BR"], "pt_PT"),
        ("ru", &["ru_RU"], "ru_RU"),
        ("ro", &["ro_RO"], "ro_RO"),
        ("zh", &["zh_CN", "zh_TW"], "zh_CN"),
        ("sv", &["sv_SE"], "sv_SE"),
        ("ar", &["ar_SA"], "ar_SA"),
        ("tr", &["tr_TR"], "tr_TR"),
    ];

    #[test]
    fn rule1_every_supported_locale_passes_under_any_country() {
        for (_, locales, _) in SPEC_TABLE {
            for l in *locales {
                assert!(is_supported_locale(l), "{l}");
                assert_eq!(locale(l, "US"), *l);
                assert_eq!(locale(l, "JP"), *l);
            }
        }
    }

    #[test]
    fn rule2_bare_code_takes_the_template_country_when_supported() {
        for (code, locales, _) in SPEC_TABLE {
            for l in *locales {
                let country = &l[3..];
                assert_eq!(locale(code, country), *l, "{code} + {country}");
            }
        }
    }

    #[test]
    fn rule2_bare_code_falls_back_to_the_sensible_default() {
        for (code, _, default) in SPEC_TABLE {
            // SE is no locale's country except sv_SE; AQ is nobody's.
            assert_eq!(locale(code, "AQ"), *default, "{code}");
            if *code != "sv" {
                assert_eq!(locale(code, "SE"), *default, "{code}");
            }
        }
        assert_eq!(locale("fr", "BE"), "fr_FR");
        assert_eq!(locale("es", "AR"), "es_ES");
        assert_eq!(locale("pt", "AO"), "pt_PT");
        assert_eq!(locale("zh", "HK"), "zh_CN");
    }

    #[test]
    fn the_table_has_every_row_and_nothing_else() {
        assert_eq!(LOCALES.len(), SPEC_TABLE.len());
        for (row, (code, locales, default)) in LOCALES.iter().zip(SPEC_TABLE) {
            assert_eq!(
                (row.code, row.locales, row.default),
                (*code, *locales, *default)
            );
        }
        for l in [
            "fr_BE", "en_IE", "es_AR", "de_AT", "en", "en-US", "EN_US", "zh_HK",
        ] {
            assert!(!is_supported_locale(l), "{l}");
        }
    }

    #[test]
    fn rule3_unsupported_language_takes_the_template_default_with_a_note() {
        for value in [
            "Klingon", "xx", "fi", "el_GR", "he-IL", "english!", "e", "en_USA",
        ] {
            let (l, notes) = resolve(Some(value), "US");
            assert_eq!(l, "de_DE", "{value}");
            assert_eq!(notes.len(), 1, "{value}");
            assert!(
                notes[0].contains(value) && notes[0].contains("de_DE"),
                "{notes:?}"
            );
        }
    }

    #[test]
    fn rule3_no_language_at_all_is_en_us() {
        assert_eq!(resolve(None, "FR"), ("en_US".to_owned(), vec![]));
        assert_eq!(resolve(Some("  "), "FR"), ("en_US".to_owned(), vec![]));
    }

    #[test]
    fn codes_with_dash_underscore_and_any_case() {
        for value in ["fr_CA", "fr-CA", "FR-ca", "fr_ca", "Fr-Ca", " fr_CA "] {
            assert_eq!(locale(value, "US"), "fr_CA", "{value}");
        }
        for value in ["fr", "FR", "Fr"] {
            assert_eq!(locale(value, "CA"), "fr_CA", "{value}");
            assert_eq!(locale(value, "US"), "fr_FR", "{value}");
        }
    }

    #[test]
    fn unsupported_region_of_a_supported_language_keeps_the_language() {
        assert_eq!(locale("fr_BE", "US"), "fr_FR");
        assert_eq!(locale("fr-BE", "CA"), "fr_CA");
        assert_eq!(locale("en_IE", "GB"), "en_GB");
        assert_eq!(locale("en_IE", "IE"), "en_US");
    }

    #[test]
    fn norwegian_macrolanguage_code_is_bokmal() {
        assert_eq!(locale("no", "NO"), "nb_NO");
        assert_eq!(locale("no_NO", "US"), "nb_NO");
        assert_eq!(locale("nb", "US"), "nb_NO");
    }

    #[test]
    fn builtin_names_cover_every_language_of_the_table() {
        let t = table();
        let names = [
            ("English", "en"),
            ("French", "fr"),
            ("German", "de"),
            ("Spanish", "es"),
            ("Italian", "it"),
            ("Japanese", "ja"),
            ("Korean", "ko"),
            ("Dutch", "nl"),
            ("Norwegian", "nb"),
            ("Norwegian Bokmal", "nb"),
            ("Norwegian Bokmål", "nb"),
            ("Polish", "pl"),
            ("Portuguese", "pt"),
            ("Russian", "ru"),
            ("Romanian", "ro"),
            ("Chinese", "zh"),
            ("Swedish", "sv"),
            ("Arabic", "ar"),
            ("Turkish", "tr"),
            ("Czech", "cs"),
            ("Danish", "da"),
            ("Hungarian", "hu"),
            ("Indonesian", "id"),
        ];
        for (name, code) in names {
            assert_eq!(t.lookup(name), Some(code), "{name}");
        }
        for (code, _, _) in SPEC_TABLE {
            assert!(names.iter().any(|(_, c)| c == code), "no name for {code}");
        }
    }

    #[test]
    fn names_resolve_through_the_country() {
        assert_eq!(locale("English", "US"), "en_US");
        assert_eq!(locale("English", "GB"), "en_GB");
        assert_eq!(locale("English", "AU"), "en_AU");
        assert_eq!(locale("English", "IE"), "en_US");
        assert_eq!(locale("French", "CA"), "fr_CA");
        assert_eq!(locale("French", "CH"), "fr_FR");
        assert_eq!(locale("Spanish", "MX"), "es_MX");
        assert_eq!(locale("Portuguese", "BR"), "pt_BR");
        assert_eq!(locale("Chinese", "TW"), "zh_TW");
        assert_eq!(locale("German", "AT"), "de_DE");
    }

    #[test]
    fn names_that_carry_a_region_keep_it() {
        assert_eq!(locale("Chinese (Traditional)", "US"), "zh_TW");
        assert_eq!(locale("Traditional Chinese", "CN"), "zh_TW");
        assert_eq!(locale("Chinese (Simplified)", "TW"), "zh_CN");
        assert_eq!(locale("Brazilian Portuguese", "US"), "pt_BR");
        assert_eq!(locale("French (Canada)", "FR"), "fr_CA");
    }

    #[test]
    fn names_match_case_insensitively() {
        for value in ["english", "ENGLISH", "eNgLiSh", " English "] {
            assert_eq!(locale(value, "GB"), "en_GB", "{value}");
        }
        assert_eq!(locale("NORWEGIAN BOKMÅL", "US"), "nb_NO");
    }

    #[test]
    fn config_entries_override_and_extend_the_builtin_names() {
        let overrides = BTreeMap::from([
            ("english".to_owned(), "fr".to_owned()),
            ("Français".to_owned(), "fr".to_owned()),
            ("Suomi".to_owned(), "fi".to_owned()),
        ]);
        let t = LanguageTable::with_overrides(&overrides);
        assert_eq!(t.lookup("English"), Some("fr"));
        assert_eq!(t.lookup("FRANÇAIS"), Some("fr"));
        assert_eq!(t.lookup("German"), Some("de"), "untouched built-ins stay");
        let mut notes = Vec::new();
        assert_eq!(
            resolve_locale(Some("Français"), &t, "CA", "en_US", &mut notes),
            "fr_CA"
        );
        // Known name, language Webex does not support: rule 3.
        assert_eq!(
            resolve_locale(Some("Suomi"), &t, "FI", "en_GB", &mut notes),
            "en_GB"
        );
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn meetings_unsupported_locales_get_a_note() {
        for (value, country, expected) in [
            ("es_CO", "US", "es_CO"),
            ("Spanish", "CO", "es_CO"),
            ("Indonesian", "US", "id_ID"),
            ("Norwegian", "US", "nb_NO"),
            ("Portuguese", "US", "pt_PT"),
        ] {
            let (l, notes) = resolve(Some(value), country);
            assert_eq!(l, expected);
            assert_eq!(notes.len(), 1, "{value}");
            assert!(
                notes[0].contains(expected) && notes[0].contains("Meetings"),
                "{notes:?}"
            );
        }
        for ok in ["es_ES", "es_MX", "pt_BR", "en_US", "fr_CA"] {
            assert_eq!(resolve(Some(ok), "US").1, Vec::<String>::new(), "{ok}");
        }
        // The template default is sent too, so it gets the same note.
        let mut notes = Vec::new();
        assert_eq!(
            resolve_locale(Some("Klingon"), &table(), "US", "pt_PT", &mut notes),
            "pt_PT"
        );
        assert_eq!(notes.len(), 2);
    }

    #[test]
    fn is_language_code_accepts_only_two_lowercase_letters() {
        assert!(is_language_code("fr"));
        for bad in ["FR", "fra", "f", "", "fr_CA", "f1"] {
            assert!(!is_language_code(bad), "{bad}");
        }
    }
}
