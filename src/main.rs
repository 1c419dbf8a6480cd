use clap::Parser;

// glibc malloc showed as ~11% of the proxy's CPU under load; mimalloc halves it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use tollgate::auth::issue;
use tollgate::cli::{Cli, Command, TokenCommand};
use tollgate::state::State;
use tollgate::{config, server};

fn main() -> ExitCode {
    tollgate::server::no_transparent_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            upgrade,
            daemon,
        } => server::serve(server::ServeOptions {
            config_path: &config,
            upgrade,
            daemon,
        }),
        Command::Check { config } => match config::load(&config)
            .map_err(|e| e.problems)
            .and_then(|c| State::build(c, None))
        {
            Ok(state) => {
                for warning in state.warnings() {
                    eprintln!("warning: {warning}");
                }
                println!("{}: ok", config.display());
                Ok(())
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{}", config::line(p));
                }
                return ExitCode::from(1);
            }
        },
        Command::Echo { listen, threads } => server::echo(&listen, threads),
        Command::Token { command } => match *command {
            TokenCommand::Issue(args) => issue::run(args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    }
}
