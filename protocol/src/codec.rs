//! Primitive encoding: LEB128 varints, little-endian floats, bounded strings
//! and lists. `Reader` never allocates more than the input could possibly hold.

use crate::{Error, Limits, Result};

pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

pub trait Decode: Sized {
    fn decode(r: &mut Reader<'_>) -> Result<Self>;
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    pub limits: Limits,
    /// The wire version of what is read (from the frame header; records are
    /// length-delimited from version 2 on).
    pub version: u8,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], limits: Limits) -> Self {
        Reader {
            buf,
            pos: 0,
            limits,
            version: crate::VERSION,
        }
    }

    /// Reads data written in wire version `version` (see `tables.rs`).
    pub fn with_version(mut self, version: u8) -> Self {
        self.version = version;
        self
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// What is left to read, without reading it.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::Truncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn varint(&mut self) -> Result<u64> {
        let start = self.pos;
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let part = (b & 0x7f) as u64;
            if shift == 63 && part > 1 {
                return Err(Error::VarintOverflow(start));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::VarintOverflow(start))
    }

    pub fn f32(&mut self) -> Result<f32> {
        let b = self.bytes(4)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A list count, checked against `max` and against the bytes left
    /// (each element takes at least `min_elem_bytes`), before any allocation.
    pub fn count(&mut self, what: &'static str, max: u64, min_elem_bytes: usize) -> Result<usize> {
        let n = self.varint()?;
        if n > max {
            return Err(Error::CountTooLarge {
                what,
                count: n,
                max,
            });
        }
        let need = (n as usize).saturating_mul(min_elem_bytes.max(1));
        if need > self.remaining() {
            return Err(Error::Truncated {
                offset: self.pos,
                needed: need - self.remaining(),
            });
        }
        Ok(n as usize)
    }

    pub fn string(&mut self, what: &'static str) -> Result<String> {
        let len = self.varint()?;
        if len > self.limits.max_string {
            return Err(Error::StringTooLong {
                what,
                len,
                max: self.limits.max_string,
            });
        }
        let b = self.bytes(len as usize)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| Error::BadUtf8 { what })
    }

    pub fn list<T: Decode>(&mut self, what: &'static str, min_elem_bytes: usize) -> Result<Vec<T>> {
        let n = self.count(what, self.limits.max_items, min_elem_bytes)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::decode(self)?);
        }
        Ok(v)
    }
}

impl Encode for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, *self);
    }
}
impl Decode for u64 {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        r.varint()
    }
}
impl Encode for u32 {
    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, *self as u64);
    }
}
impl Decode for u32 {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let v = r.varint()?;
        u32::try_from(v).map_err(|_| Error::InvalidValue {
            what: "u32",
            value: v,
        })
    }
}
impl Encode for f32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl Decode for f32 {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        r.f32()
    }
}
impl Encode for String {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, self);
    }
}
impl Decode for String {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        r.string("string")
    }
}
impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.len() as u64);
        for x in self {
            x.encode(out);
        }
    }
}
impl<T: Decode> Decode for Vec<T> {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        r.list("list", 1)
    }
}
impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(x) => {
                out.push(1);
                x.encode(out)
            }
        }
    }
}
impl<T: Decode> Decode for Option<T> {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        match r.u8()? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(r)?)),
            v => Err(Error::InvalidValue {
                what: "option tag",
                value: v as u64,
            }),
        }
    }
}

/// Declares a plain record struct whose fields are encoded in order.
#[macro_export]
macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        impl $crate::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) { $($crate::Encode::encode(&self.$f, out);)* }
        }
        impl $crate::Decode for $name {
            fn decode(r: &mut $crate::Reader<'_>) -> $crate::Result<Self> {
                Ok($name { $($f: $crate::Decode::decode(r)?),* })
            }
        }
    };
}
