//! Just enough of a BTF reader to find where a struct member sits in this kernel
//! (`/sys/kernel/btf/vmlinux`), so probes can read a field behind a tracepoint's pointer
//! without hard-coding an offset that moves between kernel builds.

use std::collections::HashMap;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Type {
    kind: u32,
    name: u32,
    kind_flag: bool,
    /// Struct/union members: (name offset, type id, bit offset).
    members: Vec<(u32, u32, u32)>,
    /// For modifiers and typedefs: the referenced type.
    type_ref: u32,
}

pub struct Btf {
    strings: Vec<u8>,
    types: Vec<Type>, // index = type id - 1
    by_name: HashMap<String, Vec<u32>>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl Btf {
    pub fn from_sys() -> Option<Btf> {
        Btf::parse(&std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
    }

    pub fn parse(b: &[u8]) -> Option<Btf> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != 0xeb9f {
            return None;
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let tsec = b.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)?
            .to_vec();
        let mut types = Vec::new();
        let mut p = 0;
        while p + 12 <= tsec.len() {
            let name = u32_at(tsec, p)?;
            let info = u32_at(tsec, p + 4)?;
            let size_type = u32_at(tsec, p + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            p += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = p + i * 12;
                        members.push((
                            u32_at(tsec, m)?,
                            u32_at(tsec, m + 4)?,
                            u32_at(tsec, m + 8)?,
                        ));
                    }
                    12 * vlen
                }
                6 => 8 * vlen,   // ENUM
                13 => 8 * vlen,  // FUNC_PROTO
                14 => 4,         // VAR
                15 => 12 * vlen, // DATASEC
                17 => 4,         // DECL_TAG
                19 => 12 * vlen, // ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return None, // unknown kind: cannot skip it safely
            };
            p += extra;
            types.push(Type {
                kind,
                name,
                kind_flag: info >> 31 == 1,
                members,
                type_ref: size_type,
            });
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (i, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT || t.kind == KIND_UNION {
                let n = btf.name(t.name).to_string();
                if !n.is_empty() {
                    btf.by_name.entry(n).or_default().push(i as u32 + 1);
                }
            }
        }
        Some(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = &self.strings[(off as usize).min(self.strings.len())..];
        let end = s.iter().position(|c| *c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get(id.checked_sub(1)? as usize)
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.get(id) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = t.type_ref,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous struct/union
    /// members as C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Option<usize> {
        for &id in self.by_name.get(strukt)? {
            if let Some(bits) = self.find(id, member, 0) {
                return Some(bits as usize / 8);
            }
        }
        None
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let t = self.get(id)?;
        for &(name, ty, off) in &t.members {
            let bits = if t.kind_flag { off & 0xff_ffff } else { off };
            let n = self.name(name);
            if n == member {
                return Some(bits);
            }
            if n.is_empty() {
                let inner = self.resolve(ty);
                if matches!(
                    self.get(inner).map(|t| t.kind),
                    Some(KIND_STRUCT | KIND_UNION)
                ) {
                    if let Some(o) = self.find(inner, member, depth + 1) {
                        return Some(bits + o);
                    }
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
    }
}
