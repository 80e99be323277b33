//! Names people recognise, resolved from a cgroup's path alone (no runtime API): the
//! container id (short form, with its runtime), the Kubernetes pod UID, or the systemd
//! unit. Covers the layouts of Docker (cgroupfs and systemd drivers), containerd, CRI-O,
//! podman and kubelet (both drivers).

/// `(container, pod)` for a cgroup path such as
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_….slice/cri-containerd-<id>.scope`.
/// `container` is `runtime:<12 hex>` for a container, a systemd unit (`nginx.service`),
/// or empty; `pod` is the pod UID (dashes restored) or empty.
pub fn resolve(path: &str) -> (String, String) {
    let mut container = String::new();
    let mut pod = String::new();
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        if let Some(uid) = pod_uid(comp) {
            pod = uid;
            container.clear();
            continue;
        }
        if let Some(c) = container_id(comp) {
            container = c;
            continue;
        }
        if container.is_empty() || !container.contains(':') {
            if let Some(unit) = systemd_unit(comp) {
                container = unit.to_string();
            }
        }
    }
    (container, pod)
}

/// A 64-hex container id inside a path component, with the runtime it names.
fn container_id(comp: &str) -> Option<String> {
    let (runtime, rest) = if let Some(r) = comp.strip_prefix("docker-") {
        ("docker", r)
    } else if let Some(r) = comp.strip_prefix("cri-containerd-") {
        ("containerd", r)
    } else if let Some(r) = comp.strip_prefix("crio-conmon-") {
        ("crio-conmon", r)
    } else if let Some(r) = comp.strip_prefix("crio-") {
        ("crio", r)
    } else if let Some(r) = comp.strip_prefix("libpod-conmon-") {
        ("podman-conmon", r)
    } else if let Some(r) = comp.strip_prefix("libpod-") {
        ("podman", r)
    } else {
        ("", comp)
    };
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        // A bare id (cgroupfs driver: /docker/<id>, /kubepods/…/pod<uid>/<id>).
        let runtime = if runtime.is_empty() {
            "container"
        } else {
            runtime
        };
        Some(format!("{runtime}:{}", &id[..12]))
    } else {
        None
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid with _>.slice` (systemd).
fn pod_uid(comp: &str) -> Option<String> {
    let c = comp.strip_suffix(".slice").unwrap_or(comp);
    let at = c.rfind("pod")?;
    if at != 0 && !c[..at].ends_with('-') {
        return None;
    }
    if at != 0 && !c.starts_with("kubepods") {
        return None;
    }
    let uid = c[at + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

fn systemd_unit(comp: &str) -> Option<&str> {
    const KINDS: [&str; 4] = [".service", ".scope", ".socket", ".mount"];
    KINDS
        .iter()
        .any(|k| comp.ends_with(k) && comp.len() > k.len())
        .then_some(comp)
}

#[cfg(test)]
mod tests {
    use super::resolve;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

    fn r(p: &str) -> (String, String) {
        resolve(p)
    }

    #[test]
    fn runtimes() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(r(&format!("/docker/{ID}")), s("container:3f4e5d6c7b8a", ""));
        assert_eq!(
            r(&format!("/system.slice/docker-{ID}.scope")),
            s("docker:3f4e5d6c7b8a", "")
        );
        assert_eq!(
            r(&format!("/machine.slice/libpod-{ID}.scope")),
            s("podman:3f4e5d6c7b8a", "")
        );
        assert_eq!(
            r(&format!("/machine.slice/libpod-{ID}.scope/container")),
            s("podman:3f4e5d6c7b8a", "")
        );
        assert_eq!(r("/system.slice/nginx.service"), s("nginx.service", ""));
        assert_eq!(
            r("/user.slice/user-1000.slice/session-3.scope"),
            s("session-3.scope", "")
        );
        assert_eq!(r("/system.slice"), s("", ""));
        assert_eq!(r("/sonde-test/a"), s("", ""));
        assert_eq!(r("/"), s("", ""));
        // Not an id: too short, not hex.
        assert_eq!(r("/docker/abc"), s("", ""));
    }

    #[test]
    fn kubernetes() {
        let uid = "1a2b3c4d-0000-4111-8222-0123456789ab";
        let s = |a: &str| (a.to_string(), uid.to_string());
        assert_eq!(r(&format!("/kubepods/burstable/pod{uid}")), s(""));
        assert_eq!(
            r(&format!("/kubepods/burstable/pod{uid}/{ID}")),
            s("container:3f4e5d6c7b8a")
        );
        let u = uid.replace('-', "_");
        assert_eq!(
            r(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
            )),
            s("containerd:3f4e5d6c7b8a")
        );
        assert_eq!(
            r(&format!(
                "/kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope"
            )),
            s("crio:3f4e5d6c7b8a")
        );
        // A unit named like a pod is not one.
        assert_eq!(r("/system.slice/mypod.service").1, "");
    }
}
