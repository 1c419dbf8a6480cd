//! The command line (README, "Command line").

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Edge API proxy: JWT route permissions, distributed rate limits, pooled upstreams"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// YAML config file.
        #[arg(
            short,
            long,
            env = "TOLLGATE_CONFIG",
            default_value = "conf/tollgate.yaml"
        )]
        config: PathBuf,
        /// Take over the listening sockets of a running instance (graceful upgrade).
        #[arg(long, env = "TOLLGATE_UPGRADE")]
        upgrade: bool,
        /// Detach from the terminal.
        #[arg(long, env = "TOLLGATE_DAEMON")]
        daemon: bool,
    },
    /// Validate a config file: exit 0, or print every problem and exit 1.
    Check {
        #[arg(
            short,
            long,
            env = "TOLLGATE_CONFIG",
            default_value = "conf/tollgate.yaml"
        )]
        config: PathBuf,
    },
    /// Token tools.
    Token {
        #[command(subcommand)]
        command: Box<TokenCommand>,
    },
    /// A whoami-style upstream for demos, tests and benchmarks.
    Echo {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a signed HS256 token, its api_key, expiry and a curl line.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The proxy's config: its secret, claim names, issuer, audience and
    /// Redis are used unless given here.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// HMAC secret (the proxy's auth.jwt.secret).
    #[arg(long, env = "TOLLGATE_AUTH__JWT__SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The caller's key; a random url-safe one when absent.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests per limits.claim_window (the rate_limit claim).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Comma-separated allowed routes: exact paths or prefixes ending in /*.
    #[arg(long, default_value = "/*")]
    pub routes: String,
    #[arg(long, default_value = "24h")]
    pub ttl: String,
    #[arg(long)]
    pub tier: Option<String>,
    #[arg(long)]
    pub org: Option<String>,
    /// `iss` claim (the proxy's auth.jwt.issuer).
    #[arg(long)]
    pub issuer: Option<String>,
    /// `aud` claim (the proxy's auth.jwt.audience).
    #[arg(long)]
    pub audience: Option<String>,
    /// Also store the token in this Redis (redis:// or rediss://) for require_stored.
    #[arg(long)]
    pub redis: Option<String>,
    /// Key prefix in Redis (default: the config's redis.key_prefix, else tollgate:).
    #[arg(long)]
    pub prefix: Option<String>,
    /// URL used in the printed curl line.
    #[arg(long, default_value = "http://127.0.0.1:8080/api/hello")]
    pub url: String,
}
