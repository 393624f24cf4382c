//! The `ghostsr` binary: runs the CLI and prints any error once, with its causes.

use std::process::ExitCode;

fn main() -> ExitCode {
    match ghostsr::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ghostsr: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
