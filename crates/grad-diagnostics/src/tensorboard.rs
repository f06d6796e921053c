//! TensorBoard event files, so a run opens in the tool its users already have.
//!
//! # The format
//! An event file (`events.out.tfevents.<seconds>.<host>`, in a log folder TensorBoard is
//! pointed at) is a sequence of records, each
//!
//! ```text
//! u64 length (little-endian) | u32 masked CRC-32C of those 8 bytes | `length` bytes of data |
//! u32 masked CRC-32C of the data
//! ```
//!
//! where the masked CRC is `((crc >> 15) | (crc << 17)) + 0xa282_ead8` (TensorFlow's
//! `record_writer`). Each record's data is a protobuf `Event` (`tensorflow/core/util/event.proto`):
//! `wall_time` (1, double), `step` (2, int64) and either `file_version` (3, string;
//! `"brain.Event:2"` in the first record) or a `Summary` (5). A `Summary` holds `Value`s: a `tag`
//! (1) and a `simple_value` (2, float) or a `HistogramProto` `histo` (5: `min`, `max`, `num`,
//! `sum`, `sum_squares`, packed `bucket_limit` and `bucket`; bucket `i` counts the values in
//! `(bucket_limit[i - 1], bucket_limit[i]]`). The messages below are those fields, derived with
//! `prost`.
//!
//! # What a record becomes
//! One event per [`StepRecord`], at its step:
//!
//! | tag | value |
//! |---|---|
//! | `loss`, `learning_rate` | when recorded |
//! | `grad_norm/global` | the global gradient norm |
//! | `grad_norm/<layer>`, `update_ratio/<layer>` | per layer, in network order |
//! | `grad_non_finite/<layer>` | NaN and infinite gradient elements, when any |
//! | `clip/total_norm`, `clip/clipped`, `clip/skipped` | when a clipping optimizer ran (0/1 flags) |
//! | `noise/simple_noise_scale`, `noise/batch_size`, `noise/snr/<layer>` | when the record carries gradient noise ([`GradMonitor::gradient_noise`](crate::GradMonitor::gradient_noise)) |
//! | `grad_abs/<layer>` | histogram of `\|g\|` |
//! | `update_ratio_elements/<layer>` | histogram of the element-wise update ratios |
//!
//! Histograms keep gradkit's factor-of-two bins ([`Histogram`]): a bucket with limit 0 holds
//! the exact zeros, then bucket `k` has limit `2^(k - 39)`. `min`, `max`, `sum` and
//! `sum_squares` are taken from the bins (edges and geometric midpoints): the bins are what was
//! kept. NaN and infinite elements are not in a histogram; `grad_non_finite/<layer>` counts them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::histogram::{BINS, Histogram};
use crate::record::StepRecord;
use crate::{Error, Result};

/// `tensorflow.Event`, the fields gradkit writes.
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Kind", tags = "2, 5")]
    value: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "5")]
    Histo(HistogramProto),
}

/// `tensorflow.HistogramProto`.
#[derive(Clone, PartialEq, Message)]
struct HistogramProto {
    #[prost(double, tag = "1")]
    min: f64,
    #[prost(double, tag = "2")]
    max: f64,
    #[prost(double, tag = "3")]
    num: f64,
    #[prost(double, tag = "4")]
    sum: f64,
    #[prost(double, tag = "5")]
    sum_squares: f64,
    #[prost(double, repeated, tag = "6")]
    bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    bucket: Vec<f64>,
}

/// TensorFlow's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Writes [`StepRecord`]s as a TensorBoard event file.
///
/// ```
/// use gradkit::diagnostics::TensorBoardSink;
/// let dir = std::env::temp_dir().join(format!("gradkit-tb-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let sink = TensorBoardSink::create(&dir)?;
/// assert!(sink.path().file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
/// assert!(TensorBoardSink::create(dir.join("missing")).is_err());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), gradkit::diagnostics::Error>(())
/// ```
#[derive(Debug)]
pub struct TensorBoardSink {
    file: File,
    path: PathBuf,
}

