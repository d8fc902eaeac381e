//! The TLS client-certificate policy shared by the provisioning listener, the tunnel and `certs verify`.

mod policy;
mod server;

pub use policy::{
    BROADWORKS_OID, CLIENT_AUTH_OID, ClientIdentity, ClientPolicy, PolicyError, PolicyRefusal,
    Refusal, cn_allowed, common_name, eku_oids, identity, leaf_refusals, subject_alt_names,
    time_text,
};
pub use server::{
    CertsParseError, LoadedTls, Observer, PolicyVerifier, TlsError, crl_next_update, parse_certs,
    read_cert_file, read_crl_file, refusals_in, refusals_in_io, server_config,
};
