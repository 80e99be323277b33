//! TCP (programs `tcp_retransmit_skb`, `tcp_send_reset`, `tcp_receive_reset` in
//! sensor-ebpf): retransmitted segments and resets per host, retransmits per remote port.

use super::{spec, Probes, ProgSpec};
use protocol::{PortRec, ProbeRec};
use sensor_common::counter;

pub(super) const PROGRAMS: &[ProgSpec] = &[
    spec(
        "tcp_retransmit_skb",
        "tcp",
        "tcp_retransmit_skb",
        &[("skbaddr", 8, 8), ("dport", 30, 2), ("err", 76, 4)],
    ),
    spec("tcp_send_reset", "tcp", "tcp_send_reset", &[]),
    spec("tcp_receive_reset", "tcp", "tcp_receive_reset", &[]),
];

/// This probe's share of the per-host counters.
pub(super) fn counters(p: &mut ProbeRec, rate: impl Fn(u32) -> f32) {
    p.retransmits_per_s = rate(counter::TCP_RETRANS);
    p.resets_sent_per_s = rate(counter::TCP_RST_SENT);
    p.resets_received_per_s = rate(counter::TCP_RST_RECV);
}

impl Probes {
    /// Ports with retransmits in the interval.
    pub(super) fn collect_ports(&mut self, secs: Option<f64>, ports: &mut Vec<PortRec>) {
        // Retransmits per remote port.
        let mut nports = 0;
        if let Some(m) = self.ports.as_mut() {
            let mut key = 0u32;
            let mut next = 0u32;
            let mut first = true;
            let mut val = [0u64; 1];
            let mut count = 0;
            loop {
                let prev_ptr = if first {
                    None
                } else {
                    Some(&key as *const u32 as *const u8)
                };
                match m.next_key(prev_ptr, &mut next as *mut u32 as *mut u8) {
                    Ok(true) => {}
                    _ => break,
                }
                first = false;
                key = next;
                count += 1;
                if let Ok(true) = m.sum_into(&key as *const u32 as *const u8, &mut val) {
                    let prev = self.port_prev.insert(key, val[0]).unwrap_or(0);
                    let dv = val[0].saturating_sub(prev);
                    if dv > 0 && self.primed && secs.is_some() {
                        if nports == ports.len() {
                            ports.push(PortRec::default());
                        }
                        ports[nports] = PortRec {
                            port: key,
                            retransmits: dv as u32,
                        };
                        nports += 1;
                    }
                }
            }
            // Keep the map well under its 1024 entries: clear it when it fills up.
            if count > 768 {
                let keys: Vec<u32> = self.port_prev.keys().copied().collect();
                for k in keys {
                    m.delete(&k as *const u32 as *const u8);
                }
                self.port_prev.clear();
            }
        }
        ports.truncate(nports);
    }
}
