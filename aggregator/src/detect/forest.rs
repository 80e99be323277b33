//! `kind = "forest"`: streaming Half-Space Trees (Tan, Ting & Liu, IJCAI 2011), an isolation
//! forest for streams. Each tree splits a fixed random workspace in halves; a point's score is
//! how much of the recent reference window's mass lies on its path (a point in sparse space
//! reaches near-empty nodes quickly). Masses are counted over one window while the previous
//! window's counts score: constant time per sample, fixed memory, no stored points.
//!
//! Input: one series as a shingle of its last 4 values, or several of one host's series at
//! once (`series = ["cpu.busy", "memory.used", "disk.util_pct"]`), each standardised by a
//! robust running scaler. The raw score (log of the mass deficit) goes through the same
//! calibration as `anomaly`, so the threshold is a probability here too.

use super::anomaly::{calibrated, Calibrator};
use super::detectors::{Resolution, Severity, Verdict};
use super::rng::Rng;

pub const TREES: usize = 16;
pub const DEPTH: usize = 7;
/// Reference window (samples).
pub const WINDOW: u32 = 128;
pub const SHINGLE: usize = 4;
const NODES: usize = (1 << (DEPTH + 1)) - 1;
const INNER: usize = (1 << DEPTH) - 1;

/// Robust running standardiser of one input.
#[derive(Debug, Clone, Default)]
struct Scaler {
    n: u32,
    level: f64,
    scale: f64,
    res: Resolution,
}

impl Scaler {
    /// Returns the value mapped into [0, 1] (z in [-8, 8]: room for the trees' halvings to
    /// separate an outlier from the bulk within 3 sigma).
    fn map(&mut self, v: f64) -> f32 {
        if self.n == 0 {
            self.level = v;
        }
        // The floor from the resolution known before this sample (as in anomaly's scorer).
        let floor = self.res.floor(self.level, v);
        self.res.see(v);
        self.n += 1;
        let a = if self.n < 50 {
            1.0 / self.n as f64
        } else {
            0.01
        };
        let sigma = (1.25 * self.scale).max(floor);
        let r = v - self.level;
        let z = r / sigma;
        let rc = r.clamp(-3.0 * sigma, 3.0 * sigma);
        self.level += a * rc;
        self.scale += a * (rc.abs() - self.scale);
        ((z.clamp(-8.0, 8.0) + 8.0) / 16.0) as f32
    }
}

#[derive(Debug, Clone)]
pub struct Forest {
    pub threshold: f64,
    pub severity: Severity,
    dims: usize,
    /// Per tree, per inner node: split dimension and value.
    split_dim: Vec<u8>,
    split_at: Vec<f32>,
    /// Per tree, per node: reference and latest masses.
    reference: Vec<u16>,
    latest: Vec<u16>,
    scalers: Vec<Scaler>,
    shingle: Vec<f32>,
    seen: u32,
    cal: Calibrator,
    run: u32,
}

impl Forest {
    /// `inputs` series (1: shingled; more: one dimension each); `seed` fixes the trees.
    pub fn new(threshold: f64, severity: Severity, inputs: usize, seed: u64) -> Forest {
        let dims = if inputs <= 1 { SHINGLE } else { inputs.min(64) };
        let mut rng = Rng::new(seed);
        let mut split_dim = vec![0u8; TREES * INNER];
        let mut split_at = vec![0f32; TREES * INNER];
        let mut lo = vec![0f64; dims];
        let mut hi = vec![0f64; dims];
        for t in 0..TREES {
            // The tree's workspace: a random box around [0, 1]^d (HS-Trees' construction).
            for q in 0..dims {
                let s = rng.uniform();
                let r = 2.0 * s.max(1.0 - s);
                lo[q] = s - r;
                hi[q] = s + r;
            }
            build(
                &mut rng,
                &mut split_dim[t * INNER..(t + 1) * INNER],
                &mut split_at[t * INNER..(t + 1) * INNER],
                0,
                &mut lo,
                &mut hi,
            );
        }
        Forest {
            threshold,
            severity,
            dims,
            split_dim,
            split_at,
            reference: vec![0; TREES * NODES],
            latest: vec![0; TREES * NODES],
            scalers: vec![Scaler::default(); inputs.max(1)],
            shingle: Vec::with_capacity(dims),
            seen: 0,
            cal: Calibrator::empty(),
            run: 0,
        }
    }

    /// One sample of a single series.
    pub fn eval(&mut self, v: f64) -> Verdict {
        if !v.is_finite() {
            return Verdict::quiet();
        }
        let x = self.scalers[0].map(v);
        if self.shingle.len() == SHINGLE {
            self.shingle.remove(0);
        }
        self.shingle.push(x);
        if self.shingle.len() < SHINGLE {
            return Verdict::quiet();
        }
        let p: [f32; SHINGLE] = self.shingle[..SHINGLE].try_into().unwrap();
        self.point(&p)
    }

