//! The Python the tests run their peers and token minting with: the
//! virtual environment `scripts/setup.sh test` makes in `.venv` (the
//! packages of tests/requirements.txt), else `TOLLGATE_TEST_PYTHON`, else
//! `python3` from PATH.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

pub fn python3() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python3");
        if let Ok(p) = std::env::var("TOLLGATE_TEST_PYTHON") {
            p
        } else if Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    })
}
