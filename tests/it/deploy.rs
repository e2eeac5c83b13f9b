//! The Kubernetes and container artefacts: `deploy/kustomize` (rendered by `kubectl kustomize`), the Helm chart
//! `deploy/helm/wharf` (rendered by Helm's own engine with default, non-default and invalid values) and the
//! `Dockerfile`. Every rendered object is validated strictly against the Kubernetes OpenAPI schemas (1.26, the
//! chart's minimum, and 1.37; 1.30, the cluster tier's minimum, for the cluster renderings) by
//! `tests/deploy/k8s.py`; then the fields that matter are checked, the chart's defaults must equal the kustomize
//! base (and the chart with the cluster, or the runtime, on the matching overlay), the bucket tier's keys may
//! only come from a Secret, the node's runtime socket reaches wharf only when its configuration names it, and
//! the container arguments and the rendered wharf.toml must be accepted by the wharf binary built here
//! (node-setup runs against a temporary host tree).

use crate::support::images::run;
use crate::support::tools::require;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Kubernetes versions every object must validate against: the chart's `kubeVersion` floor and the newest
/// schema kubernetes-validate bundles.
const KUBE_VERSIONS: [&str; 2] = ["1.26.0", "1.37.0"];
/// The same for the cluster tier, whose preStop `sleep` action needs Kubernetes 1.30 (beta, on by default).
const CLUSTER_KUBE_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// The namespace the tests render the chart into, and the kustomize base's.
const NAMESPACE: &str = "wharf";
/// The image's user (Dockerfile `USER`), which the manifests must run wharf as and hand the cache to.
const IMAGE_USER: i64 = 65532;
const CHART: &str = "deploy/helm/wharf";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The venv scripts/test builds from tests/deploy/requirements.txt (override with `WHARF_DEPLOY_VENV`).
fn python() -> Command {
    let venv = std::env::var_os("WHARF_DEPLOY_VENV").map(PathBuf::from).unwrap_or(repo().join("target/deploy-venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/test, which creates it from tests/deploy/requirements.txt",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/deploy/k8s.py")).current_dir(repo());
    cmd
}

fn kustomize(dir: &str) -> String {
    let out = try_kustomize(&repo().join(dir));
    assert!(out.status.success(), "kubectl kustomize {dir} failed\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn try_kustomize(dir: &Path) -> Output {
    require("kubectl");
    run(Command::new("kubectl").arg("kustomize").arg(dir), Duration::from_secs(120))
}

/// A copy of `deploy/kustomize` in a temporary directory, for the overlays that read a file the user creates.
fn kustomize_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to.join(e.file_name()))
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    copy(&repo().join("deploy/kustomize"), tmp.path());
    tmp
}

/// `helm template`-equivalent (release `wharf` in namespace `wharf`); `Err` carries the lint or render error.
fn helm(values: &[&str], set: &[&str]) -> Result<String, String> {
    let mut cmd = python();
    cmd.args(["helm", CHART, "--name", "wharf", "--namespace", "wharf"]);
    for v in values {
        cmd.arg("-f").arg(repo().join(CHART).join(v));
    }
    for s in set {
        cmd.arg("--set").arg(s);
    }
    let out = run(&mut cmd, Duration::from_secs(120));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Validates every object of a YAML stream (strict: unknown fields fail) and returns them as JSON.
fn validate(yaml: &str) -> Objects {
    validate_at(yaml, &KUBE_VERSIONS)
}

/// `validate` against the given Kubernetes versions.
fn validate_at(yaml: &str, versions: &[&str]) -> Objects {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let mut cmd = python();
    cmd.arg("validate").arg(file.path());
    for v in versions {
        cmd.args(["--kube-version", v]);
    }
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "schema validation failed\n{}\n---- manifests ----\n{yaml}", text(&out));
    Objects(serde_json::from_slice(&out.stdout).unwrap())
}

/// Rendered objects.
struct Objects(Vec<Value>);

impl Objects {
    fn kinds(&self) -> BTreeSet<(String, String)> {
        self.0.iter().map(|o| (str_at(o, "/kind"), str_at(o, "/metadata/name"))).collect()
    }

    fn find(&self, kind: &str) -> Option<&Value> {
        let mut it = self.0.iter().filter(|o| o["kind"] == kind);
        let first = it.next();
        assert!(it.next().is_none(), "more than one {kind}");
        first
    }

    fn one(&self, kind: &str) -> &Value {
        self.find(kind).unwrap_or_else(|| panic!("no {kind} in {:?}", self.kinds()))
    }

    /// The Service clients use (the cluster's headless peer Service aside).
    fn client_service(&self) -> Option<&Value> {
        let mut it = self.0.iter().filter(|o| o["kind"] == "Service" && o["spec"]["clusterIP"] != "None");
        let first = it.next();
        assert!(it.next().is_none(), "more than one client Service");
        first
    }

    /// The headless Service whose DNS records are the cluster's peers.
    fn peer_service(&self) -> Option<&Value> {
        let mut it = self.0.iter().filter(|o| o["kind"] == "Service" && o["spec"]["clusterIP"] == "None");
        let first = it.next();
        assert!(it.next().is_none(), "more than one headless Service");
        first
    }
}

fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {v:#}")).into()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no entry named {name} in {list:#}"))
}

/// The wharf.toml of the rendered ConfigMap the DaemonSet mounts.
fn config_toml(objs: &Objects) -> String {
    let ds = objs.one("DaemonSet");
    let volumes = &ds["spec"]["template"]["spec"]["volumes"];
    let cm_name = str_at(named(volumes, "config"), "/configMap/name");
    let cm = objs.0.iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == cm_name.as_str());
    str_at(cm.unwrap_or_else(|| panic!("ConfigMap {cm_name} not rendered")), "/data/wharf.toml")
}

/// `wharf ARGS`, with `WHARF_…` from the test's environment removed and `env` added.
fn wharf(args: &[String], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WHARF_") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd, Duration::from_secs(60))
}

/// The effective configuration (`wharf config`) of a rendered wharf.toml.
fn effective_config(toml_text: &str) -> toml::Table {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), toml_text).unwrap();
    let out = wharf(&["config".into(), "--config".into(), file.path().to_str().unwrap().into()], &[]);
    assert!(out.status.success(), "wharf does not accept the rendered wharf.toml\n{}\n{toml_text}", text(&out));
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

/// The value of `--NAME=VALUE` in a container's args.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
}

fn args_of(container: &Value) -> Vec<String> {
    serde_json::from_value(container["args"].clone()).unwrap()
}

/// What a rendering is expected to do, beyond the invariants every rendering must keep.
struct Expect {
    node_setup: bool,
    service: bool,
    loopback: bool,
}

