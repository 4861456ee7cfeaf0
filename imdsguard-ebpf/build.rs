use which::which;

/// Rebuild when bpf-linker changes (a new linker can change the object), and
/// emit the `bpf_target_arch` cfg that aya-ebpf needs.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found: run `cargo xtask setup` (installs bpf-linker and the nightly of rust-toolchain.toml)",
    );
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
    aya_build::emit_bpf_target_arch_cfg().expect("emit bpf_target_arch cfg");
}
