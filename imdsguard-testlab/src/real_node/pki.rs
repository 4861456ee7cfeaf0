//! The node's certificates and tokens, made with openssl: one CA for the
//! API server's serving certificate, the API server's client certificate
//! towards kubelet, and the service-account key pair.

use std::{fs, path::Path, process::Command};

use anyhow::Context as _;

use super::{NODE_IP, SERVICE_IP};

/// Writes `ca.{key,crt}`, `apiserver.{key,crt}`, `apiserver-kubelet.{key,crt}`
/// and `sa.{key,pub}` into `dir`.
pub fn write(dir: &Path) -> anyhow::Result<()> {
    // No argument holds a space, so each command is one string.
    let openssl = |args: &str| {
        crate::process::run(
            Command::new("openssl")
                .args(args.split_whitespace())
                .current_dir(dir),
        )
    };
    openssl(
        "req -x509 -nodes -days 3650 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
         -subj /CN=imdsguard-real-node-ca -keyout ca.key -out ca.crt",
    )?;
    // Pods reach the API server at the `kubernetes` Service's cluster IP
    // (through kube-proxy), the node's daemons at the node IP; rustls and Go
    // check the SAN only.
    sign(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "subjectAltName=IP:{NODE_IP},IP:{SERVICE_IP},IP:127.0.0.1,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local,DNS:localhost\n\
             extendedKeyUsage=serverAuth\n"
        ),
    )?;
    // kubelet authenticates the API server (logs, exec) by this certificate.
    sign(
        dir,
        "apiserver-kubelet",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "extendedKeyUsage=clientAuth\n",
    )?;
    openssl("genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key")?;
    openssl("pkey -in sa.key -pubout -out sa.pub")?;
    Ok(())
}

fn sign(dir: &Path, name: &str, subject: &str, ext: &str) -> anyhow::Result<()> {
    let ext_file = dir.join(format!("{name}.ext"));
    fs::write(
        &ext_file,
        format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"),
    )
    .with_context(|| format!("write {}", ext_file.display()))?;
    let run =
        |args: &[&str]| crate::process::run(Command::new("openssl").args(args).current_dir(dir));
    run(&[
        "req",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-subj",
        subject,
        "-keyout",
        &format!("{name}.key"),
        "-out",
        &format!("{name}.csr"),
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        &format!("{name}.ext"),
        "-out",
        &format!("{name}.crt"),
    ])?;
    Ok(())
}
