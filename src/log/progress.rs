//! Console progress: an indicatif bar on a terminal, one plain line per step otherwise (CI logs,
//! output redirected to a file), nothing when disabled.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Console progress bar with ETA, showing step/total, loss and tokens/s.
pub struct Progress {
    mode: Mode,
    total_steps: usize,
    start_step: usize,
    started: Instant,
}

enum Mode {
    Bar(ProgressBar),
    PlainLines,
    Off,
}

impl Progress {
    /// `start_step` is where this run begins (the resumed step, or 0); the ETA is measured over
    /// the steps done since then, so a resume does not count restored steps as instant ones.
    pub fn new(total_steps: usize, start_step: usize, enabled: bool) -> Progress {
        let mode = if !enabled {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                Some(total_steps as u64),
                ProgressDrawTarget::stderr(),
            )
            .with_style(
                ProgressStyle::with_template("{wide_bar} {pos}/{len} {msg}")
                    .expect("progress template is a valid indicatif template"),
            )
            .with_position(start_step as u64);
            Mode::Bar(bar)
        } else {
            Mode::PlainLines
        };
        Progress {
            mode,
            total_steps,
            start_step,
            started: Instant::now(),
        }
    }

    /// Reports that `step` has finished with this loss and throughput.
    pub fn update(&self, step: usize, loss: f64, tokens_per_s: f64) {
        let eta = eta(
            step.saturating_sub(self.start_step),
            self.total_steps.saturating_sub(step),
            self.started.elapsed(),
        );
        match &self.mode {
            Mode::Bar(bar) => {
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "loss {loss:.4} | {tokens_per_s:.0} tok/s | eta {}",
                    format_eta(eta)
                ));
            }
            Mode::PlainLines => eprintln!(
                "{}",
                status_line(step, self.total_steps, loss, tokens_per_s, eta)
            ),
            Mode::Off => {}
        }
    }

    /// Prints a line (eval result, checkpoint saved) above the bar. Printed even when progress
    /// is disabled: these are events, not progress.
    pub fn message(&self, text: &str) {
        match &self.mode {
            Mode::Bar(bar) => bar.println(text),
            Mode::PlainLines | Mode::Off => eprintln!("{text}"),
        }
    }

    /// Leaves the bar drawn at its final state.
    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish();
        }
    }
}

/// Remaining time at the mean step time of this run so far; `None` before the first step.
fn eta(steps_done: usize, steps_left: usize, elapsed: Duration) -> Option<Duration> {
    if steps_done == 0 {
        return None;
    }
    Some(elapsed.mul_f64(steps_left as f64 / steps_done as f64))
}

/// `h:mm:ss`, or `?` while unknown.
fn format_eta(eta: Option<Duration>) -> String {
    match eta {
        None => "?".to_string(),
        Some(eta) => {
            let seconds = eta.as_secs();
            format!(
                "{}:{:02}:{:02}",
                seconds / 3600,
                seconds / 60 % 60,
                seconds % 60
            )
        }
    }
}

fn status_line(
    step: usize,
    total_steps: usize,
    loss: f64,
    tokens_per_s: f64,
    eta: Option<Duration>,
) -> String {
    format!(
        "step {step}/{total_steps} | loss {loss:.4} | {tokens_per_s:.0} tok/s | eta {}",
        format_eta(eta)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_scales_mean_step_time_by_steps_left() {
        // 10 steps in 5 s -> 0.5 s/step; 90 left -> 45 s.
        assert_eq!(
            eta(10, 90, Duration::from_secs(5)),
            Some(Duration::from_secs(45))
        );
        assert_eq!(eta(0, 90, Duration::from_secs(5)), None);
    }

    #[test]
    fn status_line_shows_step_loss_throughput_and_eta() {
        assert_eq!(
            status_line(120, 5000, 3.21456, 12345.6, Some(Duration::from_secs(3725))),
            "step 120/5000 | loss 3.2146 | 12346 tok/s | eta 1:02:05"
        );
        assert_eq!(
            status_line(0, 10, 4.0, 0.0, None),
            "step 0/10 | loss 4.0000 | 0 tok/s | eta ?"
        );
    }
}
