//! Time zones: Webex takes IANA names; BroadWorks may hold anything, so a value that is not one
//! falls back to the template default (SPEC §3) with a note for the log.

/// The time zone Webex gets for a BroadWorks `timeZone` value; fallbacks are noted in `notes`.
/// `None` (no value) also gets the default, silently: nothing was lost.
pub fn resolve_timezone(
    value: Option<&str>,
    default_timezone: &str,
    notes: &mut Vec<String>,
) -> String {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return default_timezone.to_owned();
    };
    if value.parse::<chrono_tz::Tz>().is_ok() {
        return value.to_owned();
    }
    notes.push(format!(
        "timeZone \"{value}\" is not an IANA time zone name; using the template default {default_timezone}"
    ));
    default_timezone.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iana_names_pass_without_a_note() {
        let mut notes = Vec::new();
        for tz in [
            "America/New_York",
            "Europe/Paris",
            "UTC",
            "Asia/Kolkata",
            "America/Indiana/Indianapolis",
        ] {
            assert_eq!(resolve_timezone(Some(tz), "Europe/London", &mut notes), tz);
        }
        assert!(notes.is_empty());
    }

    #[test]
    fn anything_else_takes_the_template_default_with_a_note() {
        for bad in [
            "Eastern",
            "Eastern Standard Time ",
            "GMT+5",
            "america/new_york",
            "(GMT-05:00) Eastern Time",
            "Mars/Olympus",
        ] {
            let mut notes = Vec::new();
            assert_eq!(
                resolve_timezone(Some(bad), "Europe/London", &mut notes),
                "Europe/London",
                "{bad}"
            );
            assert_eq!(notes.len(), 1);
            assert!(notes[0].contains(bad.trim()) && notes[0].contains("Europe/London"));
        }
    }

    #[test]
    fn no_value_takes_the_default_silently() {
        let mut notes = Vec::new();
        assert_eq!(resolve_timezone(None, "UTC", &mut notes), "UTC");
        assert_eq!(resolve_timezone(Some(" "), "UTC", &mut notes), "UTC");
        assert!(notes.is_empty());
    }
}
