//! Customer templates: the Webex customer template a BroadWorks request is provisioned with, the
//! checks that make a bad template fail at startup, and the `spEnterpriseId` it derives.

use serde::{Deserialize, Serialize};

use super::locale::is_supported_locale;
use crate::secret::PasswordAccount;

/// The Webex package; it cannot be changed from BroadWorks, the template defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Package {
    Softphone,
    Basic,
    Standard,
    Premium,
}

/// Whether Webex trusts the email address BroadWorks sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserVerification {
    TrustedEmail,
    UntrustedEmail,
}

/// One `[templates.NAME]` section, as written in the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub provisioning_id: String,
    pub package: Package,
    pub enterprise_mode: bool,
    pub user_verification: UserVerification,
    /// ISO-3166 alpha-2.
    pub country: String,
    /// Prefix for national numbers, e.g. `+1`.
    pub calling_code: String,
    #[serde(default = "default_language")]
    pub default_language: String,
    #[serde(default = "default_timezone")]
    pub default_timezone: String,
    /// Pattern with `{serviceProviderId}` and `{groupId}`; default depends on `enterprise_mode`.
    #[serde(default)]
    pub sp_enterprise_id: Option<String>,
    #[serde(default)]
    pub provisioning_account: Option<PasswordAccount>,
}

fn default_language() -> String {
    "en_US".to_owned()
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

/// A template setting that is wrong; `key` is relative to the template's section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub key: &'static str,
    pub message: String,
}

impl TemplateError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        TemplateError {
            key,
            message: message.into(),
        }
    }
}

const SP_PLACEHOLDER: &str = "{serviceProviderId}";
const GROUP_PLACEHOLDER: &str = "{groupId}";

/// The officially assigned ISO-3166-1 alpha-2 codes (249). Kept as one string: small, and a typo
/// in the config ("UK", "USA") is caught at startup instead of producing wrong locales.
const ISO_3166_ALPHA2: &str = "\
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ \
BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ \
DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU \
ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ \
LA LB LC LI LK LR LS LT LU LV LY \
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA \
RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ \
TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ \
VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

fn is_country_code(code: &str) -> bool {
    code.len() == 2 && ISO_3166_ALPHA2.split(' ').any(|c| c == code)
}

impl Template {
    /// Every check serde cannot express. The first failing setting is returned with a message
    /// that says what is wrong and what to write instead.
    pub fn validate(&self) -> Result<(), TemplateError> {
        if self.provisioning_id.trim().is_empty() {
            return Err(TemplateError::new(
                "provisioning_id",
                "is empty; copy the provisioning ID of the customer template from Partner Hub",
            ));
        }
        if !is_country_code(&self.country) {
            let hint = match self.country.to_ascii_uppercase().as_str() {
                "UK" => " (the United Kingdom is \"GB\")".to_owned(),
                upper if is_country_code(upper) => format!(" (write it in capitals: \"{upper}\")"),
                _ => String::new(),
            };
            return Err(TemplateError::new(
                "country",
                format!(
                    "\"{}\" is not an ISO-3166 alpha-2 country code{hint}; write two capital letters, e.g. \"US\" or \"FR\"",
                    self.country
                ),
            ));
        }
        let digits = self.calling_code.strip_prefix('+').unwrap_or("");
        if !(1..=3).contains(&digits.len())
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || digits.starts_with('0')
        {
            return Err(TemplateError::new(
                "calling_code",
                format!(
                    "\"{}\" is not a country calling code; write \"+\" and 1 to 3 digits, e.g. \"+1\" or \"+44\"",
                    self.calling_code
                ),
            ));
        }
        if !is_supported_locale(&self.default_language) {
            return Err(TemplateError::new(
                "default_language",
                format!(
                    "\"{}\" is not a Webex locale; write one of the supported locales such as \"en_US\", \"fr_CA\" or \"de_DE\" (language_COUNTRY)",
                    self.default_language
                ),
            ));
        }
        if self.default_timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(TemplateError::new(
                "default_timezone",
                format!(
                    "\"{}\" is not an IANA time zone name; write one such as \"America/New_York\" or \"UTC\"",
                    self.default_timezone
                ),
            ));
        }
        if let Some(pattern) = &self.sp_enterprise_id {
            check_sp_enterprise_pattern(pattern)
                .map_err(|m| TemplateError::new("sp_enterprise_id", m))?;
        }
        if let Some(account) = &self.provisioning_account {
            if account.user.trim().is_empty() {
                return Err(TemplateError::new(
                    "provisioning_account.user",
                    "is empty; write the provisioning account name that is also configured on the AS",
                ));
            }
            // Same rule and wording as config::check_password_hash; config depends on mapping, so
            // calling back into it would make the pure mapping module depend on the config loader.
            if argon2::PasswordHash::new(account.password_hash.expose()).is_err() {
                return Err(TemplateError::new(
                    "provisioning_account.password_hash",
                    "is not an Argon2 PHC hash ($argon2id$…); generate one with `flowthrough hash-password` and paste its output — never the plain password",
                ));
            }
        }
        Ok(())
    }

    /// The pattern in force: the configured one, else the SPEC §3 default for the mode.
    pub fn sp_enterprise_pattern(&self) -> &str {
        match &self.sp_enterprise_id {
            Some(p) => p,
            None if self.enterprise_mode => SP_PLACEHOLDER,
            None => "{serviceProviderId}+{groupId}",
        }
    }

    /// The `spEnterpriseId` for a user of this customer. Errors name the missing BroadWorks field.
    pub fn sp_enterprise_id(
        &self,
        service_provider_id: &str,
        group_id: &str,
    ) -> Result<String, String> {
        let pattern = self.sp_enterprise_pattern();
        // Ids first: they are short and nearly always present, so the pattern is rarely searched.
        if service_provider_id.trim().is_empty() && pattern.contains(SP_PLACEHOLDER) {
            return Err(format!(
                "serviceProviderId is missing; the template's spEnterpriseId pattern \"{pattern}\" needs it"
            ));
        }
        if group_id.trim().is_empty() && pattern.contains(GROUP_PLACEHOLDER) {
            return Err(format!(
                "groupId is missing; the template's spEnterpriseId pattern \"{pattern}\" needs it"
            ));
        }
        let id = replace_placeholder(pattern, SP_PLACEHOLDER, service_provider_id);
        // Without a brace there is no group placeholder left to replace: skip the second copy.
        Ok(if id.contains('{') {
            replace_placeholder(&id, GROUP_PLACEHOLDER, group_id)
        } else {
            id
        })
    }
}

