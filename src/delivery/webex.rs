//! The Webex attempt: one outbox entry, one try against the Webex API, classified for the
//! scheduler.
