//! Run logging: TensorBoard event files and `metrics.jsonl` (through [`Logger`]), console
//! progress ([`Progress`]), and the mHC health numbers ([`amax_gains`]).
//!
//! Only rank 0 logs in data-parallel runs: the trainer does not create a `Logger` elsewhere.

mod metrics;
mod progress;
mod tensorboard;

pub use metrics::METRICS_FILE;
pub use progress::Progress;

use anyhow::{bail, Context, Result};
use metrics::MetricsFile;
use std::collections::HashSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use tensorboard::EventWriter;

/// One logged record: a step and named scalar values ("train/loss", "val/loss", "lr",
/// "grad_norm", "step_time_ms", "tokens_per_s", "mhc/layer3/attn/amax_fwd", ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub step: usize,
    pub scalars: Vec<(String, f64)>,
}

/// Writes every record to a TensorBoard event file in the run dir and appends it as one JSON
/// line to `<run dir>/metrics.jsonl`.
pub struct Logger {
    events: EventWriter,
    metrics: MetricsFile,
}

impl Logger {
    /// Opens the run dir's logs (creating the dir). `resume_from_step: Some(s)` keeps the
    /// metrics.jsonl lines of steps `<= s` and drops the later ones, which the interrupted run
    /// logged past its checkpoint; `None` is a fresh start, so every old line goes. TensorBoard
    /// gets a new event file that starts with a `SessionLog START` at the first step to come,
    /// which makes it drop the stale steps of earlier files too.
    pub fn create(run_dir: &Path, resume_from_step: Option<usize>) -> Result<Logger> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
        let first_new_step = resume_from_step.map_or(0, |step| step + 1);
        let metrics = MetricsFile::open(run_dir, first_new_step)?;
        let events = EventWriter::create(run_dir, first_new_step, unix_time_now())?;
        Ok(Logger { events, metrics })
    }

    /// Writes one record to both logs; both reach the OS before this returns.
    pub fn log(&mut self, record: &Record) -> Result<()> {
        check_names(record)?;
        let time = unix_time_now();
        self.events
            .write_scalars(record.step, time, &record.scalars)?;
        self.events.flush()?;
        self.metrics.append(record.step, time, &record.scalars)
    }

    /// Makes everything logged so far durable on disk (call it with each checkpoint).
    pub fn flush(&mut self) -> Result<()> {
        self.events.sync()?;
        self.metrics.sync()
    }
}

/// Names become JSON keys next to "step" and "time" and TensorBoard tags, so they must be
/// non-empty, unique within the record, and not those two.
fn check_names(record: &Record) -> Result<()> {
    let mut seen = HashSet::with_capacity(record.scalars.len());
    for (name, _) in &record.scalars {
        if name.is_empty() || name == "step" || name == "time" {
            bail!(
                "scalar name {name:?} at step {} is reserved or empty in metrics.jsonl",
                record.step
            );
        }
        if !seen.insert(name.as_str()) {
            bail!("scalar {name:?} logged twice at step {}", record.step);
        }
    }
    Ok(())
}

