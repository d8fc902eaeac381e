//! flowthrough: a DMZ adapter between a Cisco BroadWorks Application Server (OCI-P over mTLS) and
//! the Webex for BroadWorks subscriber API, plus an allow-listed CONNECT tunnel.
//!
//! Data flows one way: bytes → [`oci`] command → [`mapping`] plan → [`webex`] delivery (through the
//! [`store`] outbox) → OCI-P response. See `ARCHITECTURE.md` for the code map and invariants.

pub mod certs;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod failover;
pub mod listener;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod oci;
pub mod population;
pub mod secret;
pub mod server;
pub mod sim;
pub mod store;
pub mod tls;
pub mod trace;
pub mod tunnel;
pub mod webex;
