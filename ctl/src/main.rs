//! fwctl: the operator CLI of keepstate. Talks gRPC to any fwnode.

use clap::Parser;

/// keepstate operator CLI.
#[derive(Debug, Parser)]
#[command(name = "fwctl", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