/// The invariants: probes, ports, volumes, security contexts, references between objects, and the
/// containers' arguments and configuration run through the wharf binary.
fn check_workload(objs: &Objects, expect: &Expect) -> toml::Table {
    assert!(
        !objs.0.iter().any(
            |o| ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"].contains(&o["kind"].as_str().unwrap())
        ),
        "wharf needs no RBAC"
    );
    let config = effective_config(&config_toml(objs));
    let listen: std::net::SocketAddr = config["listen"].as_str().unwrap().parse().unwrap();
    let port = listen.port() as i64;
    assert_eq!(listen.ip().is_loopback(), expect.loopback, "listen {listen}");
    let data_dir = config["data_dir"].as_str().unwrap().to_string();

    let ds = objs.one("DaemonSet");
    let tmpl = &ds["spec"]["template"];
    let pod = &tmpl["spec"];
    let labels = tmpl["metadata"]["labels"].as_object().unwrap();
    let selects_pods = |sel: &Value| {
        let sel = sel.as_object().unwrap();
        !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects_pods(&ds["spec"]["selector"]["matchLabels"]), "DaemonSet selector");
    assert_eq!(pod["hostNetwork"], true, "the node's containerd reaches wharf on 127.0.0.1");
    if ds["spec"]["updateStrategy"]["type"] == "RollingUpdate" {
        let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert!(ru["maxSurge"].is_null() || ru["maxSurge"] == 0, "a host port cannot surge");
    }
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(grace > config["shutdown_grace"].as_integer().unwrap(), "grace period {grace} <= shutdown_grace");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let sa = str_at(pod, "/serviceAccountName");
    assert!(objs.kinds().contains(&("ServiceAccount".into(), sa.clone())), "ServiceAccount {sa}");
    let pc = str_at(pod, "/priorityClassName");
    assert!(
        pc.starts_with("system-") || objs.kinds().contains(&("PriorityClass".into(), pc.clone())),
        "priority class {pc} is neither built in nor rendered"
    );
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");

    // The wharf container: non-root as the image's user, read-only root, no capabilities, probes on the port.
    let main = named(&pod["containers"], "wharf");
    let sc = &main["securityContext"];
    assert_eq!(
        (&sc["runAsNonRoot"], &sc["runAsUser"], &sc["readOnlyRootFilesystem"], &sc["allowPrivilegeEscalation"]),
        (&json!(true), &json!(IMAGE_USER), &json!(true), &json!(false)),
        "wharf's securityContext"
    );
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    let http = named(&main["ports"], "http");
    assert_eq!((&http["containerPort"], &http["hostPort"]), (&json!(port), &json!(port)), "ports vs listen {listen}");
    for (probe, path) in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &main[probe]["httpGet"];
        assert_eq!((&get["path"], &get["port"]), (&json!(path), &json!("http")), "{probe}");
        // With the host network the kubelet probes the node's address, where a loopback-bound wharf is absent.
        assert_eq!(get["host"] == "127.0.0.1", expect.loopback, "{probe} host");
    }
    assert!(main["resources"]["requests"]["memory"].is_string() && main["resources"]["limits"]["memory"].is_string());
    let main_args = args_of(main);
    assert_eq!(main_args[0], "serve");
    let mounts = &main["volumeMounts"];
    assert_eq!(str_at(named(mounts, "config"), "/mountPath"), "/etc/wharf");
    assert_eq!(flag(&main_args, "config").as_deref(), Some("/etc/wharf/wharf.toml"));
    assert_eq!(str_at(named(mounts, "data"), "/mountPath"), data_dir, "cache volume vs data_dir");
    let data = named(&pod["volumes"], "data");
    assert_eq!(data["hostPath"]["type"], "DirectoryOrCreate", "the cache survives pod restarts: {data}");
    if let Some(creds) = config.get("credentials_file").and_then(|v| v.as_str()) {
        let creds = Path::new(creds);
        assert_eq!(str_at(named(mounts, "credentials"), "/mountPath"), creds.parent().unwrap().to_str().unwrap());
        let secret = &named(&pod["volumes"], "credentials")["secret"];
        assert_eq!(secret["items"], json!([{"key": ".dockerconfigjson", "path": creds.file_name().unwrap().to_str()}]));
    }

    // Bucket credentials: never in wharf.toml (a ConfigMap is readable by far more than a Secret), and in the
    // environment only as references to a Secret.
    if let Some(s3) = bucket_of(&config) {
        assert!(s3.get("access_key_id").is_none() && s3.get("secret_access_key").is_none(), "keys in wharf.toml");
    }
    for e in main["env"].as_array().into_iter().flatten().filter(|e| str_at(e, "/name").starts_with("AWS_")) {
        assert!(e.get("value").is_none() && e["valueFrom"]["secretKeyRef"].is_object(), "literal credential {e}");
    }

    // The runtime socket: wharf gets it exactly when its configuration names it (runtime pre-pull), as the
    // socket's directory, read-only, at the host's path, with a supplementary group for the socket's mode 0660.
    // Otherwise no host path but the cache reaches wharf, and it has no extra group.
    match runtime_socket(&config) {
        Some(socket) => {
            let dir = Path::new(&socket).parent().unwrap().to_str().unwrap().to_string();
            assert_ne!(dir, "/", "the whole root mounted for {socket}");
            let mount = named(mounts, "runtime-socket");
            assert_eq!((str_at(mount, "/mountPath"), &mount["readOnly"]), (dir.clone(), &json!(true)), "{mount}");
            let volume = named(&pod["volumes"], "runtime-socket");
            // A directory, not the socket: containerd recreates the socket, and a file mount would keep the old.
            assert_eq!(volume["hostPath"], json!({"path": dir, "type": "Directory"}), "{volume}");
            let groups = pod["securityContext"]["supplementalGroups"].as_array();
            assert!(groups.is_some_and(|g| g.len() == 1 && g[0].is_i64()), "the socket's group: {pod:#}");
        }
        None => {
            for mount in mounts.as_array().unwrap() {
                let volume = named(&pod["volumes"], mount["name"].as_str().unwrap());
                assert!(volume["hostPath"].is_null() || mount["name"] == "data", "host path in wharf: {volume}");
            }
            assert!(pod["securityContext"].get("supplementalGroups").is_none(), "{pod:#}");
        }
    }

    // The init container: root with CAP_CHOWN only, host paths mounted under --root.
    let init = named(&pod["initContainers"], "node-setup");
    let isc = &init["securityContext"];
    assert_eq!((&isc["readOnlyRootFilesystem"], &isc["allowPrivilegeEscalation"]), (&json!(true), &json!(false)));
    assert_eq!(isc["capabilities"], json!({"drop": ["ALL"], "add": ["CHOWN"]}));
    let init_args = args_of(init);
    assert_eq!(init_args[0], "node-setup");
    assert_eq!(flag(&init_args, "data-owner"), Some(format!("{IMAGE_USER}:{IMAGE_USER}")));
    assert_eq!(str_at(named(&init["volumeMounts"], "data"), "/mountPath"), data_dir);
    assert_eq!(flag(&init_args, "config").as_deref(), Some("/etc/wharf/wharf.toml"));
    assert_eq!(init_args.contains(&"--only-data-dir".to_string()), !expect.node_setup);
    assert!(
        init["volumeMounts"].as_array().unwrap().iter().all(|m| m["name"] != "runtime-socket"),
        "node-setup runs as root: it never gets the runtime socket"
    );
    if expect.node_setup {
        assert_eq!(flag(&init_args, "mirror"), Some(format!("http://127.0.0.1:{port}")), "mirror vs listen");
        let root = flag(&init_args, "root").unwrap();
        for (volume, host_path) in [
            ("certs-d", flag(&init_args, "certs-dir").unwrap()),
            (
                "containerd-config",
                Path::new(&flag(&init_args, "containerd-config").unwrap()).parent().unwrap().to_str().unwrap().into(),
            ),
        ] {
            let v = named(&pod["volumes"], volume);
            assert_eq!(str_at(v, "/hostPath/path"), host_path, "{volume}");
            assert_eq!(str_at(named(&init["volumeMounts"], volume), "/mountPath"), format!("{root}{host_path}"));
        }
        assert_eq!(named(&init["volumeMounts"], "containerd-config")["readOnly"], true);
    }

    // Service and PodDisruptionBudget select the pods; the Service stays on the client's node.
    match objs.client_service() {
        Some(svc) => {
            assert!(expect.service);
            assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
            assert!(selects_pods(&svc["spec"]["selector"]), "Service selector");
            let p = named(&svc["spec"]["ports"], "http");
            assert_eq!((&p["port"], &p["targetPort"]), (&json!(port), &json!("http")));
        }
        None => assert!(!expect.service, "no Service rendered"),
    }
    if let Some(pdb) = objs.find("PodDisruptionBudget") {
        assert!(selects_pods(&pdb["spec"]["selector"]["matchLabels"]), "PodDisruptionBudget selector");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    }
    if let Some(sm) = objs.find("ServiceMonitor") {
        let svc = objs.client_service().unwrap();
        let svc_labels = svc["metadata"]["labels"].as_object().unwrap();
        let sel = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
        assert!(sel.iter().all(|(k, v)| svc_labels.get(k) == Some(v)), "ServiceMonitor does not select the Service");
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
        assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    }
    if let Some(port_annotation) = tmpl["metadata"]["annotations"].get("prometheus.io/port") {
        assert_eq!(port_annotation, &json!(port.to_string()));
    }

    run_containers_here(objs, &config);
    config
}

