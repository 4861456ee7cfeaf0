//! A real kube-apiserver 1.20.2 and etcd on 127.0.0.1, for the control-plane
//! tests.
//!
//! `cargo xtask kubernetes` builds the binary once per machine and
//! installs etcd, etcdctl and openssl; [`KubeApiserver::start`] fails, rather
//! than skips, when it has not been run. Each server gets its own temp dir,
//! certificates, tokens and free ports, so tests can run side by side.

use std::env;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Read as _};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{self, Child, Command, Stdio};

use anyhow::{Context as _, bail};

use crate::process::{spawn_logged, stop, wait_until};

/// The user name of the daemon's service account, `imdsguard` in namespace
/// `imdsguard-system`: bind roles to that service account to grant
/// [`KubeApiserver::daemon_token`] rights.
pub const DAEMON_USER: &str = "system:serviceaccount:imdsguard-system:imdsguard";

/// Keep in step with xtask's `kubernetes` module, which builds the binaries.
const VERSION: &str = "1.20.2";

/// A running etcd and kube-apiserver. Dropping it stops both and removes
/// their files.
pub struct KubeApiserver {
    dir: PathBuf,
    binary: PathBuf,
    port: u16,
    etcd_url: String,
    admin_token: String,
    daemon_token: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

impl KubeApiserver {
    /// Starts etcd and kube-apiserver and waits until the apiserver is ready.
    pub fn start() -> anyhow::Result<Self> {
        let binary = binary_path("kube-apiserver");
        if !binary.is_file() {
            bail!(
                "{} is missing: run `cargo xtask kubernetes` to build it",
                binary.display()
            );
        }
        let dir = make_temp_dir()?;
        let [etcd_port, peer_port, port] = free_ports()?;
        // Built before anything is started, so that Drop cleans up after any
        // step that fails.
        let mut server = KubeApiserver {
            dir,
            binary,
            port,
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            admin_token: random_hex(16)?,
            daemon_token: random_hex(16)?,
            etcd: None,
            apiserver: None,
        };
        server.write_credentials()?;
        server.start_etcd(peer_port)?;
        server.start_apiserver()?;
        Ok(server)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA that signed the serving certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A token of group `system:masters`.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A token of [`DAEMON_USER`], with only the rights that RBAC grants it.
    pub fn daemon_token(&self) -> &str {
        &self.daemon_token
    }

    /// Writes a kubeconfig for this server that authenticates with `token`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>, token: &str) -> anyhow::Result<()> {
        write_kubeconfig(path.as_ref(), &self.url(), &self.ca_cert_path(), token)
    }

    /// Stops the apiserver and starts it again on the same port and data.
    pub fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        self.stop_apiserver()?;
        self.start_apiserver()
    }

    /// Stops the apiserver (SIGTERM, then SIGKILL after a timeout); etcd keeps
    /// running. Does nothing if it is stopped.
    pub fn stop_apiserver(&mut self) -> anyhow::Result<()> {
        match self.apiserver.take() {
            Some(mut child) => stop(&mut child).context("stop kube-apiserver"),
            None => Ok(()),
        }
    }

