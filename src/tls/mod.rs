//! The TLS client-certificate policy shared by the provisioning listener, the tunnel and `certs verify`.
