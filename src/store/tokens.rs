//! The OAuth token record: the latest access and refresh tokens, their expiries and the
//! credentials state, in one key written atomically and flushed, so a restart reuses a valid
//! access token and never loses a rotated refresh token.

use serde::{Deserialize, Serialize};

use super::{SledStore, StoreError};
use crate::secret::Secret;

const TOKENS_TREE: &str = "tokens";
const TOKEN_KEY: &[u8] = b"webex";

/// Whether the partner credentials work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TokenState {
    Ok,
    /// The token endpoint rejected the refresh token or the client (e.g. `invalid_grant`): only an
    /// operator can fix it, with `flowthrough token set`.
    CredentialsInvalid {
        reason: String,
    },
}

/// Times are Unix seconds (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub access_token: Option<Secret>,
    pub access_expires_at: Option<i64>,
    pub refresh_token: Secret,
    pub refresh_expires_at: Option<i64>,
    pub last_refresh: Option<i64>,
    pub state: TokenState,
}

impl SledStore {
    /// The stored token record, if one was ever written.
    pub fn token(&self) -> Result<Option<TokenRecord>, StoreError> {
        match self.tree(TOKENS_TREE)?.get(TOKEN_KEY)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: "token record",
                    reason: e.to_string(),
                }),
        }
    }

    /// Replace the token record and flush before returning: a rotated refresh token that is not
    /// durable would lock the deployment out after a crash.
    pub fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let raw = serde_json::to_vec(record).map_err(|e| StoreError::Io(e.to_string()))?;
        let tree = self.tree(TOKENS_TREE)?;
        tree.insert(TOKEN_KEY, raw)?;
        tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore as Store;

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let (_dir, store) = Store::temporary();
        store
            .tree(TOKENS_TREE)
            .unwrap()
            .insert(TOKEN_KEY, &b"{not json"[..])
            .unwrap();
        assert!(matches!(store.token(), Err(StoreError::Corrupt { .. })));
    }
}
