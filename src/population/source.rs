//! BroadWorks exports read into user records: a CSV file, or OCI-P documents as OCI-P clients
//! save them (the user tables of `UserGetListInGroupResponse`, `…InServiceProviderResponse` and
//! `…InSystemResponse`, `UserGetResponse22`/`23` profiles, `UserServiceGetAssignmentListResponse`
//! for Integrated IM&P). Pure: bytes in, records and refusals out.
//!
//! Column headings follow the public OCI-P schema (R25). The group-level table has no
//! "Group Id" or "Service Provider Id" column and the service-provider table no "Service
//! Provider Id" (SPEC §12's list of columns says otherwise): those come from the saved request
//! (`UserGetListInGroupRequest` names both) or from `--service-provider`/`--group`.
//! `UserGetResponse*` and `UserServiceGetAssignmentListResponse` do not repeat the userId: it is
//! taken from the request saved before them (in the same file or the file given just before), or
//! else from the file name (`alice@acme.example.xml`).

use std::collections::BTreeMap;

use super::xml::{self, Element};
use crate::mapping::IMP_SERVICE;
use crate::oci::UserProfile;

/// One user as a BroadWorks export describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it was read, for messages: `users.csv line 12`, `group.xml row 3`.
    pub origin: String,
    pub profile: UserProfile,
    /// The template the row names (CSV `template` column).
    pub template: Option<String>,
    /// Integrated IM&P assigned, when the source says.
    pub imp: Option<bool>,
}

/// A row or document that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    pub origin: String,
    #[serde(rename = "userId")]
    pub user_id: Option<String>,
    pub reason: String,
}

/// Everything read from the sources, users merged by userId in first-seen order.
#[derive(Debug, Clone, Default)]
pub struct Population {
    pub records: Vec<Record>,
    pub refused: Vec<Refusal>,
    index: BTreeMap<String, usize>,
    /// The userId named by the last saved `UserGetRequest*` or
    /// `UserServiceGetAssignmentListRequest`, for the response that follows it.
    pending_user: Option<String>,
    /// serviceProviderId and groupId of the last saved `UserGetListIn…Request`.
    pending_scope: (Option<String>, Option<String>),
}

/// What the operator says about exports that do not carry it.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub service_provider_id: Option<String>,
    pub group_id: Option<String>,
}

/// The CSV columns, as documented in the README ("Onboarding an existing population").
pub const CSV_COLUMNS: [&str; 14] = [
    "userId",
    "serviceProviderId",
    "groupId",
    "firstName",
    "lastName",
    "phoneNumber",
    "extension",
    "mobilePhoneNumber",
    "emailAddress",
    "language",
    "timeZone",
    "isEnterprise",
    "template",
    "imp",
];

fn boolean(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "y" => Some(true),
        "false" | "no" | "0" | "n" => Some(false),
        _ => None,
    }
}

