//! The invariants of ARCHITECTURE.md, checked on the source: pure modules import no I/O, nothing
//! imports the CLI, the tunnel does not reach into the server, and `serve` never reaches the
//! simulator.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every line of the files under `dir` (relative to src/) that mentions one of `forbidden`.
fn offenders(dir: &str, forbidden: &[&str]) -> Vec<String> {
    let root = src().join(dir);
    let files = if root.is_dir() {
        rust_files(&root)
    } else {
        vec![root.with_extension("rs")]
    };
    assert!(!files.is_empty(), "no source under {dir}");
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for f in forbidden {
                if code.contains(f) {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

const IO: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "tokio",
    "reqwest",
    "sled",
    "actix",
    "crate::store",
    "crate::webex",
    "crate::server",
    "crate::delivery",
    "crate::sim",
    "crate::tls",
    "crate::certs",
];

#[test]
fn oci_and_mapping_import_no_io_module() {
    for module in ["oci", "mapping"] {
        let found = offenders(module, IO);
        assert!(
            found.is_empty(),
            "{module} must stay pure:\n{}",
            found.join("\n")
        );
    }
}

#[test]
fn population_reading_and_comparing_import_no_io_module() {
    for module in ["population/xml", "population/source"] {
        let found = offenders(module, IO);
        assert!(
            found.is_empty(),
            "{module} must stay pure:\n{}",
            found.join("\n")
        );
    }
    // The comparison reads Webex's subscriber *type*, never its client.
    let mut io: Vec<&str> = IO
        .iter()
        .copied()
        .filter(|m| *m != "crate::webex")
        .collect();
    io.extend(["WebexClient", "Transport", "TokenManager"]);
    let found = offenders("population/diff", &io);
    assert!(
        found.is_empty(),
        "population::diff must stay pure:\n{}",
        found.join("\n")
    );
}

#[test]
fn nothing_imports_the_cli() {
    for entry in std::fs::read_dir(src()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "cli" || name == "main.rs" || name == "lib.rs" || name == "bin" {
            continue;
        }
        let found = offenders(
            name.trim_end_matches(".rs"),
            &["crate::cli", "flowthrough::cli"],
        );
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}

/// The listener pipeline both modes share lives below both: the tunnel never reaches into the
/// translating server, so either can change without the other.
#[test]
fn the_tunnel_does_not_import_the_server() {
    let found = offenders("tunnel", &["crate::server"]);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn serve_never_reaches_the_simulator() {
    for module in [
        "server", "delivery", "webex", "store", "tls", "tunnel", "listener",
    ] {
        let found = offenders(module, &["crate::sim", "sim::"]);
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}

/// The store is one API over two backends: neither's types nor SQL leak out of it.
#[test]
fn no_sled_type_and_no_sql_outside_the_store() {
    for entry in std::fs::read_dir(src()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "store" {
            continue;
        }
        let found = offenders(
            name.trim_end_matches(".rs"),
            &[
                "sled::",
                "tokio_postgres",
                "deadpool_postgres",
                "SELECT ",
                "INSERT INTO",
                "DELETE FROM",
            ],
        );
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}
