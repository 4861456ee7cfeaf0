//! Empty library target: lets the daemon name this crate as a build
//! dependency so cargo rebuilds the daemon when the programs change.
#![no_std]