/// Runs both containers' arguments with the wharf binary: node-setup against a temporary host tree (the
/// `--root` and the cache moved there), `serve`'s flags through `wharf config`.
fn run_containers_here(objs: &Objects, config: &toml::Table) {
    let tmp = tempfile::tempdir().unwrap();
    let config_file = tmp.path().join("wharf.toml");
    std::fs::write(&config_file, config_toml(objs)).unwrap();
    let host = tmp.path().join("host");
    let data = tmp.path().join("data");
    let me = std::fs::metadata(tmp.path()).unwrap();
    let pod = &objs.one("DaemonSet")["spec"]["template"]["spec"];
    let local = |args: Vec<String>| -> Vec<String> {
        args.into_iter()
            .map(|a| match a.split_once('=') {
                Some(("--config", _)) => format!("--config={}", config_file.display()),
                Some(("--root", _)) => format!("--root={}", host.display()),
                Some(("--data-owner", _)) => format!("--data-owner={}:{}", me.uid(), me.gid()),
                _ => a,
            })
            .collect()
    };
    let init_args = args_of(named(&pod["initContainers"], "node-setup"));
    let out = wharf(&local(init_args.clone()), &[("WHARF_DATA_DIR", &data)]);
    assert!(out.status.success(), "node-setup {init_args:?}\n{}", text(&out));
    assert!(data.is_dir(), "node-setup did not create the cache directory");
    if let Some(certs) = flag(&init_args, "certs-dir") {
        let certs = host.join(certs.trim_start_matches('/'));
        let mirror = flag(&init_args, "mirror").unwrap();
        for (name, reg) in config["registries"].as_table().unwrap() {
            let file = certs.join(name).join("hosts.toml");
            let hosts: toml::Table = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.display(), text(&out)))
                .parse()
                .unwrap();
            assert!(hosts["host"].as_table().unwrap().contains_key(&mirror), "{name}: {hosts:#?}");
            assert_eq!(hosts["server"].as_str(), reg["url"].as_str(), "{name}");
        }
    } else {
        assert!(!host.exists(), "--only-data-dir wrote host files");
    }
    serve_config(objs, tmp.path());
}

/// The address the tests give the downward API's `status.podIP` (TEST-NET-1).
const POD_IP: &str = "192.0.2.10";

/// The effective configuration (`wharf config`) of the wharf container's `serve` arguments as the kubelet
/// passes them on a node: `$(VAR)` of a `status.podIP` variable expanded to [`POD_IP`] (any other `$(…)` is
/// left, and fails), the files they name moved into `dir`.
fn serve_config(objs: &Objects, dir: &Path) -> toml::Table {
    let main = named(&objs.one("DaemonSet")["spec"]["template"]["spec"]["containers"], "wharf");
    let config_file = dir.join("serve-wharf.toml");
    std::fs::write(&config_file, config_toml(objs)).unwrap();
    let key_file = dir.join("peer-keys");
    std::fs::write(&key_file, format!("{}\n", "k".repeat(48))).unwrap();
    let pod_ip_vars: Vec<String> = main["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP")
        .map(|e| format!("$({})", str_at(e, "/name")))
        .collect();
    let mut args: Vec<String> = args_of(main)
        .into_iter()
        .map(|a| match a.split_once('=') {
            Some(("--config", _)) => format!("--config={}", config_file.display()),
            Some(("--peer-key-file", _)) => format!("--peer-key-file={}", key_file.display()),
            _ => pod_ip_vars.iter().fold(a, |a, var| a.replace(var, POD_IP)),
        })
        .collect();
    assert_eq!(args[0], "serve");
    args[0] = "config".into();
    let out = wharf(&args, &[]);
    assert!(out.status.success(), "wharf {args:?}\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

#[test]
fn kustomize_base_is_valid_and_safe() {
    let objs = validate(&kustomize("deploy/kustomize/base"));
    let kinds: BTreeSet<&str> = objs.0.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "PodDisruptionBudget",
            "PriorityClass",
            "Service",
            "ServiceAccount"
        ])
    );
    let ns = objs.one("Namespace");
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged");
    for o in &objs.0 {
        let cluster_scoped = ["Namespace", "PriorityClass"].contains(&o["kind"].as_str().unwrap());
        assert_eq!(o["metadata"]["namespace"].is_null(), cluster_scoped, "{}", o["kind"]);
    }
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    assert_eq!(config["log_format"].as_str(), Some("json"));
    assert_no_runtime(&objs, &config);
}

#[test]
fn kustomize_credentials_overlay_mounts_the_dockerconfigjson_secret() {
    let objs = validate(&kustomize("deploy/kustomize/overlays/credentials"));
    check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    let pod = &objs.one("DaemonSet")["spec"]["template"]["spec"];
    let main = named(&pod["containers"], "wharf");
    let file = str_at(named(&main["env"], "WHARF_CREDENTIALS_FILE"), "/value");
    let mount = str_at(named(&main["volumeMounts"], "credentials"), "/mountPath");
    let secret = &named(&pod["volumes"], "credentials")["secret"];
    assert_eq!(format!("{mount}/{}", str_at(secret, "/items/0/path")), file);
    assert_eq!(secret["items"][0]["key"], ".dockerconfigjson");
    // The variable really is a wharf setting.
    let out = wharf(&["config".into()], &[("WHARF_CREDENTIALS_FILE", Path::new(&file))]);
    let config: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    assert_eq!(config["credentials_file"].as_str(), Some(file.as_str()));
}

/// An object with what legitimately differs between the two renderings removed: Helm's labels and config
/// checksum, the release label in selectors.
fn comparable(o: &Value) -> Value {
    let mut o = o.clone();
    let meta = o["metadata"].as_object_mut().unwrap();
    meta.remove("labels");
    meta.remove("namespace");
    if let Some(t) = o.pointer_mut("/spec/template/metadata") {
        t.as_object_mut().unwrap().remove("labels");
        t["annotations"].as_object_mut().unwrap().remove("checksum/config");
    }
    for selector in ["/spec/selector/matchLabels", "/spec/selector"] {
        if let Some(s) = o.pointer_mut(selector).and_then(Value::as_object_mut) {
            s.remove("app.kubernetes.io/instance");
        }
    }
    // Order means nothing in these lists (env's does: it is compared as is), and kustomize's strategic merge
    // puts an overlay's entries first.
    if let Some(pod) = o.pointer_mut("/spec/template/spec") {
        let by_name = |list: &mut Value| {
            if let Some(a) = list.as_array_mut() {
                a.sort_by_key(|x| x["name"].as_str().unwrap_or_default().to_string())
            }
        };
        by_name(&mut pod["volumes"]);
        for key in ["containers", "initContainers"] {
            for c in pod[key].as_array_mut().into_iter().flatten() {
                by_name(&mut c["ports"]);
                by_name(&mut c["volumeMounts"]);
            }
        }
    }
    if o["kind"] == "ConfigMap" {
        o["data"] = Value::Null; // compared as effective configuration
    }
    if o["kind"] == "Secret" {
        // Keys are the user's (kustomize) or random (Helm): compare which entries there are.
        let entries: Vec<&String> = o["data"].as_object().map(|d| d.keys().collect()).unwrap_or_default();
        o["data"] = json!(entries);
    }
    o
}

