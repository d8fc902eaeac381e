//! Power loss, checked on the system calls: `flowthrough serve` runs under strace while the AS
//! sends commands one after the other, and every acknowledgement written to the AS's socket must
//! come after an `fdatasync` or `fsync` of the store's log that began after the command's record
//! was written to it.
//!
//! Why system calls and not kill -9: a killed process leaves its writes in the page cache, where
//! the next start finds them, so tests/crash.rs cannot tell a durable write from one that only
//! reached the kernel. A power cut drops the page cache. sled used to make its log "stable" with
//! `sync_file_range`, which neither makes the file's new size durable nor flushes the disk's
//! write cache; this test fails on that code (no fsync between the write and the answer) and
//! passes once the log is synced with `fdatasync` (vendor/README.md; bench/RESULTS.md has the
//! LazyFS power cuts that measured the loss).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;

const COMMANDS: usize = 20;

/// The system calls that show a record written, made durable, and an answer sent.
const TRACED: &str = "trace=openat,accept,accept4,close,pwrite64,pwritev,write,writev,sendto,sendmsg,fdatasync,fsync,sync_file_range";

/// `flowthrough serve` under `strace -f`; dropping it stops both.
struct Traced {
    strace: Child,
}

impl Traced {
    fn start(config: &Path, trace: &Path) -> Traced {
        let serve = serve_command(config, "warn", Stdio::inherit());
        let mut command = Command::new("strace");
        command
            .args([
                "-f",
                "-qq",
                "--seccomp-bpf",
                "-s",
                "65536",
                "-e",
                TRACED,
                "-o",
            ])
            .arg(trace)
            .arg("--")
            .arg(serve.get_program())
            .args(serve.get_args())
            .envs(serve.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdout(Stdio::null());
        let strace = command.spawn().unwrap_or_else(|e| {
            panic!("cannot run strace ({e}): install it (`apt-get install strace`) or run `bash .ci/run`, which does")
        });
        Traced { strace }
    }

    /// The traced `flowthrough` process: strace's only child.
    fn serve_pid(&self) -> Option<i32> {
        let pid = self.strace.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGTERM to `serve` (strace exits with its tracee), then wait for strace to have written
    /// the whole trace.
    fn stop(mut self) {
        if let Some(pid) = self.serve_pid() {
            // SAFETY: a plain kill(2) of our own grandchild.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.strace.wait().unwrap();
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Ok(None) = self.strace.try_wait() {
            if let Some(pid) = self.serve_pid() {
                // SAFETY: as above; a test that failed half-way must not leave `serve` running.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.strace.kill();
            let _ = self.strace.wait();
        }
    }
}

/// One system call from the trace: where it began and where it returned (line numbers in the
/// trace, which strace writes in the order it saw the events happen).
#[derive(Debug, Clone)]
struct Call {
    name: String,
    args: String,
    ret: i64,
    began: usize,
    returned: usize,
}

impl Call {
    fn fd(&self) -> Option<i64> {
        self.args.split(',').next()?.trim().parse().ok()
    }
}

/// Parse `strace -f -o` output, joining each `<unfinished ...>` line with its `resumed` line.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut open: BTreeMap<&str, (String, String, usize)> = BTreeMap::new();
    for (line_no, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(started) = rest.strip_suffix(" <unfinished ...>") {
            if let Some((name, args)) = started.split_once('(') {
                open.insert(pid, (name.to_owned(), args.to_owned(), line_no));
            }
            continue;
        }
        let (name, args, began, tail) = if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((name, args, began)) = open.remove(pid) else {
                continue;
            };
            (name, args, began, tail.to_owned())
        } else {
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            (name.to_owned(), String::new(), line_no, args.to_owned())
        };
        // strace pads the return value into a column: `fsync(9)          = 0`.
        let Some((inner, ret)) = tail
            .rsplit_once(" = ")
            .and_then(|(before, ret)| Some((before.trim_end().strip_suffix(')')?, ret)))
        else {
            continue;
        };
        let ret = ret.split_whitespace().next().unwrap_or("-1");
        calls.push(Call {
            name,
            args: args + inner,
            ret: ret.parse().unwrap_or(-1),
            began,
            returned: line_no,
        });
    }
    calls.sort_by_key(|c| c.began);
    calls
}

/// What the trace says about each acknowledged command.
#[derive(Debug)]
struct Verdict {
    /// Commands whose record was written to the log and whose answer was sent after it.
    checked: usize,
    /// Why each failing command's acknowledgement was not durable.
    failures: Vec<String>,
    /// How often the log was synced with each call.
    syncs: BTreeMap<String, usize>,
}

fn judge(calls: &[Call], users: &[String]) -> Verdict {
    let mut db_fds = BTreeSet::new();
    let mut accepted = BTreeSet::new();
    let mut db_writes = Vec::new();
    let mut db_syncs = Vec::new();
    let mut answers = Vec::new();
    let mut syncs: BTreeMap<String, usize> = BTreeMap::new();
    for call in calls {
        match call.name.as_str() {
            "openat" if call.args.contains("/store/db\"") && call.ret >= 0 => {
                db_fds.insert(call.ret);
            }
            "accept" | "accept4" if call.ret >= 0 => {
                accepted.insert(call.ret);
            }
            "close" => {
                if let Some(fd) = call.fd() {
                    accepted.remove(&fd);
                }
            }
            "pwrite64" | "pwritev" if call.fd().is_some_and(|fd| db_fds.contains(&fd)) => {
                db_writes.push(call)
            }
            "fdatasync" | "fsync" | "sync_file_range"
                if call.fd().is_some_and(|fd| db_fds.contains(&fd)) =>
            {
                *syncs.entry(call.name.clone()).or_default() += 1;
                if call.name != "sync_file_range" && call.ret == 0 {
                    db_syncs.push(call);
                }
            }
            "write" | "writev" | "sendto" | "sendmsg"
                if call.ret > 0 && call.fd().is_some_and(|fd| accepted.contains(&fd)) =>
            {
                answers.push(call)
            }
            _ => {}
        }
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    for user in users {
        let Some(write) = db_writes.iter().find(|w| w.args.contains(user.as_str())) else {
            failures.push(format!(
                "{user}: its record was never written to the store's log"
            ));
            continue;
        };
        let Some(answer) = answers.iter().find(|a| a.began > write.returned) else {
            failures.push(format!(
                "{user}: no answer was sent after its record was written"
            ));
            continue;
        };
        checked += 1;
        let durable = db_syncs
            .iter()
            .any(|s| s.began > write.returned && s.returned < answer.began);
        if !durable {
            failures.push(format!(
                "{user}: written to the log at trace line {}, answered at line {}, and no fdatasync/fsync of the log in between",
                write.returned + 1,
                answer.began + 1
            ));
        }
    }
    Verdict {
        checked,
        failures,
        syncs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledgement_follows_an_fdatasync_of_the_commands_record() {
    let world = World::new(SimOptions::default()).await;
    let Served {
        config, admin, url, ..
    } = serve_config(&world, "");
    let trace = world.path("serve.strace");
    let traced = Traced::start(&config, &trace);
    wait_ready(&admin).await;

    let client = world.as_client();
    let mut users = Vec::new();
    for n in 0..COMMANDS {
        let user = format!("power-{n}@acme.example");
        let response = client
            .post(&url)
            .header("content-type", "text/xml")
            .body(document(&user_add(&user, Some(&user))))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let answer = &answers(&text)[0];
        assert!(
            answer.kind == "SuccessResponse" || answer.code == Some(7020),
            "{user} must be acknowledged: {text}"
        );
        users.push(user);
        // Apart, so that the store's own periodic flush cannot pass for the acknowledgement's.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    traced.stop();

    let text = std::fs::read_to_string(&trace).unwrap();
    let verdict = judge(&parse_trace(&text), &users);
    eprintln!("power-loss trace: {verdict:?}");
    assert_eq!(
        verdict.checked, COMMANDS,
        "every command's write and answer must be in the trace: {:?}",
        verdict.failures
    );
    assert!(
        verdict.failures.is_empty(),
        "acknowledged before the command was durable:\n{}",
        verdict.failures.join("\n")
    );
    assert_eq!(
        verdict.syncs.get("sync_file_range"),
        None,
        "the log is made durable with fdatasync, never sync_file_range"
    );
}

/// The judge itself, on hand-written traces: it must refuse an answer that only
/// `sync_file_range` preceded, and one whose sync began before the record was written.
#[test]
fn the_judge_refuses_what_is_not_durable() {
    let users = vec!["u1@x".to_owned()];
    let trace = |sync: &str| {
        format!(
            "10 openat(AT_FDCWD, \"/tmp/t/store/db\", O_RDWR|O_CREAT|O_CLOEXEC, 0666) = 7\n\
             11 accept4(9, {{sa_family=AF_INET}}, [16], SOCK_CLOEXEC) = 12\n\
             12 pwrite64(7, \"..u1@x..\", 100, 0) = 100\n\
             {sync}\
             11 sendto(12, \"\\27\\3\\3\", 300, MSG_NOSIGNAL, NULL, 0) = 300\n"
        )
    };
    let good = judge(&parse_trace(&trace("12 fdatasync(7) = 0\n")), &users);
    assert_eq!((good.checked, good.failures.len()), (1, 0), "{good:?}");

    let range = trace("12 sync_file_range(7, 0, 100, SYNC_FILE_RANGE_WAIT_BEFORE) = 0\n");
    let range = judge(&parse_trace(&range), &users);
    assert_eq!((range.checked, range.failures.len()), (1, 1), "{range:?}");

    let early = "10 openat(AT_FDCWD, \"/tmp/t/store/db\", O_RDWR, 0666) = 7\n\
                 11 accept4(9, NULL, NULL, SOCK_CLOEXEC) = 12\n\
                 13 fdatasync(7 <unfinished ...>\n\
                 12 pwrite64(7, \"..u1@x..\", 100, 0) = 100\n\
                 13 <... fdatasync resumed>)        = 0\n\
                 11 write(12, \"\\27\", 300) = 300\n";
    let early = judge(&parse_trace(early), &users);
    assert_eq!((early.checked, early.failures.len()), (1, 1), "{early:?}");

    let other_fd = trace("12 fdatasync(8) = 0\n");
    let other_fd = judge(&parse_trace(&other_fd), &users);
    assert_eq!(other_fd.failures.len(), 1, "{other_fd:?}");

    let unanswered = "10 openat(AT_FDCWD, \"/tmp/t/store/db\", O_RDWR, 0666) = 7\n\
                      12 pwrite64(7, \"..u1@x..\", 100, 0) = 100\n";
    let unanswered = judge(&parse_trace(unanswered), &users);
    assert_eq!(
        (unanswered.checked, unanswered.failures.len()),
        (0, 1),
        "{unanswered:?}"
    );
}