    /// Starts the apiserver on this server's port and waits until it is ready.
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        if self.apiserver.is_some() {
            bail!("kube-apiserver is already running");
        }
        let file = |name: &str| self.dir.join(name).into_os_string();
        let mut cmd = Command::new(&self.binary);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", self.port))
            .arg("--insecure-port=0")
            .arg("--tls-cert-file")
            .arg(file("server.crt"))
            .arg("--tls-private-key-file")
            .arg(file("server.key"))
            .arg("--client-ca-file")
            .arg(file("ca.crt"))
            .arg("--token-auth-file")
            .arg(file("tokens.csv"))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-account-key-file")
            .arg(file("sa.pub"))
            .arg("--service-account-signing-key-file")
            .arg(file("sa.key"))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            // No controller-manager creates the default service accounts.
            .arg("--disable-admission-plugins=ServiceAccount")
            // Nothing listens on the addresses it would publish.
            .arg("--endpoint-reconciler-type=none");
        let log = self.dir.join("kube-apiserver.log");
        let mut child = spawn_logged(cmd, &log).context("start kube-apiserver")?;
        let ca = self.ca_cert_path();
        let bearer = format!("Authorization: Bearer {}", self.admin_token);
        // The `default` namespace comes a moment after /readyz, from a
        // bootstrap controller; tests may use it at once.
        let ready = wait_until(&mut child, &log, || {
            ["/readyz", "/api/v1/namespaces/default"]
                .iter()
                .all(|path| {
                    let url = format!("{}{path}", self.url());
                    curl_ok(&url, |c| c.arg("--cacert").arg(&ca).args(["-H", &bearer]))
                })
        });
        match ready {
            Ok(()) => {
                self.apiserver = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = stop(&mut child);
                Err(e.context("wait for kube-apiserver to be ready"))
            }
        }
    }

    /// Compacts etcd at its current revision, so that watches and exact
    /// lists from older resource versions get 410 Gone. Returns the revision.
    pub fn compact_etcd(&self) -> anyhow::Result<i64> {
        let status = etcdctl(&self.etcd_url, &["endpoint", "status", "-w", "json"])?;
        let status: serde_json::Value =
            serde_json::from_str(&status).context("parse `etcdctl endpoint status` output")?;
        let Some(revision) = status[0]["Status"]["header"]["revision"].as_i64() else {
            bail!("no revision in `etcdctl endpoint status` output: {status}");
        };
        etcdctl(&self.etcd_url, &["compact", &revision.to_string()])?;
        Ok(revision)
    }

    /// The CA and serving certificate, the service-account key pair and the
    /// token file.
    fn write_credentials(&self) -> anyhow::Result<()> {
        // No argument holds a space, so each command is one string.
        let openssl = |args: &str| {
            crate::process::run(
                Command::new("openssl")
                    .args(args.split_whitespace())
                    .current_dir(&self.dir),
            )
        };
        openssl(
            "req -x509 -nodes -days 3650 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
             -subj /CN=imdsguard-test-ca -keyout ca.key -out ca.crt",
        )?;
        openssl(
            "req -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
             -subj /CN=kube-apiserver -keyout server.key -out server.csr",
        )?;
        // Go and rustls check the SAN only; rustls also rejects a CA cert
        // used as the serving cert.
        let ext = self.dir.join("server.ext");
        fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        )
        .with_context(|| format!("write {}", ext.display()))?;
        openssl(
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
             -extfile server.ext -out server.crt",
        )?;
        openssl("genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key")?;
        openssl("pkey -in sa.key -pubout -out sa.pub")?;
        let tokens = self.dir.join("tokens.csv");
        fs::write(
            &tokens,
            format!(
                "{},admin,admin,system:masters\n\
                 {},{DAEMON_USER},imdsguard-uid,\"system:serviceaccounts,system:serviceaccounts:imdsguard-system\"\n",
                self.admin_token, self.daemon_token,
            ),
        )
        .with_context(|| format!("write {}", tokens.display()))
    }

    fn start_etcd(&mut self, peer_port: u16) -> anyhow::Result<()> {
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=default")
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .arg(format!("--listen-client-urls={}", self.etcd_url))
            .arg(format!("--advertise-client-urls={}", self.etcd_url))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"));
        let log = self.dir.join("etcd.log");
        let mut child =
            spawn_logged(cmd, &log).context("start etcd (`cargo xtask kubernetes` installs it)")?;
        let health = format!("{}/health", self.etcd_url);
        let ready = wait_until(&mut child, &log, || curl_ok(&health, |c| c));
        // Kept even if not ready, so that Drop stops it.
        self.etcd = Some(child);
        ready.context("wait for etcd to be healthy")
    }
}

impl Drop for KubeApiserver {
    fn drop(&mut self) {
        for (name, child) in [
            ("kube-apiserver", &mut self.apiserver),
            ("etcd", &mut self.etcd),
        ] {
            if let Some(mut child) = child.take()
                && let Err(e) = stop(&mut child)
            {
                eprintln!("kube_apiserver: stop {name}: {e}");
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("kube_apiserver: remove {}: {e}", self.dir.display());
        }
    }
}

/// Writes a kubeconfig for the API server at `server` (TLS checked against
/// `ca`) that authenticates with `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> anyhow::Result<()> {
    // JSON strings are valid YAML scalars, and quote whatever a path holds.
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let config = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: imdsguard-test\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority: {ca}\n\
         users:\n\
         - name: imdsguard-test\n  \
           user:\n    \
             token: {token}\n\
         contexts:\n\
         - name: imdsguard-test\n  \
           context:\n    \
             cluster: imdsguard-test\n    \
             user: imdsguard-test\n\
         current-context: imdsguard-test\n",
        server = quote(server),
        ca = quote(&ca.to_string_lossy()),
        token = quote(token),
    );
    fs::write(path, config).with_context(|| format!("write {}", path.display()))
}

/// Where `cargo xtask kubernetes` caches the Kubernetes binaries:
/// `$IMDSGUARD_CACHE_DIR` (default `/var/cache/imdsguard`)
/// `/kubernetes-<version>/<name>`.
pub fn binary_path(name: &str) -> PathBuf {
    let cache = env::var_os("IMDSGUARD_CACHE_DIR").unwrap_or_else(|| "/var/cache/imdsguard".into());
    PathBuf::from(cache)
        .join(format!("kubernetes-{VERSION}"))
        .join(name)
}

/// A new private dir: it holds the keys.
fn make_temp_dir() -> anyhow::Result<PathBuf> {
    let dir = env::temp_dir().join(format!(
        "imdsguard-kube-apiserver-{}-{}",
        process::id(),
        random_hex(4)?
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Ports that were free a moment ago. All are held at once so they differ.
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .context("bind 127.0.0.1:0 to find a free port")?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn etcdctl(endpoint: &str, args: &[&str]) -> anyhow::Result<String> {
    crate::process::run(
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args),
    )
}

/// Whether a curl GET gets a 2xx answer. `--noproxy` keeps it on 127.0.0.1
/// whatever proxy the environment names.
pub fn curl_ok(url: &str, extra: impl FnOnce(&mut Command) -> &mut Command) -> bool {
    let mut cmd = Command::new("curl");
    cmd.args("-sf --noproxy * --max-time 2 -o /dev/null".split_whitespace());
    extra(&mut cmd)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
