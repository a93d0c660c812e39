//! TensorBoard event files: TFRecord-framed `Event` protos, written synchronously.
//!
//! Built from tensorboard-rs's `RecordWriter` (the TFRecord framing with masked CRC32C) and the
//! tensorboard-proto messages rather than its `SummaryWriter`, because that one writes on a
//! background thread that panics on I/O errors, cannot report when data has reached the file,
//! and names files by the second and pid only, so a second writer in the same second and
//! process truncates the first one's file.

use anyhow::{Context, Result};
use protobuf::{Message, RepeatedField};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind};
use std::path::{Path, PathBuf};
use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
use tensorboard_proto::summary::{Summary, Summary_Value};
use tensorboard_rs::record_writer::RecordWriter;

/// Writes one event file in a run directory.
pub struct EventWriter {
    path: PathBuf,
    records: RecordWriter<BufWriter<File>>,
    /// A second handle on the same open file, for `sync_data` (the record writer hides its own).
    file: File,
}

impl EventWriter {
    /// Creates a new event file `events.out.tfevents.<secs>.mhc-train.<pid>.<n>` in `dir` (the
    /// first free `n`), writes the file-version header, then a `SessionLog START` at `first_step`:
    /// TensorBoard's event accumulator drops earlier-loaded data with step >= `first_step` when it
    /// sees it, so steps that an interrupted run logged past its checkpoint do not show twice.
    pub fn create(dir: &Path, first_step: usize, unix_time: f64) -> Result<EventWriter> {
        let (path, file) = create_unique_event_file(dir, unix_time)?;
        let sync_handle = file
            .try_clone()
            .with_context(|| format!("cannot duplicate handle of {}", path.display()))?;
        let mut writer = EventWriter {
            path,
            records: RecordWriter::new(BufWriter::new(file)),
            file: sync_handle,
        };

        let mut header = Event::new();
        header.set_wall_time(unix_time);
        header.set_file_version("brain.Event:2".to_string());
        writer.write_event(&header)?;

        let mut session_start = SessionLog::new();
        session_start.set_status(SessionLog_SessionStatus::START);
        let mut start = Event::new();
        start.set_wall_time(unix_time);
        start.set_step(first_step as i64);
        start.set_session_log(session_start);
        writer.write_event(&start)?;
        writer.flush()?;
        Ok(writer)
    }

    /// Path of the event file being written.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes all scalars of one step as a single `Event` whose `Summary` holds one simple value
    /// per tag (TensorBoard stores scalars as f32).
    pub fn write_scalars(
        &mut self,
        step: usize,
        unix_time: f64,
        scalars: &[(String, f64)],
    ) -> Result<()> {
        let values = scalars
            .iter()
            .map(|(tag, value)| {
                let mut summary_value = Summary_Value::new();
                summary_value.set_tag(tag.clone());
                summary_value.set_simple_value(*value as f32);
                summary_value
            })
            .collect::<Vec<_>>();
        let mut summary = Summary::new();
        summary.set_value(RepeatedField::from_vec(values));
        let mut event = Event::new();
        event.set_wall_time(unix_time);
        event.set_step(step as i64);
        event.set_summary(summary);
        self.write_event(&event)
    }

    /// Hands buffered records to the OS (TensorBoard sees them).
    pub fn flush(&mut self) -> Result<()> {
        self.records
            .flush()
            .with_context(|| format!("cannot write event file {}", self.path.display()))
    }

    /// Flushes, then makes the file durable on disk.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.file
            .sync_data()
            .with_context(|| format!("cannot sync event file {}", self.path.display()))
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        let bytes = event
            .write_to_bytes()
            .context("cannot serialize a TensorBoard event")?;
        self.records
            .write(&bytes)
            .with_context(|| format!("cannot write event file {}", self.path.display()))
    }
}

/// Creates the event file with `create_new`, bumping the trailing counter while the name is
/// taken, so an existing file (same second, same pid) is never truncated.
fn create_unique_event_file(dir: &Path, unix_time: f64) -> Result<(PathBuf, File)> {
    let seconds = unix_time as u64;
    let pid = std::process::id();
    for counter in 0u32.. {
        let path = dir.join(format!(
            "events.out.tfevents.{seconds:010}.mhc-train.{pid}.{counter}"
        ));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(error) if error.kind() == ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot create event file {}", path.display()))
            }
        }
    }
    unreachable!("u32 counter space exhausted while naming an event file")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the textbook definition,
    /// independent of the crate's table-driven one.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// TFRecord's mask: rotate right by 15, add a constant.
    fn masked_crc32c(data: &[u8]) -> u32 {
        crc32c(data).rotate_right(15).wrapping_add(0xA282_EAD8)
    }

    #[test]
    fn crc32c_matches_its_published_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// Splits a TFRecord file into its records, checking both CRCs of every record.
    pub(crate) fn read_records(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let length_bytes = &bytes[at..at + 8];
            let length = u64::from_le_bytes(length_bytes.try_into().unwrap()) as usize;
            let length_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(
                length_crc,
                masked_crc32c(length_bytes),
                "length CRC at {at}"
            );
            let data = &bytes[at + 12..at + 12 + length];
            let data_crc = u32::from_le_bytes(
                bytes[at + 12 + length..at + 16 + length]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(data_crc, masked_crc32c(data), "data CRC at {at}");
            records.push(data.to_vec());
            at += 16 + length;
        }
        assert_eq!(at, bytes.len(), "trailing bytes after the last record");
        records
    }

    pub(crate) fn read_events(path: &Path) -> Vec<Event> {
        read_records(path)
            .iter()
            .map(|record| Event::parse_from_bytes(record).unwrap())
            .collect()
    }

    #[test]
    fn event_file_has_header_session_start_and_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path(), 5, 1000.25).unwrap();
        let scalars = vec![("train/loss".to_string(), 2.5), ("lr".to_string(), 1e-3)];
        writer.write_scalars(5, 1001.5, &scalars).unwrap();
        writer.sync().unwrap();
        let path = writer.path().to_path_buf();
        drop(writer);

        let records = read_records(&path);
        // The serialized bytes carry the tag strings and the f32 little-endian values.
        let scalar_record = &records[2];
        for needle in [
            &b"train/loss"[..],
            &b"lr"[..],
            &2.5f32.to_le_bytes()[..],
            &1e-3f32.to_le_bytes()[..],
        ] {
            assert!(scalar_record.windows(needle.len()).any(|w| w == needle));
        }

        let events = read_events(&path);
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].get_file_version(), "brain.Event:2");
        assert_eq!(events[0].get_wall_time(), 1000.25);
        assert_eq!(
            events[1].get_session_log().get_status(),
            SessionLog_SessionStatus::START
        );
        assert_eq!(events[1].get_step(), 5);
        assert_eq!(events[2].get_step(), 5);
        assert_eq!(events[2].get_wall_time(), 1001.5);
        let values = events[2].get_summary().get_value();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0].get_tag(), "train/loss");
        assert_eq!(values[0].get_simple_value(), 2.5);
        assert_eq!(values[1].get_tag(), "lr");
        assert_eq!(values[1].get_simple_value(), 1e-3f32);
    }

    #[test]
    fn second_writer_in_the_same_second_gets_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = EventWriter::create(dir.path(), 0, 1000.0).unwrap();
        let second = EventWriter::create(dir.path(), 3, 1000.0).unwrap();
        assert_ne!(first.path(), second.path());
        assert_eq!(read_events(first.path())[1].get_step(), 0);
        assert_eq!(read_events(second.path())[1].get_step(), 3);
    }
}
