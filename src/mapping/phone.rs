//! Phone numbers as Webex gets them: international numbers as BroadWorks wrote them, national
//! numbers prefixed with the template's country calling code.
//!
//! A number that starts with `+` is sent exactly as written (SPEC §3 "passes as is"): BroadWorks
//! writes mobile numbers like `+1-514-555-0199`, and Webex's own API examples use that dashed form,
//! so reformatting would only risk changing what the operator sees in both systems. A national
//! number (`2025550101`, or `202-555-0101`) has no agreed format to keep, so it is sent as compact
//! E.164: calling code + digits (`+12025550101`).

/// Characters people put between digits; they carry no meaning.
const SEPARATORS: &[char] = &[' ', '-', '.', '(', ')'];

/// E.164 allows at most 15 digits including the country code.
const MAX_DIGITS: usize = 15;

/// The value Webex gets for a BroadWorks phone number, or why it is not a phone number. `field`
/// is the BroadWorks element name, for the message.
pub fn phone_for_webex(field: &str, value: &str, calling_code: &str) -> Result<String, String> {
    let value = value.trim();
    let (international, rest) = match value.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    if let Some(bad) = rest
        .chars()
        .find(|c| !c.is_ascii_digit() && !SEPARATORS.contains(c))
    {
        return Err(format!(
            "{field} \"{value}\" contains '{bad}'; a phone number has digits only (an international one starts with +)"
        ));
    }
    let digits = rest.bytes().filter(u8::is_ascii_digit).count();
    let total = if international {
        digits
    } else {
        calling_code.len() - 1 + digits
    };
    if digits == 0 || total > MAX_DIGITS {
        return Err(format!(
            "{field} \"{value}\" is not a phone number: it needs 1 to {MAX_DIGITS} digits including the country code"
        ));
    }
    if international {
        Ok(value.to_owned())
    } else {
        let mut number = String::with_capacity(calling_code.len() + digits);
        number.push_str(calling_code);
        number.extend(rest.chars().filter(char::is_ascii_digit));
        Ok(number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn national_numbers_get_the_calling_code() {
        assert_eq!(
            phone_for_webex("phoneNumber", "2025550101", "+1").as_deref(),
            Ok("+12025550101")
        );
        assert_eq!(
            phone_for_webex("phoneNumber", "2079460000", "+44").as_deref(),
            Ok("+442079460000")
        );
        assert_eq!(
            phone_for_webex("phoneNumber", " 202-555 (0101) ", "+1").as_deref(),
            Ok("+12025550101")
        );
        assert_eq!(
            phone_for_webex("phoneNumber", "202.555.0101", "+353").as_deref(),
            Ok("+3532025550101")
        );
    }

    #[test]
    fn international_numbers_pass_as_written() {
        assert_eq!(
            phone_for_webex("mobilePhoneNumber", "+1-514-555-0199", "+44").as_deref(),
            Ok("+1-514-555-0199")
        );
        assert_eq!(
            phone_for_webex("phoneNumber", "+33 1 23 45 67 89", "+1").as_deref(),
            Ok("+33 1 23 45 67 89")
        );
        assert_eq!(
            phone_for_webex("phoneNumber", "+12025550101", "+1").as_deref(),
            Ok("+12025550101")
        );
    }

    #[test]
    fn letters_and_stray_symbols_are_refused_with_the_field_name() {
        for bad in [
            "202555abcd",
            "+1-800-FLOWERS",
            "++12025550101",
            "202*555",
            "tel:+12025550101",
        ] {
            let e = phone_for_webex("phoneNumber", bad, "+1").unwrap_err();
            assert!(e.starts_with("phoneNumber"), "{e}");
        }
    }

    #[test]
    fn digit_count_is_bounded_by_e164() {
        for bad in ["", "+", "---", "+1234567890123456"] {
            assert!(
                phone_for_webex("phoneNumber", bad, "+1").is_err(),
                "{bad:?}"
            );
        }
        // 15 digits in all is the limit: 2 of the calling code + 13.
        assert!(phone_for_webex("phoneNumber", "1234567890123", "+44").is_ok());
        assert!(phone_for_webex("phoneNumber", "12345678901234", "+44").is_err());
        assert!(phone_for_webex("phoneNumber", "+123456789012345", "+44").is_ok());
    }
}
