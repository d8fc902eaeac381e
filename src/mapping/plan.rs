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

/// A command refused with an OCI-P error, before any plan exists (see [`select_template`]).
///
/// [`select_template`]: super::select_template
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: OciError,
    pub message: String,
}

impl From<Rejection> for Plan {
    fn from(r: Rejection) -> Plan {
        Plan::Reject {
            code: r.code,
            message: r.message,
        }
    }
}

/// Unsupported and malformed commands are refused whatever the template; template selection
/// uses this too so they never turn into "unknown template".
pub(crate) fn refusal(command: &Command) -> Option<Rejection> {
    match command {
        Command::Unsupported => Some(unsupported()),
        Command::Invalid { reason } => Some(malformed(reason)),
        _ => None,
    }
}

fn unsupported() -> Rejection {
    Rejection {
        code: OciError::Unsupported,
        message: "flowthrough does not carry this command to Webex; only the commands of the SPEC §2 table are handled"
            .to_owned(),
    }
}

fn malformed(reason: &str) -> Rejection {
    Rejection {
        code: OciError::Malformed,
        message: reason.to_owned(),
    }
}

/// Whether [`plan`] reads [`MapContext::last_profile`] for this command. The handler reads the
/// profile from the store only then: a UserAdd carries the whole profile, and adds are most of
/// the traffic.
pub fn uses_last_profile(command: &Command) -> bool {
    matches!(
        command,
        Command::UserModify(_)
            | Command::ServiceAssign { .. }
            | Command::IntegratedImpModify { .. }
    )
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
        Command::Unsupported => unsupported().into(),
        Command::Invalid { reason } => malformed(reason).into(),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::mapping::template::tests::template;
    use crate::oci::{ErrorResponse, Severity};

    /// The user of `samples/user-add-17sp4.xml`.
    fn alice() -> UserProfile {
        UserProfile {
            service_provider_id: "acme-ent".into(),
            group_id: "acme-hq".into(),
            user_id: "alice.smith@acme.example".into(),
            first_name: "Alice".into(),
            last_name: "Smith".into(),
            phone_number: Some("2025550101".into()),
            extension: Some("0101".into()),
            language: Some("English".into()),
            time_zone: Some("America/New_York".into()),
            email_address: Some("alice.smith@acme.example".into()),
            ..UserProfile::default()
        }
    }

    fn plan_with(command: &Command, t: &Template, last: Option<&UserProfile>) -> Plan {
        let languages = LanguageTable::with_overrides(&BTreeMap::new());
        plan(
            command,
            &MapContext {
                template_name: "acme",
                template: t,
                languages: &languages,
                last_profile: last,
            },
        )
    }

    fn run(command: &Command) -> Plan {
        plan_with(command, &template(), None)
    }

    fn provision_body_of(plan: Plan) -> (ProvisionBody, Vec<String>) {
        match plan {
            Plan::Provision { body, notes, .. } => (body, notes),
            other => panic!("expected a provision, got {other:?}"),
        }
    }

    fn rejected(plan: &Plan) -> (u16, &str) {
        match plan {
            Plan::Reject { code, message } => (code.code(), message),
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    fn modify(changes: UserChanges) -> Command {
        Command::UserModify(UserChanges {
            user_id: "alice.smith@acme.example".into(),
            ..changes
        })
    }

    #[test]
    fn commands_said_not_to_use_the_last_profile_plan_the_same_without_it() {
        let user = "alice.smith@acme.example".to_owned();
        let commands = [
            Command::UserAdd(alice()),
            modify(UserChanges::default()),
            Command::UserDelete {
                user_id: user.clone(),
            },
            Command::ServiceAssign {
                user_id: user.clone(),
                services: vec![IMP_SERVICE.into()],
            },
            Command::ServiceUnassign {
                user_id: user.clone(),
                services: vec![IMP_SERVICE.into()],
            },
            Command::IntegratedImpModify {
                user_id: user.clone(),
                is_active: Some(true),
            },
            Command::GroupAdd {
                service_provider_id: "acme".into(),
                group_id: "hq".into(),
                group_name: None,
            },
            Command::Unsupported,
        ];
        let last = UserProfile {
            first_name: "Before".into(),
            ..alice()
        };
        let mut used = 0;
        for command in &commands {
            let with = plan_with(command, &template(), Some(&last));
            let without = plan_with(command, &template(), None);
            if uses_last_profile(command) {
                used += 1;
            } else {
                assert_eq!(with, without, "{command:?} does use the last profile");
            }
        }
        assert_eq!(used, 3);
    }

    #[test]
    fn user_add_provisions_with_the_sample_values() {
        let plan = run(&Command::UserAdd(alice()));
        assert_eq!(plan.action(), "provision");
        assert_eq!(plan.user_id(), Some("alice.smith@acme.example"));
        let (body, notes) = provision_body_of(plan);
        assert_eq!(
            body,
            ProvisionBody {
                provisioning_id: "ZjViMzYx".into(),
                user_id: "alice.smith@acme.example".into(),
                sp_enterprise_id: "acme-ent".into(),
                first_name: "Alice".into(),
                last_name: "Smith".into(),
                package: Package::Standard,
                primary_phone_number: Some("+12025550101".into()),
                mobile_phone_number: None,
                extension: Some("0101".into()),
                email: Some("alice.smith@acme.example".into()),
                language: Some("en_US".into()),
                timezone: Some("America/New_York".into()),
            }
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn provision_body_serialises_with_webex_names_and_skips_absent_fields() {
        let (body, _) = provision_body_of(run(&Command::UserAdd(alice())));
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "provisioningId": "ZjViMzYx",
                "userId": "alice.smith@acme.example",
                "spEnterpriseId": "acme-ent",
                "firstName": "Alice",
                "lastName": "Smith",
                "package": "standard",
                "primaryPhoneNumber": "+12025550101",
                "extension": "0101",
                "email": "alice.smith@acme.example",
                "language": "en_US",
                "timezone": "America/New_York"
            })
        );
        let back: ProvisionBody = serde_json::from_value(json).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn provision_in_group_mode_and_with_a_custom_pattern() {
        let mut t = template();
        t.enterprise_mode = false;
        let (body, _) = provision_body_of(plan_with(&Command::UserAdd(alice()), &t, None));
        assert_eq!(body.sp_enterprise_id, "acme-ent+acme-hq");
        t.sp_enterprise_id = Some("bw.{groupId}".into());
        let (body, _) = provision_body_of(plan_with(&Command::UserAdd(alice()), &t, None));
        assert_eq!(body.sp_enterprise_id, "bw.acme-hq");
        let mut p = alice();
        p.group_id = String::new();
        let plan = plan_with(&Command::UserAdd(p), &t, None);
        let (code, message) = rejected(&plan);
        assert_eq!(code, 7003);
        assert!(message.contains("groupId"));
    }

    #[test]
    fn package_is_always_the_templates() {
        for package in [
            Package::Softphone,
            Package::Basic,
            Package::Standard,
            Package::Premium,
        ] {
            let mut t = template();
            t.package = package;
            let (body, _) = provision_body_of(plan_with(&Command::UserAdd(alice()), &t, None));
            assert_eq!(body.package, package);
        }
    }

    #[test]
    fn trusted_email_is_required_and_checked() {
        let mut p = alice();
        p.email_address = None;
        let plan = run(&Command::UserAdd(p.clone()));
        let (code, message) = rejected(&plan);
        assert_eq!(code, 7003);
        assert!(
            message.contains("emailAddress") && message.contains("trusted_email"),
            "{message}"
        );
        p.email_address = Some("  ".into());
        assert_eq!(rejected(&run(&Command::UserAdd(p.clone()))).0, 7003);
        p.email_address = Some("alice at acme".into());
        let plan = run(&Command::UserAdd(p));
        assert_eq!(rejected(&plan).0, 7003);
        assert!(rejected(&plan).1.contains("alice at acme"));
    }

    #[test]
    fn untrusted_email_is_never_sent() {
        let mut t = template();
        t.user_verification = UserVerification::UntrustedEmail;
        let (body, _) = provision_body_of(plan_with(&Command::UserAdd(alice()), &t, None));
        assert_eq!(body.email, None);
        assert!(!serde_json::to_string(&body).unwrap().contains("email"));
        // Missing or malformed: no matter, it is not ours to send.
        let mut p = alice();
        p.email_address = Some("not an address".into());
        let (body, _) = provision_body_of(plan_with(&Command::UserAdd(p), &t, None));
        assert_eq!(body.email, None);
    }

    #[test]
    fn a_user_needs_a_phone_number_or_an_extension() {
        let mut p = alice();
        p.phone_number = None;
        let (body, _) = provision_body_of(run(&Command::UserAdd(p.clone())));
        assert_eq!(
            (body.primary_phone_number, body.extension.as_deref()),
            (None, Some("0101"))
        );
        p.extension = Some(" ".into());
        p.mobile_phone_number = Some("+1-514-555-0199".into());
        let plan = run(&Command::UserAdd(p.clone()));
        let (code, message) = rejected(&plan);
        assert_eq!(code, 7003, "a mobile number alone is not enough");
        assert!(message.contains("phoneNumber") && message.contains("extension"));
        p.phone_number = Some("+44 20 7946 0000".into());
        let (body, _) = provision_body_of(run(&Command::UserAdd(p)));
        assert_eq!(
            body.primary_phone_number.as_deref(),
            Some("+44 20 7946 0000")
        );
        assert_eq!(body.mobile_phone_number.as_deref(), Some("+1-514-555-0199"));
        assert_eq!(body.extension, None);
    }

    #[test]
    fn a_malformed_phone_number_is_7003() {
        let mut p = alice();
        p.mobile_phone_number = Some("call me".into());
        let plan = run(&Command::UserAdd(p));
        let (code, message) = rejected(&plan);
        assert_eq!(code, 7003);
        assert!(message.starts_with("mobilePhoneNumber"));
    }

    #[test]
    fn required_names_missing_is_7003() {
        for field in ["userId", "firstName", "lastName"] {
            let mut p = alice();
            match field {
                "userId" => p.user_id = String::new(),
                "firstName" => p.first_name = " ".into(),
                _ => p.last_name = String::new(),
            }
            let plan = run(&Command::UserAdd(p));
            let (code, message) = rejected(&plan);
            assert_eq!(code, 7003);
            assert!(message.starts_with(field), "{message}");
        }
    }

    #[test]
    fn language_and_time_zone_fall_back_with_notes() {
        let mut p = alice();
        p.language = Some("Klingon".into());
        p.time_zone = Some("Eastern".into());
        let mut t = template();
        t.default_language = "fr_CA".into();
        let (body, notes) = provision_body_of(plan_with(&Command::UserAdd(p.clone()), &t, None));
        assert_eq!(body.language.as_deref(), Some("fr_CA"));
        assert_eq!(body.timezone.as_deref(), Some("America/New_York"));
        assert_eq!(notes.len(), 2, "{notes:?}");
        p.language = Some("Portuguese".into());
        p.time_zone = None;
        let (body, notes) = provision_body_of(plan_with(&Command::UserAdd(p), &t, None));
        assert_eq!(body.language.as_deref(), Some("pt_PT"));
        assert_eq!(body.timezone.as_deref(), Some("America/New_York"));
        assert!(notes.iter().any(|n| n.contains("Meetings")), "{notes:?}");
    }

    #[test]
    fn is_enterprise_that_disagrees_with_the_template_is_noted() {
        let mut p = alice();
        p.is_enterprise = Some(false);
        let (_, notes) = provision_body_of(run(&Command::UserAdd(p.clone())));
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("enterprise_mode = true"));
        p.is_enterprise = Some(true);
        assert!(provision_body_of(run(&Command::UserAdd(p))).1.is_empty());
    }

    #[test]
    fn modify_carries_changed_fields_and_clears_phones_with_empty_strings() {
        let plan = run(&modify(UserChanges {
            last_name: Change::Set("Smith-Lee".into()),
            phone_number: Change::Clear,
            extension: Change::Set("0111".into()),
            ..UserChanges::default()
        }));
        assert_eq!(plan.action(), "update");
        assert_eq!(plan.response(None), ResponseCommand::Success { echo: None });
        let Plan::Update {
            user_id,
            body,
            uncarried,
            ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!(user_id, "alice.smith@acme.example");
        assert!(uncarried.is_empty());
        assert_eq!(
            serde_json::to_value(body).unwrap(),
            serde_json::json!({"lastName": "Smith-Lee", "primaryPhoneNumber": "", "extension": "0111"})
        );
        let call = plan.webex_call().unwrap();
        assert_eq!(
            (call.method, call.path),
            (Method::Put, "/broadworks/subscribers/{id}")
        );
    }

    #[test]
    fn modify_maps_every_carried_field() {
        let plan = run(&modify(UserChanges {
            new_user_id: Change::Set("alice.lee@acme.example".into()),
            first_name: Change::Set("Alicia".into()),
            last_name: Change::Set("Lee".into()),
            phone_number: Change::Set("2025550102".into()),
            mobile_phone_number: Change::Set("+1-514-555-0199".into()),
            extension: Change::Clear,
            time_zone: Change::Set("Europe/Paris".into()),
            ..UserChanges::default()
        }));
        let Plan::Update {
            body,
            uncarried,
            notes,
            ..
        } = plan
        else {
            panic!()
        };
        assert_eq!(
            body,
            UpdateBody {
                user_id: Some("alice.lee@acme.example".into()),
                first_name: Some("Alicia".into()),
                last_name: Some("Lee".into()),
                primary_phone_number: Some("+12025550102".into()),
                mobile_phone_number: Some("+1-514-555-0199".into()),
                extension: Some(String::new()),
                timezone: Some("Europe/Paris".into()),
                package: None,
            }
        );
        assert!(uncarried.is_empty() && notes.is_empty());
    }

    #[test]
    fn modify_never_carries_email_or_language() {
        let plan = run(&modify(UserChanges {
            first_name: Change::Set("Alicia".into()),
            email_address: Change::Set("alicia@acme.example".into()),
            language: Change::Set("French".into()),
            ..UserChanges::default()
        }));
        let Plan::Update {
            body, uncarried, ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        let json = serde_json::to_string(body).unwrap();
        assert_eq!(json, r#"{"firstName":"Alicia"}"#);
        assert_eq!(uncarried.len(), 2);
        let ResponseCommand::Error(ErrorResponse {
            severity,
            code,
            detail,
            echo,
            ..
        }) = plan.response(Some("7".into()))
        else {
            panic!("expected a warning")
        };
        assert_eq!(
            (severity, code, echo.as_deref()),
            (Severity::Warning, 7021, Some("7"))
        );
        let detail = detail.unwrap();
        assert!(
            detail.contains("emailAddress") && detail.contains("language"),
            "{detail}"
        );
    }

    #[test]
    fn update_body_refuses_email_and_language_when_parsed() {
        assert!(serde_json::from_str::<UpdateBody>(r#"{"email":"a@b.co"}"#).is_err());
        assert!(serde_json::from_str::<UpdateBody>(r#"{"language":"fr_FR"}"#).is_err());
        let body: UpdateBody =
            serde_json::from_str(r#"{"extension":"","package":"premium"}"#).unwrap();
        assert_eq!(body.extension.as_deref(), Some(""));
        assert_eq!(body.package, Some(Package::Premium));
    }

    #[test]
    fn only_uncarried_changes_make_an_empty_update_with_7021_and_no_call() {
        let plan = run(&modify(UserChanges {
            email_address: Change::Clear,
            ..UserChanges::default()
        }));
        let Plan::Update {
            body, uncarried, ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert!(body.is_empty());
        assert_eq!(uncarried.len(), 1);
        assert_eq!(plan.webex_call(), None);
        let ResponseCommand::Error(e) = plan.response(None) else {
            panic!()
        };
        assert_eq!(e.code, 7021);
    }

    #[test]
    fn a_modify_with_nothing_for_webex_is_a_noop() {
        let plan = run(&modify(UserChanges {
            is_enterprise: Some(true),
            ..UserChanges::default()
        }));
        assert_eq!(plan.action(), "noop");
        assert_eq!(plan.webex_call(), None);
        assert_eq!(
            plan.response(Some("x".into())),
            ResponseCommand::Success {
                echo: Some("x".into())
            }
        );
    }

    #[test]
    fn clearing_names_or_the_user_id_is_uncarried() {
        let plan = run(&modify(UserChanges {
            first_name: Change::Clear,
            last_name: Change::Set("  ".into()),
            new_user_id: Change::Clear,
            ..UserChanges::default()
        }));
        let Plan::Update {
            body, uncarried, ..
        } = plan
        else {
            panic!()
        };
        assert!(body.is_empty());
        assert_eq!(uncarried.len(), 3, "{uncarried:?}");
    }

    #[test]
    fn modify_time_zone_rules() {
        let plan = run(&modify(UserChanges {
            time_zone: Change::Set("Pacific".into()),
            ..UserChanges::default()
        }));
        let Plan::Update { body, notes, .. } = plan else {
            panic!()
        };
        assert_eq!(body.timezone.as_deref(), Some("America/New_York"));
        assert_eq!(notes.len(), 1);
        let plan = run(&modify(UserChanges {
            time_zone: Change::Clear,
            ..UserChanges::default()
        }));
        let Plan::Update { body, .. } = plan else {
            panic!()
        };
        assert_eq!(body.timezone.as_deref(), Some("America/New_York"));
    }

    #[test]
    fn modify_with_a_bad_phone_number_is_7003() {
        let plan = run(&modify(UserChanges {
            phone_number: Change::Set("12ab".into()),
            ..UserChanges::default()
        }));
        assert_eq!(rejected(&plan).0, 7003);
        assert_eq!(
            plan.response(None),
            OciError::InvalidField.response(None, Some(rejected(&plan).1.to_owned()))
        );
    }

    #[test]
    fn modify_that_leaves_no_number_is_7003() {
        let both = UserChanges {
            phone_number: Change::Clear,
            extension: Change::Clear,
            ..UserChanges::default()
        };
        assert_eq!(
            rejected(&run(&modify(both))).0,
            7003,
            "without a profile, clearing both is still wrong"
        );
        // Alice has a phone number and an extension: clearing one is fine, clearing the other too
        // only when the first is not already gone.
        let mut profile = alice();
        let only_ext = modify(UserChanges {
            extension: Change::Clear,
            ..UserChanges::default()
        });
        assert_eq!(
            plan_with(&only_ext, &template(), Some(&profile)).action(),
            "update"
        );
        profile.phone_number = None;
        assert_eq!(
            rejected(&plan_with(&only_ext, &template(), Some(&profile))).0,
            7003
        );
        // Unknown profile: the number the request does not mention may exist.
        assert_eq!(plan_with(&only_ext, &template(), None).action(), "update");
    }

    #[test]
    fn user_delete_removes() {
        let plan = run(&Command::UserDelete {
            user_id: "bob@acme.example".into(),
        });
        assert_eq!(
            plan,
            Plan::Remove {
                user_id: "bob@acme.example".into()
            }
        );
        assert_eq!(plan.action(), "remove");
        let call = plan.webex_call().unwrap();
        assert_eq!(
            (call.method, call.path, call.body),
            (Method::Delete, "/broadworks/subscribers/{id}", None)
        );
        assert_eq!(plan.response(None), ResponseCommand::Success { echo: None });
    }

    fn services(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn imp_assignment_provisions_from_the_last_profile() {
        let cmd = Command::ServiceAssign {
            user_id: "alice.smith@acme.example".into(),
            services: services(&["Voice Messaging User", "Integrated IM&P"]),
        };
        let profile = alice();
        let plan = plan_with(&cmd, &template(), Some(&profile));
        assert_eq!(plan, run(&Command::UserAdd(alice())));
        let plan = run(&cmd);
        let (code, message) = rejected(&plan);
        assert_eq!(code, 7005);
        assert!(message.contains("alice.smith@acme.example") && message.contains("UserAddRequest"));
    }

    #[test]
    fn other_service_changes_are_noops() {
        let user_id = "alice.smith@acme.example".to_owned();
        let assign = Command::ServiceAssign {
            user_id: user_id.clone(),
            services: services(&["Voice Messaging User"]),
        };
        let unassign = Command::ServiceUnassign {
            user_id,
            services: services(&["Call Waiting", "Integrated IM&P 2"]),
        };
        for cmd in [assign, unassign] {
            let plan = run(&cmd);
            assert_eq!(plan.action(), "noop", "{cmd:?}");
            assert_eq!(plan.webex_call(), None);
        }
    }

    #[test]
    fn imp_unassignment_removes() {
        let cmd = Command::ServiceUnassign {
            user_id: "a@b.co".into(),
            services: services(&["Integrated IM&P"]),
        };
        assert_eq!(
            run(&cmd),
            Plan::Remove {
                user_id: "a@b.co".into()
            }
        );
    }

    #[test]
    fn integrated_imp_modify_follows_is_active() {
        let user_id = "alice.smith@acme.example".to_owned();
        let on = Command::IntegratedImpModify {
            user_id: user_id.clone(),
            is_active: Some(true),
        };
        let profile = alice();
        assert_eq!(
            plan_with(&on, &template(), Some(&profile)).action(),
            "provision"
        );
        assert_eq!(rejected(&run(&on)).0, 7005);
        let off = Command::IntegratedImpModify {
            user_id: user_id.clone(),
            is_active: Some(false),
        };
        assert_eq!(
            run(&off),
            Plan::Remove {
                user_id: user_id.clone()
            }
        );
        let unchanged = Command::IntegratedImpModify {
            user_id,
            is_active: None,
        };
        assert_eq!(run(&unchanged).action(), "noop");
    }

    #[test]
    fn group_and_service_provider_adds_record_the_customer() {
        let group = Command::GroupAdd {
            service_provider_id: "acme-ent".into(),
            group_id: "acme-hq".into(),
            group_name: Some("ACME HQ".into()),
        };
        let plan = run(&group);
        assert_eq!(
            plan,
            Plan::RecordCustomer(Customer {
                service_provider_id: "acme-ent".into(),
                group_id: Some("acme-hq".into()),
                name: Some("ACME HQ".into()),
                enterprise: false,
                mode_mismatch: None,
            })
        );
        assert_eq!((plan.action(), plan.webex_call()), ("record", None));

        let ent = Command::ServiceProviderAdd {
            service_provider_id: "acme-ent".into(),
            name: None,
            is_enterprise: true,
        };
        let Plan::RecordCustomer(c) = run(&ent) else {
            panic!()
        };
        assert!(c.enterprise);
        assert_eq!(c.mode_mismatch, None);
        assert_eq!(
            run(&ent).response(None),
            ResponseCommand::Success { echo: None }
        );
    }

    #[test]
    fn customer_mode_mismatch_is_a_warning_text_not_an_oci_warning() {
        let sp = Command::ServiceProviderAdd {
            service_provider_id: "isp".into(),
            name: None,
            is_enterprise: false,
        };
        let plan = run(&sp);
        let Plan::RecordCustomer(c) = &plan else {
            panic!()
        };
        let warning = c.mode_mismatch.as_deref().unwrap();
        assert!(
            warning.contains("isp")
                && warning.contains("\"acme\"")
                && warning.contains("enterprise_mode = true")
        );
        assert_eq!(plan.response(None), ResponseCommand::Success { echo: None });

        let mut group_template = template();
        group_template.enterprise_mode = false;
        let ent = Command::ServiceProviderAdd {
            service_provider_id: "e".into(),
            name: None,
            is_enterprise: true,
        };
        let Plan::RecordCustomer(c) = plan_with(&ent, &group_template, None) else {
            panic!()
        };
        assert!(c.mode_mismatch.is_some());
        let Plan::RecordCustomer(c) = plan_with(&sp, &group_template, None) else {
            panic!()
        };
        assert_eq!(c.mode_mismatch, None);
    }

    #[test]
    fn deletes_of_groups_and_service_providers_are_noops() {
        let cmds = [
            Command::GroupDelete {
                service_provider_id: "isp".into(),
                group_id: "g".into(),
            },
            Command::ServiceProviderDelete {
                service_provider_id: "isp".into(),
            },
        ];
        for cmd in cmds {
            let plan = run(&cmd);
            assert_eq!(plan.action(), "noop");
            assert_eq!(plan.response(None), ResponseCommand::Success { echo: None });
        }
    }

    #[test]
    fn unsupported_is_7002_and_invalid_is_7001() {
        let plan = run(&Command::Unsupported);
        assert_eq!((plan.action(), rejected(&plan).0), ("reject", 7002));
        let plan = run(&Command::Invalid {
            reason: "userId is missing".into(),
        });
        assert_eq!(rejected(&plan), (7001, "userId is missing"));
        let ResponseCommand::Error(e) = plan.response(Some("3".into())) else {
            panic!()
        };
        assert_eq!(
            (e.severity, e.code, e.detail.as_deref()),
            (Severity::Error, 7001, Some("userId is missing"))
        );
        assert_eq!(plan.webex_call(), None);
    }

    #[test]
    fn webex_call_of_a_provision_serialises_for_translate() {
        let call = run(&Command::UserAdd(alice())).webex_call().unwrap();
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!(json["method"], "POST");
        assert_eq!(json["path"], "/broadworks/subscribers");
        assert_eq!(json["body"]["provisioningId"], "ZjViMzYx");
        assert_eq!(json["body"]["primaryPhoneNumber"], "+12025550101");
        let delete = serde_json::to_value(
            run(&Command::UserDelete {
                user_id: "u".into(),
            })
            .webex_call(),
        )
        .unwrap();
        assert_eq!(
            delete,
            serde_json::json!({"method": "DELETE", "path": "/broadworks/subscribers/{id}", "body": null})
        );
    }

    #[test]
    fn apply_changes_keeps_the_last_profile_current() {
        let changes = UserChanges {
            user_id: "alice.smith@acme.example".into(),
            new_user_id: Change::Set("alice.lee@acme.example".into()),
            first_name: Change::Clear,
            last_name: Change::Set("Lee".into()),
            phone_number: Change::Clear,
            mobile_phone_number: Change::Set("+1-514-555-0199".into()),
            email_address: Change::Set("alice.lee@acme.example".into()),
            language: Change::Clear,
            is_enterprise: Some(true),
            ..UserChanges::default()
        };
        let p = apply_changes(&alice(), &changes);
        assert_eq!(
            p,
            UserProfile {
                user_id: "alice.lee@acme.example".into(),
                first_name: "Alice".into(),
                last_name: "Lee".into(),
                phone_number: None,
                mobile_phone_number: Some("+1-514-555-0199".into()),
                email_address: Some("alice.lee@acme.example".into()),
                language: None,
                is_enterprise: Some(true),
                ..alice()
            }
        );
        assert_eq!(apply_changes(&alice(), &UserChanges::default()), alice());
    }
}
