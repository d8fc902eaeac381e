//! The Webex for BroadWorks API client, its OAuth token manager and address failover.
