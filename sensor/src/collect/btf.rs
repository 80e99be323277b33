//! Just enough of a BTF reader to find where a struct member sits in this kernel
//! (`/sys/kernel/btf/vmlinux`), so probes can read a field behind a tracepoint's pointer
//! without hard-coding an offset that moves between kernel builds.

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// An index of the kernel's BTF that keeps only each type's position in the file, and reads
/// names and members on demand: looking up a member costs a few hundred KB, not the tens of
/// MB a full parse of vmlinux BTF would (the sensor's peak RSS is a number users watch).
pub struct Btf {
    file: File,
    /// File offset of the string section.
    str_base: u64,
    str_len: u64,
    /// Per type id - 1: file offset of its 12-byte header.
    pos: Vec<u32>,
    /// Per type id - 1: its kind, so lookups skip non-structs without reading the file.
    kinds: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

struct Head {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    type_ref: u32,
}

impl Btf {
    pub fn from_sys() -> Option<Btf> {
        Btf::open(File::open("/sys/kernel/btf/vmlinux").ok()?)
    }

    pub fn open(file: File) -> Option<Btf> {
        let mut h = [0u8; 24];
        file.read_exact_at(&mut h, 0).ok()?;
        if u16::from_le_bytes([h[0], h[1]]) != 0xeb9f {
            return None;
        }
        let hdr_len = u32_at(&h, 4)? as u64;
        let (type_off, type_len) = (u32_at(&h, 8)? as u64, u32_at(&h, 12)? as u64);
        let (str_off, str_len) = (u32_at(&h, 16)? as u64, u32_at(&h, 20)? as u64);
        let mut r = BufReader::with_capacity(64 * 1024, file.try_clone().ok()?);
        r.seek(SeekFrom::Start(hdr_len + type_off)).ok()?;
        let mut pos = Vec::new();
        let mut kinds = Vec::new();
        let mut p: u64 = 0;
        let mut th = [0u8; 12];
        while p + 12 <= type_len {
            r.read_exact(&mut th).ok()?;
            pos.push((hdr_len + type_off + p) as u32);
            let info = u32_at(&th, 4)?;
            let kind = (info >> 24) & 0x1f;
            kinds.push(kind as u8);
            let vlen = (info & 0xffff) as u64;
            let extra = match kind {
                1 => 4,                                // INT
                3 => 12,                               // ARRAY
                KIND_STRUCT | KIND_UNION => 12 * vlen, // members
                6 => 8 * vlen,                         // ENUM
                13 => 8 * vlen,                        // FUNC_PROTO
                14 => 4,                               // VAR
                15 => 12 * vlen,                       // DATASEC
                17 => 4,                               // DECL_TAG
                19 => 12 * vlen,                       // ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return None, // unknown kind: cannot skip it safely
            };
            r.seek_relative(extra as i64).ok()?;
            p += 12 + extra;
        }
        Some(Btf {
            file,
            str_base: hdr_len + str_off,
            str_len,
            pos,
            kinds,
        })
    }

    fn head(&self, id: u32) -> Option<Head> {
        let at = *self.pos.get(id.checked_sub(1)? as usize)? as u64;
        let mut b = [0u8; 12];
        self.file.read_exact_at(&mut b, at).ok()?;
        let info = u32_at(&b, 4)?;
        Some(Head {
            name: u32_at(&b, 0)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            type_ref: u32_at(&b, 8)?,
        })
    }

    fn name_is(&self, off: u32, want: &str) -> bool {
        if off as u64 >= self.str_len {
            return false;
        }
        let mut b = vec![0u8; want.len() + 1];
        let n = self
            .file
            .read_at(&mut b, self.str_base + off as u64)
            .unwrap_or(0);
        n == b.len() && &b[..want.len()] == want.as_bytes() && b[want.len()] == 0
    }

    fn name_empty(&self, off: u32) -> bool {
        off == 0 || self.name_is(off, "")
    }

    fn members(&self, id: u32) -> Vec<(u32, u32, u32)> {
        let Some(h) = self.head(id) else {
            return Vec::new();
        };
        let at = self.pos[id as usize - 1] as u64 + 12;
        let mut b = vec![0u8; 12 * h.vlen];
        if self.file.read_exact_at(&mut b, at).is_err() {
            return Vec::new();
        }
        (0..h.vlen)
            .filter_map(|i| {
                Some((
                    u32_at(&b, i * 12)?,
                    u32_at(&b, i * 12 + 4)?,
                    u32_at(&b, i * 12 + 8)?,
                ))
            })
            .collect()
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.head(id) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = t.type_ref,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous struct/union
    /// members as C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Option<usize> {
        for id in 1..=self.pos.len() as u32 {
            if !matches!(self.kinds[id as usize - 1] as u32, KIND_STRUCT | KIND_UNION) {
                continue;
            }
            let Some(h) = self.head(id) else { continue };
            if (h.kind == KIND_STRUCT || h.kind == KIND_UNION) && self.name_is(h.name, strukt) {
                if let Some(bits) = self.find(id, member, 0) {
                    return Some(bits as usize / 8);
                }
            }
        }
        None
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        self.find_typed(id, member, depth).map(|(bits, _)| bits)
    }