/// Drops the content-hash suffix kustomize's generators give ConfigMap and Secret names (and their references),
/// checking on the way that the suffix is there: it is what rolls the DaemonSet when wharf.toml or the peer
/// keys change.
fn unhash(mut objs: Objects) -> Objects {
    let mut renamed = BTreeMap::new();
    for o in objs.0.iter_mut().filter(|o| o["kind"] == "ConfigMap" || o["kind"] == "Secret") {
        let name = str_at(o, "/metadata/name");
        let (stem, hash) = name.rsplit_once('-').unwrap();
        assert!(hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()), "no hash suffix: {name}");
        o["metadata"]["name"] = json!(stem);
        renamed.insert(name.clone(), stem.to_string());
    }
    for o in objs.0.iter_mut().filter(|o| o["kind"] == "DaemonSet") {
        for v in o["spec"]["template"]["spec"]["volumes"].as_array_mut().unwrap() {
            let pointer = if v["configMap"].is_object() { "/configMap/name" } else { "/secret/secretName" };
            if let Some(name) = v.pointer_mut(pointer) {
                *name = json!(renamed[name.as_str().unwrap()]);
            }
        }
    }
    objs
}

#[test]
fn helm_chart_defaults_equal_the_kustomize_base() {
    let chart = validate(&helm(&[], &[]).unwrap());
    let config = check_workload(&chart, &Expect { node_setup: true, service: true, loopback: false });
    assert!(chart.peer_service().is_none() && chart.find("Secret").is_none(), "the cluster is off by default");
    assert!(bucket_of(&config).is_none(), "the bucket is off by default: {:#?}", config.get("storage"));
    assert!(!config_toml(&chart).contains("[storage.s3]"));
    assert!(aws_env(&chart).is_empty(), "no bucket credentials without a bucket");
    assert_no_runtime(&chart, &config);
    let base = unhash(validate(&kustomize("deploy/kustomize/base")));
    assert_same_objects(&chart, &config, &base);
}

/// The chart renders the same objects as kustomize (`base`, hash suffixes dropped) and the same configuration.
fn assert_same_objects(chart: &Objects, config: &toml::Table, base: &Objects) {
    let mut base_kinds = base.kinds();
    base_kinds.remove(&("Namespace".into(), "wharf".into())); // `helm install --create-namespace` makes it
    assert_eq!(chart.kinds(), base_kinds, "the chart and the base define different objects");
    assert_eq!(config, &effective_config(&config_toml(base)), "effective wharf configuration differs");
    let by_key = |objs: &Objects| -> BTreeMap<(String, String), Value> {
        objs.0.iter().map(|o| ((str_at(o, "/kind"), str_at(o, "/metadata/name")), comparable(o))).collect()
    };
    let (a, b) = (by_key(chart), by_key(base));
    for (key, object) in &a {
        assert_eq!(object, &b[key], "{key:?} differs between the chart (left) and the base (right)");
    }
}

#[test]
fn helm_chart_nondefault_values_land_where_they_should() {
    let objs = validate(&helm(&["ci/nondefault-values.yaml"], &[]).unwrap());
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    // wharf.toml: upstreams, credentials, cache bounds, warm list, extra TOML.
    assert_eq!(config["listen"].as_str(), Some("0.0.0.0:5001"));
    assert_eq!(config["default_registry"].as_str(), Some("registry.internal:5000"));
    let regs = config["registries"].as_table().unwrap();
    assert_eq!(regs["registry.internal:5000"]["insecure"].as_bool(), Some(true));
    assert_eq!(regs["ghcr.io"]["url"].as_str(), Some("https://ghcr-mirror.example.com"));
    assert_eq!(regs["docker.io"]["url"].as_str(), Some("https://registry-1.docker.io"), "built-ins stay");
    assert_eq!(config["credentials_file"].as_str(), Some("/etc/wharf/credentials/config.json"));
    assert_eq!(config["access"]["private_answer"].as_str(), Some("hide"));
    let cache = config["cache"].as_table().unwrap();
    assert_eq!(
        (cache["max_bytes"].as_integer(), cache["high_watermark"].as_integer(), cache["low_watermark"].as_integer()),
        (Some(107374182400), Some(70), Some(60))
    );
    let warm = config["warm"]["images"].as_array().unwrap();
    assert_eq!(warm.len(), 2);
    assert_eq!(warm[1]["platforms"].as_array().unwrap().len(), 2);
    assert_eq!(config["upstream"]["read_timeout"].as_integer(), Some(120));
    // Pod placement, image, resources, metrics.
    let ds = objs.one("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["node-role.example.com/builder"], "true");
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "dedicated", "operator": "Equal", "value": "builds", "effect": "NoSchedule"}])
    );
    assert!(pod["affinity"]["nodeAffinity"].is_object());
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "platform-pull"}]));
    let main = named(&pod["containers"], "wharf");
    assert_eq!(main["image"], "registry.example.com/platform/wharf:0.1.0-rc1");
    assert_eq!(main["resources"]["limits"]["cpu"], "2");
    assert_eq!(str_at(named(&main["env"], "RUST_LOG"), "/value"), "info,wharf=debug");
    let tokens = &named(&main["env"], "WHARF_ACCESS__TOKENS")["valueFrom"]["secretKeyRef"];
    assert_eq!((tokens["name"].as_str(), tokens["key"].as_str()), (Some("wharf-client-tokens"), Some("tokens")));
    let init = named(&pod["initContainers"], "node-setup");
    assert_eq!(init["resources"]["limits"]["memory"], "32Mi");
    let init_args = args_of(init);
    assert_eq!(flag(&init_args, "dial-timeout").as_deref(), Some("500ms"));
    assert_eq!(flag(&init_args, "certs-dir").as_deref(), Some("/var/lib/rancher/k3s/agent/etc/containerd/certs.d"));
    assert_eq!(str_at(named(&pod["volumes"], "data"), "/hostPath/path"), "/mnt/fast/wharf");
    let meta = &ds["spec"]["template"]["metadata"];
    assert_eq!(meta["labels"]["example.com/tier"], "infra");
    assert_eq!(meta["annotations"]["example.com/team"], "platform");
    assert!(meta["annotations"].get("prometheus.io/scrape").is_none());
    let sm = objs.one("ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    assert!(objs.find("PriorityClass").is_none() && objs.find("PodDisruptionBudget").is_none());
    assert_eq!(str_at(ds, "/metadata/name"), "node-mirror");
}

