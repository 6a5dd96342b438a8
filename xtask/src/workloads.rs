//! Runs a container of one of the manifests' workloads the way a kubelet
//! would, from the pod template the API server holds after `kubectl apply
//! -k manifests/`: the same command, args and environment (downward-API
//! values filled in), its hostPath, Secret and service-account volumes
//! bind-mounted at their mountPaths in a mount namespace of its own, its
//! capabilities and user as its securityContext says. So the end-to-end
//! tests cannot drift from the manifests.
//!
//! A node's hostPaths live in a directory of the lab (`<node>-root`), the
//! node's bpffs is the lab's bpffs directory for it, and character devices
//! are the host's. Without kube-proxy in the node namespaces,
//! `KUBERNETES_SERVICE_HOST` names the API server's address directly (a
//! kubelet gives the `kubernetes` Service's ClusterIP, which leads there).

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::Value;

use crate::{
    kube::{ControlPlane, APISERVER_PORT},
    lab::Lab,
};

/// A volume's files: (name, content).
type Files = Vec<(String, Vec<u8>)>;

/// The namespace everything of Ligo runs in.
pub const NAMESPACE: &str = "ligo-system";

/// Where a container runs.
pub struct Placement<'a> {
    /// The Node's name (`spec.nodeName`).
    pub node: &'a str,
    /// The node's network namespace; `None`: the root namespace.
    pub netns: Option<&'a str>,
    /// The address the API server answers on from there.
    pub apiserver: Ipv4Addr,
}

/// One container of a workload's pod template, as stored by the API server.
pub struct Workload {
    pub kind: String,
    pub name: String,
    pod: Value,
    container: Value,
}

impl ControlPlane {
    /// Container `container` of `kind/name` in ligo-system.
    pub fn workload(&self, kind: &str, name: &str, container: &str) -> Result<Workload> {
        let json = self.kubectl(&["get", kind, name, "-n", NAMESPACE, "-o", "json"])?;
        let object: Value = serde_json::from_str(&json)?;
        let pod = object["spec"]["template"]["spec"].clone();
        let container = pod["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == container))
            .cloned()
            .with_context(|| format!("{kind}/{name} has no container {container}"))?;
        Ok(Workload {
            kind: kind.into(),
            name: name.into(),
            pod,
            container,
        })
    }

    /// The ServiceAccount token Secret's files (token, ca.crt, namespace),
    /// once the token controller has made it.
    fn service_account_files(&self, account: &str) -> Result<Files> {
        let secret = self.wait_for(
            &format!("a token Secret for ServiceAccount {account}"),
            std::time::Duration::from_secs(30),
            || {
                let name = self.jsonpath_in("serviceaccount", account, "{.secrets[0].name}")?;
                Ok((!name.is_empty()).then_some(name))
            },
        )?;
        self.secret_files(&secret)?
            .context("the token Secret went away")
    }

    /// A Secret's data as files; `None` when it does not exist.
    pub fn secret_files(&self, name: &str) -> Result<Option<Files>> {
        let json = self.kubectl(&[
            "get",
            "secret",
            name,
            "-n",
            NAMESPACE,
            "--ignore-not-found",
            "-o",
            "json",
        ])?;
        if json.trim().is_empty() {
            return Ok(None);
        }
        let secret: Value = serde_json::from_str(&json)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut files = Vec::new();
        if let Some(data) = secret["data"].as_object() {
            for (key, value) in data {
                let bytes = b64
                    .decode(value.as_str().unwrap_or_default())
                    .with_context(|| format!("Secret {name} data.{key}"))?;
                files.push((key.clone(), bytes));
            }
        }
        Ok(Some(files))
    }

    fn jsonpath_in(&self, kind: &str, name: &str, path: &str) -> Result<String> {
        self.kubectl(&[
            "get",
            kind,
            name,
            "-n",
            NAMESPACE,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }
}

impl Workload {
    /// Starts the container as process `process` of `lab` (its log is
    /// `lab.log_path(process)`).
    pub fn start(
        &self,
        cp: &ControlPlane,
        lab: &mut Lab,
        at: &Placement,
        process: &str,
    ) -> Result<()> {
        let script = self
            .script(cp, lab, at, process)
            .with_context(|| format!("preparing {}/{} for {}", self.kind, self.name, at.node))?;
        let shell = std::ffi::OsStr::new("sh");
        let args = [std::ffi::OsStr::new("-c"), std::ffi::OsStr::new(&script)];
        match at.netns {
            Some(ns) => lab.spawn(ns, process, shell, &args),
            None => lab.spawn_here(process, shell, &args),
        }
    }

    /// The command line, environment and mounts, as one `sh` script that
    /// mounts in a fresh mount namespace and then execs the container's
    /// command.
    fn script(
        &self,
        cp: &ControlPlane,
        lab: &mut Lab,
        at: &Placement,
        process: &str,
    ) -> Result<String> {
        let mut mounts: Vec<(PathBuf, String)> = Vec::new();
        let volumes = self.pod["volumes"].as_array().cloned().unwrap_or_default();
        let node_root = lab.file(&format!("{}-root", at.netns.unwrap_or(at.node)));
        for mount in self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = mount["name"].as_str().unwrap_or_default();
            let target = mount["mountPath"].as_str().unwrap_or_default().to_owned();
            let volume = volumes
                .iter()
                .find(|v| v["name"] == name)
                .with_context(|| format!("volumeMount {name} names no volume"))?;
            let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
                match host_path(lab, at, &node_root, path)? {
                    Some(dir) => dir,
                    // The host's own device: nothing to mount.
                    None => continue,
                }
            } else if let Some(secret) = volume["secret"].as_object() {
                let dir = lab.file(&format!("{process}-{name}"));
                let secret_name = secret["secretName"].as_str().unwrap_or_default();
                let mode = secret
                    .get("defaultMode")
                    .and_then(Value::as_u64)
                    .unwrap_or(0o644) as u32;
                let optional = secret.get("optional").and_then(Value::as_bool) == Some(true);
                match cp.secret_files(secret_name)? {
                    Some(files) => write_files(&dir, &files, mode)?,
                    None if optional => write_files(&dir, &[], mode)?,
                    None => bail!("Secret {secret_name} (volume {name}) does not exist"),
                }
                dir
            } else {
                bail!("volume {name}: only hostPath and secret volumes are supported here");
            };
            mounts.push((source, target));
        }
        let account = self.pod["serviceAccountName"].as_str();
        if let Some(account) = account {
            if self.pod["automountServiceAccountToken"] != Value::Bool(false) {
                let dir = lab.file(&format!("{process}-serviceaccount"));
                write_files(&dir, &cp.service_account_files(account)?, 0o644)?;
                mounts.push((
                    dir,
                    "/var/run/secrets/kubernetes.io/serviceaccount".to_owned(),
                ));
            }
        }

        let mut env = vec![
            (
                "KUBERNETES_SERVICE_HOST".to_owned(),
                at.apiserver.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT".to_owned(),
                APISERVER_PORT.to_string(),
            ),
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
        ];
        for var in self.container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(v) = var["value"].as_str() {
                v.to_owned()
            } else {
                match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => at.node.to_owned(),
                    Some("metadata.namespace") => NAMESPACE.to_owned(),
                    Some("metadata.name") => format!("{}-{}", self.name, at.node),
                    other => bail!("env {name}: valueFrom {other:?} is not filled in here"),
                }
            };
            env.push((name, value));
        }

