//! Include/exclude filters with shell-style globs (`*`, `?`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filter {
    /// If non-empty, only names matching one of these globs are collected.
    pub include: Vec<String>,
    /// Names matching one of these globs are never collected.
    pub exclude: Vec<String>,
}

impl Filter {
    pub fn new(include: &[&str], exclude: &[&str]) -> Self {
        Filter {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn allows(&self, name: &str) -> bool {
        let n = name.as_bytes();
        (self.include.is_empty() || self.include.iter().any(|g| glob(g.as_bytes(), n)))
            && !self.exclude.iter().any(|g| glob(g.as_bytes(), n))
    }
}

pub fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"loop*", b"loop0"));
        assert!(!glob(b"loop*", b"vda"));
        assert!(glob(b"*", b""));
        assert!(glob(b"sd?", b"sda"));
        assert!(!glob(b"sd?", b"sda1"));
        assert!(glob(b"*eth*", b"veth12"));
        assert!(glob(b"/var/*/x", b"/var/lib/docker/x"));
    }

    #[test]
    fn include_exclude() {
        let f = Filter::new(&["eth*", "lo"], &["eth9"]);
        assert!(f.allows("eth0"));
        assert!(f.allows("lo"));
        assert!(!f.allows("eth9"));
        assert!(!f.allows("wlan0"));
        assert!(Filter::default().allows("anything"));
    }
}
