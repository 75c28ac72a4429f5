//! fwnode binary: configuration, logging, and the I/O shells around the sans-IO cores.

use clap::Parser;

/// keepstate gateway daemon.
#[derive(Debug, Parser)]
#[command(name = "fwnode", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