        let mut argv: Vec<String> = Vec::new();
        argv.extend(self.security_wrapper());
        argv.push("env".into());
        argv.push("-i".into());
        argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        let command = strings(&self.container["command"]);
        if command.is_empty() {
            bail!(
                "{}/{}: the container names no command",
                self.kind,
                self.name
            );
        }
        let as_user = self.container["securityContext"]["runAsUser"].as_u64();
        for (i, c) in command.into_iter().enumerate() {
            let binary = binary_for(&c);
            // Another user may not reach the build tree (a clone in a 0700
            // temporary directory): give it a copy in the lab.
            if i == 0 && as_user.is_some_and(|uid| uid != 0) && binary != c {
                let copy = lab.file(&format!("{process}-bin"));
                fs::copy(&binary, &copy).with_context(|| format!("copying {binary}"))?;
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
                argv.push(copy.to_string_lossy().into_owned());
            } else {
                argv.push(binary);
            }
        }
        argv.extend(strings(&self.container["args"]));

        let mut script = String::from("set -e\n");
        // A container's /dev holds only what its spec mounts: without a
        // /dev/net/tun volume, there is none.
        if !self.mounts_path("/dev/net/tun") {
            script.push_str("mount -t tmpfs -o size=4k tmpfs /dev/net\n");
        }
        for (source, target) in &mounts {
            script.push_str(&format!(
                "mkdir -p {t}\nmount --bind {s} {t}\n",
                s = quote(&source.to_string_lossy()),
                t = quote(target)
            ));
        }
        script.push_str("exec");
        for a in argv {
            script.push(' ');
            script.push_str(&quote(&a));
        }
        script.push('\n');
        // A fresh mount namespace, so the mounts are this container's alone.
        Ok(format!(
            "exec unshare --mount --propagation private sh -c {}",
            quote(&script)
        ))
    }

    fn mounts_path(&self, path: &str) -> bool {
        self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["mountPath"] == path)
    }

    /// `setpriv` as the securityContext says: the capabilities it adds (all
    /// others dropped), and its user.
    fn security_wrapper(&self) -> Vec<String> {
        let context = &self.container["securityContext"];
        let added = strings(&context["capabilities"]["add"]);
        let mut caps = String::from("-all");
        for cap in &added {
            caps.push_str(&format!(",+{}", cap.to_lowercase()));
        }
        let mut wrapper = vec![
            "setpriv".to_owned(),
            "--bounding-set".to_owned(),
            caps.clone(),
            "--inh-caps".to_owned(),
            caps,
        ];
        if let Some(uid) = context["runAsUser"].as_u64() {
            wrapper.extend([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
            ]);
        }
        wrapper
    }
}

/// The lab's stand-in for a node's hostPath `path` (`None`: the host's own,
/// a device).
fn host_path(
    lab: &mut Lab,
    at: &Placement,
    node_root: &Path,
    path: &str,
) -> Result<Option<PathBuf>> {
    if path == "/sys/fs/bpf" {
        let ns = at
            .netns
            .context("a bpffs hostPath needs a node namespace")?;
        return lab.bpffs_of(ns).map(Some);
    }
    if path.starts_with("/dev/") {
        return Ok(None);
    }
    let dir = node_root.join(path.trim_start_matches('/'));
    fs::create_dir_all(&dir)?;
    Ok(Some(dir))
}

/// The project's build of a binary the image holds at `/usr/local/bin/…`.
fn binary_for(command: &str) -> String {
    match command {
        "/usr/local/bin/ligo-fabric" => crate::daemon_binary().to_string_lossy().into_owned(),
        "/usr/local/bin/ligo-control" => crate::control_binary().to_string_lossy().into_owned(),
        other => other.to_owned(),
    }
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)], mode: u32) -> Result<()> {
    fs::create_dir_all(dir)?;
    for (name, bytes) in files {
        let path = dir.join(name);
        fs::write(&path, bytes)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Single-quoted for `sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
