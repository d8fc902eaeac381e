//! Small operator tools: password hashing, shell completions, the man page.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use clap::{Args, CommandFactory};

use super::{Cli, fail};

#[derive(Debug, Args)]
pub struct HashPasswordArgs {}

/// Reads one line (the password) from stdin and prints its Argon2id PHC string, ready to paste as
/// `password_hash`. The password itself is never printed or logged.
pub fn hash_password(_args: HashPasswordArgs) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        return fail(format!("cannot read the password from stdin: {e}"));
    }
    let password = crate::secret::Secret::new(line.trim_end_matches(['\r', '\n']));
    if password.is_empty() {
        return fail("the password is empty; type it (or pipe it) on standard input");
    }
    let salt = SaltString::generate(&mut OsRng);
    match argon2::Argon2::default().hash_password(password.expose().as_bytes(), &salt) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("cannot hash the password: {e}")),
    }
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn completions(args: CompletionsArgs) -> ExitCode {
    let mut command = Cli::command();
    clap_complete::generate(
        args.shell,
        &mut command,
        "flowthrough",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}

pub fn man() -> ExitCode {
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut out) {
        return fail(format!("cannot render the man page: {e}"));
    }
    match std::io::stdout().write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("cannot write the man page: {e}")),
    }
}