impl TensorBoardSink {
    /// Starts a new event file in the log folder `dir`, which must exist (a misspelt folder is
    /// an error, not a new tree somewhere unexpected).
    ///
    /// # Errors
    /// [`Error::Io`] when `dir` is missing, not a folder or not writable.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = dir.join(format!(
            "events.out.tfevents.{now}.gradkit.{}",
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut sink = Self { file, path };
        sink.event(Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(sink)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` as one event (tags in the module docs) and flushes it.
    ///
    /// # Errors
    /// [`Error::Io`] when the write fails.
    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let mut values = Vec::new();
        let mut scalar = |tag: String, v: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                reason = "TensorBoard scalars are f32"
            )]
            let v = v as f32;
            values.push(Value {
                tag,
                value: Some(Kind::SimpleValue(v)),
            });
        };
        if let Some(loss) = record.loss {
            scalar("loss".into(), loss);
        }
        if let Some(lr) = record.learning_rate {
            scalar("learning_rate".into(), lr);
        }
        scalar("grad_norm/global".into(), record.global_grad_norm);
        for l in &record.layers {
            scalar(format!("grad_norm/{}", l.name), l.grad_norm);
            if let Some(u) = l.update_ratio {
                scalar(format!("update_ratio/{}", l.name), u);
            }
            if l.non_finite > 0 {
                #[allow(clippy::cast_precision_loss, reason = "a count")]
                scalar(format!("grad_non_finite/{}", l.name), l.non_finite as f64);
            }
        }
        if let Some(c) = record.clip {
            scalar("clip/total_norm".into(), c.total_norm);
            scalar("clip/clipped".into(), f64::from(u8::from(c.clipped)));
            scalar("clip/skipped".into(), f64::from(u8::from(c.skipped)));
        }
        if let Some(n) = &record.noise {
            scalar("noise/simple_noise_scale".into(), n.simple_noise_scale);
            #[allow(clippy::cast_precision_loss, reason = "a batch size")]
            scalar(
                "noise/batch_size".into(),
                (n.micro_batches * n.micro_batch_size) as f64,
            );
            for l in &n.layers {
                scalar(format!("noise/snr/{}", l.name), l.snr);
            }
        }
        for l in &record.layers {
            values.push(Value {
                tag: format!("grad_abs/{}", l.name),
                value: Some(Kind::Histo(histogram_proto(&l.grad_histogram))),
            });
            if let Some(h) = &l.update_histogram {
                values.push(Value {
                    tag: format!("update_ratio_elements/{}", l.name),
                    value: Some(Kind::Histo(histogram_proto(h))),
                });
            }
        }
        self.event(Event {
            wall_time: wall_time(),
            step: i64::try_from(record.step).unwrap_or(i64::MAX),
            what: Some(What::Summary(Summary { value: values })),
        })
    }

    fn event(&mut self, event: Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A gradkit histogram as TensorBoard's: a zero bucket (limit 0), then the factor-of-two bins.
fn histogram_proto(h: &Histogram) -> HistogramProto {
    let mut bucket_limit = vec![0.0];
    #[allow(clippy::cast_precision_loss, reason = "counts")]
    let mut bucket = vec![h.zero as f64];
    let (mut sum, mut sum_squares) = (0.0, 0.0);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    if h.zero > 0 {
        (min, max) = (0.0, 0.0);
    }
    for k in 0..BINS {
        let (lo, hi) = (Histogram::lower_edge(k), Histogram::lower_edge(k + 1));
        bucket_limit.push(hi);
        #[allow(clippy::cast_precision_loss, reason = "counts")]
        let count = h.count(k) as f64;
        bucket.push(count);
        if count > 0.0 {
            let mid = (lo * hi).sqrt();
            sum += count * mid;
            sum_squares += count * mid * mid;
            min = min.min(lo);
            max = max.max(hi);
        }
    }
    #[allow(clippy::cast_precision_loss, reason = "counts")]
    let num = (h.total() - h.nan - h.inf) as f64;
    if num == 0.0 {
        (min, max) = (0.0, 0.0);
    }
    HistogramProto {
        min,
        max,
        num,
        sum,
        sum_squares,
        bucket_limit,
        bucket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TensorFlow's crc32c_test: the CRC-32C of 32 zero bytes is 0x8a9136aa.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let crc: u32 = 0x8a91_36aa;
        assert_eq!(
            masked_crc(&[0u8; 32]),
            crc.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn records_are_framed_and_decode_back() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gradkit-tb-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let sink = TensorBoardSink::create(&dir)?;
        let bytes = std::fs::read(sink.path()).map_err(|e| Error::io(sink.path(), e))?;
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        let len = usize::try_from(len).unwrap_or(0);
        assert_eq!(bytes.len(), 8 + 4 + len + 4);
        assert_eq!(bytes[8..12], masked_crc(&bytes[..8]).to_le_bytes());
        let event = Event::decode(&bytes[12..12 + len])
            .map_err(|e| Error::io(&dir, std::io::Error::other(e)))?;
        assert_eq!(event.what, Some(What::FileVersion("brain.Event:2".into())));
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
