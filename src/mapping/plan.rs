//! The typed plan: what one OCI-P command means for Webex (SPEC §2 command table, §3 rules, §4
//! bodies), decided without any I/O so the server, the outbox and `translate` share one answer.

use serde::{Deserialize, Serialize};

use super::codes::OciError;
use super::email::check_email;
use super::locale::{LanguageTable, resolve_locale};
use super::phone::phone_for_webex;
use super::template::{Package, Template, UserVerification};
use super::timezone::resolve_timezone;
use crate::oci::{Change, Command, ResponseCommand, UserChanges, UserProfile};

/// The BroadWorks service whose assignment provisions the user in Webex.
pub const IMP_SERVICE: &str = "Integrated IM&P";

/// `POST /broadworks/subscribers` (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionBody {
    pub provisioning_id: String,
    pub user_id: String,
    pub sp_enterprise_id: String,
    pub first_name: String,
    pub last_name: String,
    pub package: Package,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mobile_phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// `PUT /broadworks/subscribers/{id}` (SPEC §4). Webex refuses `email` and `language` here, so
/// the type has no place for them; `Some("")` clears a phone value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mobile_phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Part of the Webex contract; BroadWorks never changes the package, so [`plan`] leaves it
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<Package>,
}

impl UpdateBody {
    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        *self == UpdateBody::default()
    }
}

/// A BroadWorks customer seen in a `GroupAddRequest` or `ServiceProviderAddRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub service_provider_id: String,
    /// Set for a group (`GroupAddRequest`).
    pub group_id: Option<String>,
    pub name: Option<String>,
    /// True for a service provider added with `isEnterprise` true; false for a plain service
    /// provider and for a group.
    pub enterprise: bool,
    /// A log warning when the customer's mode disagrees with the template's `enterprise_mode`.
    pub mode_mismatch: Option<String>,
}

/// What one command means for Webex.
///
/// The customer mode mismatch is a log warning only (the AS gets `SuccessResponse`): the SPEC's
/// warning codes (7020, 7021) are about the user's data reaching Webex, and a mismatch changes
/// nothing at Webex; the operator is the one who must fix the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// POST the subscriber.
    Provision {
        user_id: String,
        body: ProvisionBody,
        notes: Vec<String>,
    },
    /// PUT the changed fields. `uncarried` names changes Webex cannot take (→ 7021 warning). When
    /// `body` is empty only uncarried changes were asked for: no Webex call, the AS gets 7021.
    Update {
        user_id: String,
        body: UpdateBody,
        uncarried: Vec<String>,
        notes: Vec<String>,
    },
    /// DELETE the subscriber; an unknown user is a success.
    Remove { user_id: String },
    /// Record the customer; no Webex call.
    RecordCustomer(Customer),
    /// Nothing to do at Webex; `reason` is for the log.
    NoOp { reason: String },
    /// Refuse the command; `message` is the operator-facing detail.
    Reject { code: OciError, message: String },
}

/// The HTTP method of a Webex call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Post,
    Put,
    Delete,
}

/// A body sent to Webex; serialises as the bare JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum WebexBody {
    Provision(ProvisionBody),
    Update(UpdateBody),
}

/// The Webex call a plan causes, as `translate --json` prints it (SPEC §9). The path of an update
/// or removal holds the literal `{id}`: the subscriber id is only known online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebexCall {
    pub method: Method,
    pub path: &'static str,
    pub body: Option<WebexBody>,
}

pub const SUBSCRIBERS_PATH: &str = "/broadworks/subscribers";
pub const SUBSCRIBER_PATH: &str = "/broadworks/subscribers/{id}";

impl Plan {
    fn reject(code: OciError, message: impl Into<String>) -> Plan {
        Plan::Reject {
            code,
            message: message.into(),
        }
    }

