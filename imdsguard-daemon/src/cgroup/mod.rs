//! cgroup v2 on this host: where the hierarchy is mounted and what level a
//! directory is at ([`mount`]), walking a subtree ([`subtree`]), where
//! kubelet puts each pod's cgroup ([`pod`]), and waiting for the kubepods
//! cgroup to appear ([`kubepods_wait`]).

pub mod discover;
pub mod kubepods_wait;
pub mod mount;
pub mod pod;
pub mod subtree;
#[cfg(test)]
mod test_tree;
