//! The Kubernetes side's pure logic: label selectors, the policy file, and
//! where kubelet puts each pod's cgroup. Nothing here talks to the API
//! server or the kernel, so all of it is tested without either.

mod names;
pub mod pod_cgroup;
pub mod policy;
pub mod selector;

pub use names::{KeyProblem, Malformed};
