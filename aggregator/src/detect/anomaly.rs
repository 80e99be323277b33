//! `kind = "anomaly"`: the default statistical detector. No parameters.
//!
//! Two stages, both O(1) per sample and a few hundred bytes per series:
//!
//! 1. **Raw score** from a robust, self-scaling view of the series: a Huber-clipped EWMA
//!    baseline and scale (so an outlier moves neither much), a scale floor from the series'
//!    own resolution (the smallest non-zero step seen) so quantized and flat series never
//!    divide by zero, and three statistics on the standardised residual `z`:
//!    a fast one (mean of the last ~3 residuals: spikes, sudden changes),
//!    a slow one (EWMA over ~20 samples, rescaled to unit variance: small sustained shifts,
//!    the same job a CUSUM does) and a variance one (EWMA of z², for bursts of volatility).
//!    The raw score is the largest of them in the rule's direction.
//! 2. **Calibration** (an "anomaly likelihood"): the tail probability of the raw score under
//!    the distribution of the series' own past raw scores, kept as an exponentially forgetting
//!    histogram with a generalised-Pareto (power-law) tail fitted beyond its 99th percentile
//!    (the peaks-over-threshold idea of extreme value theory). The score is `1 - p`, so on any stationary series the
//!    fraction of samples above `t` is about `1 - t`, whatever the series' scale or noise:
//!    one threshold means the same on every series, and a noisy series (builds every hour)
//!    learns its own heavy tail and pages no more than a calm one.
//!
//! The histogram starts from a prior (the raw scores of Gaussian noise run through stage 1)
//! so early scores are sane; samples that breach are learned with a small weight so a long
//! incident does not teach the series that it is normal before it is over (and an unusual
//! stretch teaches it at most 3 samples' worth). No breach before 300 samples.

use super::detectors::{Resolution, Severity, Verdict};
use std::sync::OnceLock;

/// Histogram bins: 8 per octave of (1 + raw), raw up to 2^16.
const BINS: usize = 128;
const PER_OCTAVE: f64 = 8.0;
/// Effective memory of the calibration (samples): counts are halved beyond twice this.
const MEMORY: f32 = 10_000.0;
/// Weight of the prior in pseudo-samples.
const PRIOR_WEIGHT: f32 = 300.0;
/// Weight with which breaching samples are learned.
const BREACH_WEIGHT: f32 = 0.02;
/// An unusual stretch (scores above `UNUSUAL`) teaches the calibration at most this many
/// samples at full weight: a long incident counts about once, not once per sample, so it
/// does not make the next incident of the same size look normal; while bursts that keep
/// recurring (builds, backups) still become normal after a few. Measured trade-off in
/// docs/DETECTION.md (1 catches more recurring incidents, 10+ pages less on recurring bursts).
const EPISODE_CAP: u32 = 3;
const UNUSUAL: f64 = 0.999;
/// Samples before the baseline is trusted (the calibration's prior covers the rest).
pub const WARMUP: u32 = 30;
/// Samples before a series may breach: its calibration must have seen some of its own
/// history, not only the Gaussian prior (5 min at 1 s; 25 h at 5 min).
pub const QUIET_SAMPLES: u32 = 300;

/// Spreads are never taken below this fraction of the series' magnitude.
pub const RELATIVE_FLOOR: f64 = 1e-4;
const ALPHA_LEVEL: f64 = 0.01;
const ALPHA_SCALE: f64 = 0.005;
const CLIP: f64 = 3.0;
const ALPHA_FAST: f64 = 0.5;
const ALPHA_SLOW: f64 = 0.1;
const ALPHA_VAR: f64 = 0.1;

fn bin_of(raw: f64) -> usize {
    let b = ((1.0 + raw.max(0.0)).log2() * PER_OCTAVE) as usize;
    b.min(BINS - 1)
}

