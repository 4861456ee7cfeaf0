//! Creating a Deployment as the controllers and the scheduler would: the
//! Deployment, its ReplicaSet and its pods bound to the test node.

use std::collections::BTreeMap;

use anyhow::{Context as _, ensure};
use imdsguard_testlab::cluster::{Cluster, NODE};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, ReplicaSet, ReplicaSetSpec},
        core::v1::{Container, Pod, PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Resource as _,
    api::{ObjectMeta, PostParams},
};

use crate::NS;

/// Creates Deployment `app` with 2 replicas, plus what the controllers and
/// the scheduler would add: ReplicaSet `app-hash` and its two pods, bound to
/// [`NODE`]. Returns the pods' names and UIDs.
pub(super) fn create_deployment(
    cluster: &Cluster,
    app: &str,
    hash: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let pp = PostParams::default();
    let app_labels = BTreeMap::from([("app".to_string(), app.to_string())]);
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(app_labels.clone()),
            ..Default::default()
        }),
        // No resources: BestEffort, the QoS class whose cgroup we create.
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
    };
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(app.into()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(app_labels.clone()),
                ..Default::default()
            },
            template: template.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let deployment = cluster
        .rt
        .block_on(Api::<Deployment>::namespaced(cluster.admin.clone(), NS).create(&pp, &deployment))
        .with_context(|| format!("create deployment {app}"))?;
    println!("created deployment.apps/{app} (2 replicas, selector app={app})");

    // The deployment controller's ReplicaSet. It hashes the template for
    // the name; a fixed hash does here.
    let mut rs_labels = app_labels;
    rs_labels.insert("pod-template-hash".into(), hash.into());
    let mut rs_template = template;
    if let Some(meta) = rs_template.metadata.as_mut() {
        meta.labels = Some(rs_labels.clone());
    }
    let rs_name = format!("{app}-{hash}");
    let rs = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(rs_name.clone()),
            labels: Some(rs_labels.clone()),
            owner_references: deployment.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(rs_labels.clone()),
                ..Default::default()
            },
            template: Some(rs_template.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rs = cluster
        .rt
        .block_on(Api::<ReplicaSet>::namespaced(cluster.admin.clone(), NS).create(&pp, &rs))
        .with_context(|| format!("create replicaset {rs_name}"))?;
    println!("created replicaset.apps/{rs_name} (as the deployment controller would)");

    // The ReplicaSet controller's pods: the API server appends the random
    // suffix to generateName, exactly as for real replicas. nodeName is
    // what the scheduler would bind.
    let mut created = Vec::new();
    for _ in 0..2 {
        let pod = Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{rs_name}-")),
                labels: Some(rs_labels.clone()),
                owner_references: rs.controller_owner_ref(&()).map(|o| vec![o]),
                ..Default::default()
            },
            spec: rs_template.spec.clone().map(|spec| PodSpec {
                node_name: Some(NODE.into()),
                ..spec
            }),
            ..Default::default()
        };
        let pod = cluster
            .rt
            .block_on(Api::<Pod>::namespaced(cluster.admin.clone(), NS).create(&pp, &pod))
            .with_context(|| format!("create a pod of {rs_name}"))?;
        let qos = pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
        ensure!(
            qos == Some("BestEffort"),
            "pod QoS class {qos:?}: the cgroup path assumes BestEffort"
        );
        let name = pod.metadata.name.context("created pod has no name")?;
        let uid = pod.metadata.uid.context("created pod has no uid")?;
        created.push((name, uid));
    }
    Ok(created)
}
