//! Latency samples and bandwidth figures.

use hdrhistogram::Histogram;

/// Latency samples in nanoseconds (raw, plus an HdrHistogram for percentiles).
#[derive(Clone)]
pub struct Lat {
    samples: Vec<f64>,
    hist: Histogram<u64>,
}

impl Lat {
    pub fn new(samples: Vec<f64>) -> Lat {
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
        for s in &samples {
            hist.saturating_record(s.max(1.0).round() as u64);
        }
        Lat { samples, hist }
    }

    /// How many samples there are.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.samples.len()
    }

    /// All samples of `parts` in one distribution.
    pub fn merge(parts: &[Lat]) -> Lat {
        Lat::new(
            parts
                .iter()
                .flat_map(|l| l.samples.iter().copied())
                .collect(),
        )
    }

    /// The same distribution times `k` (the floor of a full round trip).
    pub fn scaled(&self, k: f64) -> Lat {
        Lat::new(self.samples.iter().map(|s| s * k).collect())
    }

    /// The same distribution plus `ns` (a fixed cost added to every sample).
    pub fn shifted(&self, ns: f64) -> Lat {
        Lat::new(self.samples.iter().map(|s| s + ns).collect())
    }

    pub fn median_ns(&self) -> f64 {
        self.p(50.0)
    }
    pub fn p(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q / 100.0) as f64
    }
    pub fn min_ns(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }
    pub fn max_ns(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }
    pub fn stdev_ns(&self) -> f64 {
        let n = self.samples.len().max(1) as f64;
        let mean = self.samples.iter().sum::<f64>() / n;
        (self.samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "samples": self.samples.len(), "min": self.min_ns(), "median": self.median_ns(),
            "p99": self.p(99.0), "p99_9": self.p(99.9), "max": self.max_ns(), "stdev": self.stdev_ns(),
        })
    }
}

/// Bytes and messages moved in a time.
pub struct Bw {
    pub bytes: u64,
    pub msgs: u64,
    pub secs: f64,
}

impl Bw {
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    pub fn mmsg_s(&self) -> f64 {
        self.msgs as f64 / self.secs / 1e6
    }
}

impl Lat {
    /// The distribution in HdrHistogram's percentile-distribution text format
    /// (values in microseconds), as `.hgrm` files hold it.
    pub fn hgrm(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>12} {:>14} {:>10} {:>14}\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        let mut total = 0u64;
        for v in self.hist.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let inv = if q < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - q))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:>12.3} {:>14.12} {:>10} {}",
                v.value_iterated_to() as f64 / 1000.0,
                q,
                total,
                inv
            );
        }
        let n = self.samples.len().max(1) as f64;
        let mean = self.samples.iter().sum::<f64>() / n;
        let _ = writeln!(
            out,
            "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
            mean / 1000.0,
            self.stdev_ns() / 1000.0
        );
        let _ = writeln!(
            out,
            "#[Max     = {:>12.3}, Total count    = {:>12}]",
            self.max_ns() / 1000.0,
            self.samples.len()
        );
        out
    }

    /// (percentile, microseconds) points for a percentile chart.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        self.hist
            .iter_quantiles(5)
            .map(|v| {
                (
                    v.quantile_iterated_to(),
                    v.value_iterated_to() as f64 / 1000.0,
                )
            })
            .collect()
    }
}
