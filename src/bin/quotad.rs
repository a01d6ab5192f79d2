//! The `quotad` binary: everything lives in the library; see `quotad::cli`.

// glibc malloc was about 12% of the daemon's CPU under load (profile in
// BENCHMARKS.md); mimalloc's thread-local free lists remove most of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    quotad::cli::main()
}
