//! /proc/net/snmp: TCP and UDP protocol counters.

use crate::procfile::{fields, lines, parse_u64, rate, ProcFile};
use protocol::TcpRec;

const TCP: [&[u8]; 10] = [
    b"RetransSegs",
    b"ActiveOpens",
    b"PassiveOpens",
    b"AttemptFails",
    b"EstabResets",
    b"OutRsts",
    b"InErrs",
    b"InSegs",
    b"OutSegs",
    b"CurrEstab",
];
const UDP: [&[u8]; 5] = [
    b"InDatagrams",
    b"OutDatagrams",
    b"InErrors",
    b"RcvbufErrors",
    b"NoPorts",
];

pub struct Tcp {
    snmp: ProcFile,
    prev: [u64; 15],
}

impl Tcp {
    pub fn new(proc: &str) -> Self {
        Tcp {
            snmp: ProcFile::new(format!("{proc}/net/snmp")),
            prev: [0; 15],
        }
    }

    pub fn collect(&mut self, secs: Option<f64>, t: &mut TcpRec) -> std::io::Result<()> {
        let buf = self.snmp.read()?;
        let mut cur = [0u64; 15];
        let mut it = lines(buf);
        // Lines come in pairs: "Tcp: Name Name ..." then "Tcp: 1 2 ...".
        while let (Some(h), Some(v)) = (it.next(), it.next()) {
            let (names, base): (&[&[u8]], usize) = if h.starts_with(b"Tcp:") {
                (&TCP, 0)
            } else if h.starts_with(b"Udp:") {
                (&UDP, 10)
            } else {
                continue;
            };
            for (name, val) in fields(h).zip(fields(v)).skip(1) {
                if let Some(i) = names.iter().position(|n| *n == name) {
                    cur[base + i] = parse_u64(val);
                }
            }
        }
        if let Some(s) = secs {
            let r = |i: usize| rate(self.prev[i], cur[i], s);
            t.retrans_segs_per_s = r(0);
            t.active_opens_per_s = r(1);
            t.passive_opens_per_s = r(2);
            t.attempt_fails_per_s = r(3);
            t.estab_resets_per_s = r(4);
            t.out_rsts_per_s = r(5);
            t.in_errs_per_s = r(6);
            t.in_segs_per_s = r(7);
            t.out_segs_per_s = r(8);
            t.udp_in_datagrams_per_s = r(10);
            t.udp_out_datagrams_per_s = r(11);
            t.udp_in_errors_per_s = r(12);
            t.udp_rcvbuf_errors_per_s = r(13);
            t.udp_no_ports_per_s = r(14);
        }
        t.curr_estab = cur[9] as u32;
        self.prev = cur;
        Ok(())
    }
}