    /// The `action` of `translate --json`.
    pub fn action(&self) -> &'static str {
        match self {
            Plan::Provision { .. } => "provision",
            Plan::Update { .. } => "update",
            Plan::Remove { .. } => "remove",
            Plan::RecordCustomer(_) => "record",
            Plan::NoOp { .. } => "noop",
            Plan::Reject { .. } => "reject",
        }
    }

    /// The user a Webex call is about (the current BroadWorks userId, before any rename).
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Plan::Provision { user_id, .. }
            | Plan::Update { user_id, .. }
            | Plan::Remove { user_id } => Some(user_id),
            _ => None,
        }
    }

    /// The log lines the caller should write for this plan.
    pub fn notes(&self) -> &[String] {
        match self {
            Plan::Provision { notes, .. } | Plan::Update { notes, .. } => notes,
            _ => &[],
        }
    }

    /// The Webex call this plan makes, if any.
    pub fn webex_call(&self) -> Option<WebexCall> {
        match self {
            Plan::Provision { body, .. } => Some(WebexCall {
                method: Method::Post,
                path: SUBSCRIBERS_PATH,
                body: Some(WebexBody::Provision(body.clone())),
            }),
            Plan::Update { body, .. } if !body.is_empty() => Some(WebexCall {
                method: Method::Put,
                path: SUBSCRIBER_PATH,
                body: Some(WebexBody::Update(body.clone())),
            }),
            Plan::Remove { .. } => Some(WebexCall {
                method: Method::Delete,
                path: SUBSCRIBER_PATH,
                body: None,
            }),
            Plan::Update { .. }
            | Plan::RecordCustomer(_)
            | Plan::NoOp { .. }
            | Plan::Reject { .. } => None,
        }
    }

    /// The response the AS gets once Webex has accepted the call (or at once when there is none).
    pub fn response(&self, echo: Option<String>) -> ResponseCommand {
        match self {
            Plan::Update { uncarried, .. } if !uncarried.is_empty() => OciError::NotCarried
                .response(
                    echo,
                    Some(format!("not carried to Webex: {}", uncarried.join("; "))),
                ),
            Plan::Reject { code, message } => code.response(echo, Some(message.clone())),
            _ => ResponseCommand::Success { echo },
        }
    }
}

/// What [`plan`] needs besides the command.
#[derive(Debug, Clone, Copy)]
pub struct MapContext<'a> {
    pub template_name: &'a str,
    pub template: &'a Template,
    pub languages: &'a LanguageTable,
    /// The last profile seen for the command's user (the caller keeps it: UserAdd, then
    /// [`apply_changes`] for each UserModify).
    pub last_profile: Option<&'a UserProfile>,
}

/// Unsupported and malformed commands are refused whatever the template; [`select_template`]
/// uses this too so they never turn into "unknown template".
///
/// [`select_template`]: super::select_template
pub(crate) fn refusal(command: &Command) -> Option<Plan> {
    match command {
        Command::Unsupported => Some(unsupported()),
        Command::Invalid { reason } => Some(malformed(reason)),
        _ => None,
    }
}

fn unsupported() -> Plan {
    Plan::reject(
        OciError::Unsupported,
        "flowthrough does not carry this command to Webex; only the commands of the SPEC §2 table are handled",
    )
}

fn malformed(reason: &str) -> Plan {
    Plan::reject(OciError::Malformed, reason)
}

