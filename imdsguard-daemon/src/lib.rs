//! imdsguard: keeps pods away from the cloud metadata service with cgroup
//! sock_addr programs. This crate is the userspace side: it loads, attaches
//! and pins the programs and keeps their maps in sync with the desired state.
//!
//! `main.rs` is a thin CLI; everything lives here so that tests, the demo
//! and the benchmarks drive the same code.

pub mod actor;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod destinations;
pub mod ebpf_object;
pub mod enforcer;
pub mod error;
pub mod events;
pub mod explain;
pub mod http;
pub mod k8s;
pub mod metrics;
pub mod pins;
pub mod revoke;
pub mod standalone;
pub mod status;
pub mod sys;
pub mod telemetry;

pub use error::{Error, Result};
