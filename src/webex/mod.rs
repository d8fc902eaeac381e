//! The Webex for BroadWorks API client, its OAuth token manager and address failover.

mod client;
mod error;
mod token;
mod transport;
mod types;

pub use client::{ClientSetupError, ListPage, MAX_PAGE, Outcome, WebexClient};
pub use error::{ApiErrorBody, ApiErrorItem, DUPLICATE_USER_ID, WebexError, backoff, retry_after};
pub use token::{REFRESH_TOKEN_WARNING, TokenManager, TokenSetupError, TokenStatus, read_secret};
pub use transport::{RawResponse, Transport, TransportError, TransportOptions};
pub use types::{Subscriber, SubscriberStatus};

pub use crate::store::{TokenRecord, TokenState};
