//! The `flowthrough` binary: everything lives in the library; this only hands over to the CLI.

/// jemalloc instead of glibc's malloc: under load glibc's arenas took a sixth of the server's
/// CPU (`_int_malloc`, `_int_free`, `malloc_consolidate`) and their locks made the actix workers
/// and the delivery thread wake each other. With jemalloc the server spends about a quarter less
/// CPU per request and holds less memory per idle connection (bench/RESULTS.md, seventh sitting).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    flowthrough::cli::main()
}
