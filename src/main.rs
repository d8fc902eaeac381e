//! The `flowthrough` binary: everything lives in the library; this only hands over to the CLI.

// Under load glibc's malloc took about a fifth of the server's CPU (sled copies tree nodes on
// writes, every request allocates in parse, map and HTTP); mimalloc's per-thread free lists
// cut that to a few per cent. bench/RESULTS.md has the before and after.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    flowthrough::cli::main()
}
