//! A whole population at once: `flowthrough import` brings users BroadWorks provisioned before
//! flow-through was switched on onto Webex, and `flowthrough reconcile` finds (and repairs) where
//! BroadWorks, flowthrough and Webex disagree.
//!
//! Pure parts: [`xml`] and [`source`] read the exports (CSV, saved OCI-P documents) into user
//! records; [`diff`] maps them through the templates exactly as live traffic is mapped and
//! compares the three sides. I/O parts: [`fetch`] lists Webex's subscribers page by page under
//! the rate limit; [`deliver`] turns fixes into bulk outbox entries, which live commands always
//! go before, and delivers them with `serve`'s own engine when there is no running node.

pub mod deliver;
pub mod diff;
pub mod fetch;
pub mod source;
pub mod xml;
