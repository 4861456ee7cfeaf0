//! The kernel's numbers as userspace names them: the actions of allow
//! entries and the protocols of protected ranges, plus `kernel_enum!`,
//! which the other rooms use for their own kernel values (hooks in
//! `bpf::hook`, verdicts, address forms and causes in `decisions`).
//!
//! Each enum is written once, as a table of variant, kernel value and
//! name; the name is what logs, metrics labels, `status` and `explain`
//! print, so adding a variant is one line of its table.

use imdsguard_common::{PROTO_TCP, PROTO_UDP, action};

/// A value from the kernel (or a pinned map) that this build has no name
/// for: a newer kernel object, or a corrupted map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: u32,
}

/// Declares an enum over kernel `u32` values from one table of
/// `Variant = kernel value => "name"`, with `ALL`, `kernel()`, `name()`,
/// a fallible `TryFrom<u32>`, and `Display` and `Serialize` as the name.
macro_rules! kernel_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:expr => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant),+];

            /// The value the kernel side uses.
            pub const fn kernel(self) -> u32 {
                match self {
                    $( $name::$variant => $value as u32, )+
                }
            }

            /// The name printed in logs, metrics labels and the CLI.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl TryFrom<u32> for $name {
            type Error = $crate::vocabulary::UnknownValue;

            fn try_from(value: u32) -> std::result::Result<Self, Self::Error> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.kernel() == value)
                    .ok_or($crate::vocabulary::UnknownValue { what: $what, value })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // pad, not write_str: the CLI's tables align these.
                f.pad(self.name())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
    };
}
pub(crate) use kernel_enum;

kernel_enum! {
    /// What an allow entry (or the global default) does to a caller that
    /// reaches a protected destination. Read back from a pinned map it is
    /// fallible: the kernel treats a value it does not know as `Enforce`,
    /// and so must whoever shows it.
    pub enum Action("action") {
        /// Reach the destination, report nothing.
        Allow = action::ALLOW => "allow",
        /// Allow, but report it as an audit hit.
        Audit = action::AUDIT => "audit",
        /// Deny with EPERM and report it.
        Enforce = action::ENFORCE => "enforce",
        /// A TCP connect to the HTTP port goes to the filtering proxy; all
        /// else is denied as under `Enforce`.
        Filter = action::FILTER => "filter",
    }
}

impl Action {
    /// Whether the kernel lets the operation through to the destination
    /// itself (reported or not). A filtered caller never reaches it: its
    /// connection ends at the proxy, which forwards allowed requests.
    pub fn reaches(self) -> bool {
        matches!(self, Action::Allow | Action::Audit)
    }
}

kernel_enum! {
    /// A transport protocol of protected port ranges, sockets and events.
    pub enum Protocol("protocol") {
        Tcp = PROTO_TCP => "tcp",
        Udp = PROTO_UDP => "udp",
    }
}

impl Protocol {
    /// Its bit in [`imdsguard_common::PortRange::proto_mask`].
    pub const fn mask(self) -> u16 {
        self.kernel() as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kernel_values_round_trip() {
        for a in Action::ALL {
            assert_eq!(Action::try_from(a.kernel()), Ok(a));
        }
        assert_eq!(Action::Audit.to_string(), "audit");
        assert_eq!(format!("{:<8}|", Action::Allow), "allow   |");
        assert_eq!(
            Action::try_from(0),
            Err(UnknownValue {
                what: "action",
                value: 0
            })
        );
        assert_eq!(Protocol::try_from(PROTO_UDP as u32), Ok(Protocol::Udp));
        assert_eq!(Protocol::Tcp.mask(), PROTO_TCP);
        assert_eq!(serde_json::to_string(&Protocol::Tcp).unwrap(), "\"tcp\"");
    }
}
