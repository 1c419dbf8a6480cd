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
            .and_then(State::build)
        {
            Ok(_) => {
                println!("{}: ok", config.display());
                Ok(())
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                return ExitCode::from(1);
            }
        },
        Command::Echo { listen, threads } => server::echo(&listen, threads),
        Command::Token {
            command:
                TokenCommand::Issue {
                    secret,
                    api_key,
                    limit,
                    routes,
                    ttl,
                    tier,
                    org,
                    redis,
                    prefix,
                    url,
                },
        } => {
            let opts = issue::IssueOptions {
                secret,
                api_key,
                limit,
                routes: issue::split_routes(&routes),
                ttl,
                tier,
                org,
                redis,
                prefix,
                algorithm: jsonwebtoken::Algorithm::HS256,
            };
            issue::mint(&opts).and_then(|issued| {
                let stored = match &opts.redis {
                    Some(r) => Some(issue::store(r, &opts.prefix, &issued)?),
                    None => None,
                };
                print!("{}", issue::describe(&issued, stored.as_deref(), &url));
                Ok(())
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    }
}
