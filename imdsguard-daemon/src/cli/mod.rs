//! The command line: argument structs, and the read-only commands that
//! inspect an installation and format what they find.

pub mod args;
pub mod explain;
pub mod status;
