//! /proc/net/dev: per interface rates.

use crate::filter::Filter;
use crate::procfile::{fields, lines, parse_u64, rate, set_str, slot, ProcFile};
use protocol::NetRec;

struct Iface {
    name: String,
    allowed: bool,
    prev: [u64; 16],
    seen: bool,
}

pub struct Net {
    dev: ProcFile,
    filter: Filter,
    ifaces: Vec<Iface>,
}

impl Net {
    pub fn new(proc: &str, filter: Filter) -> Self {
        Net {
            dev: ProcFile::new(format!("{proc}/net/dev")),
            filter,
            ifaces: Vec::new(),
        }
    }

    pub fn collect(&mut self, secs: Option<f64>, out: &mut Vec<NetRec>) -> std::io::Result<()> {
        let buf = self.dev.read()?;
        for i in &mut self.ifaces {
            i.seen = false;
        }
        let mut n = 0;
        for line in lines(buf).skip(2) {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let name = fields(&line[..colon]).next().unwrap_or_default();
            let mut cur = [0u64; 16];
            for (i, v) in fields(&line[colon + 1..]).take(16).enumerate() {
                cur[i] = parse_u64(v);
            }
            let idx = match self.ifaces.iter().position(|i| i.name.as_bytes() == name) {
                Some(i) => i,
                None => {
                    let name = String::from_utf8_lossy(name).into_owned();
                    let allowed = self.filter.allows(&name);
                    self.ifaces.push(Iface {
                        name,
                        allowed,
                        prev: cur,
                        seen: false,
                    });
                    self.ifaces.len() - 1
                }
            };
            let it = &mut self.ifaces[idx];
            it.seen = true;
            if it.allowed {
                if let Some(s) = secs {
                    let (p, r) = (&it.prev, slot(out, n));
                    set_str(&mut r.interface, it.name.as_bytes());
                    // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
                    r.rx_bytes_per_s = rate(p[0], cur[0], s);
                    r.rx_packets_per_s = rate(p[1], cur[1], s);
                    r.rx_errors_per_s = rate(p[2], cur[2], s);
                    r.rx_drops_per_s = rate(p[3], cur[3], s);
                    r.tx_bytes_per_s = rate(p[8], cur[8], s);
                    r.tx_packets_per_s = rate(p[9], cur[9], s);
                    r.tx_errors_per_s = rate(p[10], cur[10], s);
                    r.tx_drops_per_s = rate(p[11], cur[11], s);
                    n += 1;
                }
            }
            it.prev = cur;
        }
        out.truncate(n);
        self.ifaces.retain(|i| i.seen);
        Ok(())
    }
}
