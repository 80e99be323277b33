//! Least privilege after start-up. Loading and attaching eBPF programs needs
//! root (CAP_BPF + CAP_PERFMON); reading their maps through the file
//! descriptors already open, reading /proc and writing the spool do not. So
//! once everything is open the sensor gives up every capability, and with
//! `--user NAME` also becomes that user (the spool directory is handed to it
//! first). `no_new_privs` is set either way.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::path::Path;

pub struct Target {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `name` now, so a typo fails at start, before anything runs.
pub fn lookup(name: &str) -> Result<Target> {
    let c = CString::new(name).context("user: contains a NUL byte")?;
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        bail!("user: no such user {name:?} on this host");
    }
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Target {
        name: name.to_string(),
        uid,
        gid,
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the bounding and ambient sets; needs CAP_SETPCAP, so it runs while still root.
fn clear_bounding_set() {
    for cap in 0..=63 {
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
}

fn clear_capabilities() -> Result<()> {
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const _, data.as_ptr()) };
    if r != 0 {
        bail!("capset: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives up privileges; `spool` is chowned to the target user first.
pub fn drop_privileges(user: Option<&Target>, spool: Option<&Path>) -> Result<String> {
    if unsafe { libc::geteuid() } != 0 {
        // Started unprivileged, perhaps with ambient capabilities (the systemd unit):
        // give those up too.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        clear_capabilities()?;
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        return Ok("not root: capabilities given up".into());
    }
    clear_bounding_set();
    if let Some(t) = user {
        if let Some(dir) = spool {
            let chown = |p: &Path| -> Result<()> {
                let c = CString::new(p.as_os_str().as_encoded_bytes())?;
                if unsafe { libc::chown(c.as_ptr(), t.uid, t.gid) } != 0 {
                    bail!(
                        "cannot hand {} to user {}: {}",
                        p.display(),
                        t.name,
                        std::io::Error::last_os_error()
                    );
                }
                Ok(())
            };
            chown(dir)?;
            for e in std::fs::read_dir(dir)?.flatten() {
                chown(&e.path())?;
            }
        }
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(t.gid) != 0
                || libc::setuid(t.uid) != 0
            {
                bail!(
                    "cannot switch to user {}: {}",
                    t.name,
                    std::io::Error::last_os_error()
                );
            }
        }
        if unsafe { libc::setuid(0) } == 0 {
            bail!("still able to regain root after switching to {}", t.name);
        }
    }
    clear_capabilities()?;
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(match user {
        Some(t) => format!("running as {} (uid {}), no capabilities", t.name, t.uid),
        None => "running as root with no capabilities (use --user to switch user)".into(),
    })
}
