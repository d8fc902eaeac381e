//! What BroadWorks, flowthrough and Webex each say about a population, compared. Pure.
//!
//! BroadWorks' side is the export mapped through the templates exactly as live traffic is (the
//! Webex body each user *should* have); flowthrough's side is its user map; Webex's side is the
//! paged subscriber list. The comparison yields findings by kind and, for each, the fix that
//! goes through the outbox.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::source::{Record, Refusal};
use crate::config::Config;
use crate::mapping::{self, MapContext, Plan, ProvisionBody, UpdateBody};
use crate::oci::Command;
use crate::webex::{Subscriber, SubscriberStatus};

/// A BroadWorks user mapped to the Webex body it should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub origin: String,
    pub template: String,
    pub body: ProvisionBody,
}

/// Map every record through its template (`explicit`, else the row's own, else the override
/// table and `default_template`, as `POST /provisioning` does). Users whose Integrated IM&P is
/// known to be unassigned are not Webex users; with `require_imp`, neither are users whose
/// assignment is unknown.
pub fn desired(
    records: &[Record],
    config: &Config,
    explicit: Option<&str>,
    require_imp: bool,
) -> (Vec<Desired>, Vec<Refusal>) {
    let languages = config.language_table();
    let mut wanted = Vec::new();
    let mut refused = Vec::new();
    for record in records {
        let user_id = record.profile.user_id.clone();
        let refuse = |reason: String| Refusal {
            origin: record.origin.clone(),
            user_id: Some(user_id.clone()),
            reason,
        };
        match record.imp {
            Some(false) => {
                refused.push(refuse(format!(
                    "{} is not assigned; assign it in BroadWorks (flow-through then provisions the user) or leave the user out",
                    mapping::IMP_SERVICE
                )));
                continue;
            }
            None if require_imp => {
                refused.push(refuse(format!(
                    "the sources do not say whether {} is assigned (--require-imp); add the user's UserServiceGetAssignmentListResponse or an imp column",
                    mapping::IMP_SERVICE
                )));
                continue;
            }
            _ => {}
        }
        let command = Command::UserAdd(record.profile.clone());
        let selection = config.selection(explicit.or(record.template.as_deref()), None);
        let plan = match mapping::select_template(&command, &selection) {
            Ok(name) => {
                let ctx = MapContext {
                    template_name: &name,
                    template: &config.templates[&name],
                    languages: &languages,
                    last_profile: None,
                };
                (name.clone(), mapping::plan(&command, &ctx))
            }
            Err(rejection) => (String::new(), Plan::from(rejection)),
        };
        match plan {
            (template, Plan::Provision { body, .. }) => wanted.push(Desired {
                origin: record.origin.clone(),
                template,
                body,
            }),
            (_, Plan::Reject { message, .. }) => refused.push(refuse(message)),
            (_, other) => refused.push(refuse(format!(
                "the mapping gave {} instead of a provision",
                other.action()
            ))),
        }
    }
    (wanted, refused)
}

/// Kinds of drift, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// In BroadWorks, not in Webex.
    Missing,
    /// In Webex (under a compared provisioning ID or spEnterpriseId), not in BroadWorks: a
    /// billed seat.
    Extra,
    /// Names, numbers, extension, package or time zone differ.
    Differs,
    /// Webex status `error`, with its errors.
    Error,
    /// A pending or in-progress status for longer than the threshold.
    Stuck,
    /// In flowthrough's user map with a subscriber id Webex no longer has.
    StaleMap,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Missing,
        Kind::Extra,
        Kind::Differs,
        Kind::Error,
        Kind::Stuck,
        Kind::StaleMap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Differs => "differs",
            Kind::Error => "error",
            Kind::Stuck => "stuck",
            Kind::StaleMap => "stale_map",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One field that differs: its Webex name, BroadWorks' value and Webex's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldDiff {
    pub field: &'static str,
    pub broadworks: Option<String>,
    pub webex: Option<String>,
}