    /// One sample of several series (same order as the rule's `series`).
    pub fn eval_vector(&mut self, v: &[f64]) -> Verdict {
        if v.len() != self.scalers.len() || v.iter().any(|x| !x.is_finite()) {
            return Verdict::quiet();
        }
        let mut p = [0f32; 64];
        for (i, x) in v.iter().enumerate().take(64) {
            p[i] = self.scalers[i].map(*x);
        }
        let d = self.dims;
        self.point(&p[..d])
    }

    fn point(&mut self, p: &[f32]) -> Verdict {
        let mut score = 0.0f64;
        for t in 0..TREES {
            let dims = &self.split_dim[t * INNER..(t + 1) * INNER];
            let at = &self.split_at[t * INNER..(t + 1) * INNER];
            let r = &self.reference[t * NODES..(t + 1) * NODES];
            let l = &mut self.latest[t * NODES..(t + 1) * NODES];
            let mut node = 0usize;
            let mut depth = 0usize;
            let mut scored = false;
            loop {
                l[node] = l[node].saturating_add(1);
                if !scored && (depth == DEPTH || (r[node] as u32) * 10 < WINDOW) {
                    // Geometric mean over trees (log mass): one tree whose split happens to
                    // keep the outlier with the bulk does not mask the others.
                    score += (1.0 + r[node] as f64 * (1u64 << depth) as f64).ln();
                    scored = true;
                }
                if depth == DEPTH {
                    break;
                }
                let go_right = p[dims[node] as usize] >= at[node];
                node = 2 * node + 1 + go_right as usize;
                depth += 1;
            }
        }
        self.seen += 1;
        if self.seen.is_multiple_of(WINDOW) {
            std::mem::swap(&mut self.reference, &mut self.latest);
            self.latest.iter_mut().for_each(|m| *m = 0);
        }
        if self.seen <= WINDOW {
            return Verdict::quiet();
        }
        // The raw score is the mean log-mass deficit against the largest possible mass.
        let top = (1.0 + WINDOW as f64 * (1u64 << DEPTH) as f64).ln();
        let raw = (top - score / TREES as f64).max(0.0);
        let s = calibrated(&mut self.cal, raw, self.threshold, &mut self.run);
        if self.seen <= 3 * WINDOW {
            return Verdict::quiet();
        }
        Verdict {
            breach: (s >= self.threshold).then_some(self.severity),
            score: s,
            norm: s,
            threshold: Some(self.threshold),
        }
    }

    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Forest>()
            + self.split_dim.capacity()
            + self.split_at.capacity() * 4
            + (self.reference.capacity() + self.latest.capacity()) * 2
            + self.scalers.capacity() * std::mem::size_of::<Scaler>()
            + self.shingle.capacity() * 4
    }
}

fn build(
    rng: &mut Rng,
    dim: &mut [u8],
    at: &mut [f32],
    node: usize,
    lo: &mut [f64],
    hi: &mut [f64],
) {
    if node >= INNER {
        return;
    }
    let q = rng.below(lo.len());
    let mid = 0.5 * (lo[q] + hi[q]);
    dim[node] = q as u8;
    at[node] = mid as f32;
    let h = hi[q];
    hi[q] = mid;
    build(rng, dim, at, 2 * node + 1, lo, hi);
    hi[q] = h;
    let l = lo[q];
    lo[q] = mid;
    build(rng, dim, at, 2 * node + 2, lo, hi);
    lo[q] = l;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolates_a_spike_and_stays_quiet_on_noise() {
        let mut rng = Rng::new(1);
        let mut f = Forest::new(0.999, Severity::Warning, 1, 42);
        let mut alerts = Vec::new();
        for i in 0..6000 {
            let v = 10.0 + rng.normal() + if i == 5000 { 15.0 } else { 0.0 };
            if f.eval(v).breach.is_some() {
                alerts.push(i);
            }
        }
        assert!(alerts.contains(&5000), "{alerts:?}");
        // About 0.1 % of 5600 scored samples on noise, and the spike's shingle.
        assert!(alerts.len() <= 25, "{} alerts: {alerts:?}", alerts.len());
    }

    #[test]
    fn finds_what_no_single_series_shows() {
        // Two series that move together; then each stays within its usual range but they
        // move apart.
        let mut rng = Rng::new(2);
        let mut f = Forest::new(0.999, Severity::Warning, 2, 7);
        let mut hit = false;
        let mut false_alerts = 0;
        for i in 0..5000 {
            let a = rng.normal();
            let (x, y) = if i < 4800 {
                (a, a + 0.1 * rng.normal())
            } else {
                (2.5, -2.5)
            };
            let b = f.eval_vector(&[x, y]).breach.is_some();
            if i >= 4800 && b {
                hit = true;
            }
            if i < 4800 && b {
                false_alerts += 1;
            }
        }
        assert!(hit);
        // ~0.1-0.4 % of the ~4400 scored normal samples.
        assert!(false_alerts <= 25, "{false_alerts}");
    }

    #[test]
    fn constant_input_is_quiet_and_state_is_bounded() {
        let mut f = Forest::new(0.99, Severity::Warning, 3, 1);
        for _ in 0..3000 {
            assert!(f.eval_vector(&[1.0, 2.0, 3.0]).breach.is_none());
        }
        assert!(f.state_bytes() < 40 * 1024, "{}", f.state_bytes());
    }
}
