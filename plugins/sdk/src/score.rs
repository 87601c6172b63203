//! Scoring shapes several plugins share, so their arithmetic cannot drift apart.

/// "Fewer is better", min-max normalised over the candidates: `(max − v) / (max − min)`,
/// 1.0 for every known value when all known values are equal. An unknown value (NaN or
/// infinite: a metric missing or stale) scores 0 and does not move the others' min/max.
pub fn fewer_is_better(values: &[f32]) -> Vec<f32> {
    let known = |v: f32| Some(v).filter(|v| v.is_finite());
    let (min, max) = values
        .iter()
        .filter_map(|&v| known(v))
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    values
        .iter()
        .map(|&v| match known(v) {
            None => 0.0,
            Some(_) if max <= min => 1.0,
            Some(v) => ((max - v) / (max - min)).clamp(0.0, 1.0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_is_better_normalises_known_values() {
        assert_eq!(fewer_is_better(&[0.0, 5.0, 10.0]), vec![1.0, 0.5, 0.0]);
        assert_eq!(fewer_is_better(&[3.0, 3.0]), vec![1.0, 1.0]);
        assert_eq!(fewer_is_better(&[f32::NAN, 2.0, 4.0]), vec![0.0, 1.0, 0.0]);
        assert_eq!(fewer_is_better(&[f32::NAN, f32::INFINITY]), vec![0.0, 0.0]);
        assert!(fewer_is_better(&[]).is_empty());
    }
}
