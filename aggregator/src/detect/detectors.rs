//! The detectors. Pure state machines over (timestamp, value) samples: the same code runs
//! on the live stream and in `aggregator backtest`.

use std::collections::VecDeque;

/// Severity of a breach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What a detector says about one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The level breached, if any.
    pub breach: Option<Severity>,
    /// The detector's raw score (threshold: the value; statistical: a z-like score).
    pub score: f64,
    /// Score normalised to 0..1 (0.5 = exactly at the alerting level).
    pub norm: f64,
    /// The level the value was compared with (threshold rules).
    pub threshold: Option<f64>,
}

impl Verdict {
    /// No breach, score 0 (warm-up, missing values).
    pub fn quiet() -> Verdict {
        Verdict {
            breach: None,
            score: 0.0,
            norm: 0.0,
            threshold: None,
        }
    }
}

/// The smallest non-zero step between consecutive values seen: the series' resolution.
/// Spreads are floored by it, so quantized and flat series never divide by (nearly) zero.
#[derive(Debug, Clone, Copy)]
pub struct Resolution {
    last: f64,
    quantum: f64,
}

impl Default for Resolution {
    fn default() -> Self {
        Resolution {
            last: f64::NAN,
            quantum: f64::INFINITY,
        }
    }
}

impl Resolution {
    pub fn see(&mut self, v: f64) {
        let d = (v - self.last).abs();
        if d > 0.0 && d < self.quantum {
            self.quantum = d;
        }
        self.last = v;
    }

    /// The smallest non-zero step seen so far (0 while the series has never changed).
    pub fn step(&self) -> f64 {
        if self.quantum.is_finite() {
            self.quantum
        } else {
            0.0
        }
    }

    /// The spread floor for a sample `v` near `level`: one step of the resolution seen so
    /// far (before `v`), and never below 1e-4 of the magnitude at hand, so the first change of
    /// a flat series scores large but finite.
    pub fn floor(&self, level: f64, v: f64) -> f64 {
        self.step()
            .max(super::anomaly::RELATIVE_FLOOR * level.abs().max(v.abs()))
            .max(f64::MIN_POSITIVE)
    }
}

/// Threshold with warning/critical levels, direction and hysteresis on clear.
#[derive(Debug, Clone)]
pub struct Threshold {
    pub above: bool,
    pub warning: Option<f64>,
    pub critical: Option<f64>,
    /// A breached level clears only once the value is this far back on the good side.
    pub hysteresis: f64,
    level: Option<Severity>,
}

impl Threshold {
    pub fn new(above: bool, warning: Option<f64>, critical: Option<f64>, hysteresis: f64) -> Self {
        Threshold {
            above,
            warning,
            critical,
            hysteresis: hysteresis.abs(),
            level: None,
        }
    }

    fn beyond(&self, v: f64, t: f64, current: bool) -> bool {
        // Entering needs the level itself; staying needs the level minus the hysteresis.
        let t = if current {
            if self.above {
                t - self.hysteresis
            } else {
                t + self.hysteresis
            }
        } else {
            t
        };
        if self.above {
            v > t || (current && v >= t)
        } else {
            v < t || (current && v <= t)
        }
    }

    pub fn eval(&mut self, v: f64) -> Verdict {
        let cur = self.level;
        let crit = self
            .critical
            .filter(|&t| self.beyond(v, t, cur == Some(Severity::Critical)));
        let warn = self.warning.filter(|&t| self.beyond(v, t, cur.is_some()));
        let level = if crit.is_some() {
            Some(Severity::Critical)
        } else if warn.is_some() {
            Some(Severity::Warning)
        } else {
            None
        };
        self.level = level;
        let reference = match level {
            Some(Severity::Critical) => self.critical,
            _ => self.warning.or(self.critical),
        };
        let norm = match reference {
            Some(t) if t != 0.0 => {
                let r = if self.above {
                    v / t
                } else {
                    t / v.max(f64::MIN_POSITIVE)
                };
                (r / (r + 1.0)).clamp(0.0, 1.0)
            }
            _ => {
                if level.is_some() {
                    1.0
                } else {
                    0.0
                }
            }
        };
        Verdict {
            breach: level,
            score: v,
            norm: if norm.is_finite() { norm } else { 1.0 },
            threshold: reference,
        }
    }
}