#[test]
fn helm_chart_loopback_values_without_node_setup() {
    let objs = validate(&helm(&["ci/loopback-values.yaml"], &[]).unwrap());
    check_workload(&objs, &Expect { node_setup: false, service: false, loopback: true });
    let pod = &objs.one("DaemonSet")["spec"]["template"]["spec"];
    let volumes: BTreeSet<String> = pod["volumes"].as_array().unwrap().iter().map(|v| str_at(v, "/name")).collect();
    assert_eq!(volumes, BTreeSet::from(["config".into(), "data".into()]), "no host containerd paths mounted");
    assert_eq!(objs.one("DaemonSet")["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
}

#[test]
fn helm_chart_rejects_invalid_values() {
    let cases: [(&[&str], &str); 23] = [
        (&["port=abc"], "/port"),
        (&["cache.highWatermark=150"], "highWatermark"),
        (&["registries.internal.url=ftp://internal"], "url"),
        (&["warm.images[0].image=x", "warm.images[0].platforms[0]=amd64"], "platforms"),
        (&["updateStrategy.rollingUpdate.maxSurge=1"], "maxSurge"),
        (&["portt=5000"], "portt"),
        (&["metrics.serviceMonitor.enabled=true", "service.enabled=false"], "needs service.enabled"),
        (&["shutdownGrace=60"], "terminationGracePeriodSeconds must be larger"),
        (&["listenAddress=127.0.0.1"], "service.enabled needs a listenAddress"),
        (&["access.privateAnswer=maybe"], "privateAnswer"),
        (&["cluster.enabled=true"], "larger than cluster.preStopSleep + shutdownGrace (45)"),
        (
            &["cluster.enabled=true", "terminationGracePeriodSeconds=60", "cluster.port=5000"],
            "cluster.port must differ",
        ),
        (&["cluster.dnsDomain=Cluster Local"], "dnsDomain"),
        (&["cluster.existingsecret=x"], "existingsecret"),
        (&["bucket.enabled=true"], "bucket.name is required"),
        (&["bucket.enabled=true", "bucket.name=cache", "bucket.endpoint=http://minio:9000"], "set bucket.allowHttp"),
        (&["bucket.name=Wharf_Cache"], "/bucket/name"),
        (&["bucket.breakerSeconds=0"], "breakerSeconds"),
        (&["bucket.secretName=x"], "secretName"),
        // One --set per image: separate ones would each replace the whole list.
        (
            &["warm.images[0].image=x,warm.images[0].intoRuntime=true"],
            "x: intoRuntime and pinInRuntime need runtime.enabled",
        ),
        (
            &["runtime.enabled=true", "warm.images[0].image=x,warm.images[0].pinInRuntime=true"],
            "x: pinInRuntime needs intoRuntime",
        ),
        (&["runtime.enabled=true", "warm.images[0].image=x,warm.images[0].into_runtime=true"], "into_runtime"),
        (&["runtime.enabled=true", "runtime.socket=/containerd.sock"], "/runtime/socket"),
    ];
    for (set, wanted) in cases {
        match helm(&[], set) {
            Ok(yaml) => panic!("--set {set:?} rendered:\n{yaml}"),
            Err(e) => assert!(e.contains(wanted), "--set {set:?}: expected an error naming {wanted:?}, got:\n{e}"),
        }
    }
}

/// The cluster tier's invariants: a headless Service of the ready pods on the peer port, the peer API on the
/// node's address and a port of its own, the key Secret mounted where `--peer-key-file` points, cluster DNS to
/// find the peers, and a preStop sleep that fits the grace period with wharf's drain. `secret` is the Secret
/// the pods must mount (rendered or not); returns the peer port.
fn check_cluster(objs: &Objects, dns_domain: &str, secret: &str) -> i64 {
    let ds = objs.one("DaemonSet");
    let labels = ds["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    let main = named(&pod["containers"], "wharf");
    let args = args_of(main);
    let client_port = named(&main["ports"], "http")["containerPort"].as_i64().unwrap();

    // The headless Service: DNS answers with the ready pods' addresses, nothing else.
    let svc = objs.peer_service().expect("no headless Service for the peers");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], false, "starting and terminating pods are no peers");
    let sel = svc["spec"]["selector"].as_object().unwrap();
    assert!(!sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)), "peer Service selector");
    let svc_port = named(&svc["spec"]["ports"], "peer");
    assert_eq!(svc_port["targetPort"], "peer");
    let peer_port = svc_port["port"].as_i64().unwrap();
    let port = named(&main["ports"], "peer");
    assert_eq!((&port["containerPort"], &port["hostPort"]), (&json!(peer_port), &json!(peer_port)), "peer port");
    assert_ne!(peer_port, client_port, "the peer API never shares the client port");
    if let Some(client) = objs.client_service() {
        assert!(client["spec"]["ports"].as_array().unwrap().iter().all(|p| p["port"] != peer_port));
    }

    // The flags: the node's own address (the downward API's pod IP is the node's on the host network), the
    // Service's fully qualified name (trailing dot: no search list), and the mounted keys.
    assert_eq!(pod["hostNetwork"], true);
    let pod_ip = named(&main["env"], "POD_IP");
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(flag(&args, "peer-listen"), Some(format!("$(POD_IP):{peer_port}")));
    let ns = svc["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
    let svc_name = str_at(svc, "/metadata/name");
    assert_eq!(flag(&args, "peers-dns"), Some(format!("{svc_name}.{ns}.svc.{dns_domain}.:{peer_port}")));
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "the node's resolver cannot resolve {svc_name}");
    let key_file = PathBuf::from(flag(&args, "peer-key-file").expect("--peer-key-file"));
    let mount = main["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == key_file.parent().unwrap())
        .unwrap_or_else(|| panic!("nothing mounted at {}", key_file.display()));
    assert_eq!(mount["readOnly"], true);
    let volume = named(&pod["volumes"], mount["name"].as_str().unwrap());
    assert_eq!(str_at(volume, "/secret/secretName"), secret);
    let file_name = key_file.file_name().unwrap().to_str().unwrap();
    let item = volume["secret"]["items"].as_array().unwrap().iter().find(|i| i["path"] == file_name);
    let key = str_at(item.unwrap_or_else(|| panic!("{file_name} is not in {volume}")), "/key");
    if let Some(rendered) = objs.0.iter().find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == secret) {
        assert!(rendered["data"].get(&key).is_some(), "Secret {secret} has no {key}");
    }

    // Going away: out of DNS first (the preStop sleep), then wharf's drain, within the grace period.
    let sleep = main["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().expect("a preStop sleep");
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let shutdown_grace = effective_config(&config_toml(objs))["shutdown_grace"].as_integer().unwrap();
    // At least two of wharf's 5 s re-resolutions after the endpoint went.
    assert!(sleep >= 10, "preStop sleep of {sleep} s: DNS has no time to move");
    assert!(sleep + shutdown_grace < grace, "preStop {sleep} s + drain {shutdown_grace} s vs grace period {grace} s");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1, "one node at a time");

    // wharf takes the flags as the kubelet expands them (needs wharf's [cluster] settings).
    let tmp = tempfile::tempdir().unwrap();
    let effective = serve_config(objs, tmp.path());
    let cluster = effective["cluster"].as_table().unwrap_or_else(|| panic!("no [cluster] in {effective:#?}"));
    assert_eq!(cluster["peer_listen"].as_str(), Some(format!("{POD_IP}:{peer_port}").as_str()));
    assert_eq!(cluster["peers_dns"].as_str(), flag(&args, "peers-dns").as_deref());
    assert!(cluster["key_file"].as_str().is_some_and(|f| f.ends_with("peer-keys")), "{cluster:#?}");
    peer_port
}

/// Renders `deploy/kustomize/overlays/cluster` with a key file as the user creates it; returns the key too.
fn kustomize_cluster() -> (Objects, String) {
    let tree = kustomize_copy();
    let overlay = tree.path().join("overlays/cluster");
    let key = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL".to_string();
    std::fs::write(overlay.join("peer-keys"), format!("{key}\n")).unwrap();
    let out = try_kustomize(&overlay);
    assert!(out.status.success(), "kubectl kustomize overlays/cluster failed\n{}", text(&out));
    (validate_at(&String::from_utf8(out.stdout).unwrap(), &CLUSTER_KUBE_VERSIONS), key)
}

