//! What the adapter remembers about users and customers: the userId → subscriber map, the
//! template each user was provisioned with, the last profile seen (an IM&P assignment provisions
//! from it), and customers recorded from group and service-provider adds.

use serde::{Deserialize, Serialize};

use super::{SledStore, StoreError, decode, encode};
use crate::oci::UserProfile;

pub(super) const USERS: &str = "users";
pub(super) const PROFILES: &str = "profiles";
const CUSTOMERS: &str = "customers";

/// A user known to the adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The Webex subscriber id, once known.
    pub subscriber_id: Option<String>,
    /// The template the user was provisioned with; `POST /provisioning` uses it for commands that
    /// carry only a userId.
    pub template: Option<String>,
}

/// A BroadWorks customer (enterprise or group) recorded from an add command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub service_provider_id: String,
    pub group_id: Option<String>,
    pub name: Option<String>,
    pub enterprise: bool,
    pub template: String,
}

/// How a delivered entry changes its user's record (see [`crate::store::Store::finish_try`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserMapChange {
    /// Provisioned or updated: the user is this subscriber, provisioned with this template.
    Map {
        subscriber_id: String,
        template: String,
    },
    /// Removed from Webex: the subscriber id is forgotten; the template and profile stay, so a
    /// later IM&P assignment can provision the user again.
    Forget,
}

impl SledStore {
    pub fn user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.tree(USERS)?
            .get(user_id)?
            .map(|raw| decode(&raw, "user record"))
            .transpose()
    }

    /// Remember the subscriber id and/or template of a user; `None` keeps what is stored.
    pub fn map_user(
        &self,
        user_id: &str,
        subscriber_id: Option<&str>,
        template: Option<&str>,
    ) -> Result<(), StoreError> {
        self.update_user(user_id, |record| {
            let mut record = record.unwrap_or_default();
            if let Some(id) = subscriber_id {
                record.subscriber_id = Some(id.to_owned());
            }
            if let Some(t) = template {
                record.template = Some(t.to_owned());
            }
            Some(record)
        })
    }

    /// Forget the subscriber id (after a remove); the template and profile stay, so a later IM&P
    /// assignment can provision the user again.
    pub fn unmap_subscriber(&self, user_id: &str) -> Result<(), StoreError> {
        self.update_user(user_id, |record| {
            record.map(|record| UserRecord {
                subscriber_id: None,
                ..record
            })
        })
    }

    /// Read, change and write a user record as one step: the handler (a user's template) and
    /// the delivery engine (its subscriber id) change the same record concurrently, and a plain
    /// read then write would let one undo the other. A change that leaves the record as it is
    /// writes nothing: every delivered UserModify maps its user to the subscriber and template
    /// it already has, and sled's compare-and-swap would log the same bytes again.
    fn update_user(
        &self,
        user_id: &str,
        change: impl Fn(Option<UserRecord>) -> Option<UserRecord>,
    ) -> Result<(), StoreError> {
        let users = self.tree(USERS)?;
        let mut current = users.get(user_id)?;
        loop {
            let record = current
                .as_ref()
                .map(|raw| decode::<UserRecord>(raw, "user record"))
                // An unreadable record is reported, not overwritten.
                .transpose()?;
            let Some(changed) = change(record.clone()) else {
                return Ok(());
            };
            if record.as_ref() == Some(&changed) {
                return Ok(());
            }
            match users.compare_and_swap(user_id, current.as_ref(), Some(encode(&changed)?))? {
                Ok(()) => return Ok(()),
                // Another writer got in first: change what it wrote.
                Err(conflict) => current = conflict.current,
            }
        }
    }

    pub fn profile(&self, user_id: &str) -> Result<Option<UserProfile>, StoreError> {
        self.tree(PROFILES)?
            .get(user_id)?
            .map(|raw| decode(&raw, "user profile"))
            .transpose()
    }

    pub fn save_profile(&self, profile: &UserProfile) -> Result<(), StoreError> {
        self.tree(PROFILES)?
            .insert(profile.user_id.as_bytes(), encode(profile)?)?;
        Ok(())
    }

    pub fn record_customer(&self, customer: &Customer) -> Result<(), StoreError> {
        let key = match &customer.group_id {
            Some(group) => format!("{}\0{}", customer.service_provider_id, group),
            None => customer.service_provider_id.clone(),
        };
        self.tree(CUSTOMERS)?.insert(key, encode(customer)?)?;
        Ok(())
    }

    pub fn customers(&self) -> Result<Vec<Customer>, StoreError> {
        self.tree(CUSTOMERS)?
            .iter()
            .map(|item| {
                let (_, raw) = item?;
                decode(&raw, "customer")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many writes `users` saw since the last call: sled tells a subscriber of every
    /// insert, the same bytes again included, before the insert returns.
    fn writes_seen(seen: &mut sled::Subscriber) -> usize {
        std::iter::from_fn(|| seen.next_timeout(std::time::Duration::from_millis(20)).ok()).count()
    }

    #[test]
    fn a_user_record_change_that_changes_nothing_writes_nothing() {
        let (_dir, store) = SledStore::temporary();
        let mut seen = store.tree(USERS).unwrap().watch_prefix(b"alice");
        store
            .map_user("alice", Some("sub-1"), Some("acme"))
            .unwrap();
        assert_eq!(writes_seen(&mut seen), 1);

        store
            .map_user("alice", Some("sub-1"), Some("acme"))
            .unwrap();
        store.map_user("alice", None, Some("acme")).unwrap();
        store.map_user("alice", None, None).unwrap();
        assert_eq!(writes_seen(&mut seen), 0, "the record is as asked already");

        store.map_user("alice", Some("sub-2"), None).unwrap();
        store.unmap_subscriber("alice").unwrap();
        assert_eq!(writes_seen(&mut seen), 2);
        store.unmap_subscriber("alice").unwrap();
        store.unmap_subscriber("nobody").unwrap();
        assert_eq!(writes_seen(&mut seen), 0, "nothing to forget");
        assert_eq!(
            store.user("alice").unwrap(),
            Some(UserRecord {
                subscriber_id: None,
                template: Some("acme".into()),
            })
        );
    }

    #[test]
    fn an_unreadable_user_record_is_reported_and_left_as_it_is() {
        let (_dir, store) = SledStore::temporary();
        store
            .tree(USERS)
            .unwrap()
            .insert("alice", &b"{not json"[..])
            .unwrap();
        let error = store.map_user("alice", Some("sub-1"), None).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
        assert_eq!(
            store.tree(USERS).unwrap().get("alice").unwrap().as_deref(),
            Some(&b"{not json"[..])
        );
    }
}