/// The plan for one command under one template (SPEC §2 table).
pub fn plan(command: &Command, ctx: &MapContext) -> Plan {
    match command {
        Command::UserAdd(profile) => provision(profile, ctx),
        Command::UserModify(changes) => update(changes, ctx),
        Command::UserDelete { user_id } => Plan::Remove {
            user_id: user_id.clone(),
        },
        Command::ServiceAssign { user_id, services } if names_imp(services) => {
            provision_known(user_id, ctx)
        }
        Command::ServiceUnassign { user_id, services } if names_imp(services) => Plan::Remove {
            user_id: user_id.clone(),
        },
        Command::ServiceAssign { services, .. } | Command::ServiceUnassign { services, .. } => {
            Plan::NoOp {
                reason: format!("services {} are not carried to Webex", services.join(", ")),
            }
        }
        Command::IntegratedImpModify {
            user_id,
            is_active: Some(true),
        } => provision_known(user_id, ctx),
        Command::IntegratedImpModify {
            user_id,
            is_active: Some(false),
        } => Plan::Remove {
            user_id: user_id.clone(),
        },
        Command::IntegratedImpModify { .. } => Plan::NoOp {
            reason: "isActive not given: IM&P state unchanged".to_owned(),
        },
        Command::GroupAdd {
            service_provider_id,
            group_id,
            group_name,
        } => Plan::RecordCustomer(Customer {
            service_provider_id: service_provider_id.clone(),
            group_id: Some(group_id.clone()),
            name: group_name.clone(),
            enterprise: false,
            // A group exists under an enterprise and under a service provider alike, so it says
            // nothing about the mode.
            mode_mismatch: None,
        }),
        Command::ServiceProviderAdd {
            service_provider_id,
            name,
            is_enterprise,
        } => {
            let mode_mismatch = (*is_enterprise != ctx.template.enterprise_mode).then(|| {
                format!(
                    "{} \"{service_provider_id}\" was added, but template \"{}\" has enterprise_mode = {}; its users will get spEnterpriseId \"{}\" — use a template with enterprise_mode = {is_enterprise} for this customer ([template_overrides])",
                    if *is_enterprise { "enterprise" } else { "service provider" },
                    ctx.template_name,
                    ctx.template.enterprise_mode,
                    ctx.template.sp_enterprise_pattern(),
                )
            });
            Plan::RecordCustomer(Customer {
                service_provider_id: service_provider_id.clone(),
                group_id: None,
                name: name.clone(),
                enterprise: *is_enterprise,
                mode_mismatch,
            })
        }
        Command::GroupDelete {
            service_provider_id,
            group_id,
        } => Plan::NoOp {
            reason: format!(
                "group \"{group_id}\" of \"{service_provider_id}\" deleted; Webex users are removed per user"
            ),
        },
        Command::ServiceProviderDelete {
            service_provider_id,
        } => Plan::NoOp {
            reason: format!(
                "service provider \"{service_provider_id}\" deleted; Webex users are removed per user"
            ),
        },
        Command::Unsupported => unsupported(),
        Command::Invalid { reason } => malformed(reason),
    }
}

fn names_imp(services: &[String]) -> bool {
    services
        .iter()
        .any(|s| s.trim().eq_ignore_ascii_case(IMP_SERVICE))
}

/// Provision from the last profile seen (IM&P assigned or activated).
fn provision_known(user_id: &str, ctx: &MapContext) -> Plan {
    match ctx.last_profile {
        Some(profile) => provision(profile, ctx),
        None => Plan::reject(
            OciError::UnknownUser,
            format!(
                "no UserAddRequest was ever seen for \"{user_id}\", so flowthrough has no profile to provision; re-send the user's UserAddRequest (or modify the user) through flowthrough, then assign Integrated IM&P again"
            ),
        ),
    }
}

fn provision(profile: &UserProfile, ctx: &MapContext) -> Plan {
    match provision_body(profile, ctx) {
        Ok((body, notes)) => Plan::Provision {
            user_id: profile.user_id.clone(),
            body,
            notes,
        },
        Err(message) => Plan::reject(OciError::InvalidField, message),
    }
}

