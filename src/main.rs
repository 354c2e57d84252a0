//! The `settle` binary: parses the command line and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    settle::cli::run(settle::cli::Cli::parse()).await
}
