//! What a cgroup path says about the processes in it: a container (runtime, container id,
//! pod uid, QoS class) or a host service (systemd unit, login session). Pure string work on
//! the shapes each runtime and cgroup driver makes, so it needs no runtime socket and gives
//! the same answer live and in tests.

use serde::{Deserialize, Serialize};

/// The container runtime a cgroup (or a Kubernetes `containerID` scheme) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Runtime {
    #[serde(rename = "containerd")]
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    #[serde(rename = "docker")]
    Docker,
    #[serde(rename = "podman")]
    Podman,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        }
    }

    /// The scheme of a pod status `containerID` (`containerd://<id>`).
    pub fn from_scheme(s: &str) -> Option<Runtime> {
        match s {
            "containerd" => Some(Runtime::Containerd),
            "cri-o" | "crio" => Some(Runtime::CriO),
            "docker" => Some(Runtime::Docker),
            "podman" => Some(Runtime::Podman),
            _ => None,
        }
    }
}

/// Kubernetes QoS class, from the kubelet's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Identity read from one cgroup path. A container's fields and a host service's are
/// exclusive: `unit` and `session` are only set when no container was found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// None when the path cannot tell (the kubelet's cgroupfs driver names containers by id
    /// only); the pod's `containerID` scheme fills it in later.
    pub runtime: Option<Runtime>,
    /// 64 hex digits.
    pub container_id: Option<String>,
    /// With dashes (systemd slices write them as `_`).
    pub pod_uid: Option<String>,
    pub qos: Option<Qos>,
    /// systemd service (`nginx.service`), innermost one.
    pub unit: Option<String>,
    /// Login session scope (`session-3.scope`).
    pub session: Option<String>,
}

impl CgroupInfo {
    pub fn is_container(&self) -> bool {
        self.container_id.is_some() || self.pod_uid.is_some()
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Runtime prefixes of container scopes (`<prefix><id>.scope` with systemd, `<prefix><id>`
/// with cgroupfs). conmon (the monitor process of CRI-O and podman) is attributed to its
/// container.
const PREFIXES: &[(&str, Runtime)] = &[
    ("cri-containerd-", Runtime::Containerd),
    ("crio-conmon-", Runtime::CriO),
    ("crio-", Runtime::CriO),
    ("docker-", Runtime::Docker),
    ("libpod-conmon-", Runtime::Podman),
    ("libpod-", Runtime::Podman),
];

/// What a kubelet slice or directory says: QoS class and pod uid. `None`: not a kubelet one.
fn kube_segment(seg: &str, in_kube: bool) -> Option<(Option<Qos>, Option<String>)> {
    let qos_of = |s: &str| match s {
        "besteffort" => Some(Qos::BestEffort),
        "burstable" => Some(Qos::Burstable),
        _ => None,
    };
    // systemd driver: `kubepods-burstable-pod<uid_with_underscores>.slice`, also under a
    // cgroup root such as kind's `kubelet-kubepods-...slice`.
    if let Some(name) = seg.strip_suffix(".slice") {
        let parts: Vec<&str> = name.split('-').collect();
        let at = parts.iter().position(|p| *p == "kubepods")?;
        let mut qos = None;
        let mut pod = None;
        for p in &parts[at + 1..] {
            if let Some(q) = qos_of(p) {
                qos = Some(q);
            } else if let Some(uid) = p.strip_prefix("pod") {
                pod = Some(uid.replace('_', "-"));
            }
        }
        return Some((qos, pod));
    }
    // cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`.
    if seg == "kubepods" {
        return Some((None, None));
    }
    if in_kube {
        if let Some(q) = qos_of(seg) {
            return Some((Some(q), None));
        }
        if let Some(uid) = seg.strip_prefix("pod")
            && uid.len() >= 32
            && uid
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
        {
            return Some((None, Some(uid.replace('_', "-"))));
        }
    }
    None
}

/// A container scope or directory: (runtime if told, id).
fn container_segment(seg: &str, prev: &str) -> Option<(Option<Runtime>, String)> {
    let name = seg.strip_suffix(".scope").unwrap_or(seg);
    for (prefix, rt) in PREFIXES {
        if let Some(id) = name.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some((Some(*rt), id.to_ascii_lowercase()));
        }
    }
    if is_container_id(name) {
        // A bare id: plain Docker (`/docker/<id>`), podman's cgroupfs parent, or the kubelet's
        // cgroupfs driver, where containerd and Docker look the same.
        let rt = match prev {
            "docker" => Some(Runtime::Docker),
            "libpod_parent" | "machine.slice" => Some(Runtime::Podman),
            _ => None,
        };
        return Some((rt, name.to_ascii_lowercase()));
    }
    None
}

/// Parses one cgroup path (v2, or one v1 hierarchy's).
pub fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    let mut in_kube = false;
    let mut prev = "";
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        // containerd with SystemdCgroup when the kubelet's parent is not a slice path:
        // `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`.
        let mut colon = seg.splitn(3, ':');
        if let (Some(slice), Some(rt), Some(id)) = (colon.next(), colon.next(), colon.next()) {
            if let Some((qos, pod)) = kube_segment(slice, true) {
                if !in_kube {
                    info = CgroupInfo::default();
                    in_kube = true;
                }
                info.qos = qos.or(info.qos);
                info.pod_uid = pod.or(info.pod_uid.take());
            }
            if is_container_id(id) {
                info.runtime = match rt {
                    "cri-containerd" => Some(Runtime::Containerd),
                    "crio" => Some(Runtime::CriO),
                    "docker" => Some(Runtime::Docker),
                    _ => None,
                };
                info.container_id = Some(id.to_ascii_lowercase());
            }
            prev = seg;
            continue;
        }
        if let Some((qos, pod)) = kube_segment(seg, in_kube) {
            if !in_kube {
                // Entering the kubelet's tree: a container seen above it is the node itself
                // (kind or k3s running in Docker), not the workload.
                info = CgroupInfo::default();
                in_kube = true;
            }
            if qos.is_some() {
                info.qos = qos;
            }
            if pod.is_some() {
                info.pod_uid = pod;
            }
        } else if let Some((rt, id)) = container_segment(seg, prev) {
            info.runtime = rt;
            info.container_id = Some(id);
        } else if seg.ends_with(".service") {
            info.unit = Some(seg.to_string());
        } else if seg.starts_with("session-") && seg.ends_with(".scope") {
            info.session = Some(seg.to_string());
        }
        prev = seg;
    }
    // Guaranteed pods have no QoS level in the hierarchy.
    if info.pod_uid.is_some() && info.qos.is_none() {
        info.qos = Some(Qos::Guaranteed);
    }
    if info.is_container() {
        info.unit = None;
        info.session = None;
    }
    info
}

