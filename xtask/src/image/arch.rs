//! The two image architectures and what building and checking each needs
//! (Rust target, C toolchain, qemu-user runner, OCI platform names).

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

impl Arch {
    /// The OCI (GOARCH) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    pub fn rust_target(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-unknown-linux-musl",
            Self::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The OCI platform variant (arm64 is v8, amd64 has none).
    pub(super) fn variant(self) -> Option<&'static str> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some("v8"),
        }
    }

    /// What `file` calls the machine.
    pub(super) fn file_machine(self) -> &'static str {
        match self {
            Self::Amd64 => "x86-64",
            Self::Arm64 => "ARM aarch64",
        }
    }

    /// The host's architecture, whose binaries run natively.
    pub(super) fn host() -> Option<Self> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Self::Amd64),
            "aarch64" => Some(Self::Arm64),
            _ => None,
        }
    }

    /// The command and Debian package that build C for this target (ring's
    /// C and assembly) and link it. .cargo/config.toml names the cross gcc.
    pub(super) fn c_toolchain(self) -> (&'static str, &'static str) {
        match self {
            Self::Amd64 => ("musl-gcc", "musl-tools"),
            Self::Arm64 => ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        }
    }

    /// The Debian packages beyond the compiler: the GNU cross gcc has no
    /// libc headers of its own, and ring's C includes <stdint.h>.
    pub(super) fn c_headers(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some((
                "/usr/aarch64-linux-gnu/include/stdint.h",
                "libc6-dev-arm64-cross",
            )),
        }
    }

    /// How to run a binary of this architecture here: natively, or under
    /// qemu-user.
    pub(super) fn runner(self) -> Option<(&'static str, &'static str)> {
        if Self::host() == Some(self) {
            return None;
        }
        Some(match self {
            Self::Amd64 => ("qemu-x86_64-static", "qemu-user-static"),
            Self::Arm64 => ("qemu-aarch64-static", "qemu-user-static"),
        })
    }
}
