//! /proc/net/snmp and /proc/net/netstat: TCP and UDP protocol counters.

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

/// From the `TcpExt:` lines of /proc/net/netstat.
const TCP_EXT: [&[u8]; 2] = [b"ListenOverflows", b"ListenDrops"];
const N: usize = 15 + TCP_EXT.len();

pub struct Tcp {
    snmp: ProcFile,
    netstat: ProcFile,
    prev: [u64; N],
}

/// Fills `cur[base + i]` from header/value line pairs whose header starts with `prefix`
/// ("Tcp: Name Name ..." then "Tcp: 1 2 ...").
fn pairs(buf: &[u8], sections: &[(&[u8], &[&[u8]], usize)], cur: &mut [u64; N]) {
    let mut it = lines(buf);
    while let (Some(h), Some(v)) = (it.next(), it.next()) {
        let Some(&(_, names, base)) = sections.iter().find(|s| h.starts_with(s.0)) else {
            continue;
        };
        for (name, val) in fields(h).zip(fields(v)).skip(1) {
            if let Some(i) = names.iter().position(|n| *n == name) {
                cur[base + i] = parse_u64(val);
            }
        }
    }
}

impl Tcp {
    pub fn new(proc: &str) -> Self {
        Tcp {
            snmp: ProcFile::new(format!("{proc}/net/snmp")),
            netstat: ProcFile::new(format!("{proc}/net/netstat")),
            prev: [0; N],
        }
    }

    pub fn collect(&mut self, secs: Option<f64>, t: &mut TcpRec) -> std::io::Result<()> {
        let mut cur = [0u64; N];
        pairs(
            self.snmp.read()?,
            &[(b"Tcp:", &TCP, 0), (b"Udp:", &UDP, 10)],
            &mut cur,
        );
        // Absent in some containers: the columns stay 0.
        if let Ok(buf) = self.netstat.read() {
            pairs(buf, &[(b"TcpExt:", &TCP_EXT, 15)], &mut cur);
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
            t.listen_overflows_per_s = r(15);
            t.listen_drops_per_s = r(16);
        }
        t.curr_estab = cur[9] as u32;
        self.prev = cur;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, retrans: u64, overflows: u64, drops: u64) {
        std::fs::create_dir_all(dir.join("net")).unwrap();
        std::fs::write(
            dir.join("net/snmp"),
            format!(
                "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm RetransSegs CurrEstab\nTcp: 1 {retrans} 7\n\
                 Udp: InDatagrams NoPorts\nUdp: 10 0\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("net/netstat"),
            format!(
                "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\nTcpExt: 0 {overflows} {drops} 5\n\
                 IpExt: InNoRoutes\nIpExt: 0\n"
            ),
        )
        .unwrap();
    }

    #[test]
    fn snmp_and_netstat_rates() {
        let dir = std::env::temp_dir().join(format!("sonde-tcp-{}", std::process::id()));
        write(&dir, 100, 3, 4);
        let mut t = Tcp::new(dir.to_str().unwrap());
        let mut r = TcpRec::default();
        t.collect(None, &mut r).unwrap();
        write(&dir, 110, 13, 24);
        t.collect(Some(2.0), &mut r).unwrap();
        assert_eq!(r.retrans_segs_per_s, 5.0);
        assert_eq!(r.curr_estab, 7);
        assert_eq!(r.listen_overflows_per_s, 5.0);
        assert_eq!(r.listen_drops_per_s, 10.0);
        // No netstat (some containers): the snmp counters still come, these stay 0.
        std::fs::remove_file(dir.join("net/netstat")).unwrap();
        let mut t = Tcp::new(dir.to_str().unwrap());
        t.collect(None, &mut r).unwrap();
        t.collect(Some(1.0), &mut r).unwrap();
        assert_eq!(r.listen_overflows_per_s, 0.0);
        std::fs::remove_dir_all(dir).ok();
    }
}