/// `s.replace(placeholder, value)` for a placeholder that starts with its only `{`: stepping
/// from `{` to `{` finds the same matches, and costs far less per provisioned user than setting
/// up a general substring search.
fn replace_placeholder(s: &str, placeholder: &str, value: &str) -> String {
    let mut out = String::with_capacity(s.len() + value.len());
    let mut rest = s;
    while let Some(brace) = rest.find('{') {
        out.push_str(&rest[..brace]);
        rest = &rest[brace..];
        let (replacement, after) = match rest.strip_prefix(placeholder) {
            Some(after) => (value, after),
            None => ("{", &rest[1..]),
        };
        out.push_str(replacement);
        rest = after;
    }
    out.push_str(rest);
    out
}

/// A pattern must name at least one placeholder (a constant would fold every customer into one
/// Webex enterprise) and no other `{…}`: a misspelt placeholder would otherwise be sent literally.
fn check_sp_enterprise_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("is empty; write a pattern such as \"{serviceProviderId}\" or \"{serviceProviderId}+{groupId}\", or remove the key for the default".to_owned());
    }
    let rest = pattern
        .replace(SP_PLACEHOLDER, "")
        .replace(GROUP_PLACEHOLDER, "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "\"{pattern}\" uses a placeholder other than {{serviceProviderId}} and {{groupId}} (they are case-sensitive), or a stray brace; fix the spelling"
        ));
    }
    if rest == pattern {
        return Err(format!(
            "\"{pattern}\" has no placeholder, so every customer would share one Webex enterprise; include {{serviceProviderId}} and/or {{groupId}}"
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::secret::Secret;

    /// A valid template; tests change one field at a time.
    pub(crate) fn template() -> Template {
        Template {
            provisioning_id: "ZjViMzYx".to_owned(),
            package: Package::Standard,
            enterprise_mode: true,
            user_verification: UserVerification::TrustedEmail,
            country: "US".to_owned(),
            calling_code: "+1".to_owned(),
            default_language: "en_US".to_owned(),
            default_timezone: "America/New_York".to_owned(),
            sp_enterprise_id: None,
            provisioning_account: None,
        }
    }

    fn error_key(t: &Template) -> &'static str {
        t.validate()
            .expect_err("the template should be refused")
            .key
    }

    #[test]
    fn a_complete_template_is_valid() {
        let mut t = template();
        t.provisioning_account = Some(PasswordAccount {
            user: "bwprov".into(),
            password_hash: Secret::new(
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$pQ8QeQ1p1vGj8ZkR0xX6mG2t8YbH0m7vXz3c1w5nJ0A",
            ),
        });
        t.sp_enterprise_id = Some("bw-{serviceProviderId}-{groupId}".into());
        assert_eq!(t.validate(), Ok(()));
    }

    #[test]
    fn the_country_list_is_complete_and_well_formed() {
        let codes: Vec<&str> = ISO_3166_ALPHA2.split(' ').collect();
        assert_eq!(codes.len(), 249);
        assert!(
            codes
                .iter()
                .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
        assert!(
            codes.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
    }

    #[test]
    fn provisioning_id_must_not_be_blank() {
        let mut t = template();
        t.provisioning_id = "  ".into();
        assert_eq!(error_key(&t), "provisioning_id");
    }

    #[test]
    fn country_must_be_an_assigned_alpha2_code() {
        for good in ["US", "GB", "CA", "FR", "NO", "TW"] {
            let mut t = template();
            t.country = good.into();
            assert_eq!(t.validate(), Ok(()), "{good}");
        }
        for bad in ["USA", "us", "U", "", "UK", "XX", "1A"] {
            let mut t = template();
            t.country = bad.into();
            assert_eq!(error_key(&t), "country", "{bad}");
        }
        let mut t = template();
        t.country = "UK".into();
        assert!(t.validate().unwrap_err().message.contains("\"GB\""));
        t.country = "fr".into();
        assert!(t.validate().unwrap_err().message.contains("\"FR\""));
    }

    #[test]
    fn calling_code_is_plus_and_one_to_three_digits() {
        for good in ["+1", "+44", "+353"] {
            let mut t = template();
            t.calling_code = good.into();
            assert_eq!(t.validate(), Ok(()), "{good}");
        }
        for bad in ["1", "+", "+1234", "+4a", "+01", "44", "", " +1"] {
            let mut t = template();
            t.calling_code = bad.into();
            assert_eq!(error_key(&t), "calling_code", "{bad}");
        }
    }

    #[test]
    fn default_language_must_be_a_supported_locale() {
        for good in ["en_US", "fr_CA", "zh_TW", "nb_NO"] {
            let mut t = template();
            t.default_language = good.into();
            assert_eq!(t.validate(), Ok(()), "{good}");
        }
        for bad in ["en", "English", "en-US", "en_us", "fr_BE", ""] {
            let mut t = template();
            t.default_language = bad.into();
            assert_eq!(error_key(&t), "default_language", "{bad}");
        }
    }

    #[test]
    fn default_timezone_must_be_an_iana_name() {
        for good in ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires"] {
            let mut t = template();
            t.default_timezone = good.into();
            assert_eq!(t.validate(), Ok(()), "{good}");
        }
        for bad in ["Eastern", "GMT+5", "", "Europe/Pariss"] {
            let mut t = template();
            t.default_timezone = bad.into();
            assert_eq!(error_key(&t), "default_timezone", "{bad}");
        }
    }

    #[test]
    fn sp_enterprise_id_uses_only_known_placeholders() {
        for bad in [
            "",
            "  ",
            "acme",
            "{serviceproviderid}",
            "{serviceProviderId}-{group}",
            "{serviceProviderId}}",
        ] {
            let mut t = template();
            t.sp_enterprise_id = Some(bad.into());
            assert_eq!(error_key(&t), "sp_enterprise_id", "{bad:?}");
        }
    }

    #[test]
    fn provisioning_account_needs_a_user_and_a_phc_hash() {
        let mut t = template();
        t.provisioning_account = Some(PasswordAccount {
            user: "bwprov".into(),
            password_hash: Secret::new("plain-password"),
        });
        let e = t.validate().unwrap_err();
        assert_eq!(e.key, "provisioning_account.password_hash");
        assert!(
            !e.message.contains("plain-password"),
            "the secret never appears in the message"
        );
        t.provisioning_account = Some(PasswordAccount {
            user: " ".into(),
            password_hash: Secret::new(
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$pQ8QeQ1p1vGj8ZkR0xX6mG2t8YbH0m7vXz3c1w5nJ0A",
            ),
        });
        assert_eq!(error_key(&t), "provisioning_account.user");
    }

    #[test]
    fn sp_enterprise_id_defaults_per_mode() {
        let mut t = template();
        assert_eq!(
            t.sp_enterprise_id("acme-ent", "acme-hq").as_deref(),
            Ok("acme-ent")
        );
        // Enterprise mode does not need the group.
        assert_eq!(
            t.sp_enterprise_id("acme-ent", "").as_deref(),
            Ok("acme-ent")
        );
        t.enterprise_mode = false;
        assert_eq!(
            t.sp_enterprise_id("isp", "dentist").as_deref(),
            Ok("isp+dentist")
        );
        assert!(
            t.sp_enterprise_id("isp", "")
                .unwrap_err()
                .contains("groupId")
        );
        assert!(
            t.sp_enterprise_id("", "dentist")
                .unwrap_err()
                .contains("serviceProviderId")
        );
    }

    #[test]
    fn sp_enterprise_id_custom_patterns() {
        let mut t = template();
        t.sp_enterprise_id = Some("bw-{groupId}".into());
        assert_eq!(
            t.sp_enterprise_id("isp", "dentist").as_deref(),
            Ok("bw-dentist")
        );
        t.sp_enterprise_id = Some("{groupId}.{serviceProviderId}.{groupId}".into());
        assert_eq!(t.sp_enterprise_id("isp", "g1").as_deref(), Ok("g1.isp.g1"));
        t.enterprise_mode = false;
        t.sp_enterprise_id = Some("{serviceProviderId}".into());
        assert_eq!(t.sp_enterprise_id("isp", "").as_deref(), Ok("isp"));
    }
}
