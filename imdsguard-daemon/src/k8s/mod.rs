//! The Kubernetes side's pure logic: label selectors, the policy file, and
//! where kubelet puts each pod's cgroup. Nothing here talks to the API
//! server or the kernel, so all of it is tested without either.

pub mod agent;
pub mod attribution;
pub mod cgroup_watch;
pub mod desired;
pub mod kubepods_wait;
mod names;
pub mod pod_cgroup;
pub mod policy;
pub mod selector;
pub mod taint;
#[cfg(test)]
mod watch_faults;

pub use names::{KeyProblem, Malformed};
