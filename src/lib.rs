//! tollgate: an edge API proxy on Pingora.

pub mod admin;
pub mod analytics;
pub mod auth;
pub mod background;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod echo;
pub mod edge;
pub mod error;
pub mod http_client;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod pid_file;
pub mod proxy;
pub mod ratelimit;
pub mod redis_client;
pub mod redis_probe;
pub mod reload;
pub mod routes;
pub mod server;
pub mod state;
pub mod upstream;
