//! The small statistics every benchmark table uses.

/// The median (the mean of the two middle values for an even count); NaN
/// for no values.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (min, max); NaN for no values.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::NAN, f64::min);
    let hi = v.iter().copied().fold(f64::NAN, f64::max);
    (lo, hi)
}

/// A table cell: "`value` ns, median ratio [min..max]" of per-round ratios.
pub fn ratio_cell(value_ns: f64, ratios: &[f64]) -> String {
    let (lo, hi) = min_max(ratios);
    format!(
        "{value_ns:.0} ns, {:.3} [{lo:.3}..{hi:.3}]",
        median(ratios.to_vec())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_cells() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(min_max(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
        assert_eq!(
            ratio_cell(1234.4, &[1.0, 1.5, 0.9]),
            "1234 ns, 1.000 [0.900..1.500]"
        );
    }
}
