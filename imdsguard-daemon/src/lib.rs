//! imdsguard: keeps pods away from the cloud metadata service with cgroup
//! sock_addr programs. This crate is the userspace side: it loads, attaches
//! and pins the programs and keeps their maps in sync with the desired state.
//!
//! `main.rs` is a thin CLI; everything lives here so that tests, the demo
//! and the benchmarks drive the same code.

pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod decisions;
pub mod destinations;
pub mod error;
pub mod http;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod revoke;
pub mod standalone;
pub mod telemetry;

pub use error::{Error, Result};