#[test]
fn kustomize_cluster_overlay_adds_peers_keys_and_a_prestop_sleep() {
    let (objs, key) = kustomize_cluster();
    check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    for o in &objs.0 {
        let cluster_scoped = ["Namespace", "PriorityClass"].contains(&o["kind"].as_str().unwrap());
        assert_eq!(o["metadata"]["namespace"].is_null(), cluster_scoped, "{} {}", o["kind"], o["metadata"]["name"]);
    }
    let secret = objs.one("Secret");
    let name = str_at(secret, "/metadata/name");
    assert!(name.starts_with("wharf-peer-keys-"), "a generated name, hashed so that new keys roll the pods: {name}");
    let data = str_at(secret, "/data/keys");
    assert_eq!(base64_decode(&data), format!("{key}\n").into_bytes(), "the user's file, as it is");
    check_cluster(&objs, "cluster.local", &name);
}

#[test]
fn kustomize_cluster_overlay_ships_no_key() {
    let dir = repo().join("deploy/kustomize/overlays/cluster");
    // The key file is the user's: ignored by git, and without it there is nothing to apply.
    let ignored = std::fs::read_to_string(dir.join(".gitignore")).unwrap();
    assert!(ignored.lines().any(|l| l.trim() == "peer-keys"), "{ignored}");
    let tree = kustomize_copy();
    let _ = std::fs::remove_file(tree.path().join("overlays/cluster/peer-keys"));
    let out = try_kustomize(&tree.path().join("overlays/cluster"));
    assert!(!out.status.success(), "rendered without a key file:\n{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer-keys"), "{}", text(&out));
    // The example, copied as it is, is refused: its placeholder is shorter than a key may be.
    let example = std::fs::read_to_string(dir.join("peer-keys.example")).unwrap();
    assert!(!example.trim().is_empty() && example.lines().all(|l| l.trim().len() < 32), "{example}");
}

/// A Secret's value (standard base64).
fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn helm_chart_with_cluster_equals_the_kustomize_cluster_overlay() {
    let chart = validate_at(&helm(&["ci/cluster-values.yaml"], &[]).unwrap(), &CLUSTER_KUBE_VERSIONS);
    let config = check_workload(&chart, &Expect { node_setup: true, service: true, loopback: false });
    check_cluster(&chart, "cluster.local", "wharf-peer-keys");
    // A generated key: random, long, printable, one line.
    let key = base64_decode(&str_at(chart.one("Secret"), "/data/keys"));
    assert!(key.len() >= 48 && key.iter().all(u8::is_ascii_alphanumeric), "{}", String::from_utf8_lossy(&key));
    let again = validate_at(&helm(&["ci/cluster-values.yaml"], &[]).unwrap(), &CLUSTER_KUBE_VERSIONS);
    assert_ne!(chart.one("Secret")["data"], again.one("Secret")["data"], "the same key twice is no random key");
    let (base, _) = kustomize_cluster();
    assert_same_objects(&chart, &config, &unhash(base));
}

#[test]
fn helm_chart_cluster_values_follow_the_release() {
    let objs = validate_at(
        &helm(
            &["ci/cluster-values.yaml"],
            &[
                "fullnameOverride=node-mirror",
                "cluster.port=7001",
                "cluster.dnsDomain=k8s.example",
                "cluster.existingSecret=my-keys",
                "cluster.preStopSleep=20",
                "terminationGracePeriodSeconds=51",
            ],
        )
        .unwrap(),
        &CLUSTER_KUBE_VERSIONS,
    );
    check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    assert_eq!(check_cluster(&objs, "k8s.example", "my-keys"), 7001);
    assert!(objs.find("Secret").is_none(), "an existing Secret is used as it is");
    assert_eq!(str_at(objs.peer_service().unwrap(), "/metadata/name"), "node-mirror-peers");
}

/// The `[storage.s3]` table of an effective configuration.
fn bucket_of(config: &toml::Table) -> Option<&toml::Table> {
    config.get("storage")?.get("s3")?.as_table()
}

