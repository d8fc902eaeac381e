//! Which template a command is mapped with (SPEC §2): the one the URL names, else the override
//! for the command's serviceProviderId, else the template the user was provisioned with, else the
//! configured default.

use std::collections::BTreeMap;

use super::codes::OciError;
use super::plan::{Plan, refusal};
use super::template::Template;
use crate::oci::Command;

/// The BroadWorks userId a command is about, if it names one.
pub fn command_user_id(command: &Command) -> Option<&str> {
    match command {
        Command::UserAdd(p) => Some(&p.user_id),
        Command::UserModify(c) => Some(&c.user_id),
        Command::UserDelete { user_id }
        | Command::ServiceAssign { user_id, .. }
        | Command::ServiceUnassign { user_id, .. }
        | Command::IntegratedImpModify { user_id, .. } => Some(user_id),
        _ => None,
    }
}

/// The serviceProviderId a command carries, if any (user commands other than UserAdd carry only
/// the userId).
pub fn command_service_provider(command: &Command) -> Option<&str> {
    match command {
        Command::UserAdd(p) => Some(&p.service_provider_id),
        Command::GroupAdd {
            service_provider_id,
            ..
        }
        | Command::ServiceProviderAdd {
            service_provider_id,
            ..
        }
        | Command::GroupDelete {
            service_provider_id,
            ..
        }
        | Command::ServiceProviderDelete {
            service_provider_id,
        } => Some(service_provider_id),
        _ => None,
    }
}

/// Where the template choice came from, for the refusal message.
#[derive(Debug, Clone, Copy)]
enum Source {
    Url,
    Override,
    Remembered,
    Default,
}

/// Everything the choice depends on. `remembered` is the template the command's user was
/// provisioned with (the caller looks it up by [`command_user_id`]).
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    /// The `{template}` of `POST /provisioning/{template}` or `translate --template`.
    pub explicit: Option<&'a str>,
    pub templates: &'a BTreeMap<String, Template>,
    /// `[template_overrides]`: serviceProviderId → template name.
    pub overrides: &'a BTreeMap<String, String>,
    pub remembered: Option<&'a str>,
    /// `default_template`.
    pub default: Option<&'a str>,
}

/// The template name for `command`, or the plan that refuses it: 7004 when no configured template
/// results, and 7002/7001 for unsupported or malformed commands whatever the templates (they never
/// needed one).
pub fn select_template(command: &Command, s: &Selection) -> Result<String, Plan> {
    if let Some(refused) = refusal(command) {
        return Err(refused);
    }
    let by_customer = || match command_service_provider(command) {
        Some(sp) => s.overrides.get(sp).map(|t| (t.as_str(), Source::Override)),
        None => s.remembered.map(|t| (t, Source::Remembered)),
    };
    let chosen = s
        .explicit
        .map(|t| (t, Source::Url))
        .or_else(by_customer)
        .or_else(|| s.default.map(|t| (t, Source::Default)));
    let Some((name, source)) = chosen else {
        return Err(Plan::Reject {
            code: OciError::UnknownTemplate,
            message: "no template applies: the URL names none, no [template_overrides] entry or remembered template matches, and default_template is not set; POST to /provisioning/{template} or set default_template".to_owned(),
        });
    };
    if s.templates.contains_key(name) {
        return Ok(name.to_owned());
    }
    let origin = match source {
        Source::Url => "the request URL names",
        Source::Override => "[template_overrides] maps this serviceProviderId to",
        Source::Remembered => "this user was provisioned with",
        Source::Default => "default_template names",
    };
    let known: Vec<&str> = s.templates.keys().map(String::as_str).collect();
    Err(Plan::Reject {
        code: OciError::UnknownTemplate,
        message: format!(
            "{origin} template \"{name}\", which is not configured; configured templates: {}",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ),
    })
}
