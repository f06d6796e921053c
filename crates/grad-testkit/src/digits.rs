//! The digits data set shipped in `data/digits.csv.gz`: 1,797 8x8 images of handwritten digits
//! (UCI, Alpaydin & Kaynak 1998, CC BY 4.0), with pixels scaled to `[0, 1]` and a fixed split —
//! every fifth row (rows 4, 9, 14, ...) is the test set — so results compare run to run.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Errors reading the data set.
#[derive(Debug, thiserror::Error)]
pub enum DigitsError {
    /// The file is missing or unreadable.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A line is not 65 integers with pixels in 0..=16 and a label in 0..=9.
    #[error("{path}: line {line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A candle error building the tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One split: images `[n, 64]` (f32 in `[0, 1]`) and labels `[n]` (u32).
#[derive(Debug, Clone)]
pub struct Split {
    /// Pixels, scaled by 1/16.
    pub images: Tensor,
    /// Class labels 0..=9.
    pub labels: Tensor,
}

/// The training and test splits.
#[derive(Debug, Clone)]
pub struct Digits {
    /// Four rows out of five.
    pub train: Split,
    /// Every fifth row.
    pub test: Split,
}

/// The repository's copy of the data set.
pub fn default_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits.csv.gz"
    ))
}

/// Reads `path` (gzip-compressed CSV: 64 pixel counts and a label per line).
///
/// # Errors
/// [`DigitsError::Io`] for a missing or unreadable (or not gzip) file,
/// [`DigitsError::Malformed`] for a bad line.
pub fn load(path: &Path, device: &Device) -> Result<Digits, DigitsError> {
    let io = |source| DigitsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(io)?;
    let (mut train, mut test) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |message: String| DigitsError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let values: Vec<u32> = line
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|e| bad(format!("{v:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if values.len() != 65 {
            return Err(bad(format!("{} values, expected 65", values.len())));
        }
        if values[..64].iter().any(|&p| p > 16) || values[64] > 9 {
            return Err(bad("pixel above 16 or label above 9".into()));
        }
        let target = if i % 5 == 4 { &mut test } else { &mut train };
        #[allow(clippy::cast_precision_loss, reason = "pixel counts are at most 16")]
        target
            .0
            .extend(values[..64].iter().map(|&p| p as f32 / 16.0));
        target.1.push(values[64]);
    }
    let split = |(pixels, labels): (Vec<f32>, Vec<u32>)| -> Result<Split, DigitsError> {
        let n = labels.len();
        Ok(Split {
            images: Tensor::from_vec(pixels, (n, 64), device)?,
            labels: Tensor::from_vec(labels, n, device)?,
        })
    };
    Ok(Digits {
        train: split(train)?,
        test: split(test)?,
    })
}