fn normalise(score: f64, threshold: f64) -> f64 {
    let s = score.abs();
    if !s.is_finite() {
        return 1.0;
    }
    s / (s + threshold.max(f64::MIN_POSITIVE))
}

/// Exponentially weighted mean and variance; the score is the z-score of a sample against
/// the state *before* it is folded in.
#[derive(Debug, Clone)]
pub struct Ewma {
    pub alpha: f64,
    pub threshold: f64,
    pub warmup: u32,
    pub severity: Severity,
    /// Only deviations in this direction count: Some(true) above, Some(false) below.
    pub direction: Option<bool>,
    n: u32,
    mean: f64,
    var: f64,
    res: Resolution,
}

impl Ewma {
    pub fn new(
        alpha: f64,
        threshold: f64,
        warmup: u32,
        severity: Severity,
        direction: Option<bool>,
    ) -> Self {
        Ewma {
            alpha,
            threshold,
            warmup,
            severity,
            direction,
            n: 0,
            mean: 0.0,
            var: 0.0,
            res: Resolution::default(),
        }
    }

    pub fn eval(&mut self, v: f64) -> Verdict {
        if !v.is_finite() {
            return Verdict {
                breach: None,
                score: 0.0,
                norm: 0.0,
                threshold: None,
            };
        }
        let z = if self.n == 0 {
            0.0
        } else {
            // A flat or quantized history has (almost) no spread: the floor is one step of
            // the series' own resolution, and an unchanged value scores exactly 0.
            let sd = self.var.sqrt().max(self.res.floor(self.mean, v));
            let d = v - self.mean;
            if d == 0.0 {
                0.0
            } else {
                d / sd
            }
        };
        self.res.see(v);
        // Fold the sample in.
        if self.n == 0 {
            self.mean = v;
            self.var = 0.0;
        } else {
            let d = v - self.mean;
            let incr = self.alpha * d;
            self.mean += incr;
            self.var = (1.0 - self.alpha) * (self.var + d * incr);
        }
        self.n = self.n.saturating_add(1);
        let warm = self.n > self.warmup;
        let directional = match self.direction {
            Some(true) => z,
            Some(false) => -z,
            None => z.abs(),
        };
        Verdict {
            breach: (warm && directional >= self.threshold).then_some(self.severity),
            score: if warm { z } else { 0.0 },
            norm: if warm {
                normalise(directional.max(0.0), self.threshold)
            } else {
                0.0
            },
            threshold: None,
        }
    }
}

