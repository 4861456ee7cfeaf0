use proptest::prelude::*;

use super::*;
use crate::cgroup::test_tree::{CID, Tree, UID, UID_, uid};

fn layout(root: &str) -> KubepodsLayout {
    KubepodsLayout::from_root(Path::new(root)).unwrap()
}

#[test]
fn pod_dirs_under_cgroupfs() {
    let l = layout("/sys/fs/cgroup/kubepods");
    assert_eq!(l.driver(), CgroupDriver::Cgroupfs);
    assert_eq!(
        l.candidates(&uid()).map(|p| p.display().to_string()),
        [
            format!("/sys/fs/cgroup/kubepods/pod{UID}"),
            format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}"),
            format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID}"),
        ]
    );
    let nested = layout("/sys/fs/cgroup/kubelet/kubepods");
    assert_eq!(
        nested.pod_dir(&uid(), QosClass::Burstable),
        PathBuf::from(format!(
            "/sys/fs/cgroup/kubelet/kubepods/burstable/pod{UID}"
        ))
    );
}

#[test]
fn pod_dirs_under_systemd() {
    let l = layout("/sys/fs/cgroup/kubepods.slice");
    assert_eq!(
        (l.driver(), l.slice_prefix()),
        (CgroupDriver::Systemd, "kubepods")
    );
    assert_eq!(
        l.candidates(&uid()).map(|p| p.display().to_string()),
        [
            format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID_}.slice"),
            format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
            ),
            format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ),
        ]
    );
}

#[test]
fn pod_dirs_under_a_nested_systemd_root() {
    let l = layout("/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice");
    assert_eq!(l.slice_prefix(), "kubelet-kubepods");
    assert_eq!(
        l.pod_dir(&uid(), QosClass::Burstable),
        PathBuf::from(format!(
            "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice"
        ))
    );
    assert_eq!(
        l.pod_dir(&uid(), QosClass::Guaranteed),
        PathBuf::from(format!(
            "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"
        ))
    );
}

#[test]
fn pod_uids_are_uuids_or_static_pod_hashes() {
    for ok in [
        UID,
        "3F2A1B4C-5D6E-4F70-8A9B-0C1D2E3F4A5B",
        "0123456789abcdef0123456789abcdef",
    ] {
        assert_eq!(ok.parse::<PodUid>().unwrap().as_str(), ok);
    }
    for bad in [
        "",
        "../../etc",
        "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b/..",
        "3f2a1b4c_5d6e_4f70_8a9b_0c1d2e3f4a5b",
        "3f2a1b4c-5d6e-4f70-8a9b0-c1d2e3f4a5b",
        "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5g",
        "0123456789abcdef0123456789abcde",
        "pod-3f2a",
    ] {
        let e = bad.parse::<PodUid>().unwrap_err();
        assert!(
            matches!(&e, PodCgroupError::InvalidPodUid { uid } if uid == bad),
            "{bad:?}: {e:?}"
        );
    }
}

#[test]
fn qos_classes_parse_from_pod_status() {
    assert_eq!(
        "Guaranteed".parse::<QosClass>().unwrap(),
        QosClass::Guaranteed
    );
    assert_eq!(
        "Burstable".parse::<QosClass>().unwrap(),
        QosClass::Burstable
    );
    assert_eq!(
        "BestEffort".parse::<QosClass>().unwrap(),
        QosClass::BestEffort
    );
    for q in QosClass::ALL {
        assert_eq!(q.to_string().parse::<QosClass>().unwrap(), q);
    }
    let e = "burstable".parse::<QosClass>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown qos class \"burstable\" (expected Guaranteed, Burstable, BestEffort)"
    );
}