/// An optional BroadWorks value, with blanks treated as absent.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn provision_body(
    p: &UserProfile,
    ctx: &MapContext,
) -> Result<(ProvisionBody, Vec<String>), String> {
    let t = ctx.template;
    let mut notes = Vec::new();
    for (field, value) in [
        ("userId", &p.user_id),
        ("firstName", &p.first_name),
        ("lastName", &p.last_name),
    ] {
        if value.trim().is_empty() {
            return Err(format!("{field} is missing or empty; Webex requires it"));
        }
    }
    let sp_enterprise_id = t.sp_enterprise_id(&p.service_provider_id, &p.group_id)?;
    let phone = |field, value: &Option<String>| {
        present(value)
            .map(|v| phone_for_webex(field, v, &t.calling_code))
            .transpose()
    };
    let primary_phone_number = phone("phoneNumber", &p.phone_number)?;
    let mobile_phone_number = phone("mobilePhoneNumber", &p.mobile_phone_number)?;
    let extension = present(&p.extension).map(str::to_owned);
    if primary_phone_number.is_none() && extension.is_none() {
        return Err(format!(
            "user \"{}\" has neither phoneNumber nor extension; Webex needs one of them",
            p.user_id
        ));
    }
    let email = match t.user_verification {
        UserVerification::TrustedEmail => {
            let Some(email) = present(&p.email_address) else {
                return Err(format!(
                    "emailAddress is missing; template \"{}\" uses trusted_email, so Webex needs the user's address",
                    ctx.template_name
                ));
            };
            check_email(email)?;
            Some(email.to_owned())
        }
        // The subscriber supplies the address to Webex themselves.
        UserVerification::UntrustedEmail => None,
    };
    let language = resolve_locale(
        present(&p.language),
        ctx.languages,
        &t.country,
        &t.default_language,
        &mut notes,
    );
    let timezone = resolve_timezone(present(&p.time_zone), &t.default_timezone, &mut notes);
    if let Some(enterprise) = p.is_enterprise.filter(|e| *e != t.enterprise_mode) {
        notes.push(format!(
            "user \"{}\" is in {} but template \"{}\" has enterprise_mode = {}; check [template_overrides]",
            p.user_id,
            if enterprise { "an enterprise" } else { "a service provider's group" },
            ctx.template_name,
            t.enterprise_mode
        ));
    }
    let body = ProvisionBody {
        provisioning_id: t.provisioning_id.clone(),
        user_id: p.user_id.trim().to_owned(),
        sp_enterprise_id,
        first_name: p.first_name.trim().to_owned(),
        last_name: p.last_name.trim().to_owned(),
        package: t.package,
        primary_phone_number,
        mobile_phone_number,
        extension,
        email,
        language: Some(language),
        timezone: Some(timezone),
    };
    Ok((body, notes))
}

/// A set value, with a blank one counted as a clear (BroadWorks writes `<x></x>` for both).
fn change(c: &Change<String>) -> Change<&str> {
    match c {
        Change::Set(v) if !v.trim().is_empty() => Change::Set(v.trim()),
        Change::Set(_) | Change::Clear => Change::Clear,
        Change::Absent => Change::Absent,
    }
}

