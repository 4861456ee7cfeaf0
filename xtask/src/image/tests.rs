//! Unit tests of the image module: archive layout, reproducibility and
//! the embedded eBPF object checks.

use std::fs;
use std::io::Read as _;

use anyhow::Context as _;

use super::bpf::{EM_BPF, embedded_bpf_object, program_sections};
use super::oci::{MEDIA_MANIFEST, layout, sha256_hex};
use super::*;
use crate::test::workspace_root;

fn members(tar: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
    tar::Archive::new(tar)
        .entries()
        .expect("a tar")
        .map(|e| {
            let mut e = e.expect("an entry");
            let name = e.path().expect("a path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("entry data");
            (name, e.header().clone(), data)
        })
        .collect()
}

/// The chart's default image, from values.yaml's `repository:` and `tag:`.
fn chart_image() -> anyhow::Result<(String, String)> {
    let path = workspace_root().join("deploy/helm/imdsguard/values.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .with_context(|| format!("{}: no `{name}` line", path.display()))
    };
    Ok((field("repository:")?, field("tag:")?))
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON")
}

#[test]
fn image_is_the_charts_default() {
    let (repository, tag) = chart_image().unwrap();
    assert_eq!((repository.as_str(), tag.as_str()), (REPOSITORY, VERSION));
}

#[test]
fn layout_blobs_agree_with_their_digests() {
    let (files, manifest_digest) = layout(Arch::Arm64, b"\x7fELF not really").unwrap();
    for (name, data) in &files {
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            assert_eq!(hex, sha256_hex(data), "{name}");
        }
    }
    let index = json(&files["index.json"]);
    let m = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(m["digest"], manifest_digest.as_str());
    assert_eq!(
        m["platform"],
        serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
    );
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        format!("{REPOSITORY}:{VERSION}").as_str()
    );
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        VERSION
    );
    let blob = |d: &serde_json::Value| {
        let hex = d["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let data = &files[&format!("blobs/sha256/{hex}")];
        assert_eq!(d["size"], data.len());
        data.clone()
    };
    let manifest = json(&blob(m));
    assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
    let config = json(&blob(&manifest["config"]));
    let layer = blob(&manifest["layers"][0]);
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256_hex(&layer)).as_str()
    );
    assert_eq!(
        (&config["architecture"], &config["variant"], &config["os"]),
        (
            &serde_json::json!("arm64"),
            &serde_json::json!("v8"),
            &serde_json::json!("linux")
        )
    );
    let c = &config["config"];
    assert_eq!(c["User"], "0:0");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/imdsguard"])
    );
    assert_eq!(c["Cmd"], serde_json::json!(["--help"]));
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], VERSION);

    let got: Vec<(String, u32, Vec<u8>)> = members(&layer)
        .into_iter()
        .map(|(n, h, d)| {
            assert_eq!((h.mtime().unwrap(), h.uid().unwrap()), (0, 0), "{n}");
            (n, h.mode().unwrap(), d)
        })
        .collect();
    let want: Vec<(String, u32, Vec<u8>)> = [
        ("usr/", 0o755, &b""[..]),
        ("usr/local/", 0o755, b""),
        ("usr/local/bin/", 0o755, b""),
        ("usr/local/bin/imdsguard", 0o755, b"\x7fELF not really"),
    ]
    .into_iter()
    .map(|(n, m, d)| (n.to_owned(), m, d.to_vec()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn amd64_has_no_variant_and_another_manifest() {
    let (a, da) = layout(Arch::Amd64, b"x").unwrap();
    let (b, db) = layout(Arch::Arm64, b"x").unwrap();
    assert_ne!(da, db);
    assert_eq!(
        json(&a["index.json"])["manifests"][0]["platform"],
        serde_json::json!({"architecture": "amd64", "os": "linux"})
    );
    assert_ne!(a["index.json"], b["index.json"]);
}

#[test]
fn archive_is_reproducible() {
    let dir = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("imdsguard");
    fs::write(&bin, b"same bytes").unwrap();
    let one = write_archive(Arch::Amd64, &bin, &dir.join("a.oci.tar"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&bin, b"same bytes").unwrap();
    let two = write_archive(Arch::Amd64, &bin, &dir.join("b.oci.tar"));
    let (a, b) = (
        fs::read(dir.join("a.oci.tar")).unwrap(),
        fs::read(dir.join("b.oci.tar")).unwrap(),
    );
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(one.unwrap(), two.unwrap());
    assert!(a == b, "the archives differ");
    let names: Vec<String> = members(&a).into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(&names[..2], ["blobs/", "blobs/sha256/"]);
    assert_eq!(&names[names.len() - 2..], ["index.json", "oci-layout"]);
}

/// A minimal BPF ELF header with no sections past the header.
fn bpf_elf(extra: u8) -> Vec<u8> {
    let mut h = vec![0u8; 64 + 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[18..20].copy_from_slice(&EM_BPF.to_le_bytes());
    // Section headers at 64: one of 64 bytes.
    h[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
    h[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    h[0x3c..0x3e].copy_from_slice(&1u16.to_le_bytes());
    h[100] = extra;
    h
}

/// A BPF object with the sections (name, type, data), after a null
/// section and the section-name table, which comes first.
fn bpf_object(sections: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut names = b"\0.shstrtab\0".to_vec();
    let mut all = vec![(0usize, 0u32, Vec::new()), (1, 3, Vec::new())];
    for (name, kind, data) in sections {
        all.push((names.len(), *kind, data.to_vec()));
        names.extend(name.as_bytes());
        names.push(0);
    }
    all[1].2 = names;
    let mut object = bpf_elf(0)[..64].to_vec();
    let mut headers = Vec::new();
    for (name, kind, data) in &all {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(&(*name as u32).to_le_bytes());
        h[4..8].copy_from_slice(&kind.to_le_bytes());
        h[0x18..0x20].copy_from_slice(&(object.len() as u64).to_le_bytes());
        h[0x20..0x28].copy_from_slice(&(data.len() as u64).to_le_bytes());
        if *kind != 8 {
            object.extend(data);
        }
        headers.extend(h);
    }
    let shoff = object.len() as u64;
    object[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    object[0x3c..0x3e].copy_from_slice(&(all.len() as u16).to_le_bytes());
    object[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
    object.extend(headers);
    object
}

#[test]
fn program_sections_leave_out_debug_info_and_btf() {
    let x86 = bpf_object(&[
        ("cgroup/connect4", 1, b"code"),
        (".debug_str", 1, b"x86_64/helpers.rs"),
        (".BTF", 1, b"x86_64"),
        (".bss", 8, b"12345678"),
    ]);
    let arm = bpf_object(&[
        ("cgroup/connect4", 1, b"code"),
        (".debug_str", 1, b"aarch64/helpers.rs"),
        (".BTF", 1, b"aarch64"),
        (".bss", 8, b"12345678"),
    ]);
    let other = bpf_object(&[("cgroup/connect4", 1, b"Code"), (".bss", 8, b"")]);
    let sections = program_sections(&x86).unwrap();
    assert_eq!(
        sections.keys().collect::<Vec<_>>(),
        [".bss", ".shstrtab", "cgroup/connect4"]
    );
    assert_eq!(
        embedded_bpf_object(&[b"prefix".as_slice(), &x86].concat()).unwrap(),
        &x86[..]
    );
    assert_eq!(
        sections["cgroup/connect4"],
        program_sections(&arm).unwrap()["cgroup/connect4"]
    );
    assert_ne!(
        sections["cgroup/connect4"],
        program_sections(&other).unwrap()["cgroup/connect4"]
    );
    // Cut inside the last section header.
    assert!(program_sections(&x86[..x86.len() - 40]).is_err());
}

#[test]
fn finds_the_embedded_bpf_object() {
    let object = bpf_elf(7);
    let mut host = b"\x7fELF\x02\x01 a host ELF, machine not BPF........".to_vec();
    host.extend([0u8; 64]);
    host.extend(&object);
    host.extend(b"trailing");
    assert_eq!(embedded_bpf_object(&host).unwrap(), &object[..]);
    host.extend(bpf_elf(8));
    assert!(embedded_bpf_object(&host).is_err(), "two objects");
    assert!(embedded_bpf_object(b"no elf here").is_err());
}
