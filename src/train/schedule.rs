//! Learning-rate schedules: linear warmup, then cosine, the paper's step decay, or constant.

use crate::config::{Schedule, TrainConfig};

/// The learning rate for update number `step` (0-based) of `cfg.steps`.
pub fn learning_rate(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let progress = if cfg.steps > cfg.warmup_steps {
        (step - cfg.warmup_steps) as f64 / (cfg.steps - cfg.warmup_steps) as f64
    } else {
        1.0
    };
    match cfg.schedule {
        Schedule::Constant => cfg.lr,
        Schedule::Cosine => {
            let min = cfg.lr * cfg.min_lr_ratio;
            min + 0.5 * (cfg.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        // The paper's step schedule: x0.316 from 80% of training, x0.1 from 90%.
        Schedule::Step => {
            let done = step as f64 / cfg.steps as f64;
            if done >= 0.9 {
                cfg.lr * 0.1
            } else if done >= 0.8 {
                cfg.lr * 0.316
            } else {
                cfg.lr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> TrainConfig {
        TrainConfig {
            lr: 1.0,
            steps: 100,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            schedule,
            ..Default::default()
        }
    }

    #[test]
    fn warmup_then_schedules() {
        let c = cfg(Schedule::Cosine);
        assert!((learning_rate(&c, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&c, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 10) - 1.0).abs() < 1e-12);
        // halfway through the decay: (1 + 0.1) / 2
        assert!((learning_rate(&c, 55) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&c, 100) - 0.1).abs() < 1e-12);
        let s = cfg(Schedule::Step);
        assert_eq!(learning_rate(&s, 79), 1.0);
        assert!((learning_rate(&s, 80) - 0.316).abs() < 1e-12);
        assert!((learning_rate(&s, 90) - 0.1).abs() < 1e-12);
        assert_eq!(learning_rate(&cfg(Schedule::Constant), 99), 1.0);
    }
}
