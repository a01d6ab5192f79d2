//! The `quotad` binary: everything lives in the library; see `quotad::cli`.

fn main() -> std::process::ExitCode {
    quotad::cli::main()
}