/// Lower edge of bin `b` in raw units.
fn edge(b: usize) -> f64 {
    (b as f64 / PER_OCTAVE).exp2() - 1.0
}

/// Exponentially forgetting histogram of raw scores → calibrated tail probabilities.
#[derive(Debug, Clone)]
pub struct Calibrator {
    counts: [f32; BINS],
    total: f32,
}

impl Calibrator {
    pub fn empty() -> Self {
        Calibrator {
            counts: [0.0; BINS],
            total: 0.0,
        }
    }

    pub fn add(&mut self, raw: f64, w: f32) {
        self.counts[bin_of(raw)] += w;
        self.total += w;
        if self.total > 2.0 * MEMORY {
            for c in self.counts.iter_mut() {
                *c *= 0.5;
            }
            self.total *= 0.5;
        }
    }

    /// P(R >= raw) under the history.
    pub fn tail(&self, raw: f64) -> f64 {
        if self.total <= 0.0 {
            return 1.0;
        }
        let raw = raw.max(0.0);
        let b = bin_of(raw);
        let total = self.total as f64;
        // Mass strictly above bin b, plus the part of bin b above raw (linear within the bin).
        let above: f64 = self.counts[b + 1..].iter().map(|&c| c as f64).sum();
        let lo = edge(b);
        let hi = edge(b + 1);
        let frac = if hi > lo {
            ((hi - raw) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let empirical = (above + frac * self.counts[b] as f64) / total;
        if empirical * total >= 10.0 {
            return empirical;
        }
        // Beyond the 99th percentile, where the history has fewer than 10 samples at or above
        // `raw`: a generalised Pareto tail, fitted as an exponential tail of ln(1 + raw)
        // (P = 0.01 * ((1 + u) / (1 + raw))^(1 / mean log excess)). Bursty operational series
        // are heavy-tailed: a burst 10x larger than the last one is less surprising than a
        // light (exponential) tail would say.
        let (u, excess) = self.tail_fit();
        if raw > u {
            0.01 * (-((1.0 + raw).ln() - (1.0 + u).ln()) / excess).exp()
        } else {
            empirical
        }
    }

    /// (the 0.99 quantile u, the mean excess of ln(1 + raw) over ln(1 + u)), from the bins
    /// (uniform within a bin).
    fn tail_fit(&self) -> (f64, f64) {
        let target = self.total as f64 * 0.01;
        let mut acc = 0.0;
        let mut b = BINS;
        while b > 0 {
            b -= 1;
            let c = self.counts[b] as f64;
            if acc + c >= target && c > 0.0 {
                let needed = target - acc;
                let (lo, hi) = (edge(b), edge(b + 1));
                let u = hi - (needed / c) * (hi - lo);
                let lu = (1.0 + u).ln();
                let mut mass = needed;
                let mut sum = needed * 0.5 * ((1.0 + hi).ln() - lu);
                for (i, &ci) in self.counts.iter().enumerate().skip(b + 1) {
                    let mid = 0.5 * ((1.0 + edge(i)).ln() + (1.0 + edge(i + 1)).ln());
                    mass += ci as f64;
                    sum += ci as f64 * (mid - lu);
                }
                let excess = if mass > 0.0 { sum / mass } else { 0.0 };
                // Never lighter than the tail of Gaussian |z| on this scale (~0.1).
                return (u, excess.max(MIN_LOG_EXCESS));
            }
            acc += c;
        }
        (0.0, MIN_LOG_EXCESS)
    }
}

const MIN_LOG_EXCESS: f64 = 0.1;

/// Stage 1: the robust baseline and the raw score.
#[derive(Debug, Clone)]
pub struct RawScorer {
    n: u32,
    level: f64,
    scale: f64,
    res: Resolution,
    fast: f64,
    slow: f64,
    var: f64,
    /// Warm-up: running sums for the first samples.
    sum: f64,
    abs_dev: f64,
}

impl Default for RawScorer {
    fn default() -> Self {
        Self::new()
    }
}

impl RawScorer {
    pub fn new() -> Self {
        RawScorer {
            n: 0,
            level: 0.0,
            scale: 0.0,
            res: Resolution::default(),
            fast: 0.0,
            slow: 0.0,
            var: 1.0,
            sum: 0.0,
            abs_dev: 0.0,
        }
    }

    pub fn warm(&self) -> bool {
        self.n >= WARMUP
    }

    /// Folds `v` in and returns the signed statistics (fast, slow, variance), each roughly
    /// unit-scaled under stationary noise.
    pub fn update(&mut self, v: f64) -> (f64, f64, f64) {
        // The floor from the resolution known *before* this sample, so the first change of a
        // flat series is measured against the series, not against itself (and scores at most
        // 1 / RELATIVE_FLOOR, not 10^300).
        let floor = self.res.floor(self.level, v);
        self.res.see(v);
        self.n = self.n.saturating_add(1);
        if self.n <= WARMUP {
            // Plain running mean and mean absolute deviation to seed the baseline.
            self.sum += v;
            let mean = self.sum / self.n as f64;
            self.abs_dev += (v - mean).abs();
            self.level = mean;
            self.scale = self.abs_dev / self.n as f64;
            return (0.0, 0.0, 0.0);
        }
        let sigma = (1.25 * self.scale).max(floor);
        let r = v - self.level;
        let z = r / sigma;
        // Huber-clipped updates: an outlier moves the baseline by at most CLIP sigmas x alpha.
        let rc = r.clamp(-CLIP * sigma, CLIP * sigma);
        self.level += ALPHA_LEVEL * rc;
        self.scale += ALPHA_SCALE * (rc.abs() - self.scale);
        let zc = z.clamp(-1e6, 1e6);
        self.fast += ALPHA_FAST * (zc - self.fast);
        self.slow += ALPHA_SLOW * (zc - self.slow);
        // z² clipped at 25: one outlier is the fast statistic's business; a sustained change
        // of spread (many large residuals) is this one's.
        self.var += ALPHA_VAR * ((zc * zc).min(25.0) - self.var);
        // Unit variance under iid noise: an EWMA of unit noise has var a / (2 - a).
        let fast = self.fast / (ALPHA_FAST / (2.0 - ALPHA_FAST)).sqrt();
        let slow = self.slow / (ALPHA_SLOW / (2.0 - ALPHA_SLOW)).sqrt();
        // EWMA of chi2(1): mean 1, sd sqrt(2 a / (2 - a)).
        let var = (self.var - 1.0) / (2.0 * ALPHA_VAR / (2.0 - ALPHA_VAR)).sqrt();
        (fast, slow, var)
    }

    /// The raw score in a direction (Some(true) above, Some(false) below, None both).
    pub fn raw(stats: (f64, f64, f64), direction: Option<bool>) -> f64 {
        let (f, s, v) = stats;
        let (f, s) = match direction {
            Some(true) => (f, s),
            Some(false) => (-f, -s),
            None => (f.abs(), s.abs()),
        };
        // The fast statistic is noisier (heavier tail); the slow one is scaled up by its
        // persistence already. The variance term only counts increases.
        f.max(s).max(v * 0.5).max(0.0)
    }
}

/// The prior: raw scores of Gaussian noise through stage 1, as a histogram (computed once).
fn prior() -> &'static Calibrator {
    static P: OnceLock<Calibrator> = OnceLock::new();
    P.get_or_init(|| {
        let mut c = Calibrator::empty();
        let mut rng = super::rng::Rng::new(0x5eed);
        for dir in [None, Some(true)] {
            let mut s = RawScorer::new();
            for _ in 0..200_000 {
                let st = s.update(rng.normal());
                if s.warm() {
                    c.add(RawScorer::raw(st, dir), 1.0);
                }
            }
        }
        // Scale to PRIOR_WEIGHT pseudo-samples.
        let k = PRIOR_WEIGHT / c.total;
        for x in c.counts.iter_mut() {
            *x *= k;
        }
        c.total = PRIOR_WEIGHT;
        c
    })
}

/// The `anomaly` detector.
#[derive(Debug, Clone)]
pub struct Anomaly {
    pub threshold: f64,
    pub severity: Severity,
    pub direction: Option<bool>,
    raw: RawScorer,
    cal: Calibrator,
    run: u32,
}

impl Anomaly {
    pub fn new(threshold: f64, severity: Severity, direction: Option<bool>) -> Self {
        Anomaly {
            threshold,
            severity,
            direction,
            raw: RawScorer::new(),
            cal: prior().clone(),
            run: 0,
        }
    }

