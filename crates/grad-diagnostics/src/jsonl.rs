//! JSON Lines logs: one [`StepRecord`] per line, each written whole and flushed, so a run that
//! crashes leaves a log that reads back up to its last complete line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::record::StepRecord;
use crate::{Error, Result};

/// Appends records to a JSON Lines file.
///
/// ```
/// use grad_diagnostics::{JsonlSink, read_log};
/// # let dir = std::env::temp_dir().join(format!("gradkit-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("run.jsonl");
/// let mut sink = JsonlSink::create(&path)?;
/// # let record: grad_diagnostics::StepRecord = serde_json::from_str(r#"{"step":0,"global_grad_norm":1.0,"clip_threshold":null,"params":[],"layers":[],"probes":[]}"#).unwrap();
/// sink.write(&record)?;
/// let log = read_log(&path)?;
/// assert_eq!(log.records.len(), 1);
/// # Ok::<(), grad_diagnostics::Error>(())
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

    /// Opens the log at `path` for appending (creating it if needed), to continue a run.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
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
/// number. Blank lines are skipped.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn read_log(path: impl AsRef<Path>) -> Result<LogContents> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = LogContents {
        records: Vec::new(),
        bad_lines: Vec::new(),
    };
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let bytes = line.map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8_lossy(&bytes);
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepRecord>(&text) {
            Ok(r) => out.records.push(r),
            Err(e) => out.bad_lines.push(BadLine {
                line: i + 1,
                message: e.to_string(),
            }),
        }
    }
    Ok(out)
}