fn unix_time_now() -> f64 {
    // A clock before 1970 is a broken machine, not a reason to stop training: log time 0.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// mHC health from the paper: for a square matrix H (row-major, n x n), the forward gain is the
/// max absolute row sum and the backward gain the max absolute column sum (Amax gains). For a
/// doubly stochastic H both are 1; growth above 1 is signal amplification through the layer.
pub fn amax_gains(h: &[f64], n: usize) -> (f64, f64) {
    assert_eq!(
        h.len(),
        n * n,
        "amax_gains: H has {} entries, not n*n = {}",
        h.len(),
        n * n
    );
    let forward = (0..n)
        .map(|row| {
            h[row * n..(row + 1) * n]
                .iter()
                .map(|x| x.abs())
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let backward = (0..n)
        .map(|col| (0..n).map(|row| h[row * n + col].abs()).sum::<f64>())
        .fold(0.0, f64::max);
    (forward, backward)
}

#[cfg(test)]
mod tests {
    use super::tensorboard::tests::read_events;
    use super::*;
    use std::path::PathBuf;

    fn record(step: usize, loss: f64, lr: f64) -> Record {
        Record {
            step,
            scalars: vec![("train/loss".to_string(), loss), ("lr".to_string(), lr)],
        }
    }

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        let mut files = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains("tfevents"))
            .collect::<Vec<_>>();
        files.sort();
        files
    }

    fn metrics_lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// (step, tag, value) of every scalar in an event file.
    fn scalars_in(path: &Path) -> Vec<(i64, String, f32)> {
        read_events(path)
            .iter()
            .filter(|event| event.has_summary())
            .flat_map(|event| {
                event
                    .get_summary()
                    .get_value()
                    .iter()
                    .map(|value| {
                        (
                            event.get_step(),
                            value.get_tag().to_string(),
                            value.get_simple_value(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn logger_writes_event_file_and_metrics_lines() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let before = unix_time_now();
        let mut logger = Logger::create(&run_dir, None).unwrap();
        logger.log(&record(1, 3.25, 1e-3)).unwrap();
        logger.log(&record(2, 2.75, 2e-3)).unwrap();
        logger.flush().unwrap();
        drop(logger);
        let after = unix_time_now();

        let files = event_files(&run_dir);
        assert_eq!(files.len(), 1);
        assert_eq!(
            scalars_in(&files[0]),
            vec![
                (1, "train/loss".to_string(), 3.25f32),
                (1, "lr".to_string(), 1e-3f32),
                (2, "train/loss".to_string(), 2.75f32),
                (2, "lr".to_string(), 2e-3f32),
            ]
        );

        let lines = metrics_lines(&run_dir);
        assert_eq!(lines.len(), 2);
        for (line, (step, loss, lr)) in lines.iter().zip([(1, 3.25, 1e-3), (2, 2.75, 2e-3)]) {
            assert_eq!(line["step"].as_u64(), Some(step));
            assert_eq!(line["train/loss"].as_f64(), Some(loss));
            assert_eq!(line["lr"].as_f64(), Some(lr));
            let time = line["time"].as_f64().unwrap();
            assert!(
                (before..=after).contains(&time),
                "{time} not in [{before}, {after}]"
            );
            assert_eq!(line.as_object().unwrap().len(), 4);
        }
    }

    #[test]
    fn resume_drops_later_metrics_lines_and_restarts_tensorboard_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut logger = Logger::create(dir.path(), None).unwrap();
        for step in 1..=5 {
            logger
                .log(&record(step, 4.0 - step as f64 * 0.5, 1e-3))
                .unwrap();
        }
        drop(logger);

        let mut logger = Logger::create(dir.path(), Some(3)).unwrap();
        logger.log(&record(4, 1.75, 1e-3)).unwrap();
        drop(logger);

        let lines = metrics_lines(dir.path());
        let steps_and_losses = lines
            .iter()
            .map(|line| {
                (
                    line["step"].as_u64().unwrap(),
                    line["train/loss"].as_f64().unwrap(),
                )
            })
            .collect::<Vec<_>>();
        assert_eq!(
            steps_and_losses,
            vec![(1, 3.5), (2, 3.0), (3, 2.5), (4, 1.75)]
        );

        let files = event_files(dir.path());
        assert_eq!(files.len(), 2, "the resumed run writes its own event file");
        let resumed = read_events(&files[1]);
        assert!(resumed[1].has_session_log());
        assert_eq!(
            resumed[1].get_step(),
            4,
            "TensorBoard purges steps >= 4 of the old file"
        );
        assert_eq!(
            scalars_in(&files[1])[0],
            (4, "train/loss".to_string(), 1.75f32)
        );
    }

    #[test]
    fn fresh_start_in_a_used_dir_starts_metrics_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut logger = Logger::create(dir.path(), None).unwrap();
        logger.log(&record(1, 3.0, 1e-3)).unwrap();
        logger.log(&record(2, 2.0, 1e-3)).unwrap();
        drop(logger);
        let mut logger = Logger::create(dir.path(), None).unwrap();
        logger.log(&record(1, 5.0, 1e-3)).unwrap();
        drop(logger);
        let lines = metrics_lines(dir.path());
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["train/loss"].as_f64(), Some(5.0));
    }

    #[test]
    fn duplicate_and_reserved_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut logger = Logger::create(dir.path(), None).unwrap();
        let twice = Record {
            step: 1,
            scalars: vec![("lr".to_string(), 1.0), ("lr".to_string(), 2.0)],
        };
        assert!(logger
            .log(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let reserved = Record {
            step: 1,
            scalars: vec![("time".to_string(), 1.0)],
        };
        assert!(logger
            .log(&reserved)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
    }

    #[test]
    fn amax_gains_of_hand_computed_matrices() {
        // Rows |1|+|-2| = 3, |0.5|+|0.5| = 1; columns 1.5, 2.5.
        assert_eq!(amax_gains(&[1.0, -2.0, 0.5, 0.5], 2), (3.0, 2.5));
        // Rows 0.6, 1.5, 0.9; columns 1.1, 0.7, 1.2.
        let h = [0.1, 0.2, -0.3, 0.4, -0.5, 0.6, 0.6, 0.0, 0.3];
        let (forward, backward) = amax_gains(&h, 3);
        assert!((forward - 1.5).abs() < 1e-15, "{forward}");
        assert!((backward - 1.2).abs() < 1e-15, "{backward}");
        // Doubly stochastic: both gains exactly 1.
        assert_eq!(amax_gains(&[0.25, 0.75, 0.75, 0.25], 2), (1.0, 1.0));
    }
}