/// Robust detector: distance from the rolling median in units of the median absolute
/// deviation (scaled by 1.4826 so it reads like a z-score on normal data).
#[derive(Debug, Clone)]
pub struct Mad {
    pub window: usize,
    pub threshold: f64,
    pub min_samples: usize,
    pub severity: Severity,
    pub direction: Option<bool>,
    values: VecDeque<f64>,
    scratch: Vec<f64>,
    res: Resolution,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Mad {
    pub fn new(
        window: usize,
        threshold: f64,
        min_samples: usize,
        severity: Severity,
        direction: Option<bool>,
    ) -> Self {
        Mad {
            window: window.max(3),
            threshold,
            min_samples: min_samples.max(3),
            severity,
            direction,
            values: VecDeque::with_capacity(window.max(3)),
            scratch: Vec::with_capacity(window.max(3)),
            res: Resolution::default(),
        }
    }

    pub fn eval(&mut self, v: f64) -> Verdict {
        if !v.is_finite() {
            return Verdict {
                breach: None,
                score: 0.0,
                norm: 0.0,
                threshold: None,
            };
        }
        let warm = self.values.len() >= self.min_samples;
        let mut score = 0.0;
        if !self.values.is_empty() {
            self.scratch.clear();
            self.scratch.extend(self.values.iter().copied());
            let med = median(&mut self.scratch);
            for x in self.scratch.iter_mut() {
                *x = (*x - med).abs();
            }
            let mean_dev = self.scratch.iter().sum::<f64>() / self.scratch.len() as f64;
            let mad = 1.4826 * median(&mut self.scratch);
            // More than half the window on one value makes the MAD 0: fall back to the mean
            // absolute deviation (x 1.2533, sigma on normal data), then to the resolution.
            let spread =
                if mad > 0.0 { mad } else { 1.2533 * mean_dev }.max(self.res.floor(med, v));
            let d = v - med;
            if d != 0.0 {
                score = d / spread;
            }
        }
        self.res.see(v);
        if self.values.len() == self.window {
            self.values.pop_front();
        }
        self.values.push_back(v);
        let directional = match self.direction {
            Some(true) => score,
            Some(false) => -score,
            None => score.abs(),
        };
        Verdict {
            breach: (warm && directional >= self.threshold).then_some(self.severity),
            score: if warm { score } else { 0.0 },
            norm: if warm {
                normalise(directional.max(0.0), self.threshold)
            } else {
                0.0
            },
            threshold: None,
        }
    }
}

/// Any detector.
#[derive(Debug, Clone)]
pub enum Detector {
    Threshold(Threshold),
    Ewma(Ewma),
    Mad(Mad),
    Anomaly(Box<super::anomaly::Anomaly>),
    Forest(Box<super::forest::Forest>),
    Drift(Box<super::drift::Drift>),
    Forecast(Box<super::forecast::Forecast>),
}

impl Detector {
    pub fn eval(&mut self, ts_ms: u64, v: f64) -> Verdict {
        match self {
            Detector::Threshold(d) => d.eval(v),
            Detector::Ewma(d) => d.eval(v),
            Detector::Mad(d) => d.eval(v),
            Detector::Anomaly(d) => d.eval(v),
            Detector::Forest(d) => d.eval(v),
            Detector::Drift(d) => d.eval(v),
            Detector::Forecast(d) => d.eval(ts_ms, v),
        }
    }

    /// Several series at once (a multi-series forest).
    pub fn eval_vector(&mut self, ts_ms: u64, v: &[f64]) -> Verdict {
        match self {
            Detector::Forest(d) => d.eval_vector(v),
            other => match v.first() {
                Some(&x) => other.eval(ts_ms, x),
                None => Verdict::quiet(),
            },
        }
    }

