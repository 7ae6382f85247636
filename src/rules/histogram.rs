//! Latency histograms that add up: fixed logarithmic buckets (four per
//! doubling, from 1 ms to about 2^27 ms = 37 h), so that hourly rollups merge
//! by adding counts and a percentile comes back within 9% of the exact one.

/// Buckets of a histogram; bucket `i` holds values in [2^(i/4), 2^((i+1)/4)) ms,
/// bucket 0 also everything under 1 ms, the last one everything above.
pub const BUCKETS: usize = 108;

/// The bucket of a value in milliseconds (NaN and negatives count as 0 ms).
pub fn bucket(ms: f64) -> usize {
    if ms.is_nan() || ms <= 1.0 {
        return 0;
    }
    ((ms.log2() * 4.0).floor() as usize).min(BUCKETS - 1)
}

/// A histogram of `values` (ms).
pub fn of(values: &[f64]) -> Vec<i64> {
    let mut counts = vec![0i64; BUCKETS];
    for v in values {
        counts[bucket(*v)] += 1;
    }
    counts
}

/// The sum of two histograms (a shorter one counts as zeros where it ends).
pub fn add(a: &[i64], b: &[i64]) -> Vec<i64> {
    (0..a.len().max(b.len())).map(|i| a.get(i).unwrap_or(&0) + b.get(i).unwrap_or(&0)).collect()
}

/// The `q` quantile (0 to 1) of a histogram, in ms: the geometric middle of the
/// bucket where the count reaches q × total; None when it is empty.
pub fn quantile(counts: &[i64], q: f64) -> Option<f64> {
    let total: i64 = counts.iter().map(|c| (*c).max(0)).sum();
    if total == 0 || q.is_nan() {
        return None;
    }
    let target = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += (*c).max(0);
        if seen >= target {
            return Some(2f64.powf((i as f64 + 0.5) / 4.0));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_back_within_nine_percent_and_histograms_add() {
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 0.37).collect();
        let h = of(&values);
        for q in [0.5, 0.95, 0.99] {
            let exact = values[(q * values.len() as f64).ceil() as usize - 1];
            let got = quantile(&h, q).unwrap();
            assert!((got / exact - 1.0).abs() < 0.09, "q{q}: {got} vs {exact}");
        }
        let (a, b) = values.split_at(3_000);
        assert_eq!(add(&of(a), &of(b)), h);
        assert_eq!(quantile(&of(&[]), 0.95), None);
        assert_eq!((bucket(0.2), bucket(f64::NAN), bucket(1e12)), (0, 0, BUCKETS - 1));
        assert_eq!(add(&[1, 2], &[1]), vec![2, 2]);
    }
}
