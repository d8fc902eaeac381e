//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` of the installed server
//! (`pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`) in a temp dir, on a free
//! loopback port, with fsync on. Run as the `postgres` user when the tests run as root (the
//! server refuses root). Stopped in `Drop`; the cluster shared by a test binary is dropped at
//! process exit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The superuser role `initdb` created (trust authentication on loopback).
    pub user: String,
}

fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server binaries (initdb, pg_ctl): install the `postgresql` package")
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl PgCluster {
    /// A new cluster, started and accepting connections.
    pub fn start() -> PgCluster {
        PgCluster::start_with(None)
    }

    /// A cluster that accepts TLS connections only (`hostssl` in pg_hba.conf), with this
    /// server certificate chain and key (PEM).
    pub fn start_tls(certificate: &Path, key: &Path) -> PgCluster {
        PgCluster::start_with(Some((certificate, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> PgCluster {
        let bin = bindir();
        let dir = tempfile::Builder::new()
            .prefix("flowthrough-pg-")
            .tempdir()
            .unwrap();
        let cluster = PgCluster {
            dir,
            bin,
            port: super::free_port(),
            user: "flowthrough".to_owned(),
        };
        if let Some((certificate, key)) = tls {
            std::fs::copy(certificate, cluster.dir.path().join("server.crt")).unwrap();
            std::fs::copy(key, cluster.dir.path().join("server.key")).unwrap();
            std::fs::set_permissions(
                cluster.dir.path().join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        if as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "cannot chown the cluster's directory");
        }
        cluster.run_ok(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                &cluster.user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ],
        );
        let mut settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = on\nsynchronous_commit = on\nmax_connections = 200\nshared_buffers = 32MB\n",
            cluster.port,
            cluster.dir.path().display()
        );
        if tls.is_some() {
            let dir = cluster.dir.path().display();
            settings.push_str(&format!(
                "ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n"
            ));
            std::fs::write(
                cluster.data().join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
        }
        let conf = cluster.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&settings);
        std::fs::write(&conf, text).unwrap();
        cluster.pg_ctl_start();
        cluster
    }

    /// The cluster shared by the tests of one binary, started by the first that asks.
    pub fn shared() -> Arc<PgCluster> {
        static SHARED: OnceLock<Mutex<Option<Arc<PgCluster>>>> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(slot) = SHARED.get() {
                let cluster = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                drop(cluster);
            }
        }
        let slot = SHARED.get_or_init(|| {
            // SAFETY: registers a plain function to run at process exit; it only stops the
            // cluster's server.
            unsafe { libc::atexit(stop_shared) };
            Mutex::new(None)
        });
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .get_or_insert_with(|| Arc::new(PgCluster::start()))
            .clone()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn run_ok(&self, program: &str, args: &[&str]) -> Output {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn pg_ctl_start(&self) {
        let log = self.dir.path().join("server.log").display().to_string();
        self.run_ok(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stop the server (fast shutdown: connections are cut) — the database "goes away".
    pub fn stop(&self) {
        self.run_ok(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Start it again after [`PgCluster::stop`].
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    /// Run SQL as the superuser in `dbname`; panics with psql's error when it fails.
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let out = self
            .psql_command(dbname)
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A `psql` session as the superuser in `dbname`, reading its SQL from stdin as it comes:
    /// for a transaction held open while a test looks at what waits for it.
    pub fn psql_session(&self, dbname: &str) -> std::process::Child {
        self.psql_command(dbname)
            .arg("-q")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `psql` as the superuser in `dbname`, stopping at the first error, printing unaligned
    /// tuples only.
    fn psql_command(&self, dbname: &str) -> Command {
        let mut command = self.command("psql");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
                "-d",
                dbname,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
            ])
            .current_dir(self.dir.path());
        command
    }

    /// A new, empty database with a name no other test of this process uses.
    pub fn database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// The `[store]` section of a flowthrough config using `dbname` of this cluster.
    pub fn store_section(&self, dbname: &str) -> String {
        self.store_section_tls(dbname, "tls = \"disable\"")
    }

    /// [`PgCluster::store_section`] with these TLS keys (`tls = …`, `ca_bundle = …`).
    pub fn store_section_tls(&self, dbname: &str, tls: &str) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\n\n[store.postgres]\nhost = \"127.0.0.1\"\nport = {}\n\
             dbname = \"{dbname}\"\nuser = \"{}\"\n{tls}\npool_size = 8\n\
             connect_timeout_ms = 2000\n",
            self.port, self.user
        )
    }

    /// The store config for `dbname`, parsed as flowthrough parses it.
    pub fn store_config(&self, dbname: &str) -> flowthrough::config::StoreConfig {
        let text = self.store_section(dbname);
        flowthrough::config::Config::parse(&text, Path::new("test.toml"))
            .unwrap()
            .store
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
