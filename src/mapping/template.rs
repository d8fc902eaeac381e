//! Customer templates: the Webex customer template a BroadWorks request is provisioned with.

use serde::Deserialize;

use crate::secret::PasswordAccount;

/// The Webex package; it cannot be changed from BroadWorks, the template defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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

impl Template {
    /// Checks serde cannot express; the mapping work completes the rules.
    pub fn validate(&self) -> Result<(), TemplateError> {
        if self.provisioning_id.trim().is_empty() {
            return Err(TemplateError {
                key: "provisioning_id",
                message:
                    "is empty; copy the provisioning ID of the customer template from Partner Hub"
                        .to_owned(),
            });
        }
        Ok(())
    }
}