    /// Bytes of state this detector keeps per series.
    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Detector>()
            + match self {
                Detector::Mad(m) => (m.values.capacity() + m.scratch.capacity()) * 8,
                Detector::Anomaly(d) => d.state_bytes(),
                Detector::Forest(d) => d.state_bytes(),
                Detector::Drift(d) => d.state_bytes(),
                Detector::Forecast(d) => d.state_bytes(),
                _ => 0,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-1, 1).
    fn noise(i: u64) -> f64 {
        let x = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn threshold_levels_and_hysteresis() {
        let mut t = Threshold::new(true, Some(70.0), Some(80.0), 5.0);
        assert_eq!(t.eval(50.0).breach, None);
        assert_eq!(t.eval(75.0).breach, Some(Severity::Warning));
        assert_eq!(t.eval(85.0).breach, Some(Severity::Critical));
        // Hysteresis: 78 is below 80 but not below 80 - 5: still critical.
        assert_eq!(t.eval(78.0).breach, Some(Severity::Critical));
        assert_eq!(t.eval(74.0).breach, Some(Severity::Warning));
        assert_eq!(t.eval(66.0).breach, Some(Severity::Warning));
        assert_eq!(t.eval(64.9).breach, None);
        // Re-entering needs the level itself.
        assert_eq!(t.eval(68.0).breach, None);
        let mut below = Threshold::new(false, Some(10.0), None, 0.0);
        assert_eq!(below.eval(11.0).breach, None);
        assert_eq!(below.eval(9.0).breach, Some(Severity::Warning));
        assert_eq!(below.eval(10.5).breach, None);
    }

    #[test]
    fn ewma_finds_a_spike_in_noise_and_not_the_noise() {
        let mut d = Ewma::new(0.05, 6.0, 30, Severity::Warning, None);
        let mut alerts = Vec::new();
        for i in 0..600u64 {
            let v = 50.0 + 2.0 * noise(i) + if i == 400 { 40.0 } else { 0.0 };
            if d.eval(v).breach.is_some() {
                alerts.push(i);
            }
        }
        assert_eq!(alerts, vec![400]);
    }

    #[test]
    fn ewma_level_shift_alerts_then_adapts() {
        let mut d = Ewma::new(0.1, 5.0, 20, Severity::Critical, Some(true));
        let mut alerts = Vec::new();
        for i in 0..400u64 {
            let v = if i < 200 { 10.0 } else { 30.0 } + noise(i);
            if d.eval(v).breach.is_some() {
                alerts.push(i);
            }
        }
        assert!(alerts.first() == Some(&200), "{alerts:?}");
        assert!(alerts.len() < 30, "adapts to the new level: {alerts:?}");
        // A downward-only direction would not have fired on an upward shift.
        let mut down = Ewma::new(0.1, 5.0, 20, Severity::Critical, Some(false));
        assert!((0..400u64)
            .map(|i| if i < 200 { 10.0 } else { 30.0 } + noise(i))
            .all(|v| down.eval(v).breach.is_none()));
    }

    #[test]
    fn constant_series_never_alert_nor_divide_by_zero() {
        let mut e = Ewma::new(0.1, 3.0, 5, Severity::Warning, None);
        let mut m = Mad::new(60, 3.0, 10, Severity::Warning, None);
        let mut t = Threshold::new(true, Some(0.0), None, 0.0);
        for _ in 0..500 {
            let a = e.eval(42.0);
            let b = m.eval(42.0);
            assert!(a.breach.is_none() && a.score == 0.0 && a.norm.is_finite());
            assert!(b.breach.is_none() && b.score == 0.0 && b.norm.is_finite());
        }
        for _ in 0..10 {
            let v = t.eval(0.0);
            assert!(v.breach.is_none() && v.norm.is_finite());
        }
        // Zeros too.
        let mut z = Ewma::new(0.1, 3.0, 5, Severity::Warning, None);
        assert!((0..100).all(|_| z.eval(0.0).breach.is_none()));
    }

    #[test]
    fn mad_ignores_outliers_in_its_window_and_finds_the_spike() {
        let mut d = Mad::new(120, 6.0, 30, Severity::Warning, None);
        let mut alerts = Vec::new();
        for i in 0..500u64 {
            let spike = match i {
                300 => 50.0,
                301 => 45.0,
                _ => 0.0,
            };
            let v = 100.0 + noise(i) * 3.0 + spike;
            if d.eval(v).breach.is_some() {
                alerts.push(i);
            }
        }
        assert_eq!(alerts, vec![300, 301]);
    }

    #[test]
    fn warmup_keeps_new_series_quiet() {
        let mut d = Ewma::new(0.3, 2.0, 50, Severity::Warning, None);
        for i in 0..50u64 {
            // Wild values during warm-up never alert.
            let v = if i % 2 == 0 { 0.0 } else { 1000.0 };
            assert!(d.eval(v).breach.is_none());
        }
        let mut m = Mad::new(60, 2.0, 40, Severity::Warning, None);
        for i in 0..39u64 {
            assert!(m.eval(i as f64 * 100.0).breach.is_none());
        }
    }

    #[test]
    fn scores_are_normalised() {
        let mut d = Ewma::new(0.1, 4.0, 10, Severity::Warning, None);
        for i in 0..200u64 {
            let v = d.eval(5.0 + noise(i)).norm;
            assert!((0.0..=1.0).contains(&v));
        }
        let v = d.eval(1e12);
        assert!(v.norm > 0.99 && v.norm <= 1.0);
    }
}
