use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    chainrun_cli::execute(chainrun_cli::args::Cli::parse()).into()
}