/// The fix of a finding, as an outbox call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    Provision(ProvisionBody),
    Update(UpdateBody),
    Remove,
    /// Forget the subscriber id in the user map (no Webex call).
    Unmap,
}

impl Fix {
    pub fn action(&self) -> &'static str {
        match self {
            Fix::Provision(_) => "provision",
            Fix::Update(_) => "update",
            Fix::Remove => "remove",
            Fix::Unmap => "unmap",
        }
    }
}

/// One user's drift of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    #[serde(rename = "userId")]
    pub user_id: String,
    #[serde(rename = "subscriberId")]
    pub subscriber_id: Option<String>,
    /// The template the BroadWorks side maps through (none for an extra).
    pub template: Option<String>,
    #[serde(rename = "spEnterpriseId")]
    pub sp_enterprise_id: Option<String>,
    /// Webex status for error and stuck.
    pub status: Option<String>,
    pub detail: String,
    pub fields: Vec<FieldDiff>,
    #[serde(skip)]
    pub fix: Fix,
}

/// Digits of a phone number with its leading `+`: Webex may write a number with or without the
/// separators BroadWorks used.
fn phone_key(value: &str) -> String {
    let mut key: String = value.chars().filter(char::is_ascii_digit).collect();
    if value.trim_start().starts_with('+') {
        key.insert(0, '+');
    }
    key
}

/// One field both sides have: its Webex name, the two values, whether it is a phone number, and
/// where its update goes.
struct Compared<'a> {
    name: &'static str,
    broadworks: Option<&'a str>,
    webex: Option<&'a str>,
    phone: bool,
    slot: &'a mut Option<String>,
}

fn blank(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The fields that differ between the body BroadWorks maps to and the subscriber Webex has, and
/// the update that makes Webex agree. Email and language cannot be updated, so they are not
/// compared.
pub fn compare(want: &ProvisionBody, have: &Subscriber) -> (Vec<FieldDiff>, UpdateBody) {
    let mut diffs = Vec::new();
    let mut update = UpdateBody::default();
    let package = serde_json::to_value(want.package)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let field = |name, broadworks, webex, phone, slot| Compared {
        name,
        broadworks,
        webex,
        phone,
        slot,
    };
    let fields = [
        field(
            "firstName",
            Some(want.first_name.as_str()),
            blank(&have.first_name),
            false,
            &mut update.first_name,
        ),
        field(
            "lastName",
            Some(want.last_name.as_str()),
            blank(&have.last_name),
            false,
            &mut update.last_name,
        ),
        field(
            "primaryPhoneNumber",
            blank(&want.primary_phone_number),
            blank(&have.primary_phone_number),
            true,
            &mut update.primary_phone_number,
        ),
        field(
            "mobilePhoneNumber",
            blank(&want.mobile_phone_number),
            blank(&have.mobile_phone_number),
            true,
            &mut update.mobile_phone_number,
        ),
        field(
            "extension",
            blank(&want.extension),
            blank(&have.extension),
            false,
            &mut update.extension,
        ),
        field(
            "timezone",
            blank(&want.timezone),
            blank(&have.timezone),
            false,
            &mut update.timezone,
        ),
    ];
    for Compared {
        name: field,
        broadworks: bw,
        webex,
        phone,
        slot,
    } in fields
    {
        let same = match (bw, webex) {
            (Some(a), Some(b)) if phone => phone_key(a) == phone_key(b),
            (a, b) => a == b,
        };
        if !same {
            // Clearing is an empty string (SPEC §4).
            *slot = Some(bw.unwrap_or_default().to_owned());
            diffs.push(FieldDiff {
                field,
                broadworks: bw.map(str::to_owned),
                webex: webex.map(str::to_owned),
            });
        }
    }
    if blank(&have.package) != Some(package.as_str()) {
        update.package = Some(want.package);
        diffs.push(FieldDiff {
            field: "package",
            broadworks: Some(package),
            webex: have.package.clone(),
        });
    }
    (diffs, update)
}

/// Everything an update may carry, so an `error` or a stuck subscriber gets a new attempt with
/// the values BroadWorks holds.
fn full_update(want: &ProvisionBody) -> UpdateBody {
    UpdateBody {
        user_id: None,
        first_name: Some(want.first_name.clone()),
        last_name: Some(want.last_name.clone()),
        primary_phone_number: Some(want.primary_phone_number.clone().unwrap_or_default()),
        mobile_phone_number: Some(want.mobile_phone_number.clone().unwrap_or_default()),
        extension: Some(want.extension.clone().unwrap_or_default()),
        timezone: want.timezone.clone(),
        package: Some(want.package),
    }
}

/// What the comparison needs besides the three sides.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Now, in milliseconds since the epoch.
    pub now_ms: u64,
    /// A subscriber pending or in progress longer than this is stuck.
    pub stuck_after_ms: u64,
}

