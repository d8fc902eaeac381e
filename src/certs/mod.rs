//! Certificate tooling: an internal CA, server and BroadWorks client certificates, CSRs, inspection.
