//! The Kubernetes node agent and its I/O: the pod and namespace watchers,
//! the inotify watch on the pod cgroups, the startup taint, attribution of
//! decisions to pods, Kubernetes Events, and filter mode's proxy beside
//! the enforcer. The decisions themselves come
//! from [`crate::policy`].

pub mod agent;
pub mod attribution;
pub mod cgroup_watch;
mod filter;
pub mod pod_cgroups;
pub mod pod_view;
mod policy_reload;
pub mod taint;
#[cfg(test)]
mod watch_faults;
pub mod watchers;