/// The status as Webex spells it.
pub fn status_name(status: SubscriberStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn changed_ms(subscriber: &Subscriber) -> Option<u64> {
    let at =
        chrono::DateTime::parse_from_rfc3339(subscriber.last_status_change.as_deref()?).ok()?;
    u64::try_from(at.timestamp_millis()).ok()
}

/// Compare the three sides. `map` is flowthrough's userId → subscriber id for the users it
/// knows; `webex` is every subscriber listed under the compared scopes. Findings come sorted by
/// userId, then kind.
pub fn reconcile(
    wanted: &[Desired],
    map: &HashMap<String, String>,
    webex: &[Subscriber],
    limits: Thresholds,
) -> Vec<Finding> {
    let by_user: HashMap<&str, &Subscriber> =
        webex.iter().map(|s| (s.user_id.as_str(), s)).collect();
    let webex_ids: HashSet<&str> = webex.iter().map(|s| s.id.as_str()).collect();
    let mut findings = Vec::new();
    let mut known = HashSet::new();
    for want in wanted {
        let user_id = want.body.user_id.as_str();
        known.insert(user_id);
        let finding =
            |kind, subscriber_id: Option<&str>, status, detail: String, fields, fix| Finding {
                kind,
                user_id: user_id.to_owned(),
                subscriber_id: subscriber_id.map(str::to_owned),
                template: Some(want.template.clone()),
                sp_enterprise_id: Some(want.body.sp_enterprise_id.clone()),
                status,
                detail,
                fields,
                fix,
            };
        if let Some(mapped) = map.get(user_id)
            && !webex_ids.contains(mapped.as_str())
        {
            findings.push(finding(
                Kind::StaleMap,
                Some(mapped),
                None,
                format!(
                    "flowthrough maps {user_id} to subscriber {mapped}, which Webex does not list"
                ),
                Vec::new(),
                Fix::Unmap,
            ));
        }
        let Some(have) = by_user.get(user_id) else {
            findings.push(finding(
                Kind::Missing,
                None,
                None,
                format!("{} ({}) has no Webex subscriber", user_id, want.origin),
                Vec::new(),
                Fix::Provision(want.body.clone()),
            ));
            continue;
        };
        let status = status_name(have.status);
        match have.status {
            SubscriberStatus::Error => {
                let errors: Vec<String> = have
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.error_code, e.description))
                    .collect();
                findings.push(finding(
                    Kind::Error,
                    Some(&have.id),
                    Some(status),
                    if errors.is_empty() {
                        "Webex status error, no errors listed".to_owned()
                    } else {
                        errors.join("; ")
                    },
                    Vec::new(),
                    Fix::Update(full_update(&want.body)),
                ));
                continue;
            }
            SubscriberStatus::Provisioned | SubscriberStatus::Unknown => {}
            _ => {
                let since = changed_ms(have);
                let age = since.map(|t| limits.now_ms.saturating_sub(t));
                if age.is_some_and(|a| a > limits.stuck_after_ms) {
                    findings.push(finding(
                        Kind::Stuck,
                        Some(&have.id),
                        Some(status.clone()),
                        format!(
                            "{status} for {} min (since {})",
                            age.unwrap_or_default() / 60_000,
                            have.last_status_change.as_deref().unwrap_or("?")
                        ),
                        Vec::new(),
                        Fix::Update(full_update(&want.body)),
                    ));
                    continue;
                }
            }
        }
        let (fields, update) = compare(&want.body, have);
        if !fields.is_empty() {
            let names: Vec<&str> = fields.iter().map(|f| f.field).collect();
            findings.push(finding(
                Kind::Differs,
                Some(&have.id),
                Some(status),
                format!("differs in {}", names.join(", ")),
                fields,
                Fix::Update(update),
            ));
        }
    }
    for have in webex {
        if known.contains(have.user_id.as_str()) {
            continue;
        }
        findings.push(Finding {
            kind: Kind::Extra,
            user_id: have.user_id.clone(),
            subscriber_id: Some(have.id.clone()),
            template: None,
            sp_enterprise_id: have.sp_enterprise_id.clone(),
            status: Some(status_name(have.status)),
            detail: "in Webex but not in BroadWorks: a billed seat; remove it with --repair --only extra".to_owned(),
            fields: Vec::new(),
            fix: Fix::Remove,
        });
    }
    findings.sort_by(|a, b| a.user_id.cmp(&b.user_id).then(a.kind.cmp(&b.kind)));
    findings
}

