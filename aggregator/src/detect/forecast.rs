//! `kind = "forecast"`: time until a series reaches a limit ("filesystem /var full in
//! 3 h 10 m"), from a robust trend (Theil–Sen: the median of pairwise slopes, which a burst or
//! a deleted file does not swing) over the last `window`. The window is kept as up to
//! `POINTS` slot points (the last value of each slot of `window / POINTS`), so memory is
//! fixed and the fit runs once per slot, not per sample.

use super::detectors::{Severity, Verdict};
use std::collections::VecDeque;

pub const POINTS: usize = 60;
/// Fewest points for a fit.
const MIN_POINTS: usize = 8;

#[derive(Debug, Clone)]
pub struct Forecast {
    pub limit: f64,
    /// Towards a higher limit (filling) or a lower one (draining, e.g. available bytes).
    pub above: bool,
    pub within_s: f64,
    pub window_ms: u64,
    pub severity: Severity,
    /// (slot start ms, time of the last sample in it (s), value)
    points: VecDeque<(u64, f64, f64)>,
    /// The fit: (slope per s, intercept at t0 (s), t0)
    fit: Option<(f64, f64)>,
    last: Verdict,
}

impl Forecast {
    pub fn new(limit: f64, above: bool, within_s: f64, window_ms: u64, severity: Severity) -> Self {
        Forecast {
            limit,
            above,
            within_s,
            window_ms: window_ms.max(POINTS as u64 * 1000),
            severity,
            points: VecDeque::with_capacity(POINTS + 1),
            fit: None,
            last: Verdict::quiet(),
        }
    }

    fn refit(&mut self) {
        thread_local! {
            // Pairwise slopes, shared by every series on this thread (the fit runs once per
            // slot, not per sample): no per-series scratch memory.
            static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let n = self.points.len();
        if n < MIN_POINTS {
            self.fit = None;
            return;
        }
        self.fit = SCRATCH.with(|s| {
            let mut slopes = s.borrow_mut();
            slopes.clear();
            for i in 0..n {
                for j in i + 1..n {
                    let (_, ti, vi) = self.points[i];
                    let (_, tj, vj) = self.points[j];
                    if tj > ti {
                        slopes.push((vj - vi) / (tj - ti));
                    }
                }
            }
            if slopes.is_empty() {
                return None;
            }
            let mid = slopes.len() / 2;
            let cmp = |a: &f64, b: &f64| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal);
            let (_, &mut slope, _) = slopes.select_nth_unstable_by(mid, cmp);
            // Intercept: median of v - slope * t.
            slopes.clear();
            slopes.extend(self.points.iter().map(|&(_, t, v)| v - slope * t));
            let m = slopes.len() / 2;
            let (_, &mut icpt, _) = slopes.select_nth_unstable_by(m, cmp);
            Some((slope, icpt))
        });
    }

    /// Seconds until the trend reaches the limit from the sample at `t` (None: never).
    fn eta(&self, t: f64, v: f64) -> Option<f64> {
        let (slope, icpt) = self.fit?;
        let towards = if self.above { slope } else { -slope };
        let reached = if self.above {
            v >= self.limit
        } else {
            v <= self.limit
        };
        if reached {
            return Some(0.0);
        }
        if towards <= 0.0 {
            return None;
        }
        // From the fitted level now (robust to the current sample's noise).
        let now = icpt + slope * t;
        let eta = (self.limit - now) / slope;
        Some(eta.max(0.0))
    }

    pub fn eval(&mut self, ts_ms: u64, v: f64) -> Verdict {
        if !v.is_finite() {
            return self.last;
        }
        let slot_ms = self.window_ms / POINTS as u64;
        let slot = ts_ms - ts_ms % slot_ms.max(1);
        let t = ts_ms as f64 / 1000.0;
        match self.points.back_mut() {
            Some(p) if p.0 == slot => {
                p.1 = t;
                p.2 = v;
            }
            _ => {
                // A slot closed: fit on the closed slots plus this first sample of the new one.
                self.points.push_back((slot, t, v));
                while self
                    .points
                    .front()
                    .is_some_and(|p| p.0 + self.window_ms < slot)
                {
                    self.points.pop_front();
                }
                while self.points.len() > POINTS {
                    self.points.pop_front();
                }
                self.refit();
            }
        }
        let eta = self.eta(t, v);
        self.last = Verdict {
            breach: eta.filter(|&e| e <= self.within_s).map(|_| self.severity),
            // The score is the predicted time to the limit in seconds (-1: not approaching).
            score: eta.unwrap_or(-1.0),
            norm: match eta {
                Some(e) => self.within_s / (self.within_s + e),
                None => 0.0,
            },
            threshold: Some(self.limit),
        };
        self.last
    }

    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Forecast>() + self.points.capacity() * 24
    }

    /// The current fit: (slope per second, value at t = 0 s), None before enough points.
    pub fn trend(&self) -> Option<(f64, f64)> {
        self.fit
    }
}

/// "3 h 10 m", "12 m", "45 s".
pub fn human_eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    let (d, h, m) = (s / 86400, s % 86400 / 3600, s % 3600 / 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} m")
    } else if m > 0 {
        format!("{m} m")
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicts_a_filling_disk() {
        // 40 % used, +1 % per minute, 10 s samples: full (100 %) in 60 minutes.
        let mut f = Forecast::new(100.0, true, 2.0 * 3600.0, 1800 * 1000, Severity::Warning);
        let mut v = Verdict::quiet();
        let t0 = 1_700_000_000_000u64;
        for i in 0..180u64 {
            let x = 40.0 + i as f64 / 6.0 + if i % 7 == 0 { 0.3 } else { 0.0 };
            v = f.eval(t0 + i * 10_000, x);
        }
        // At i = 179: value ~69.8 %, ~30 min left.
        assert!(v.breach.is_some());
        assert!((v.score - 1810.0).abs() < 200.0, "eta {}", v.score);
        assert_eq!(human_eta(v.score).split(' ').nth(1), Some("m"));
    }

    #[test]
    fn flat_or_draining_series_never_fire_and_bursts_do_not_swing_the_trend() {
        let mut f = Forecast::new(100.0, true, 3600.0, 600 * 1000, Severity::Warning);
        let t0 = 1_700_000_000_000u64;
        for i in 0..600u64 {
            // Flat 50 % with a few big bursts (a temp file written and deleted).
            let x = if i % 100 < 3 { 90.0 } else { 50.0 };
            assert!(f.eval(t0 + i * 1000, x).breach.is_none(), "at {i}");
        }
        let mut down = Forecast::new(0.0, false, 3600.0, 600 * 1000, Severity::Warning);
        for i in 0..600u64 {
            // Available bytes growing: not approaching 0.
            assert!(down
                .eval(t0 + i * 1000, 1e9 + i as f64 * 1e6)
                .breach
                .is_none());
        }
    }
}