/// Parses `/proc/<pid>/cgroup`: v2 (`0::/path`) and v1 (`12:memory:/path`,
/// `1:name=systemd:/path`) lines. A line naming a container wins (on hybrid hosts the v2
/// path may be `/` while v1 hierarchies carry the kubelet's tree), then the v2 line, then
/// systemd's own v1 hierarchy.
pub fn parse_proc_cgroup(text: &str) -> CgroupInfo {
    let mut best: Option<(u8, CgroupInfo)> = None;
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let info = parse_path(path);
        let rank = if info.is_container() {
            4
        } else if controllers.is_empty() {
            3
        } else if controllers == "name=systemd" {
            2
        } else {
            1
        };
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, info));
        }
    }
    best.map(|(_, i)| i).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9f3a1c5e7b2d4f6081a3c5e7092b4d6f8a1c3e5f7092b4d6f8a1c3e5f7092b4d";
    const UID: &str = "4c0f9e2a-6b1d-4e8f-9a3c-7d5e2f1b0a9c";
    const UID_: &str = "4c0f9e2a_6b1d_4e8f_9a3c_7d5e2f1b0a9c";

    fn container(rt: Option<Runtime>, pod: Option<&str>, qos: Option<Qos>) -> CgroupInfo {
        CgroupInfo {
            runtime: rt,
            container_id: Some(ID.into()),
            pod_uid: pod.map(str::to_string),
            qos,
            unit: None,
            session: None,
        }
    }

    #[test]
    fn systemd_driver_containerd_burstable() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::Containerd), Some(UID), Some(Qos::Burstable))
        );
    }

    #[test]
    fn systemd_driver_besteffort_crio_and_docker() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
        );
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::CriO), Some(UID), Some(Qos::BestEffort))
        );
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"
        );
        assert_eq!(parse_path(&p).runtime, Some(Runtime::Docker));
        // CRI-O's conmon belongs to its container.
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope"
        );
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::CriO), Some(UID), Some(Qos::BestEffort))
        );
    }

    #[test]
    fn guaranteed_pods_have_no_qos_slice() {
        let p = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::Containerd), Some(UID), Some(Qos::Guaranteed))
        );
        let p = format!("/kubepods/pod{UID}/{ID}");
        assert_eq!(
            parse_path(&p),
            container(None, Some(UID), Some(Qos::Guaranteed))
        );
    }

    #[test]
    fn cgroupfs_driver() {
        let p = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(
            parse_path(&p),
            container(None, Some(UID), Some(Qos::Burstable))
        );
        let p = format!("/kubepods/besteffort/pod{UID}/crio-{ID}");
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::CriO), Some(UID), Some(Qos::BestEffort))
        );
        // The pod's own cgroup: a pod, no container.
        let p = format!("/kubepods/burstable/pod{UID}");
        let i = parse_path(&p);
        assert_eq!((i.pod_uid.as_deref(), i.container_id), (Some(UID), None));
    }

    #[test]
    fn containerd_slice_colon_form() {
        let p = format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"
        );
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::Containerd), Some(UID), Some(Qos::BestEffort))
        );
    }

    #[test]
    fn plain_docker_both_drivers() {
        assert_eq!(
            parse_path(&format!("/docker/{ID}")),
            container(Some(Runtime::Docker), None, None)
        );
        assert_eq!(
            parse_path(&format!("/system.slice/docker-{ID}.scope")),
            container(Some(Runtime::Docker), None, None)
        );
    }

    #[test]
    fn podman_rootful_rootless_and_conmon() {
        assert_eq!(
            parse_path(&format!("/machine.slice/libpod-{ID}.scope")),
            container(Some(Runtime::Podman), None, None)
        );
        assert_eq!(
            parse_path(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            container(Some(Runtime::Podman), None, None)
        );
        assert_eq!(
            parse_path(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            )),
            container(Some(Runtime::Podman), None, None)
        );
        assert_eq!(
            parse_path(&format!("/libpod_parent/libpod-{ID}")),
            container(Some(Runtime::Podman), None, None)
        );
    }

    #[test]
    fn kind_and_k3s_nested_in_docker() {
        // kind: the node is a Docker container; the kubelet uses the `/kubelet` cgroup root.
        let node = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let p = format!(
            "/system.slice/docker-{node}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_path(&p),
            container(Some(Runtime::Containerd), Some(UID), Some(Qos::BestEffort))
        );
        // k3s in Docker (cgroupfs): the node's id must not be taken for the workload's.
        let p = format!("/docker/{node}/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(
            parse_path(&p),
            container(None, Some(UID), Some(Qos::Burstable))
        );
        // The node's own processes (kubelet, containerd) are the node container.
        let p = format!("/docker/{node}/system.slice/containerd.service");
        let i = parse_path(&p);
        assert_eq!(i.container_id.as_deref(), Some(node));
        assert_eq!(i.unit, None);
    }

    #[test]
    fn host_units_and_sessions() {
        let i = parse_path("/system.slice/nginx.service");
        assert_eq!(
            (i.unit.as_deref(), i.container_id, i.pod_uid),
            (Some("nginx.service"), None, None)
        );
        assert_eq!(
            parse_path("/system.slice/system-getty.slice/getty@tty1.service")
                .unit
                .as_deref(),
            Some("getty@tty1.service")
        );
        let i = parse_path("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(
            (i.session.as_deref(), i.unit),
            (Some("session-3.scope"), None)
        );
        assert_eq!(parse_path("/"), CgroupInfo::default());
        assert_eq!(parse_path(""), CgroupInfo::default());
        // Not a container id: too short, not hex.
        assert_eq!(
            parse_path("/docker/abc").container_id,
            None,
            "short ids are names, not container ids"
        );
        assert_eq!(parse_path("/monitor-test-1/podcast").pod_uid, None);
    }

    #[test]
    fn proc_cgroup_v1_and_v2_lines() {
        // Hybrid host: v2 at the root, the kubelet's tree in the v1 hierarchies.
        let text = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(
            parse_proc_cgroup(&text),
            container(None, Some(UID), Some(Qos::Burstable))
        );
        let text =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(
            parse_proc_cgroup(&text),
            container(Some(Runtime::Containerd), Some(UID), Some(Qos::Guaranteed))
        );
        // A host service on a v1 host: systemd's hierarchy names the unit.
        let text =
            "4:memory:/system.slice/nginx.service\n1:name=systemd:/system.slice/nginx.service\n";
        assert_eq!(
            parse_proc_cgroup(text).unit.as_deref(),
            Some("nginx.service")
        );
        assert_eq!(parse_proc_cgroup("garbage"), CgroupInfo::default());
    }

    #[test]
    fn runtime_names() {
        assert_eq!(serde_json::to_string(&Runtime::CriO).unwrap(), "\"cri-o\"");
        assert_eq!(
            Runtime::from_scheme("containerd"),
            Some(Runtime::Containerd)
        );
        assert_eq!(Runtime::from_scheme("cri-o"), Some(Runtime::CriO));
        assert_eq!(Runtime::from_scheme("rkt"), None);
    }
}
