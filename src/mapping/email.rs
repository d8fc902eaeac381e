//! Email addresses under a trusted-email template: Webex creates the account with the address it
//! is given, so an address must at least be deliverable in form before it is sent.
//!
//! The check is the practical subset of RFC 5321/5322 that mail systems accept: one `@`, a
//! dot-atom local part of at most 64 characters, and a domain of at least two DNS labels (letters,
//! digits, hyphens; internationalised domains in their `xn--` form), 254 characters in all. Quoted
//! local parts, IP-literal domains and non-ASCII addresses are refused: Webex cannot verify them.

const LOCAL_SPECIALS: &str = "!#$%&'*+/=?^_`{|}~-";

/// `Ok` when `value` is a syntactically valid address; else the reason, naming `emailAddress`.
pub fn check_email(value: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "emailAddress \"{value}\" is not a valid email address: {why}"
        ))
    };
    if value.len() > 254 {
        return refuse("it is longer than 254 characters");
    }
    let Some((local, domain)) = value.rsplit_once('@') else {
        return refuse("it has no @");
    };
    if local.is_empty() || local.len() > 64 {
        return refuse("the part before @ must have 1 to 64 characters");
    }
    if !local
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || LOCAL_SPECIALS.contains(c))
    {
        return refuse(
            "the part before @ may hold only letters, digits, dots and !#$%&'*+/=?^_`{|}~-",
        );
    }
    if local.starts_with('.')
        || local.ends_with('.')
        || local.as_bytes().windows(2).any(|w| w == b"..")
    {
        return refuse(
            "the part before @ cannot start or end with a dot or have two dots in a row",
        );
    }
    if !domain.contains('.') {
        return refuse("the domain needs at least two labels, e.g. example.com");
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !domain.split('.').all(label_ok) {
        return refuse("each domain label needs 1 to 63 letters, digits or inner hyphens");
    }
    if domain
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return refuse("the top-level domain cannot be all digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_addresses_are_valid() {
        for good in [
            "alice.smith@acme.example",
            "a@b.co",
            "first+tag@sub.domain.example.com",
            "o'brien@xn--mller-kva.example",
            "x_y-z{1}@a-b.example",
            "1234@9domain.example",
        ] {
            assert_eq!(check_email(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn malformed_addresses_are_refused_with_a_reason() {
        for bad in [
            "",
            "alice",
            "@acme.example",
            "alice@",
            "alice@acme",
            "alice@@acme.example",
            "alice smith@acme.example",
            ".alice@acme.example",
            "alice.@acme.example",
            "al..ice@acme.example",
            "alice@acme..example",
            "alice@-acme.example",
            "alice@acme-.example",
            "alice@acme.123",
            "alice@acme_corp.example",
            "\"alice\"@acme.example",
            "alice@[192.0.2.1]",
            "müller@acme.example",
            "alice@acme.example ",
            "<alice@acme.example>",
        ] {
            let e = check_email(bad).expect_err(bad);
            assert!(e.starts_with("emailAddress"), "{e}");
        }
    }

    #[test]
    fn length_limits() {
        let local64 = "a".repeat(64);
        assert_eq!(check_email(&format!("{local64}@acme.example")), Ok(()));
        assert!(check_email(&format!("a{local64}@acme.example")).is_err());
        let label63 = "b".repeat(63);
        assert_eq!(check_email(&format!("a@{label63}.example")), Ok(()));
        assert!(check_email(&format!("a@b{label63}.example")).is_err());
        let long_domain = [label63.as_str(); 4].join(".");
        assert!(
            check_email(&format!("a@{long_domain}")).is_err(),
            "over 254 in all"
        );
    }
}
