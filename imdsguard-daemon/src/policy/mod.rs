//! Who may reach a protected destination, as pure logic: the policy file,
//! Kubernetes label selectors and name syntax, and the desired allow map
//! computed from the pod and namespace stores. Nothing here talks to the
//! API server or the kernel, so all of it is tested without either.

pub mod desired;
pub mod file;
pub mod names;
pub mod presets;
pub mod selector;
pub mod spec;

#[cfg(test)]
mod filter_policy_tests;