/// What an import does with one BroadWorks user, from the comparison: provision the missing,
/// update what differs, forget a stale map entry, and leave alone a user Webex already has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportStep {
    pub user_id: String,
    pub template: String,
    /// The fix to send (a provision, an update, or an unmap of flowthrough's stale entry);
    /// `None` when Webex has the user as BroadWorks says.
    pub fix: Option<Fix>,
    /// The user's Webex status, empty when Webex has none (not every status means it works:
    /// an `error` is reconcile's to report and repair).
    pub status: String,
}

/// The import's steps for every wanted user, in the order of `wanted` (a user may have an
/// unmap step and a provision step). Extra subscribers are not an import's business.
pub fn import_steps(
    wanted: &[Desired],
    findings: &[Finding],
    webex: &[Subscriber],
) -> Vec<ImportStep> {
    let mut fixes: HashMap<&str, Vec<&Finding>> = HashMap::new();
    for finding in findings {
        if matches!(finding.kind, Kind::Missing | Kind::Differs | Kind::StaleMap) {
            fixes
                .entry(finding.user_id.as_str())
                .or_default()
                .push(finding);
        }
    }
    let status: HashMap<&str, SubscriberStatus> = webex
        .iter()
        .map(|s| (s.user_id.as_str(), s.status))
        .collect();
    let mut steps = Vec::with_capacity(wanted.len());
    for want in wanted {
        let user_id = want.body.user_id.as_str();
        let mine = fixes.remove(user_id).unwrap_or_default();
        let acts = mine.iter().any(|f| f.kind != Kind::StaleMap);
        let status = status
            .get(user_id)
            .map_or_else(String::new, |s| status_name(*s));
        let step = |fix| ImportStep {
            user_id: user_id.to_owned(),
            template: want.template.clone(),
            fix,
            status: status.clone(),
        };
        steps.extend(mine.into_iter().map(|f| step(Some(f.fix.clone()))));
        if !acts {
            steps.push(step(None));
        }
    }
    steps
}

