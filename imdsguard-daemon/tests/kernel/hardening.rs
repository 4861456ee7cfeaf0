//! Attempts to get around the connect hooks, tried for real.

use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    Vec::new()
}