    /// Bit offset and type id of `member` in the struct/union `id`.
    fn find_typed(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let flag = self.head(id)?.kind_flag;
        for (name, ty, off) in self.members(id) {
            let bits = if flag { off & 0xff_ffff } else { off };
            if self.name_is(name, member) {
                return Some((bits, ty));
            }
            if self.name_empty(name) {
                let inner = self.resolve(ty);
                if matches!(
                    self.head(inner).map(|t| t.kind),
                    Some(KIND_STRUCT | KIND_UNION)
                ) {
                    if let Some((o, t)) = self.find_typed(inner, member, depth + 1) {
                        return Some((bits + o, t));
                    }
                }
            }
        }
        None
    }

    /// Byte offset of a dotted member path inside `struct name` (`"sched_info.last_queued"`
    /// in `task_struct`): each step but the last must be an embedded struct or union.
    pub fn path_offset(&self, strukt: &str, path: &str) -> Option<usize> {
        let mut steps = path.split('.');
        let first = steps.next()?;
        let mut found = None;
        for id in 1..=self.pos.len() as u32 {
            if !matches!(self.kinds[id as usize - 1] as u32, KIND_STRUCT | KIND_UNION) {
                continue;
            }
            let Some(h) = self.head(id) else { continue };
            if self.name_is(h.name, strukt) {
                if let Some(f) = self.find_typed(id, first, 0) {
                    found = Some(f);
                    break;
                }
            }
        }
        let (mut bits, mut ty) = found?;
        for step in steps {
            let inner = self.resolve(ty);
            if !matches!(
                self.head(inner).map(|t| t.kind),
                Some(KIND_STRUCT | KIND_UNION)
            ) {
                return None;
            }
            let (o, t) = self.find_typed(inner, step, 0)?;
            bits += o;
            ty = t;
        }
        Some(bits as usize / 8)
    }

    /// Type id of `typedef name` (e.g. `btf_trace_sched_switch`, which a `tp_btf` program
    /// names as its attach target).
    pub fn typedef_id(&self, name: &str) -> Option<u32> {
        (1..=self.pos.len() as u32).find(|&id| {
            self.kinds[id as usize - 1] as u32 == KIND_TYPEDEF
                && self.head(id).is_some_and(|h| self.name_is(h.name, name))
        })
    }

    /// Value of enumerator `item` of `enum name` (e.g. `cgroup_subsys_id`, `cpu_cgrp_id`).
    pub fn enum_value(&self, name: &str, item: &str) -> Option<i64> {
        for id in 1..=self.pos.len() as u32 {
            let kind = self.kinds[id as usize - 1] as u32;
            if kind != 6 && kind != 19 {
                continue;
            }
            let Some(h) = self.head(id) else { continue };
            if !self.name_is(h.name, name) {
                continue;
            }
            let width = if kind == 6 { 8 } else { 12 };
            let at = self.pos[id as usize - 1] as u64 + 12;
            let mut b = vec![0u8; width * h.vlen];
            self.file.read_exact_at(&mut b, at).ok()?;
            for i in 0..h.vlen {
                if self.name_is(u32_at(&b, i * width)?, item) {
                    let lo = u32_at(&b, i * width + 4)?;
                    return Some(if kind == 6 {
                        lo as i32 as i64
                    } else {
                        ((u32_at(&b, i * width + 8)? as u64) << 32 | lo as u64) as i64
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_members_of_this_kernel() {
        let Some(b) = Btf::from_sys() else {
            eprintln!("SKIP: no /sys/kernel/btf/vmlinux");
            return;
        };
        // Offsets every kernel has had in the same place for a decade.
        assert_eq!(b.member_offset("list_head", "next"), Some(0));
        assert_eq!(b.member_offset("list_head", "prev"), Some(8));
        let cb = b.member_offset("sk_buff", "cb").expect("sk_buff.cb");
        assert!(cb > 0 && cb < 256, "{cb}");
        // Through an anonymous union/struct.
        assert_eq!(b.member_offset("tcp_skb_cb", "tcp_gso_segs"), Some(8));
        assert_eq!(b.member_offset("tcp_skb_cb", "seq"), Some(0));
        assert!(b.member_offset("sk_buff", "no_such_member").is_none());
        let pid = b
            .member_offset("task_struct", "pid")
            .expect("task_struct.pid");
        assert!(pid > 0, "{pid}");
        // A dotted path through an embedded struct.
        let si = b
            .member_offset("task_struct", "sched_info")
            .expect("sched_info");
        let lq = b
            .member_offset("sched_info", "last_queued")
            .expect("last_queued");
        assert_eq!(
            b.path_offset("task_struct", "sched_info.last_queued"),
            Some(si + lq)
        );
        assert_eq!(b.path_offset("list_head", "prev"), Some(8));
        assert!(b.path_offset("task_struct", "pid.nothing").is_none());
        // Enumerators.
        assert_eq!(b.enum_value("cgroup_subsys_id", "cpuset_cgrp_id"), Some(0));
        assert!(b.enum_value("cgroup_subsys_id", "no_such_id").is_none());
        // Typedefs (tp_btf attach targets); a struct of that name is not one.
        let id = b
            .typedef_id("btf_trace_sched_switch")
            .expect("btf_trace_sched_switch");
        assert!(id > 0);
        assert!(b.typedef_id("task_struct").is_none());
        assert!(b.typedef_id("btf_trace_no_such_tracepoint").is_none());
    }
}
