//! A wrapper for secrets (client secret, tokens, password hashes) that never shows its content in
//! `Debug`, `Display`, logs or error messages; the value is zeroed when dropped.

use std::fmt;

use zeroize::Zeroize;

/// A secret string. `Debug` and `Display` print `[redacted]`; read it with [`Secret::expose`] only
/// at the point where it goes on the wire or into the store.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Every call site is a place where the secret leaves the process or the
    /// store: keep them few and obvious.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Serializing exposes the value: only the store uses it, to persist tokens.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-refresh-token");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-refresh-token");
    }
}

/// A username with the Argon2 hash of its password (PHC string form, `$argon2id$…`), as configured
/// for a template's provisioning account or the tunnel's proxy account. The plain password is never
/// stored anywhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordAccount {
    pub user: String,
    pub password_hash: Secret,
}

/// The user and password of an HTTP `Basic` credential (`Authorization` or
/// `Proxy-Authorization`); the password stays a [`Secret`].
pub struct BasicCredentials {
    pub user: String,
    pub password: Secret,
}

impl BasicCredentials {
    /// Parse a header value `Basic base64(user:password)`; `None` when it is anything else.
    pub fn parse(value: &str) -> Option<BasicCredentials> {
        use base64::Engine as _;
        let (scheme, encoded) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some(BasicCredentials {
            user: user.to_owned(),
            password: Secret::new(password),
        })
    }
}

impl PasswordAccount {
    /// Constant time on the user name, Argon2 on the password: neither leaks how close a guess
    /// was. Argon2 is deliberately slow (tens of ms): async callers run it off the reactor.
    pub fn verify(&self, credentials: Option<&BasicCredentials>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(c) = credentials else {
            return false;
        };
        let user_ok: bool = self.user.as_bytes().ct_eq(c.user.as_bytes()).into();
        let password_ok = argon2::PasswordHash::new(self.password_hash.expose())
            .and_then(|hash| {
                argon2::PasswordVerifier::verify_password(
                    &argon2::Argon2::default(),
                    c.password.expose().as_bytes(),
                    &hash,
                )
            })
            .is_ok();
        user_ok & password_ok
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};

    fn account(user: &str, password: &str) -> PasswordAccount {
        let salt = SaltString::generate(&mut OsRng);
        let hash = argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap();
        PasswordAccount {
            user: user.to_owned(),
            password_hash: Secret::new(hash.to_string()),
        }
    }

    #[test]
    fn basic_values_parse_and_verify_against_the_hash() {
        let acct = account("bwproxy", "pa:ss");
        // base64("bwproxy:pa:ss"): the password may itself hold a colon.
        let good = BasicCredentials::parse("Basic Yndwcm94eTpwYTpzcw==").unwrap();
        assert_eq!(good.user, "bwproxy");
        assert_eq!(good.password.expose(), "pa:ss");
        assert!(acct.verify(Some(&good)));
        assert!(acct.verify(BasicCredentials::parse("basic  Yndwcm94eTpwYTpzcw== ").as_ref()));
        // base64("bwproxy:pa:sx") and base64("bwproxz:pa:ss")
        for wrong in ["Basic Yndwcm94eTpwYTpzeA==", "Basic Yndwcm94ejpwYTpzcw=="] {
            assert!(
                !acct.verify(BasicCredentials::parse(wrong).as_ref()),
                "{wrong}"
            );
        }
        assert!(!acct.verify(None));
        for bad in ["Bearer abc", "Basic !!!", "Basic", "Basic bm9jb2xvbg=="] {
            assert!(BasicCredentials::parse(bad).is_none(), "{bad}");
        }
    }
}
