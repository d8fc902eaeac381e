//! Writing OCI-P response documents.
