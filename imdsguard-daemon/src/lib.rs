//! imdsguard: keeps pods away from the cloud metadata service with cgroup
//! sock_addr programs. This crate is the userspace side: it loads, attaches
//! and pins the programs and keeps their maps in sync with the desired state.
//!
//! `main.rs` is a thin CLI; everything lives here so that tests, the demo
//! and the benchmarks drive the same code. One module per concern:
//!
//! - [`bpf`]: the object, hooks, links, maps and pins; the enforcer that
//!   loads, attaches and syncs them, and the task that owns it;
//! - [`policy`]: who may reach what, as pure logic;
//! - [`cgroup`]: cgroup v2 mounts, subtrees, and kubelet's pod cgroups;
//! - [`node`]: the Kubernetes node agent and its API server I/O;
//! - [`revoke`]: closing connections that lost their allow;
//! - [`decisions`]: the kernel's verdicts from the ring buffer;
//! - [`filter`]: filter mode's HTTP proxy and its allow lists;
//! - [`cli`]: arguments and the inspection commands' output;
//! - [`usage`]: who used the metadata service lately, for `/report`;
//! - [`runtime`]: what both modes run: the enforcer task, the link check,
//!   decision reporting, revocation, the `/metrics` endpoints and signals;
//! - [`standalone`]: the static allow list, without Kubernetes;
//! - [`vocabulary`]: typed names for the kernel's actions and protocols.

pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod decisions;
pub mod destinations;
pub mod error;
pub mod filter;
pub mod http;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod revoke;
pub mod runtime;
pub mod standalone;
pub mod telemetry;
pub mod usage;
pub mod vocabulary;

pub use error::{Error, Result};
