//! An endpoint's recent behaviour, folded from attempt outcomes (pure).

/// The outcomes of one batch for one endpoint, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fold {
    /// failures after the last success of the batch (all of them if none succeeded)
    pub failures_after_success: i32,
    /// unix seconds
    pub last_success: Option<f64>,
    pub last_failure: Option<f64>,
    /// the first failure after the last success: since when the endpoint fails
    pub first_failure_after_success: Option<f64>,
    pub last_error: Option<String>,
}

impl Fold {
    pub fn add(&mut self, succeeded: bool, at: f64, error: Option<&str>) {
        if succeeded {
            self.failures_after_success = 0;
            self.first_failure_after_success = None;
            self.last_success = Some(self.last_success.map_or(at, |s| s.max(at)));
        } else {
            self.failures_after_success += 1;
            self.first_failure_after_success.get_or_insert(at);
            self.last_failure = Some(self.last_failure.map_or(at, |s| s.max(at)));
            if let Some(e) = error {
                self.last_error = Some(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_resets_the_count_and_the_start_of_failing() {
        let mut f = Fold::default();
        f.add(false, 1.0, Some("HTTP 500"));
        f.add(false, 2.0, Some("HTTP 502"));
        assert_eq!((f.failures_after_success, f.first_failure_after_success), (2, Some(1.0)));
        f.add(true, 3.0, None);
        assert_eq!((f.failures_after_success, f.first_failure_after_success, f.last_success), (0, None, Some(3.0)));
        f.add(false, 4.0, Some("timeout"));
        assert_eq!(f.failures_after_success, 1);
        assert_eq!(f.first_failure_after_success, Some(4.0));
        assert_eq!(f.last_error.as_deref(), Some("timeout"));
        assert_eq!(f.last_failure, Some(4.0));
    }
}
