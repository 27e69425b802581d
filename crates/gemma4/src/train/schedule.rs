//! Learning-rate schedules as transformers' `get_scheduler` computes them: a linear
//! warmup from 0, then constant, linear decay to 0, or cosine decay to 0, over
//! `total` optimizer steps.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (counted from 0), as the scheduler's
    /// `get_last_lr()` reads before that step.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = (step - self.warmup) as f64 / span;
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => (1.0 - progress).max(0.0),
            Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        self.lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_as_transformers() {
        let s = Schedule {
            lr: 1.0,
            warmup: 2,
            total: 6,
            decay: Decay::Linear,
        };
        let got: Vec<f64> = (0..6).map(|t| s.lr_at(t)).collect();
        assert_eq!(got, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
        let c = Schedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((c.lr_at(4) - 0.5).abs() < 1e-12);
        assert_eq!(c.lr_at(2), 1.0);
    }
}
