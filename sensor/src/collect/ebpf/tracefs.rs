//! tracefs: where it is, and whether each tracepoint a program reads has the fields at the
//! offsets the program was compiled for (a probe is refused with the reason otherwise).

use super::ProgSpec;
use std::path::Path;

/// Finds (and if needed, mounts) tracefs.
pub(super) fn tracefs() -> Option<&'static str> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Some(p);
        }
    }
    // Not mounted: try to mount it where the kernel documents it (needs CAP_SYS_ADMIN).
    let target = c"/sys/kernel/tracing";
    let r = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 && Path::new("/sys/kernel/tracing/events").is_dir() {
        return Some("/sys/kernel/tracing");
    }
    None
}

/// Parses the `field:` lines of a tracepoint `format` file into (name, offset, size).
pub fn parse_format(text: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().unwrap_or("");
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        // The name is the last word of the declaration, minus any array suffix.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("")
            .to_string();
        if let (Some(o), Some(s)) = (offset, size) {
            out.push((name, o, s));
        }
    }
    out
}

/// Checks that a tracepoint exists and that the fields the program reads sit where it
/// expects them.
pub(super) fn check_layout(tracefs: &str, s: &ProgSpec) -> Result<(), String> {
    if s.raw {
        // Raw tracepoints take the kernel's arguments: the tracepoint must exist.
        let dir = format!("{tracefs}/events/{}/{}", s.category, s.event);
        if !Path::new(&dir).is_dir() {
            return Err(format!(
                "tracepoint {}:{} does not exist on this kernel",
                s.category, s.event
            ));
        }
        return Ok(());
    }
    let path = format!("{tracefs}/events/{}/{}/format", s.category, s.event);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "tracepoint {}:{} does not exist on this kernel",
                s.category, s.event
            )
        } else {
            format!("cannot read {path}: {e}")
        }
    })?;
    let fields = parse_format(&text);
    for &(name, off, size) in s.fields {
        match fields.iter().find(|f| f.0 == name) {
            None => {
                return Err(format!(
                    "tracepoint {}:{} has no field `{name}`",
                    s.category, s.event
                ))
            }
            Some(f) if f.1 != off || (size != 0 && f.2 != size) => {
                return Err(format!(
                    "tracepoint {}:{} field `{name}` is at offset {} size {} on this kernel; the program expects offset {off} size {size}",
                    s.category, s.event, f.1, f.2
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{probe_programs, PROBE_NAMES};
    use super::*;

    #[test]
    fn parses_tracefs_format() {
        let text = "name: sched_switch\nID: 316\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                    \tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                    \tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n";
        let f = parse_format(text);
        assert!(f.contains(&("common_type".into(), 0, 2)));
        assert!(f.contains(&("prev_comm".into(), 8, 16)));
        assert!(f.contains(&("prev_pid".into(), 24, 4)));
        assert!(f.contains(&("skbaddr".into(), 8, 8)));
        assert!(f.contains(&("comm".into(), 12, 4)));
    }

    #[test]
    fn this_kernel_matches_every_layout() {
        // Where tracefs is readable, every program's fields must match; otherwise the probe
        // would be refused at run time, which is what `sensor probes` reports.
        let Some(t) = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .find(|p| Path::new(p).join("events/sched").is_dir())
        else {
            eprintln!("SKIP: tracefs not mounted");
            return;
        };
        for p in PROBE_NAMES {
            for s in probe_programs(p) {
                check_layout(t, s).unwrap();
            }
        }
    }
}
