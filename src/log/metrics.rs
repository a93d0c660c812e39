//! `metrics.jsonl`: one JSON object per logged step, `{"step": 12, "time": <unix secs>, "<name>": <value>, ...}`,
//! keys in the order the trainer logged them so the file reads naturally.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// File name of the metrics log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one JSON line per record to `<run dir>/metrics.jsonl`.
pub struct MetricsFile {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl MetricsFile {
    /// Opens `<run_dir>/metrics.jsonl` for appending, after dropping every line whose step is
    /// `>= keep_below_step`: those steps will be logged again by this run (all of them on a fresh
    /// start, the ones after the checkpoint on a resume), and the file must stay one line per step.
    pub fn open(run_dir: &Path, keep_below_step: usize) -> Result<MetricsFile> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            truncate_steps_from(&path, keep_below_step)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open metrics log {}", path.display()))?;
        Ok(MetricsFile {
            path,
            writer: BufWriter::new(file),
        })
    }

    /// Appends one line and hands it to the OS at once, so a crash loses at most the line being
    /// written and `tail -f` shows every step live.
    pub fn append(&mut self, step: usize, unix_time: f64, scalars: &[(String, f64)]) -> Result<()> {
        let line = json_line(step, unix_time, scalars)?;
        self.writer
            .write_all(line.as_bytes())
            .and_then(|()| self.writer.flush())
            .with_context(|| format!("cannot write to metrics log {}", self.path.display()))
    }

    /// Makes every appended line durable on disk.
    pub fn sync(&mut self) -> Result<()> {
        self.writer
            .flush()
            .and_then(|()| self.writer.get_ref().sync_data())
            .with_context(|| format!("cannot sync metrics log {}", self.path.display()))
    }
}

/// One JSON object plus newline. Non-finite values (a diverged loss) become `null`, the only
/// JSON spelling for them.
fn json_line(step: usize, unix_time: f64, scalars: &[(String, f64)]) -> Result<String> {
    let mut line = format!(
        "{{\"step\":{step},\"time\":{}",
        serde_json::to_string(&unix_time)?
    );
    for (name, value) in scalars {
        line.push(',');
        line.push_str(&serde_json::to_string(name)?);
        line.push(':');
        line.push_str(&serde_json::to_string(value)?);
    }
    line.push_str("}\n");
    Ok(line)
}

/// Rewrites `path` keeping only lines with `step < keep_below_step`. A last line without its
/// newline is the torn write of an interrupted run and is dropped; any other unreadable line
/// means the file is not ours to rewrite, so it is an error.
fn truncate_steps_from(path: &Path, keep_below_step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics log {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(last_newline) => &text[..=last_newline],
        None => "",
    };
    let mut kept = String::with_capacity(complete.len());
    for (index, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|object| object.get("step").and_then(serde_json::Value::as_u64));
        let Some(step) = step else {
            bail!(
                "metrics log {} line {} is not a JSON object with an integer \"step\"; \
                 refusing to rewrite it on resume",
                path.display(),
                index + 1
            );
        };
        if step < keep_below_step as u64 {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if kept.len() == text.len() {
        return Ok(());
    }
    // Write beside and rename, so a crash here leaves either the old or the new file, never half.
    let temp = path.with_extension("jsonl.tmp");
    std::fs::write(&temp, kept)
        .with_context(|| format!("cannot write truncated metrics log {}", temp.display()))?;
    std::fs::rename(&temp, path)
        .with_context(|| format!("cannot replace metrics log {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps_in(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn line_keeps_order_and_values_and_writes_nan_as_null() {
        let scalars = vec![
            ("train/loss".to_string(), 3.25),
            ("lr".to_string(), 6e-4),
            ("grad_norm".to_string(), f64::NAN),
        ];
        let line = json_line(7, 1700000000.5, &scalars).unwrap();
        assert_eq!(
            line,
            "{\"step\":7,\"time\":1700000000.5,\"train/loss\":3.25,\"lr\":0.0006,\"grad_norm\":null}\n"
        );
    }

    #[test]
    fn truncation_drops_later_steps_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(
            &path,
            "{\"step\":1,\"time\":1.0}\n{\"step\":2,\"time\":2.0}\n{\"step\":3,\"time\":3.0}\n{\"step\":4,\"ti",
        )
        .unwrap();
        truncate_steps_from(&path, 3).unwrap();
        assert_eq!(steps_in(&path), vec![1, 2]);
    }

    #[test]
    fn truncation_refuses_a_corrupt_middle_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(&path, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let error = truncate_steps_from(&path, 2).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
    }
}