#[test]
fn pod_dir_names_parse_back() {
    let cases = [
        (
            format!("kubepods.slice/kubepods-pod{UID_}.slice"),
            QosClass::Guaranteed,
        ),
        (
            format!("kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
            QosClass::BestEffort,
        ),
        (
            format!("kubelet-kubepods-burstable-pod{UID_}.slice"),
            QosClass::Burstable,
        ),
        (
            format!("/sys/fs/cgroup/kubepods/pod{UID}"),
            QosClass::Guaranteed,
        ),
        (format!("kubepods/burstable/pod{UID}"), QosClass::Burstable),
        (format!("besteffort/pod{UID}"), QosClass::BestEffort),
    ];
    for (path, qos) in cases {
        assert_eq!(
            parse_pod_dir(Path::new(&path)),
            Some((uid(), qos)),
            "{path}"
        );
    }
    for path in [
        format!("pod{UID}"),
        format!("system.slice/pod{UID}"),
        format!("kubepods-pod{UID}.slice"),
        format!("machine-pod{UID_}.slice"),
        format!("kubepods-burstable-pod{UID_}.scope"),
        "kubepods-burstable.slice".to_string(),
        "kubepods/burstable/pod..".to_string(),
        format!("kubepods/burstable/pod{UID}/{CID}"),
    ] {
        assert_eq!(parse_pod_dir(Path::new(&path)), None, "{path}");
    }
}

#[test]
fn container_ids_come_from_scope_and_plain_names() {
    for name in [
        format!("cri-containerd-{CID}.scope"),
        format!("crio-{CID}.scope"),
        format!("docker-{CID}.scope"),
        CID.to_string(),
        format!("crio-{CID}"),
    ] {
        assert_eq!(container_id_of(&name), Some(CID), "{name}");
    }
    for name in [
        format!("crio-conmon-{CID}.scope"),
        format!("cri-containerd-{CID}"),
        format!("podman-{CID}.scope"),
        format!("cri-containerd-{}.scope", &CID[1..]),
        CID.to_uppercase(),
        format!("kubepods-pod{UID_}.slice"),
        "init.scope".to_string(),
    ] {
        assert_eq!(container_id_of(&name), None, "{name}");
    }
}

#[test]
fn at_infers_the_driver_from_the_name() {
    let t = Tree::new(&[
        "kubepods",
        "kubepods.slice",
        "kubelet.slice/kubelet-kubepods.slice",
        "system.slice",
    ]);
    assert_eq!(
        KubepodsLayout::at(t.path("kubepods")).unwrap().driver(),
        CgroupDriver::Cgroupfs
    );
    assert_eq!(
        KubepodsLayout::at(t.path("kubepods.slice"))
            .unwrap()
            .slice_prefix(),
        "kubepods"
    );
    let nested = KubepodsLayout::at(t.path("kubelet.slice/kubelet-kubepods.slice")).unwrap();
    assert_eq!(
        (nested.driver(), nested.slice_prefix()),
        (CgroupDriver::Systemd, "kubelet-kubepods")
    );
    assert_eq!(
        nested.root(),
        t.path("kubelet.slice/kubelet-kubepods.slice")
    );

    let e = KubepodsLayout::at(t.path("system.slice")).unwrap_err();
    assert!(matches!(e, PodCgroupError::UnknownDriver { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("cannot tell the cgroup driver from "),
        "{e}"
    );
    let e = KubepodsLayout::at(t.path("missing/kubepods")).unwrap_err();
    assert!(
        matches!(&e, PodCgroupError::Io { op: "stat", source, .. } if source.kind() == io::ErrorKind::NotFound)
    );
    fs::write(t.path("file"), "").unwrap();
    fs::create_dir(t.path("x")).unwrap();
    fs::write(t.path("x/kubepods"), "").unwrap();
    assert!(matches!(
        KubepodsLayout::at(t.path("x/kubepods")),
        Err(PodCgroupError::NotADirectory { .. })
    ));
    for name in [
        "-kubepods.slice",
        "a--kubepods.slice",
        "kubepods-burstable.slice",
        "mykubepods.slice",
    ] {
        assert_eq!(kubepods_kind(name), None, "{name}");
    }
}

fn any_uid() -> impl Strategy<Value = PodUid> {
    prop_oneof![
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[0-9a-f]{32}",
    ]
    .prop_map(|s| s.parse().unwrap())
}

proptest! {
    #[test]
    fn pod_dirs_round_trip(
        uid in any_uid(),
        qos in prop::sample::select(QosClass::ALL.to_vec()),
        root in prop::sample::select(vec!["/cg/kubepods", "/cg/kubelet/kubepods", "/cg/kubepods.slice", "/cg/kubelet.slice/kubelet-kubepods.slice"]),
    ) {
        let l = layout(root);
        let dir = l.pod_dir(&uid, qos);
        prop_assert!(dir.starts_with(l.root()));
        prop_assert_eq!(parse_pod_dir(&dir), Some((uid.clone(), qos)));
        // Only the pod's own directory and its QoS tier lie below the root.
        let depth = dir.strip_prefix(l.root()).unwrap().components().count();
        prop_assert_eq!(depth, if qos == QosClass::Guaranteed { 1 } else { 2 });
    }

    #[test]
    fn accepted_uids_are_one_plain_component(s in "\\PC{0,40}|[0-9a-fA-F./_-]{30,40}") {
        if let Ok(uid) = s.parse::<PodUid>() {
            prop_assert!(uid.as_str().bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
            let dir = layout("/cg/kubepods").pod_dir(&uid, QosClass::Burstable);
            prop_assert!(dir.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_))));
        }
    }
}