    pub fn eval(&mut self, v: f64) -> Verdict {
        if !v.is_finite() {
            return Verdict::quiet();
        }
        let stats = self.raw.update(v);
        if !self.raw.warm() {
            return Verdict::quiet();
        }
        let raw = RawScorer::raw(stats, self.direction);
        let score = calibrated(&mut self.cal, raw, self.threshold, &mut self.run);
        let settled = self.raw.n >= QUIET_SAMPLES;
        Verdict {
            breach: (settled && score >= self.threshold).then_some(self.severity),
            score,
            norm: score,
            threshold: Some(self.threshold),
        }
    }

    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Anomaly>()
    }
}

/// Scores `raw` against the history, then learns it: breaching samples, and an unusual
/// stretch beyond its first `EPISODE_CAP` samples, with a small weight (`run` counts the
/// current stretch).
pub fn calibrated(cal: &mut Calibrator, raw: f64, threshold: f64, run: &mut u32) -> f64 {
    let p = cal.tail(raw);
    let score = (1.0 - p).clamp(0.0, 1.0);
    if score >= UNUSUAL.min(threshold) {
        *run = run.saturating_add(1);
    } else {
        *run = 0;
    }
    let w = if score >= threshold || *run > EPISODE_CAP {
        BREACH_WEIGHT
    } else {
        1.0
    };
    cal.add(raw, w);
    score
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::rng::Rng;

    fn fraction_above(series: impl Iterator<Item = f64>, t: f64) -> (f64, usize) {
        let mut d = Anomaly::new(2.0, Severity::Warning, None); // never breaches: pure scores
        let mut above = 0usize;
        let mut n = 0usize;
        for v in series {
            let s = d.eval(v).score;
            n += 1;
            if n > 2000 && s > t {
                above += 1;
            }
        }
        (above as f64 / (n - 2000) as f64, n - 2000)
    }

    #[test]
    fn calibrated_on_noise_of_any_scale() {
        for (scale, offset) in [(1e-3, 0.0), (1.0, 50.0), (1e6, 1e9)] {
            for t in [0.9, 0.99] {
                let mut rng = Rng::new(7);
                let (f, n) = fraction_above((0..60_000).map(|_| offset + scale * rng.normal()), t);
                let want = 1.0 - t;
                // Within 35% of the nominal rate (binomial noise at 0.99 over 58k is ~7%).
                assert!(
                    (f - want).abs() <= 0.35 * want,
                    "scale {scale}: fraction above {t} was {f:.5} over {n} (want {want})"
                );
            }
        }
    }

    #[test]
    fn calibrated_on_heavy_tailed_noise_too() {
        // Laplace-like noise: heavier tails than the prior; the history takes over.
        let mut rng = Rng::new(11);
        let (f, _) = fraction_above(
            (0..60_000).map(|_| {
                let u = rng.uniform() - 0.5;
                -u.signum() * (1.0 - 2.0 * u.abs()).max(1e-12).ln()
            }),
            0.99,
        );
        assert!((0.005..0.02).contains(&f), "fraction above 0.99: {f}");
    }

    #[test]
    fn finds_a_level_shift_and_a_spike_quickly() {
        let mut rng = Rng::new(3);
        let mut d = Anomaly::new(0.999, Severity::Warning, None);
        let mut first = None;
        for i in 0..4000 {
            let v = 20.0 + rng.normal() + if i >= 3000 { 8.0 } else { 0.0 };
            if d.eval(v).breach.is_some() && i >= 3000 && first.is_none() {
                first = Some(i);
            }
        }
        let f = first.expect("level shift found");
        assert!(f - 3000 <= 5, "found after {} samples", f - 3000);
        // A single 12-sigma spike in noise, at the default threshold.
        let mut d = Anomaly::new(
            crate::detect::rules::ANOMALY_THRESHOLD,
            Severity::Warning,
            None,
        );
        let mut hits = Vec::new();
        for i in 0..6000 {
            let v = 5.0 + rng.normal() + if i == 5000 { 12.0 } else { 0.0 };
            if d.eval(v).breach.is_some() {
                hits.push(i);
            }
        }
        assert_eq!(hits.first(), Some(&5000), "{hits:?}");
        assert!(hits.len() <= 3, "{hits:?}");
    }

    #[test]
    fn quantized_and_flat_series_stay_quiet_then_find_a_real_change() {
        // A long flat stretch with a rare one-quantum blip (an error counter).
        let mut flat = Anomaly::new(0.999, Severity::Warning, None);
        let mut alerts = 0;
        for i in 0..20_000 {
            let r = flat.eval(if i % 997 == 0 { 1.0 } else { 0.0 });
            assert!(r.score.is_finite() && (0.0..=1.0).contains(&r.score));
            alerts += r.breach.is_some() as usize;
        }
        // The first blips are news; once a few have been seen they are not.
        assert!(
            alerts <= 5,
            "{alerts} breaching samples on a flat series with blips"
        );
        // CPU-like noise quantized to 0.5 steps.
        let mut q = Anomaly::new(0.999, Severity::Warning, None);
        let mut rng = Rng::new(5);
        let mut alerts = 0;
        for _ in 0..20_000 {
            let v = ((3.0 + rng.normal()).max(0.0) * 2.0).round() / 2.0;
            let r = q.eval(v);
            assert!(r.score.is_finite() && (0.0..=1.0).contains(&r.score));
            alerts += r.breach.is_some() as usize;
        }
        assert!(
            alerts <= 40,
            "{alerts} breaching samples of 20000 on quantized noise"
        );
        // A big real change is still found on both.
        assert!((0..20).any(|_| flat.eval(80.0).breach.is_some()));
        assert!((0..20).any(|_| q.eval(80.0).breach.is_some()));
    }

    #[test]
    fn first_activity_of_an_idle_series_is_found() {
        // An idle device's utilisation (0 for an hour) saturates; an OOM counter goes 0 -> 1.
        for jump in [100.0, 1.0] {
            let mut d = Anomaly::new(ANOMALY, Severity::Warning, Some(true));
            for _ in 0..3600 {
                assert!(d.eval(0.0).breach.is_none());
            }
            let v = d.eval(jump);
            assert!(
                v.breach.is_some() && v.score.is_finite(),
                "0 -> {jump}: {v:?}"
            );
        }
    }

    const ANOMALY: f64 = crate::detect::rules::ANOMALY_THRESHOLD;

    #[test]
    fn constant_series_never_alert() {
        let mut d = Anomaly::new(0.99, Severity::Warning, None);
        for _ in 0..10_000 {
            let r = d.eval(42.0);
            assert!(r.breach.is_none() && r.score.is_finite());
        }
        let mut z = Anomaly::new(0.99, Severity::Warning, None);
        assert!((0..10_000).all(|_| z.eval(0.0).breach.is_none()));
    }

    #[test]
    fn state_is_small() {
        let d = Anomaly::new(0.999, Severity::Warning, None);
        assert!(d.state_bytes() <= 4096, "{}", d.state_bytes());
    }
}