/// The wharf container's `AWS_…` environment as (name, Secret, key, optional).
fn aws_env(objs: &Objects) -> Vec<(String, String, String, bool)> {
    let main = named(&objs.one("DaemonSet")["spec"]["template"]["spec"]["containers"], "wharf");
    main["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| str_at(e, "/name").starts_with("AWS_"))
        .map(|e| {
            let r = &e["valueFrom"]["secretKeyRef"];
            (str_at(e, "/name"), str_at(r, "/name"), str_at(r, "/key"), r["optional"] == true)
        })
        .collect()
}

/// The standard AWS chain's two static keys, each from the key of the same name in `secret`.
fn assert_keys_from(objs: &Objects, secret: &str, optional: bool) {
    let expected: Vec<_> = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        .iter()
        .map(|k| (k.to_string(), secret.to_string(), k.to_string(), optional))
        .collect();
    assert_eq!(aws_env(objs), expected);
    assert!(objs.find("Secret").is_none(), "the credentials Secret is the user's, never rendered");
}

#[test]
fn helm_chart_bucket_values_render_storage_s3_and_the_secret_env() {
    let objs = validate(&helm(&["ci/bucket-values.yaml"], &[]).unwrap());
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    let s3 = bucket_of(&config).unwrap_or_else(|| panic!("no [storage.s3] in {config:#?}"));
    assert_eq!(s3["bucket"].as_str(), Some("wharf-cache-example"));
    assert_eq!(s3["prefix"].as_str(), Some("cluster-a"));
    assert_eq!(s3["endpoint"].as_str(), Some("https://s3.storage.example.com:9000"));
    assert_eq!(s3["region"].as_str(), Some("eu-west-1"));
    assert_eq!((s3["allow_http"].as_bool(), s3["breaker_seconds"].as_integer()), (Some(false), Some(30)));
    // A missing Secret named in the values fails the pod's start rather than falling back to another identity.
    assert_keys_from(&objs, "wharf-bucket", false);
    let sa = objs.one("ServiceAccount");
    assert!(sa["metadata"]["annotations"].is_null(), "{sa:#}");
    assert_eq!(sa["automountServiceAccountToken"], false);
    // The config checksum follows the bucket: another bucket rolls the pods.
    let other = validate(&helm(&["ci/bucket-values.yaml"], &["bucket.name=another-cache"]).unwrap());
    let checksum =
        |o: &Objects| o.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"].clone();
    assert_ne!(checksum(&objs), checksum(&other));
}

#[test]
fn helm_chart_bucket_with_irsa_annotates_the_service_account_and_passes_no_keys() {
    const ROLE: &str = "arn:aws:iam::111122223333:role/wharf-bucket";
    let objs = validate(
        &helm(
            &["ci/bucket-values.yaml"],
            &[
                "bucket.credentialsSecret=",
                "bucket.endpoint=",
                "bucket.prefix=",
                &format!("serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={ROLE}"),
            ],
        )
        .unwrap(),
    );
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    let s3 = bucket_of(&config).unwrap();
    assert_eq!((s3["endpoint"].as_str(), s3["prefix"].as_str()), (Some(""), Some("")), "AWS itself, no prefix");
    assert!(aws_env(&objs).is_empty(), "static keys would take precedence over the web identity");
    let sa = objs.one("ServiceAccount");
    assert_eq!(sa["metadata"]["annotations"], json!({"eks.amazonaws.com/role-arn": ROLE}));
    // EKS's webhook mounts a token of its own; wharf still gets no Kubernetes API token.
    assert_eq!(sa["automountServiceAccountToken"], false);
    assert_eq!(
        str_at(&objs.one("DaemonSet")["spec"]["template"]["spec"], "/serviceAccountName"),
        str_at(sa, "/metadata/name")
    );
}

/// Renders `deploy/kustomize/overlays/bucket` from a copy whose kustomization.yaml went through `edit`.
fn kustomize_bucket(edit: impl Fn(&str) -> String) -> Objects {
    let tree = kustomize_copy();
    let file = tree.path().join("overlays/bucket/kustomization.yaml");
    std::fs::write(&file, edit(&std::fs::read_to_string(&file).unwrap())).unwrap();
    let out = try_kustomize(&tree.path().join("overlays/bucket"));
    assert!(out.status.success(), "kubectl kustomize overlays/bucket failed\n{}", text(&out));
    validate(&String::from_utf8(out.stdout).unwrap())
}

#[test]
fn kustomize_bucket_overlay_adds_storage_s3_and_the_optional_secret_env() {
    let objs = kustomize_bucket(str::to_string);
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    let s3 = bucket_of(&config).unwrap_or_else(|| panic!("no [storage.s3] in {config:#?}"));
    assert_eq!(s3["bucket"].as_str(), Some("my-wharf-cache"));
    assert_eq!((s3["endpoint"].as_str(), s3["allow_http"].as_bool()), (Some(""), Some(false)), "AWS, over https");
    // Optional: without the Secret wharf starts with the rest of the AWS chain (IRSA, instance profile).
    assert_keys_from(&objs, "wharf-bucket", true);
    // The overlay's wharf.toml replaces the base's: it must be the base's plus the bucket, and keep the hash
    // suffix that rolls the DaemonSet.
    let base = validate(&kustomize("deploy/kustomize/base"));
    let mut without_bucket = config.clone();
    let mut base_config = effective_config(&config_toml(&base));
    for c in [&mut without_bucket, &mut base_config] {
        c.remove("storage");
    }
    assert_eq!(without_bucket, base_config, "the overlay's wharf.toml drifted from the base's");
    assert_eq!(unhash(objs).kinds(), unhash(base).kinds(), "the overlay adds no object");
    // The commented IRSA patch works once uncommented.
    let objs = kustomize_bucket(|k| {
        let (head, tail) = k.split_once("  # IRSA").expect("the IRSA example in kustomization.yaml");
        let tail: Vec<String> =
            tail.lines().map(|l| l.strip_prefix("  # ").map(|r| format!("  {r}")).unwrap_or(l.into())).collect();
        format!("{head}  # IRSA{}\n", tail.join("\n"))
    });
    let annotations = &objs.one("ServiceAccount")["metadata"]["annotations"];
    let role = annotations["eks.amazonaws.com/role-arn"].as_str().unwrap_or_else(|| panic!("{annotations:#}"));
    assert!(role.starts_with("arn:aws:iam::") && role.ends_with(":role/wharf-bucket"), "{role}");
    assert_eq!(objs.one("ServiceAccount")["automountServiceAccountToken"], false);
}

/// The runtime socket wharf's configuration names (`warm.runtime_endpoint`), if any.
fn runtime_socket(config: &toml::Table) -> Option<String> {
    let endpoint = config["warm"]["runtime_endpoint"].as_str().expect("warm.runtime_endpoint");
    (!endpoint.is_empty()).then(|| endpoint.strip_prefix("unix://").expect("a unix:// endpoint").to_string())
}

/// Neither the configuration nor the pod reaches the node's runtime (what `check_workload` checks then, said
/// where the rendering must be without it).
fn assert_no_runtime(objs: &Objects, config: &toml::Table) {
    assert_eq!(runtime_socket(config), None, "runtime pre-pull is off by default");
    let pod = &objs.one("DaemonSet")["spec"]["template"]["spec"];
    let volumes: Vec<&Value> = pod["volumes"].as_array().unwrap().iter().collect();
    assert!(volumes.iter().all(|v| v["name"] != "runtime-socket"), "{volumes:#?}");
    assert!(pod["securityContext"].get("supplementalGroups").is_none(), "{pod:#}");
}

/// The pod's supplementary groups.
fn supplemental_groups(objs: &Objects) -> Value {
    objs.one("DaemonSet")["spec"]["template"]["spec"]["securityContext"]["supplementalGroups"].clone()
}

/// The warm list as (image, into_runtime, pin_in_runtime).
fn warm_images(config: &toml::Table) -> Vec<(String, bool, bool)> {
    let images = config["warm"]["images"].as_array().unwrap();
    let flag = |i: &toml::Value, key: &str| i[key].as_bool().unwrap_or_else(|| panic!("no {key} in {i:#?}"));
    images
        .iter()
        .map(|i| (i["image"].as_str().unwrap().to_string(), flag(i, "into_runtime"), flag(i, "pin_in_runtime")))
        .collect()
}

#[test]
fn helm_chart_runtime_values_mount_the_socket_and_mark_the_warm_images() {
    let objs = validate(&helm(&["ci/runtime-values.yaml"], &[]).unwrap());
    // check_workload checks the mount against runtime_endpoint, and wharf accepts the configuration.
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    assert_eq!(runtime_socket(&config).as_deref(), Some("/run/k3s/containerd/containerd.sock"));
    let pod = &objs.one("DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(str_at(named(&pod["volumes"], "runtime-socket"), "/hostPath/path"), "/run/k3s/containerd");
    assert_eq!(supplemental_groups(&objs), json!([990]));
    assert_eq!(
        warm_images(&config),
        [
            ("docker.io/library/nginx:1.27".to_string(), true, true),
            ("registry.k8s.io/pause:3.10".to_string(), true, false),
            ("docker.io/library/busybox:1.37".to_string(), false, false),
        ]
    );
    assert_eq!(config["warm"]["images"][1]["platforms"].as_array().map(Vec::len), Some(2));
    // Enabled without any image marked: the socket is mounted, nothing is pulled into the runtime.
    let bare = validate(&helm(&[], &["runtime.enabled=true"]).unwrap());
    let config = check_workload(&bare, &Expect { node_setup: true, service: true, loopback: false });
    assert_eq!(runtime_socket(&config).as_deref(), Some("/run/containerd/containerd.sock"));
    assert_eq!(supplemental_groups(&bare), json!([0]));
    assert!(warm_images(&config).is_empty());
}

#[test]
fn kustomize_runtime_overlay_mounts_the_socket_and_equals_the_chart() {
    let objs = validate(&kustomize("deploy/kustomize/overlays/runtime"));
    let config = check_workload(&objs, &Expect { node_setup: true, service: true, loopback: false });
    assert_eq!(runtime_socket(&config).as_deref(), Some("/run/containerd/containerd.sock"));
    assert_eq!(supplemental_groups(&objs), json!([0]));
    assert_eq!(warm_images(&config), [("docker.io/library/nginx:1.27".to_string(), true, true)]);
    // The overlay's wharf.toml replaces the base's: it must be the base's plus the runtime and its image, and
    // keep the hash suffix that rolls the DaemonSet.
    let base = validate(&kustomize("deploy/kustomize/base"));
    let mut without_runtime = config.clone();
    let base_config = effective_config(&config_toml(&base));
    for key in ["runtime_endpoint", "images"] {
        without_runtime["warm"][key] = base_config["warm"][key].clone();
    }
    assert_eq!(without_runtime, base_config, "the overlay's wharf.toml drifted from the base's");
    let objs = unhash(objs);
    assert_eq!(objs.kinds(), unhash(base).kinds(), "the overlay adds no object");
    // The chart with the same values renders the same objects.
    let image = "warm.images[0].image=docker.io/library/nginx:1.27";
    let chart = validate(
        &helm(
            &[],
            &[
                "runtime.enabled=true",
                &format!("{image},warm.images[0].intoRuntime=true,warm.images[0].pinInRuntime=true"),
            ],
        )
        .unwrap(),
    );
    let chart_config = check_workload(&chart, &Expect { node_setup: true, service: true, loopback: false });
    assert_same_objects(&chart, &chart_config, &objs);
}

fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(rest) => current.push_str(rest),
            None => {
                current.push_str(t);
                let (k, v) = current.split_once(char::is_whitespace).unwrap_or((current.as_str(), ""));
                out.push((k.to_uppercase(), v.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

fn cargo_toml() -> toml::Table {
    std::fs::read_to_string(repo().join("Cargo.toml")).unwrap().parse().unwrap()
}

#[test]
fn dockerfile_matches_what_the_repository_builds() {
    let ins = dockerfile();
    let all = |k: &str| -> Vec<&String> { ins.iter().filter(|(kw, _)| kw == k).map(|(_, v)| v).collect() };
    let one = |k: &str| -> &String {
        let v = all(k);
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0]
    };
    let cargo = cargo_toml();
    let package = cargo["package"].as_table().unwrap();
    let bin = cargo["bin"].as_array().unwrap()[0]["name"].as_str().unwrap().to_string();

    // Two stages: a Debian 12 Rust builder new enough for the edition, a Debian 12 distroless runtime.
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert_eq!(froms[0], "docker.io/library/rust:${RUST_VERSION}-bookworm AS build");
    assert!(froms[1].starts_with("gcr.io/distroless/cc-debian12"), "runtime is glibc distroless: {}", froms[1]);
    let rust_version = all("ARG").into_iter().find_map(|a| a.strip_prefix("RUST_VERSION=")).unwrap();
    let (major, minor) = rust_version.split_once('.').unwrap();
    assert!((major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap()) >= (1, 85), "edition 2024 needs 1.85+");
    assert_eq!(package["edition"].as_str(), Some("2024"));

    // The build stage has protoc (the runtime's gRPC bindings are generated) and produces the binary the
    // ENTRYPOINT runs.
    let runs = all("RUN");
    assert!(runs.iter().any(|r| r.contains("apt-get install") && r.contains("protobuf-compiler")), "{runs:?}");
    let run_line = *runs.iter().find(|r| r.contains("cargo build")).expect("a RUN builds wharf");
    assert!(run_line.contains(&format!("cargo build --release --locked --bin {bin}")), "{run_line}");
    let installed = format!("/usr/local/bin/{bin}");
    assert!(run_line.contains(&format!("target/release/{bin} /out{installed}")), "{run_line}");
    assert!(all("COPY").iter().any(|c| c.as_str() == format!("--from=build /out{installed} {installed}")));
    assert_eq!(one("ENTRYPOINT"), &format!("[\"{installed}\"]"));

    // Non-root as the user the manifests run it as; the cache directory is that user's and the default port.
    assert_eq!(one("USER"), &format!("{IMAGE_USER}:{IMAGE_USER}"));
    assert!(
        all("COPY").iter().any(|c| c.as_str()
            == format!("--from=build --chown={IMAGE_USER}:{IMAGE_USER} /out/var/lib/wharf /var/lib/wharf"))
    );
    assert_eq!(one("CMD"), "[\"serve\", \"--data-dir\", \"/var/lib/wharf\"]");
    assert_eq!(one("VOLUME"), "[\"/var/lib/wharf\"]");
    let default_port = wharf::config::Config::default().listen.port();
    assert_eq!(one("EXPOSE"), &default_port.to_string());
    assert!(all("HEALTHCHECK").is_empty(), "Kubernetes probes do that");

    // OCI annotations agree with Cargo.toml.
    let labels = one("LABEL");
    for (key, value) in [
        ("title", bin.as_str()),
        ("description", package["description"].as_str().unwrap()),
        ("licenses", package["license"].as_str().unwrap()),
    ] {
        assert!(labels.contains(&format!("org.opencontainers.image.{key}=\"{value}\"")), "{key}: {labels}");
    }
    for key in ["version", "revision", "created"] {
        assert!(labels.contains(&format!("org.opencontainers.image.{key}=")), "{key}: {labels}");
    }
    let version = all("ARG").into_iter().find_map(|a| a.strip_prefix("VERSION=")).unwrap();
    assert_eq!(Some(version), package["version"].as_str(), "ARG VERSION vs Cargo.toml");
    assert_eq!(
        std::fs::read_to_string(repo().join(CHART).join("Chart.yaml"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("appVersion:")),
        Some(format!("appVersion: \"{version}\"").as_str()),
        "the chart's default image tag is the crate's version"
    );
}

/// `.dockerignore` patterns as used there: `dir/` and `**/*.ext`.
fn ignored(patterns: &[String], rel: &str) -> bool {
    patterns.iter().any(|p| match (p.strip_suffix('/'), p.strip_prefix("**/*")) {
        (Some(dir), _) => rel == dir || rel.starts_with(&format!("{dir}/")),
        (_, Some(ext)) => rel.ends_with(ext),
        _ => rel == p,
    })
}

#[test]
fn dockerignore_keeps_what_cargo_needs() {
    let patterns: Vec<String> = std::fs::read_to_string(repo().join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for p in &patterns {
        assert!(p.ends_with('/') || p.starts_with("**/*"), "pattern {p:?} is not understood by this test");
    }
    assert!(ignored(&patterns, "target") && ignored(&patterns, ".git"), "build output and history stay out");
    // Every target Cargo.toml names, the lock file, and every file the sources include at compile time.
    let cargo = cargo_toml();
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".into(), "src/lib.rs".into()];
    for section in ["bin", "test", "bench"] {
        for target in cargo.get(section).and_then(|v| v.as_array()).into_iter().flatten() {
            let name = target["name"].as_str().unwrap();
            let default = if section == "bench" { format!("benches/{name}.rs") } else { String::new() };
            needed.push(target.get("path").and_then(|p| p.as_str()).map(str::to_string).unwrap_or(default));
        }
    }
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out)
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p)
            }
        }
    }
    let mut files = Vec::new();
    sources(&repo().join("src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for part in ["include_str!(\"", "include_bytes!(\""].iter().flat_map(|m| text.split(m).skip(1)) {
            let rel = part.split('"').next().unwrap();
            let abs = file.parent().unwrap().join(rel).canonicalize().unwrap();
            needed.push(abs.strip_prefix(repo().canonicalize().unwrap()).unwrap().to_str().unwrap().into());
        }
    }
    for rel in needed.iter().filter(|r| !r.is_empty()) {
        assert!(repo().join(rel).exists(), "{rel} does not exist");
        assert!(!ignored(&patterns, rel), ".dockerignore drops {rel}, which the build needs");
    }
}

/// The runtime image has glibc (Debian 12: 2.36), libgcc and libstdc++ and no other shared library: the
/// binary must need nothing else (an OpenSSL or libz dependency would fail only at container start).
#[test]
fn binary_needs_only_what_the_distroless_runtime_has() {
    let bin = env!("CARGO_BIN_EXE_wharf");
    let out =
        run(Command::new("readelf").args(["--dynamic", "--version-info", "--wide", bin]), Duration::from_secs(60));
    assert!(out.status.success(), "readelf (Debian: binutils, which cargo's linker needs anyway)\n{}", text(&out));
    let dump = String::from_utf8_lossy(&out.stdout);
    let runtime = [
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    let needed: Vec<&str> = dump
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(needed.contains(&"libc.so.6"), "not a dynamically linked glibc binary? {needed:?}");
    let extra: Vec<_> = needed.iter().filter(|n| !runtime.contains(n)).collect();
    assert!(extra.is_empty(), "shared libraries the distroless runtime lacks: {extra:?}");
    let newest = dump
        .split("GLIBC_")
        .skip(1)
        .filter_map(|v| {
            let v: String = v.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let mut it = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
            Some((it.next()?, it.next().unwrap_or(0)))
        })
        .max()
        .unwrap();
    assert!(newest <= (2, 36), "needs GLIBC_{}.{}, Debian 12 has 2.36", newest.0, newest.1);
}
