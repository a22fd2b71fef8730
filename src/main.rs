//! The `hetsync` binary: see `hetsync --help`.

fn main() -> std::process::ExitCode {
    hetsync::cli::main()
}