/// Findings counted by kind, every kind present (zero included).
pub fn counts(findings: &[Finding]) -> BTreeMap<Kind, u64> {
    let mut counts: BTreeMap<Kind, u64> = Kind::ALL.iter().map(|k| (*k, 0)).collect();
    for finding in findings {
        *counts.entry(finding.kind).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::UserProfile;
    use crate::webex::ApiErrorItem;

    fn config() -> Config {
        Config::parse(
            r#"
default_template = "acme"
[templates.acme]
provisioning_id = "prov-acme"
package = "standard"
enterprise_mode = true
user_verification = "trusted_email"
country = "US"
calling_code = "+1"
default_language = "en_US"
default_timezone = "America/New_York"
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap()
    }

    fn record(user: &str, imp: Option<bool>) -> Record {
        Record {
            origin: format!("t.csv {user}"),
            profile: UserProfile {
                service_provider_id: "acme-ent".into(),
                group_id: "hq".into(),
                user_id: user.into(),
                first_name: "Ann".into(),
                last_name: "Ng".into(),
                phone_number: Some("2025550101".into()),
                extension: Some("101".into()),
                email_address: Some(user.to_owned()),
                ..UserProfile::default()
            },
            template: None,
            imp,
        }
    }

    /// The subscriber Webex would hold after provisioning `want`.
    fn as_provisioned(want: &Desired, id: &str) -> Subscriber {
        let b = &want.body;
        Subscriber {
            id: id.into(),
            person_id: None,
            user_id: b.user_id.clone(),
            sp_enterprise_id: Some(b.sp_enterprise_id.clone()),
            first_name: Some(b.first_name.clone()),
            last_name: Some(b.last_name.clone()),
            // Webex may write the number with separators.
            primary_phone_number: b
                .primary_phone_number
                .as_ref()
                .map(|p| format!("{}-{}", &p[..2], &p[2..])),
            mobile_phone_number: None,
            extension: b.extension.clone(),
            email: b.email.clone(),
            language: b.language.clone(),
            timezone: b.timezone.clone(),
            package: Some("standard".into()),
            status: SubscriberStatus::Provisioned,
            errors: Vec::new(),
            provisioning_id: Some(b.provisioning_id.clone()),
            last_status_change: Some("2026-01-01T00:00:00.000Z".into()),
        }
    }

    #[test]
    fn records_map_like_live_traffic_and_unassigned_imp_is_left_out() {
        let mut no_email = record("noemail@acme.example", None);
        no_email.profile.email_address = None;
        let records = vec![
            record("a@acme.example", Some(true)),
            record("b@acme.example", Some(false)),
            record("c@acme.example", None),
            no_email,
        ];
        let (wanted, refused) = desired(&records, &config(), None, false);
        assert_eq!(wanted.len(), 2);
        assert_eq!(
            wanted[0].body.primary_phone_number.as_deref(),
            Some("+12025550101")
        );
        assert_eq!(wanted[0].body.sp_enterprise_id, "acme-ent");
        assert_eq!(refused.len(), 2);
        assert!(
            refused[0]
                .reason
                .contains("Integrated IM&P is not assigned")
        );
        assert!(refused[1].reason.contains("trusted_email"), "{refused:?}");
        let (wanted, refused) = desired(&records, &config(), None, true);
        assert_eq!((wanted.len(), refused.len()), (1, 3));
        let (_, refused) = desired(&records[..1], &config(), Some("nope"), false);
        assert!(refused[0].reason.contains("not configured"), "{refused:?}");
    }

    #[test]
    fn every_kind_of_drift_is_found_and_users_in_sync_are_not_reported() {
        let records: Vec<Record> = (0..50)
            .map(|i| record(&format!("u{i:02}@acme.example"), None))
            .collect();
        let (wanted, refused) = desired(&records, &config(), None, false);
        assert!(refused.is_empty());
        let mut webex: Vec<Subscriber> = wanted
            .iter()
            .enumerate()
            .map(|(i, w)| as_provisioned(w, &format!("S{i}")))
            .collect();
        // u00 missing; u01 differs in last name and package; u02 in error; u03 stuck;
        // u04's map entry is stale; one extra subscriber.
        webex.remove(0);
        webex[0].last_name = Some("Changed".into());
        webex[0].package = Some("premium".into());
        webex[1].status = SubscriberStatus::Error;
        webex[1].errors = vec![ApiErrorItem {
            error_code: 10022,
            description: "dup".into(),
        }];
        webex[2].status = SubscriberStatus::Provisioning;
        webex[3].id = "S4-new".into();
        let mut extra = webex[4].clone();
        extra.id = "X".into();
        extra.user_id = "gone@acme.example".into();
        webex.push(extra);
        // A subscriber pending for a short while is not stuck.
        webex[5].status = SubscriberStatus::PendingEmailValidation;
        webex[5].last_status_change = Some(chrono::Utc::now().to_rfc3339());
        let map = HashMap::from([("u04@acme.example".to_owned(), "S4".to_owned())]);
        let findings = reconcile(
            &wanted,
            &map,
            &webex,
            Thresholds {
                now_ms: chrono::Utc::now().timestamp_millis() as u64,
                stuck_after_ms: 3_600_000,
            },
        );
        let found: Vec<(&str, Kind)> = findings
            .iter()
            .map(|f| (f.user_id.as_str(), f.kind))
            .collect();
        assert_eq!(
            found,
            vec![
                ("gone@acme.example", Kind::Extra),
                ("u00@acme.example", Kind::Missing),
                ("u01@acme.example", Kind::Differs),
                ("u02@acme.example", Kind::Error),
                ("u03@acme.example", Kind::Stuck),
                ("u04@acme.example", Kind::StaleMap),
            ]
        );
        let differs = &findings[2];
        let fields: Vec<&str> = differs.fields.iter().map(|f| f.field).collect();
        assert_eq!(fields, ["lastName", "package"]);
        let Fix::Update(update) = &differs.fix else {
            panic!("{:?}", differs.fix)
        };
        assert_eq!(update.last_name.as_deref(), Some("Ng"));
        assert_eq!(update.first_name, None);
        assert!(findings[3].detail.contains("10022: dup"));
        assert!(matches!(findings[1].fix, Fix::Provision(_)));
        assert_eq!(findings[0].fix, Fix::Remove);
        let counts = counts(&findings);
        assert_eq!(counts.len(), 6);
        assert!(counts.values().all(|n| *n == 1));
    }

    #[test]
    fn an_import_provisions_the_missing_updates_what_differs_and_leaves_the_rest() {
        let records: Vec<Record> = (0..4)
            .map(|i| record(&format!("i{i}@acme.example"), None))
            .collect();
        let (wanted, _) = desired(&records, &config(), None, false);
        let mut webex: Vec<Subscriber> = wanted[1..]
            .iter()
            .enumerate()
            .map(|(i, w)| as_provisioned(w, &format!("S{i}")))
            .collect();
        webex[0].first_name = Some("Changed".into());
        webex[1].status = SubscriberStatus::Error;
        webex.push(Subscriber {
            user_id: "extra@acme.example".into(),
            ..webex[2].clone()
        });
        let map = HashMap::from([("i0@acme.example".to_owned(), "S-old".to_owned())]);
        let limits = Thresholds {
            now_ms: 0,
            stuck_after_ms: u64::MAX,
        };
        let findings = reconcile(&wanted, &map, &webex, limits);
        let steps = import_steps(&wanted, &findings, &webex);
        let summary: Vec<(String, &str)> = steps
            .iter()
            .map(|s| {
                let what: &str = match &s.fix {
                    Some(fix) => fix.action(),
                    None => &s.status,
                };
                (s.user_id.clone(), what)
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("i0@acme.example".to_owned(), "provision"),
                ("i0@acme.example".to_owned(), "unmap"),
                ("i1@acme.example".to_owned(), "update"),
                ("i2@acme.example".to_owned(), "error"),
                ("i3@acme.example".to_owned(), "provisioned"),
            ]
        );
    }

    #[test]
    fn a_cleared_number_is_a_difference_and_its_fix_clears_it() {
        let (wanted, _) = desired(&[record("a@acme.example", None)], &config(), None, false);
        let mut have = as_provisioned(&wanted[0], "S");
        have.mobile_phone_number = Some("+15145550199".into());
        let (diffs, update) = compare(&wanted[0].body, &have);
        assert_eq!(diffs.len(), 1);
        assert_eq!(update.mobile_phone_number.as_deref(), Some(""));
    }
}
