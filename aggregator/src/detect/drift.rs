//! `kind = "drift"`: the distribution of the recent window against a reference window just
//! before it (two-sample Kolmogorov–Smirnov, ties handled), for slow changes in which no
//! single point looks odd. Evaluated every `STEP` samples (the verdict holds in between);
//! a drift also needs a material effect (the median moved by more than the reference's
//! spread, or the spread changed by more than 2x), so a shift by one quantum of a flat
//! series is not a drift.

use super::detectors::{Resolution, Severity, Verdict};
use std::collections::VecDeque;

pub const REFERENCE: usize = 240;
pub const RECENT: usize = 60;
const STEP: u32 = 10;

#[derive(Debug, Clone)]
pub struct Drift {
    pub threshold: f64,
    pub severity: Severity,
    values: VecDeque<f64>,
    res: Resolution,
    n: u32,
    last: Verdict,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// The KS statistic of two sorted samples.
pub fn ks(a: &[f64], b: &[f64]) -> f64 {
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

impl Drift {
    pub fn new(threshold: f64, severity: Severity) -> Drift {
        Drift {
            threshold,
            severity,
            values: VecDeque::with_capacity(REFERENCE + RECENT),
            res: Resolution::default(),
            n: 0,
            last: Verdict::quiet(),
        }
    }

    pub fn eval(&mut self, v: f64) -> Verdict {
        if !v.is_finite() {
            return self.last;
        }
        self.res.see(v);
        if self.values.len() == REFERENCE + RECENT {
            self.values.pop_front();
        }
        self.values.push_back(v);
        self.n = self.n.wrapping_add(1);
        if self.values.len() < REFERENCE + RECENT || !self.n.is_multiple_of(STEP) {
            return self.last;
        }
        let mut r: Vec<f64> = self.values.iter().take(REFERENCE).copied().collect();
        let mut c: Vec<f64> = self.values.iter().skip(REFERENCE).copied().collect();
        let cmp = |a: &f64, b: &f64| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal);
        r.sort_unstable_by(cmp);
        c.sort_unstable_by(cmp);
        let d = ks(&r, &c);
        let q = self.res.step();
        let spread = |s: &[f64]| (quantile(s, 0.75) - quantile(s, 0.25)).max(2.0 * q);
        let (sr, sc) = (spread(&r), spread(&c));
        let moved = (quantile(&c, 0.5) - quantile(&r, 0.5)).abs() > sr.max(1e-300);
        let rescaled = sr > 0.0 && (sc / sr > 2.0 || sc / sr < 0.5);
        let material = moved || rescaled;
        self.last = Verdict {
            breach: (material && d >= self.threshold).then_some(self.severity),
            score: d,
            norm: d,
            threshold: Some(self.threshold),
        };
        self.last
    }

    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Drift>() + self.values.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::rng::Rng;

    #[test]
    fn ks_of_equal_and_disjoint_samples() {
        assert_eq!(ks(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(ks(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        // Ties across samples.
        assert!((ks(&[1.0, 1.0, 2.0, 2.0], &[1.0, 2.0, 2.0, 2.0]) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn finds_a_slow_drift_and_not_noise() {
        let mut rng = Rng::new(9);
        let mut d = Drift::new(0.6, Severity::Warning);
        let mut first = None;
        let mut before = 0;
        for i in 0..3000 {
            // Flat noise, then the level creeps up by 6 sigma over 300 samples.
            let drift = if i >= 2000 {
                ((i - 2000) as f64 / 50.0).min(6.0)
            } else {
                0.0
            };
            let b = d.eval(5.0 + rng.normal() + drift).breach.is_some();
            if i < 2000 && b {
                before += 1;
            }
            if i >= 2000 && b && first.is_none() {
                first = Some(i);
            }
        }
        assert_eq!(before, 0);
        assert!(first.is_some_and(|f| f < 2300), "{first:?}");
    }

    #[test]
    fn constant_series_is_no_drift() {
        let mut d = Drift::new(0.5, Severity::Warning);
        assert!((0..2000).all(|_| d.eval(7.0).breach.is_none()));
    }

    #[test]
    fn a_one_quantum_step_of_a_flat_series_is_no_drift() {
        let mut d = Drift::new(0.5, Severity::Warning);
        for i in 0..1000 {
            let v = if i < 600 { 10.0 } else { 10.5 };
            let _ = d.eval(if i % 100 == 0 { v + 0.5 } else { v });
        }
        // Moved by one quantum (0.5) = 1x the floor of the spread (2 quanta): not material.
        assert!(d.eval(10.5).breach.is_none());
    }
}
