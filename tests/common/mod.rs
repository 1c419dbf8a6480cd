//! Test harness: real processes (tollgate, its echo upstream, redis-server) on
//! free ports, and a raw HTTP/1.1 client that sends paths exactly as written.
#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod http;
mod load;
mod peers;
mod process;
mod python;
mod redis_server;
mod servers;
mod tollgate;

pub use self::http::*;
pub use self::load::*;
pub use self::peers::*;
pub use self::process::*;
pub use self::python::*;
pub use self::redis_server::*;
pub use self::servers::*;
pub use self::tollgate::*;