fn update(c: &UserChanges, ctx: &MapContext) -> Plan {
    let t = ctx.template;
    let mut body = UpdateBody::default();
    let mut uncarried = Vec::new();
    let mut notes = Vec::new();

    match change(&c.new_user_id) {
        Change::Set(v) => body.user_id = Some(v.to_owned()),
        Change::Clear => uncarried.push("newUserId cannot be cleared; the userId stays".to_owned()),
        Change::Absent => {}
    }
    for (field, value, slot) in [
        ("firstName", &c.first_name, &mut body.first_name),
        ("lastName", &c.last_name, &mut body.last_name),
    ] {
        match change(value) {
            Change::Set(v) => *slot = Some(v.to_owned()),
            Change::Clear => {
                uncarried.push(format!("{field} cannot be cleared; Webex requires it"))
            }
            Change::Absent => {}
        }
    }
    for (field, value, slot) in [
        (
            "phoneNumber",
            &c.phone_number,
            &mut body.primary_phone_number,
        ),
        (
            "mobilePhoneNumber",
            &c.mobile_phone_number,
            &mut body.mobile_phone_number,
        ),
    ] {
        match change(value) {
            Change::Set(v) => match phone_for_webex(field, v, &t.calling_code) {
                Ok(number) => *slot = Some(number),
                Err(message) => return Plan::reject(OciError::InvalidField, message),
            },
            Change::Clear => *slot = Some(String::new()),
            Change::Absent => {}
        }
    }
    match change(&c.extension) {
        Change::Set(v) => body.extension = Some(v.to_owned()),
        Change::Clear => body.extension = Some(String::new()),
        Change::Absent => {}
    }
    if let Some(message) = leaves_no_number(c, ctx.last_profile) {
        return Plan::reject(OciError::InvalidField, message);
    }
    match change(&c.time_zone) {
        Change::Set(v) => {
            body.timezone = Some(resolve_timezone(Some(v), &t.default_timezone, &mut notes))
        }
        // Webex has no "no time zone": a cleared one is the template default.
        Change::Clear => {
            notes.push(format!(
                "timeZone cleared; using the template default {}",
                t.default_timezone
            ));
            body.timezone = Some(t.default_timezone.clone());
        }
        Change::Absent => {}
    }
    if !c.email_address.is_absent() {
        uncarried.push(
            "emailAddress cannot be changed by an update; change it in Webex Control Hub"
                .to_owned(),
        );
    }
    if !c.language.is_absent() {
        uncarried.push(
            "language cannot be changed by an update; the user changes it in Webex".to_owned(),
        );
    }
    if body.is_empty() && uncarried.is_empty() {
        return Plan::NoOp {
            reason: "the modify request changes nothing that Webex holds".to_owned(),
        };
    }
    Plan::Update {
        user_id: c.user_id.clone(),
        body,
        uncarried,
        notes,
    }
}

/// A user must keep a phone number or an extension. A field the request does not mention keeps
/// its last known value; without a known profile, only clearing both at once is provably wrong.
fn leaves_no_number(c: &UserChanges, last: Option<&UserProfile>) -> Option<String> {
    let keeps = |value: &Change<String>, before: Option<&Option<String>>| match change(value) {
        Change::Set(_) => true,
        Change::Clear => false,
        Change::Absent => before.is_none_or(|b| present(b).is_some()),
    };
    let phone = keeps(&c.phone_number, last.map(|p| &p.phone_number));
    let extension = keeps(&c.extension, last.map(|p| &p.extension));
    (!phone && !extension).then(|| {
        format!(
            "this change leaves user \"{}\" with neither phoneNumber nor extension; Webex needs one of them",
            c.user_id
        )
    })
}

/// The profile after a modify request, for the caller to keep as the user's last profile.
/// Names cannot be cleared (they stay); a rename moves the profile to the new userId.
pub fn apply_changes(profile: &UserProfile, changes: &UserChanges) -> UserProfile {
    fn required(value: &mut String, c: &Change<String>) {
        if let Change::Set(v) = c {
            value.clone_from(v);
        }
    }
    fn optional(value: &mut Option<String>, c: &Change<String>) {
        match c {
            Change::Set(v) => *value = Some(v.clone()),
            Change::Clear => *value = None,
            Change::Absent => {}
        }
    }
    let mut p = profile.clone();
    required(&mut p.user_id, &changes.new_user_id);
    required(&mut p.first_name, &changes.first_name);
    required(&mut p.last_name, &changes.last_name);
    optional(&mut p.phone_number, &changes.phone_number);
    optional(&mut p.extension, &changes.extension);
    optional(&mut p.mobile_phone_number, &changes.mobile_phone_number);
    optional(&mut p.email_address, &changes.email_address);
    optional(&mut p.language, &changes.language);
    optional(&mut p.time_zone, &changes.time_zone);
    if let Some(e) = changes.is_enterprise {
        p.is_enterprise = Some(e);
    }
    p
}
