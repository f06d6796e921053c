//! JSON Lines logs: one [`StepRecord`] per line, each written whole and flushed, so a run that
//! crashes leaves a log that reads back up to its last complete line.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

use rayon::prelude::*;
use std::path::{Path, PathBuf};

use crate::record::StepRecord;
use crate::{Error, Result};

/// Appends records to a JSON Lines file.
///
/// ```
/// use gradkit::diagnostics::{JsonlSink, read_log};
/// # let dir = std::env::temp_dir().join(format!("gradkit-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("run.jsonl");
/// let mut sink = JsonlSink::create(&path)?;
/// # let record: gradkit::diagnostics::StepRecord = serde_json::from_str(r#"{"step":0,"global_grad_norm":1.0,"clip_threshold":null,"params":[],"layers":[],"probes":[]}"#).unwrap();
/// sink.write(&record)?;
/// let log = read_log(&path)?;
/// assert_eq!(log.records.len(), 1);
/// # Ok::<(), gradkit::diagnostics::Error>(())
/// ```
#[derive(Debug)]
pub struct JsonlSink {
    file: File,
    path: PathBuf,
}

impl JsonlSink {
    /// Creates (or truncates) the log at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be created.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { file, path })
    }

    /// Opens the log at `path` for appending (creating it if needed), to continue a run. A log
    /// whose last line was cut off (a crash mid-write) first gets a newline, so the partial line
    /// stays one bad line and the next record a good one.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1))
                .and_then(|_| file.read_exact(&mut last))
                .map_err(|e| Error::io(&path, e))?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(Self { file, path })
    }

    /// Writes one record as one line (a single write of the whole line) and flushes it.
    ///
    /// # Errors
    /// [`Error::Encode`] or [`Error::Io`].
    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// A line that did not parse.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    /// Its 1-based line number.
    pub line: usize,
    /// Why it did not parse.
    pub message: String,
}

/// What [`read_log`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct LogContents {
    /// The records that parsed, in file order.
    pub records: Vec<StepRecord>,
    /// The lines that did not (a truncated last line, garbage), with their numbers.
    pub bad_lines: Vec<BadLine>,
}

/// Reads a JSON Lines log, keeping every record that parses and reporting the others by line
/// number. Blank lines are skipped. Lines parse in parallel (a 100,000-step log is hundreds of
/// megabytes), in blocks that keep file order.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn read_log(path: impl AsRef<Path>) -> Result<LogContents> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let parsed: Vec<Option<std::result::Result<StepRecord, BadLine>>> = lines
        .par_iter()
        .enumerate()
        .map(|(i, line)| {
            let text = String::from_utf8_lossy(line);
            if text.trim().is_empty() {
                return None;
            }
            Some(
                serde_json::from_str::<StepRecord>(&text).map_err(|e| BadLine {
                    line: i + 1,
                    message: e.to_string(),
                }),
            )
        })
        .collect();
    let mut out = LogContents {
        records: Vec::with_capacity(parsed.len()),
        bad_lines: Vec::new(),
    };
    for p in parsed.into_iter().flatten() {
        match p {
            Ok(r) => out.records.push(r),
            Err(bad) => out.bad_lines.push(bad),
        }
    }
    Ok(out)
}
