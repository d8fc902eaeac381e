//! The Webex subscriber as the API returns it; tolerant of fields Webex adds later.

use serde::{Deserialize, Serialize};

use super::error::ApiErrorItem;

/// `status` of a subscriber (SPEC §4). A state Webex adds later reads as `Unknown`, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberStatus {
    PendingEmailInput,
    PendingEmailValidation,
    PendingUserMigration,
    Provisioning,
    Provisioned,
    Updating,
    Error,
    #[serde(other)]
    Unknown,
}

impl SubscriberStatus {
    /// Whether the follow-up polling can stop: Webex will not move this subscriber on its own.
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            SubscriberStatus::Provisioning | SubscriberStatus::Updating
        )
    }
}

/// A Webex for BroadWorks subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscriber {
    pub id: String,
    #[serde(default)]
    pub person_id: Option<String>,
    pub user_id: String,
    #[serde(default)]
    pub sp_enterprise_id: Option<String>,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub primary_phone_number: Option<String>,
    #[serde(default)]
    pub mobile_phone_number: Option<String>,
    #[serde(default)]
    pub extension: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub package: Option<String>,
    pub status: SubscriberStatus,
    #[serde(default)]
    pub errors: Vec<ApiErrorItem>,
    #[serde(default)]
    pub provisioning_id: Option<String>,
    /// When the status last changed (ISO 8601), as Webex lists it.
    #[serde(default)]
    pub last_status_change: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_subscriber_with_unknown_fields_and_states() {
        let s: Subscriber = serde_json::from_str(
            r#"{"id":"S1","userId":"u@x","status":"some_new_state","newField":true,
                "errors":[{"errorCode":10022,"description":"dup"}]}"#,
        )
        .unwrap();
        assert_eq!(s.status, SubscriberStatus::Unknown);
        assert_eq!(s.errors[0].error_code, 10022);
        let p: Subscriber =
            serde_json::from_str(r#"{"id":"S1","userId":"u","status":"pending_email_input"}"#)
                .unwrap();
        assert_eq!(p.status, SubscriberStatus::PendingEmailInput);
        assert!(p.status.is_settled());
        assert!(!SubscriberStatus::Updating.is_settled());
    }
}
