//! Host identity and static facts.

use procfs::FromRead;
use protocol::HostInfo;

pub fn host_info(proc: &str) -> HostInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid out-pointer for uname(2).
    unsafe { libc::uname(&mut u) };
    let cstr = |b: &[libc::c_char]| {
        unsafe { std::ffi::CStr::from_ptr(b.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Linux".into());
    let memory_bytes = procfs::Meminfo::from_file(format!("{proc}/meminfo"))
        .map(|m| m.mem_total)
        .unwrap_or(0);
    HostInfo {
        probes: String::new(),
        hostname: cstr(&u.nodename),
        kernel: cstr(&u.release),
        os,
        arch: cstr(&u.machine),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes,
        kernel_boot_id: read(&format!("{proc}/sys/kernel/random/boot_id")),
        sensor_version: crate::VERSION.clone(),
    }
}
