//! Re-readable /proc files: the file stays open and is re-read with `pread`
//! at offset 0 into a buffer that keeps its capacity, so a steady-state
//! collection costs one syscall per file and no allocation.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub struct ProcFile {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
}

impl ProcFile {
    pub fn new(path: impl AsRef<Path>) -> Self {
        ProcFile {
            path: path.as_ref().to_path_buf(),
            file: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Reads the whole file; returns its contents.
    pub fn read(&mut self) -> io::Result<&[u8]> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        let f = self.file.as_ref().unwrap();
        let mut len = 0;
        loop {
            if self.buf.len() < len + 4096 {
                self.buf.resize((len + 4096).max(self.buf.len() * 2), 0);
            }
            match f.read_at(&mut self.buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.file = None;
                    return Err(e);
                }
            }
        }
        Ok(&self.buf[..len])
    }
}

/// Whitespace-separated fields of a line.
pub fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| *b == b' ' || *b == b'\t')
        .filter(|f| !f.is_empty())
}

pub fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.split(|b| *b == b'\n').filter(|l| !l.is_empty())
}

pub fn parse_u64(f: &[u8]) -> u64 {
    let mut v: u64 = 0;
    for &b in f {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.wrapping_mul(10).wrapping_add((b - b'0') as u64);
    }
    v
}

pub fn parse_f32(f: &[u8]) -> f32 {
    std::str::from_utf8(f)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// Per-second rate of a monotonically increasing counter. A counter that
/// went backwards either wrapped at 32 bits (the delta is then small and
/// plausible) or was reset (the device reappeared, a module reloaded): the
/// new value is then the increase since the reset.
pub fn rate(prev: u64, cur: u64, secs: f64) -> f32 {
    if secs <= 0.0 {
        return 0.0;
    }
    // In f64, then rounded once: exactly what the wire encoding recomputes from the
    // integer increase (`protocol/src/columnar.rs`), so the rate travels as that integer.
    (counter_delta(prev, cur) as f64 / secs) as f32
}

pub fn counter_delta(prev: u64, cur: u64) -> u64 {
    if cur >= prev {
        cur - prev
    } else if prev <= u32::MAX as u64 {
        let wrapped = (u32::MAX as u64 - prev) + cur + 1;
        if wrapped < (1 << 28) {
            wrapped
        } else {
            cur
        }
    } else {
        cur
    }
}

/// Copies `src` into `dst` without allocating when `dst` has the capacity.
pub fn set_str(dst: &mut String, src: &[u8]) {
    if dst.as_bytes() != src {
        dst.clear();
        dst.push_str(&String::from_utf8_lossy(src));
    }
}

/// Returns the `i`-th element of `v`, appending a default one if needed:
/// records keep their allocations from one collection to the next.
pub fn slot<T: Default>(v: &mut Vec<T>, i: usize) -> &mut T {
    if i == v.len() {
        v.push(T::default());
    }
    &mut v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_wrap_and_reset() {
        assert_eq!(counter_delta(10, 15), 5);
        assert_eq!(counter_delta(u32::MAX as u64 - 4, 5), 10); // 32-bit wrap
        assert_eq!(counter_delta(3_000_000_000, 100), 100); // reset, not a 1.3e9 wrap
        assert_eq!(counter_delta(1 << 40, 7), 7); // 64-bit counter reset
        assert_eq!(rate(0, 500, 0.5), 1000.0);
        assert_eq!(rate(0, 500, 0.0), 0.0);
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_u64(b"12345"), 12345);
        assert_eq!(parse_u64(b"12kB"), 12);
        assert_eq!(parse_f32(b"1.25"), 1.25);
        let v: Vec<_> = fields(b"  a  b\tc ").collect();
        assert_eq!(v, vec![&b"a"[..], b"b", b"c"]);
    }

    #[test]
    fn procfile_rereads() {
        let dir = std::env::temp_dir().join(format!("sonde-pf-{}", std::process::id()));
        std::fs::write(&dir, vec![b'x'; 10000]).unwrap();
        let mut f = ProcFile::new(&dir);
        assert_eq!(f.read().unwrap().len(), 10000);
        std::fs::write(&dir, b"short").unwrap();
        assert_eq!(f.read().unwrap(), b"short");
        std::fs::remove_file(&dir).unwrap();
    }
}
