//! Filter mode (`access: filter`): the kernel redirects a filtered pod's
//! metadata connections to an HTTP proxy in the agent, which forwards only
//! the paths the pod's rules allow.
//!
//! - [`identity`]: who made a proxied connection, as the kernel recorded it
//!   (read from the kernel's map by `bpf::filter_conns`);
//! - [`listen`]: the proxy's addresses, and what they tell the kernel;
//! - [`request`]: strict checks and the canonical form of a request;
//! - [`pattern`]: the path-pattern language of rules and profiles;
//! - [`never`]: paths never allowed, whatever a rule says;
//! - [`profiles`]: the built-in profiles (`profiles.yaml`);
//! - [`rules`]: compiled allow lists, per entry cgroup;
//! - [`events`]: the once-a-minute limit on denied-path Events;
//! - [`proxy`]: the hyper server and the forwarding client.

pub mod events;
pub mod identity;
mod kernel_identity;
pub mod listen;
pub mod never;
pub mod pattern;
pub mod profiles;
pub mod proxy;
pub mod request;
pub mod rules;