fn optional(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

impl Population {
    /// Add a record, or merge it into the one already read for its userId: values the new
    /// source has win, values it lacks stay (a table row, then the user's full profile).
    fn add(&mut self, record: Record) {
        let key = record.profile.user_id.clone();
        let Some(&at) = self.index.get(&key) else {
            self.index.insert(key, self.records.len());
            self.records.push(record);
            return;
        };
        let old = &mut self.records[at];
        let (p, n) = (&mut old.profile, record.profile);
        for (slot, value) in [
            (&mut p.service_provider_id, n.service_provider_id),
            (&mut p.group_id, n.group_id),
            (&mut p.first_name, n.first_name),
            (&mut p.last_name, n.last_name),
        ] {
            if !value.is_empty() {
                *slot = value;
            }
        }
        for (slot, value) in [
            (&mut p.phone_number, n.phone_number),
            (&mut p.extension, n.extension),
            (&mut p.mobile_phone_number, n.mobile_phone_number),
            (&mut p.email_address, n.email_address),
            (&mut p.language, n.language),
            (&mut p.time_zone, n.time_zone),
        ] {
            if value.is_some() {
                *slot = value;
            }
        }
        p.is_enterprise = n.is_enterprise.or(p.is_enterprise);
        old.template = record.template.or(old.template.take());
        old.imp = record.imp.or(old.imp);
    }

    fn set_imp(&mut self, origin: &str, user_id: &str, assigned: bool) {
        match self.index.get(user_id) {
            Some(&at) => self.records[at].imp = Some(assigned),
            // The assignment came before (or without) the user's profile: kept as a bare record
            // that a later profile fills in; one that stays bare is refused by the mapping.
            None => self.add(Record {
                origin: origin.to_owned(),
                profile: UserProfile {
                    user_id: user_id.to_owned(),
                    ..UserProfile::default()
                },
                template: None,
                imp: Some(assigned),
            }),
        }
    }

    fn refuse(&mut self, origin: String, user_id: Option<String>, reason: impl Into<String>) {
        self.refused.push(Refusal {
            origin,
            user_id,
            reason: reason.into(),
        });
    }

    /// Read a CSV export: a header row naming [`CSV_COLUMNS`] (any order, any case; `userId`,
    /// `firstName` and `lastName` required), UTF-8 (with or without BOM) or ISO-8859-1. A bad
    /// header refuses the whole file; a bad row is refused alone.
    pub fn read_csv(&mut self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        // Latin-1 when it is not UTF-8: every byte string is Latin-1, and a UTF-8 file is
        // almost never valid by accident.
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => xml::latin1(bytes),
        };
        let mut reader = csv::ReaderBuilder::new()
            .flexible(false)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let header = reader
            .headers()
            .map_err(|e| format!("{name}: cannot read the header row: {e}"))?
            .clone();
        let mut columns = Vec::with_capacity(header.len());
        for heading in &header {
            let Some(known) = CSV_COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(heading)) else {
                return Err(format!(
                    "{name}: unknown column {heading:?} in the header; the columns are {} (userId, firstName and lastName required)",
                    CSV_COLUMNS.join(", ")
                ));
            };
            if columns.contains(known) {
                return Err(format!(
                    "{name}: column {known} appears twice in the header"
                ));
            }
            columns.push(*known);
        }
        for required in ["userId", "firstName", "lastName"] {
            if !columns.contains(&required) {
                return Err(format!(
                    "{name}: the header has no {required} column; the first line must name the columns, e.g. {}",
                    CSV_COLUMNS[..5].join(",")
                ));
            }
        }
        for row in reader.records() {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    self.refuse(format!("{name} line {line}"), None, e.to_string());
                    continue;
                }
            };
            let line = row.position().map_or(0, |p| p.line());
            let origin = format!("{name} line {line}");
            let get = |column: &str| {
                columns
                    .iter()
                    .position(|c| *c == column)
                    .and_then(|i| row.get(i))
                    .unwrap_or("")
            };
            let user_id = get("userId").to_owned();
            if user_id.is_empty() {
                self.refuse(origin, None, "userId is empty");
                continue;
            }
            let flag = |column: &str| -> Result<Option<bool>, String> {
                let value = get(column);
                if value.is_empty() {
                    return Ok(None);
                }
                boolean(value)
                    .map(Some)
                    .ok_or_else(|| format!("{column} is {value:?}; write true or false"))
            };
            let (imp, is_enterprise) = match (flag("imp"), flag("isEnterprise")) {
                (Ok(imp), Ok(enterprise)) => (imp, enterprise),
                (Err(e), _) | (_, Err(e)) => {
                    self.refuse(origin, Some(user_id), e);
                    continue;
                }
            };
            self.add(Record {
                origin,
                profile: UserProfile {
                    service_provider_id: get("serviceProviderId").to_owned(),
                    group_id: get("groupId").to_owned(),
                    user_id,
                    first_name: get("firstName").to_owned(),
                    last_name: get("lastName").to_owned(),
                    phone_number: optional(get("phoneNumber")),
                    extension: optional(get("extension")),
                    mobile_phone_number: optional(get("mobilePhoneNumber")),
                    email_address: optional(get("emailAddress")),
                    language: optional(get("language")),
                    time_zone: optional(get("timeZone")),
                    alternate_user_id: None,
                    is_enterprise,
                },
                template: optional(get("template")),
                imp,
            });
        }
        Ok(())
    }

    /// Read a saved OCI-P document (request or response). `file_stem` is the file name without
    /// its extension, the userId of last resort. Commands that are not exports are ignored.
    pub fn read_oci(
        &mut self,
        name: &str,
        file_stem: &str,
        bytes: &[u8],
        defaults: &Defaults,
    ) -> Result<(), String> {
        let root = xml::parse(bytes).map_err(|e| format!("{name}: {e}"))?;
        if root.name != "BroadsoftDocument" {
            return Err(format!(
                "{name}: the root element is <{}>, not <BroadsoftDocument>; save the OCI-P response document as the client received it",
                root.name
            ));
        }
        for (n, command) in root.all("command").enumerate() {
            let kind = command.xsi_type.as_deref().unwrap_or("");
            let at = format!("{name} command {}", n + 1);
            match kind {
                "UserGetListInGroupRequest" | "UserGetListInServiceProviderRequest" => {
                    self.pending_scope = (
                        command.child_text("serviceProviderId").map(str::to_owned),
                        command.child_text("groupId").map(str::to_owned),
                    );
                }
                _ if kind.starts_with("UserGetRequest")
                    || kind == "UserServiceGetAssignmentListRequest" =>
                {
                    self.pending_user = command.child_text("userId").map(str::to_owned);
                }
                "UserGetListInGroupResponse"
                | "UserGetListInServiceProviderResponse"
                | "UserGetListInSystemResponse" => {
                    let Some(table) = command.child("userTable") else {
                        return Err(format!("{at}: {kind} without a <userTable>"));
                    };
                    let rows = xml::table(table).map_err(|e| format!("{at}: {e}"))?;
                    let scope = std::mem::take(&mut self.pending_scope);
                    for (i, row) in rows.iter().enumerate() {
                        self.table_row(&format!("{name} row {}", i + 1), row, &scope, defaults);
                    }
                }
                _ if kind.starts_with("UserGetResponse") => {
                    let user_id = self.take_user(file_stem);
                    self.profile(&at, command, user_id);
                }
                "UserServiceGetAssignmentListResponse" => {
                    let user_id = self.take_user(file_stem);
                    let Some(table) = command.child("userServicesAssignmentTable") else {
                        return Err(format!(
                            "{at}: UserServiceGetAssignmentListResponse without a <userServicesAssignmentTable>"
                        ));
                    };
                    let rows = xml::table(table).map_err(|e| format!("{at}: {e}"))?;
                    let imp = rows.iter().find(|row| {
                        cell(row, "Service Name")
                            .is_some_and(|s| s.eq_ignore_ascii_case(IMP_SERVICE))
                    });
                    let assigned = imp.and_then(|row| cell(row, "Assigned")).and_then(boolean);
                    self.set_imp(&at, &user_id, assigned.unwrap_or(false));
                }
                "ErrorResponse" => {
                    let summary = command.child_text("summary").unwrap_or("no summary");
                    let user_id = self.pending_user.take();
                    self.refuse(
                        at,
                        user_id,
                        format!("the saved answer is an ErrorResponse: {summary}"),
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn take_user(&mut self, file_stem: &str) -> String {
        self.pending_user
            .take()
            .unwrap_or_else(|| file_stem.to_owned())
    }

    fn table_row(
        &mut self,
        origin: &str,
        row: &[(String, String)],
        scope: &(Option<String>, Option<String>),
        defaults: &Defaults,
    ) {
        let Some(user_id) = cell(row, "User Id").map(str::to_owned) else {
            self.refuse(origin.to_owned(), None, "the row has no User Id");
            return;
        };
        let pick = |heading: &str, saved: &Option<String>, flag: &Option<String>| {
            cell(row, heading)
                .map(str::to_owned)
                .or_else(|| saved.clone())
                .or_else(|| flag.clone())
        };
        let service_provider_id = pick(
            "Service Provider Id",
            &scope.0,
            &defaults.service_provider_id,
        );
        let group_id = pick("Group Id", &scope.1, &defaults.group_id);
        let Some(service_provider_id) = service_provider_id else {
            self.refuse(
                origin.to_owned(),
                Some(user_id),
                "the table has no Service Provider Id column and no saved request names one; save the UserGetListIn…Request with its response, or pass --service-provider",
            );
            return;
        };
        self.add(Record {
            origin: origin.to_owned(),
            profile: UserProfile {
                service_provider_id,
                group_id: group_id.unwrap_or_default(),
                user_id,
                first_name: cell(row, "First Name").unwrap_or("").to_owned(),
                last_name: cell(row, "Last Name").unwrap_or("").to_owned(),
                phone_number: cell(row, "Phone Number").map(str::to_owned),
                extension: cell(row, "Extension").map(str::to_owned),
                mobile_phone_number: cell(row, "Mobile Number").map(str::to_owned),
                email_address: cell(row, "Email Address").map(str::to_owned),
                ..UserProfile::default()
            },
            template: None,
            imp: None,
        });
    }

    fn profile(&mut self, origin: &str, command: &Element, user_id: String) {
        let text = |name: &str| command.child_text(name).map(str::to_owned);
        let required = |name: &str| text(name).unwrap_or_default();
        self.add(Record {
            origin: origin.to_owned(),
            profile: UserProfile {
                service_provider_id: required("serviceProviderId"),
                group_id: required("groupId"),
                user_id,
                first_name: required("firstName"),
                last_name: required("lastName"),
                phone_number: text("phoneNumber"),
                extension: text("extension"),
                mobile_phone_number: text("mobilePhoneNumber"),
                email_address: text("emailAddress"),
                language: text("language"),
                time_zone: text("timeZone"),
                alternate_user_id: None,
                is_enterprise: None,
            },
            template: None,
            imp: None,
        });
    }
}

/// The non-empty value of a column.
fn cell<'a>(row: &'a [(String, String)], heading: &str) -> Option<&'a str> {
    row.iter()
        .find(|(h, _)| h == heading)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_are_read_in_any_column_order_and_case_with_latin1() {
        let mut csv = b"FIRSTNAME,lastName,userId,serviceProviderId,groupId,phoneNumber,extension,emailAddress,template,imp\n".to_vec();
        csv.extend_from_slice(b"Anna,M");
        csv.push(0xFC);
        csv.extend_from_slice(
            b"ller,anna@acme.example,acme-ent,hq,2025550101,101,anna@acme.example,acme,yes\n",
        );
        csv.extend_from_slice(b"Bob,Lee,bob@acme.example,acme-ent,hq,,102,,,\n");
        csv.extend_from_slice(b",,,acme-ent,hq,,,,,\n");
        csv.extend_from_slice(b"Carl,Ng,carl@acme.example,acme-ent,hq,,103,,,maybe\n");
        let mut p = Population::default();
        p.read_csv("users.csv", &csv).unwrap();
        assert_eq!(p.records.len(), 2);
        let anna = &p.records[0];
        assert_eq!(anna.profile.last_name, "Müller");
        assert_eq!(anna.profile.phone_number.as_deref(), Some("2025550101"));
        assert_eq!(anna.template.as_deref(), Some("acme"));
        assert_eq!(anna.imp, Some(true));
        assert_eq!(anna.origin, "users.csv line 2");
        assert_eq!(p.records[1].profile.email_address, None);
        assert_eq!(p.refused.len(), 2);
        assert!(
            p.refused[0].reason.contains("userId is empty"),
            "{:?}",
            p.refused
        );
        assert!(
            p.refused[1].reason.contains("imp is \"maybe\""),
            "{:?}",
            p.refused
        );
    }

    #[test]
    fn a_bad_csv_header_refuses_the_file_with_the_known_columns() {
        let mut p = Population::default();
        let e = p
            .read_csv("u.csv", b"userId,firstName,lastName,fax\n")
            .unwrap_err();
        assert!(
            e.contains("unknown column \"fax\"") && e.contains("mobilePhoneNumber"),
            "{e}"
        );
        let e = p.read_csv("u.csv", b"userId,firstName\n").unwrap_err();
        assert!(e.contains("no lastName column"), "{e}");
        let e = p
            .read_csv("u.csv", b"userId,userid,firstName,lastName\n")
            .unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    fn document(commands: &str) -> Vec<u8> {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><BroadsoftDocument protocol="OCI" xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><sessionId xmlns="">s</sessionId>{commands}</BroadsoftDocument>"#
        )
        .into_bytes()
    }

    #[test]
    fn a_group_table_takes_its_customer_from_the_saved_request() {
        let doc = document(
            r#"<command xsi:type="UserGetListInGroupRequest" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId></command>
<command xsi:type="UserGetListInGroupResponse" xmlns=""><userTable>
<colHeading>User Id</colHeading><colHeading>Last Name</colHeading><colHeading>First Name</colHeading><colHeading>Department</colHeading><colHeading>Phone Number</colHeading><colHeading>Phone Number Activated</colHeading><colHeading>Email Address</colHeading><colHeading>Hiragana Last Name</colHeading><colHeading>Hiragana First Name</colHeading><colHeading>In Trunk Group</colHeading><colHeading>Extension</colHeading><colHeading>Country Code</colHeading><colHeading>National Prefix</colHeading>
<row><col>ann@acme</col><col>Ng</col><col>Ann</col><col/><col>+1-2025550101</col><col>true</col><col>ann@acme.example</col><col/><col/><col>false</col><col>101</col><col>1</col><col/></row>
</userTable></command>"#,
        );
        let mut p = Population::default();
        p.read_oci("g.xml", "g", &doc, &Defaults::default())
            .unwrap();
        let ann = &p.records[0].profile;
        assert_eq!(
            (ann.service_provider_id.as_str(), ann.group_id.as_str()),
            ("acme-ent", "hq")
        );
        assert_eq!(ann.phone_number.as_deref(), Some("+1-2025550101"));
        assert_eq!(ann.email_address.as_deref(), Some("ann@acme.example"));
        assert!(p.refused.is_empty());

        // Without the request and without --service-provider, the row cannot be mapped.
        let bare = document(
            r#"<command xsi:type="UserGetListInGroupResponse" xmlns=""><userTable><colHeading>User Id</colHeading><colHeading>Last Name</colHeading><colHeading>First Name</colHeading><row><col>b@acme</col><col>B</col><col>C</col></row></userTable></command>"#,
        );
        let mut p = Population::default();
        p.read_oci("g.xml", "g", &bare, &Defaults::default())
            .unwrap();
        assert!(p.records.is_empty());
        assert!(
            p.refused[0].reason.contains("--service-provider"),
            "{:?}",
            p.refused
        );
        let mut p = Population::default();
        let flags = Defaults {
            service_provider_id: Some("sp".into()),
            group_id: Some("g".into()),
        };
        p.read_oci("g.xml", "g", &bare, &flags).unwrap();
        assert_eq!(p.records[0].profile.service_provider_id, "sp");
    }

    #[test]
    fn profiles_and_imp_assignments_take_the_user_from_the_request_or_the_file_name() {
        let table = document(
            r#"<command xsi:type="UserGetListInSystemResponse" xmlns=""><userTable><colHeading>User Id</colHeading><colHeading>Group Id</colHeading><colHeading>Service Provider Id</colHeading><colHeading>Last Name</colHeading><colHeading>First Name</colHeading><colHeading>Extension</colHeading>
<row><col>dee@acme</col><col>hq</col><col>acme-ent</col><col>Old</col><col>Dee</col><col>104</col></row></userTable></command>"#,
        );
        let pair = document(
            r#"<command xsi:type="UserGetRequest23" xmlns=""><userId>dee@acme</userId></command>
<command xsi:type="UserGetResponse23" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId><lastName>New</lastName><firstName>Dee</firstName><callingLineIdLastName>x</callingLineIdLastName><extension>104</extension><mobilePhoneNumber>+15145550199</mobilePhoneNumber><language>French</language><timeZone>America/Montreal</timeZone></command>"#,
        );
        let assignment = document(
            r#"<command xsi:type="UserServiceGetAssignmentListResponse" xmlns=""><servicePacksAssignmentTable><colHeading>Service Pack Name</colHeading><colHeading>Assigned</colHeading><colHeading>Description</colHeading></servicePacksAssignmentTable><userServicesAssignmentTable><colHeading>Service Name</colHeading><colHeading>Assigned</colHeading><row><col>Voice Messaging User</col><col>true</col></row><row><col>Integrated IM&amp;P</col><col>true</col></row></userServicesAssignmentTable></command>"#,
        );
        let mut p = Population::default();
        let none = Defaults::default();
        p.read_oci("sys.xml", "sys", &table, &none).unwrap();
        p.read_oci("dee.xml", "ignored", &pair, &none).unwrap();
        p.read_oci("dee@acme.xml", "dee@acme", &assignment, &none)
            .unwrap();
        assert_eq!(p.records.len(), 1);
        let dee = &p.records[0];
        assert_eq!(dee.profile.last_name, "New");
        assert_eq!(dee.profile.language.as_deref(), Some("French"));
        assert_eq!(dee.profile.extension.as_deref(), Some("104"));
        assert_eq!(dee.imp, Some(true));
    }

    #[test]
    fn a_document_that_is_not_an_oci_export_is_refused_clearly() {
        let mut p = Population::default();
        let e = p
            .read_oci("x.xml", "x", b"<html><body/></html>", &Defaults::default())
            .unwrap_err();
        assert!(e.contains("not <BroadsoftDocument>"), "{e}");
        let error = document(
            r#"<command xsi:type="c:ErrorResponse" xmlns="" xmlns:c="C"><summary>[Error 4008] User not found</summary></command>"#,
        );
        p.read_oci("e.xml", "e", &error, &Defaults::default())
            .unwrap();
        assert!(p.refused[0].reason.contains("User not found"));
    }
}
