//! `candle-peft`: the command-line interface. Each subcommand lives in `cli/<name>.rs`; this file
//! only parses the arguments and reports errors as `error: …` with exit status 1.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
