//! Mounted real filesystems (from /proc/self/mountinfo, re-read every
//! `REFRESH` collections) and their usage (statvfs each collection).

use crate::filter::Filter;
use crate::procfile::{set_str, slot};
use procfs::FromRead;
use protocol::FsRec;
use std::ffi::CString;

const REFRESH: u32 = 30;

/// Filesystem types that hold no user data and are never reported.
const PSEUDO: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "pstore",
    "bpf",
    "debugfs",
    "tracefs",
    "configfs",
    "fusectl",
    "mqueue",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "rpc_pipefs",
    "nsfs",
    "ramfs",
    "efivarfs",
    "overlay",
    "squashfs",
    "fuse.lxcfs",
    "fuse.portal",
    "selinuxfs",
];

struct Mount {
    mount: String,
    device: String,
    fstype: String,
    c_path: CString,
}

pub struct Filesystem {
    mountinfo: String,
    filter: Filter,
    mounts: Vec<Mount>,
    countdown: u32,
}

impl Filesystem {
    pub fn new(proc: &str, filter: Filter) -> Self {
        Filesystem {
            mountinfo: format!("{proc}/self/mountinfo"),
            filter,
            mounts: Vec::new(),
            countdown: 0,
        }
    }

    fn refresh(&mut self) {
        let Ok(mounts) = procfs::process::MountInfos::from_file(&self.mountinfo) else {
            return;
        };
        let mut out: Vec<Mount> = Vec::new();
        for m in mounts.0 {
            let fstype = m.fs_type.clone();
            let device = m.mount_source.clone().unwrap_or_default();
            let mount = m.mount_point.to_string_lossy().into_owned();
            if PSEUDO.contains(&fstype.as_str()) || !self.filter.allows(&mount) {
                continue;
            }
            let networked = fstype.starts_with("nfs")
                || fstype == "cifs"
                || fstype == "smb3"
                || fstype.starts_with("fuse.");
            if !device.starts_with('/') && !networked && fstype != "zfs" && fstype != "btrfs" {
                continue;
            }
            // Bind mounts and btrfs subvolumes: report a device once.
            if out.iter().any(|o| {
                o.device == device && o.fstype == fstype && fstype != "nfs" && fstype != "nfs4"
            }) {
                continue;
            }
            let Ok(c_path) = CString::new(mount.clone()) else {
                continue;
            };
            out.push(Mount {
                mount,
                device,
                fstype,
                c_path,
            });
        }
        self.mounts = out;
    }

    pub fn collect(&mut self, out: &mut Vec<FsRec>) {
        if self.countdown == 0 {
            self.refresh();
            self.countdown = REFRESH;
        }
        self.countdown -= 1;
        let mut n = 0;
        for m in &self.mounts {
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: c_path is a valid NUL-terminated string; st is a valid out-pointer.
            if unsafe { libc::statvfs(m.c_path.as_ptr(), &mut st) } != 0 {
                continue;
            }
            let frsize = st.f_frsize as u64;
            let r = slot(out, n);
            set_str(&mut r.mount, m.mount.as_bytes());
            set_str(&mut r.device, m.device.as_bytes());
            set_str(&mut r.fstype, m.fstype.as_bytes());
            r.size_bytes = st.f_blocks as u64 * frsize;
            r.used_bytes = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize;
            r.avail_bytes = st.f_bavail as u64 * frsize;
            r.inodes_total = st.f_files as u64;
            r.inodes_used = (st.f_files as u64).saturating_sub(st.f_ffree as u64);
            n += 1;
        }
        out.truncate(n);
    }
}
