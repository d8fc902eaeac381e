//! OCI-P documents: parse what the Application Server sends and write what it gets back.
//!
//! Pure: no I/O. [`parse`] turns bytes into a [`Document`] of typed [`Command`]s; [`write`] turns
//! [`ResponseCommand`]s back into a UTF-8 `BroadsoftDocument`. The accepted subset is described by
//! `schemas/flowthrough-oci.xsd`.

mod model;
mod parse;
mod write;

pub use model::*;
