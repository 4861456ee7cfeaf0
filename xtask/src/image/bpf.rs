//! The eBPF object embedded in each binary, and the check that every
//! architecture's binary embeds the same programs.

use std::collections::BTreeMap;
use std::fs;

use anyhow::{Context as _, bail, ensure};

use super::Built;
use super::oci::sha256_hex;

pub(super) const EM_BPF: u16 = 247;

/// The one BPF ELF object inside `binary`, which embeds it with
/// `include_bytes_aligned!`: a 64-bit little-endian ELF header with
/// `e_machine` EM_BPF, running to the end of its section headers (where
/// LLVM's objects end).
pub(super) fn embedded_bpf_object(binary: &[u8]) -> anyhow::Result<&[u8]> {
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = binary[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + i;
        at = start + 4;
        let h = &binary[start..];
        if h.len() < 64 || h[4] != 2 || h[5] != 1 || u16_at(h, 18) != EM_BPF {
            continue;
        }
        let shoff = u64::from_le_bytes(h[0x28..0x30].try_into().expect("8 bytes"));
        let end = usize::try_from(shoff)
            .ok()
            .and_then(|o| {
                o.checked_add(usize::from(u16_at(h, 0x3a)) * usize::from(u16_at(h, 0x3c)))
            })
            .filter(|&e| e >= 64 && e <= h.len());
        if let Some(end) = end {
            found.push(&h[..end]);
        }
    }
    match found[..] {
        [object] => Ok(object),
        [] => bail!("no BPF ELF object found"),
        _ => bail!("{} BPF ELF objects found, want one", found.len()),
    }
}

/// Every binary embeds the same eBPF programs. The objects are not
/// byte-identical: aya-build passes the target's `--cfg bpf_target_arch`,
/// which picks aya-ebpf-bindings' module of that architecture, and the
/// module's name (`x86_64/helpers.rs`, `aarch64/helpers.rs`) shows up in
/// the debug info and in the BTF's strings. Every other section (the
/// programs, their relocations, maps, symbols, license) must be equal.
pub(super) fn same_bpf_programs(built: &[Built]) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for b in built {
        let bytes = fs::read(&b.binary).with_context(|| format!("read {}", b.binary.display()))?;
        let object = embedded_bpf_object(&bytes)
            .with_context(|| format!("the eBPF object in {}", b.binary.display()))?;
        let sections = program_sections(object)
            .with_context(|| format!("the eBPF object in {}", b.binary.display()))?;
        eprintln!(
            "xtask: the {} binary embeds a {} byte eBPF object, sha256 {}",
            b.arch.name(),
            object.len(),
            sha256_hex(object)
        );
        seen.push((b.arch, sections));
    }
    let (first, want) = &seen[0];
    for (arch, got) in &seen[1..] {
        let differ: Vec<&str> = want
            .keys()
            .chain(got.keys())
            .filter(|k| want.get(*k) != got.get(*k))
            .map(String::as_str)
            .collect();
        ensure!(
            differ.is_empty(),
            "the {} and {} eBPF objects differ in {}",
            first.name(),
            arch.name(),
            differ.join(", ")
        );
    }
    let digest = sha256_hex(
        want.iter()
            .map(|(name, hash)| format!("{name} {hash}\n"))
            .collect::<String>()
            .as_bytes(),
    );
    eprintln!(
        "xtask: the eBPF programs are the same in every binary: {} sections equal (digest {digest}); \
         only debug info and BTF strings differ, which name the bindings' architecture",
        want.len()
    );
    Ok(())
}

/// The sha256 of each section of a BPF object by name, without the debug
/// and BTF sections (see [`same_bpf_programs`]).
pub(super) fn program_sections(object: &[u8]) -> anyhow::Result<BTreeMap<String, String>> {
    let bytes = |at: usize, len: usize| {
        at.checked_add(len)
            .and_then(|end| object.get(at..end))
            .context("a truncated ELF object")
    };
    let uint = |at: usize, len: usize| -> anyhow::Result<usize> {
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes(at, len)?);
        usize::try_from(u64::from_le_bytes(buf)).context("an ELF field out of range")
    };
    let (shoff, shentsize, shnum, shstrndx) = (
        uint(0x28, 8)?,
        uint(0x3a, 2)?,
        uint(0x3c, 2)?,
        uint(0x3e, 2)?,
    );
    // (name offset, type, offset, size) of each section header.
    let header = |i: usize| -> anyhow::Result<(usize, usize, usize, usize)> {
        let at = shoff + i * shentsize;
        Ok((
            uint(at, 4)?,
            uint(at + 4, 4)?,
            uint(at + 0x18, 8)?,
            uint(at + 0x20, 8)?,
        ))
    };
    let (_, _, names_at, names_len) = header(shstrndx)?;
    let names = bytes(names_at, names_len)?;
    let mut sections = BTreeMap::new();
    for i in 1..shnum {
        let (name_at, kind, at, len) = header(i)?;
        let name = names
            .get(name_at..)
            .and_then(|n| n.split(|&b| b == 0).next())
            .context("a section name out of range")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let named_by_arch = [".debug", ".rel.debug", ".BTF", ".rel.BTF"]
            .iter()
            .any(|p| name.starts_with(p));
        if named_by_arch {
            continue;
        }
        // SHT_NOBITS has a size but no bytes in the file.
        let data = if kind == 8 { &[][..] } else { bytes(at, len)? };
        sections.insert(name, format!("{kind} {}", sha256_hex(data)));
    }
    Ok(sections)
}
