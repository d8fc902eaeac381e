//! Parsing OCI-P request documents.
