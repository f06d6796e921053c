//! The conformance file format: parsing and conversion to candle tensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

/// What can go wrong reading a conformance file or a case's fields.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid JSON of the documented format.
    #[error("{path} is not a valid conformance file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A tensor's data does not fit its shape or dtype.
    #[error("{0}")]
    Malformed(String),
    /// A case lacks a field the test needs.
    #[error("case {case}: missing {what}")]
    Missing {
        /// The case's name.
        case: String,
        /// What is missing.
        what: String,
    },
    /// A candle error while building a tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The folder holding the conformance files: `GRADKIT_CONFORMANCE_DIR` when set, else the
/// repository's `conformance/`.
pub fn conformance_dir() -> PathBuf {
    match std::env::var_os("GRADKIT_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../conformance")),
    }
}

/// Reads and checks `<conformance_dir>/<op>.json`.
///
/// # Errors
/// [`LoadError`] when the file is missing or malformed (a data length that does not match its
/// shape, an unknown dtype, a string other than `nan`/`inf`/`-inf` where a number belongs).
pub fn load(op: &str) -> Result<ConformanceFile, LoadError> {
    let path = conformance_dir().join(format!("{op}.json"));
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    let raw: RawFile =
        serde_json::from_str(&text).map_err(|source| LoadError::Parse { path, source })?;
    raw.check()
}

/// One op's file of cases.
#[derive(Debug, Clone)]
pub struct ConformanceFile {
    /// The op's name (the file name without `.json`).
    pub op: String,
    /// Which PyTorch produced the expectations.
    pub reference: String,
    /// What PyTorch call and conventions the expectations follow.
    pub semantics: String,
    /// Extra notes, such as the cases meaningful only in f64.
    pub notes: Option<String>,
    /// The cases, in file order.
    pub cases: Vec<Case>,
}

impl ConformanceFile {
    /// The names of the cases the file's notes list as meaningful only in f64.
    pub fn f64_only(&self) -> Vec<&str> {
        let notes = self.notes.as_deref().unwrap_or("");
        self.cases
            .iter()
            .map(|c| c.name.as_str())
            .filter(|name| notes.contains(&format!("\"{name}\"")))
            .collect()
    }
}

/// One case: attributes, inputs and either expected outputs or an expected error.
#[derive(Debug, Clone)]
pub struct Case {
    /// Unique name within the file.
    pub name: String,
    /// Scalar attributes (numbers, booleans, strings or null).
    pub attrs: BTreeMap<String, Value>,
    /// Named input tensors.
    pub inputs: BTreeMap<String, RawTensor>,
    /// What the op must produce.
    pub expected: Expected,
}

/// A case's expectation.
#[derive(Debug, Clone)]
pub enum Expected {
    /// Named output tensors.
    Tensors(BTreeMap<String, RawTensor>),
    /// PyTorch raised this error; the port must return an error too.
    Error(String),
}

impl Case {
    /// Whether PyTorch rejected this case's input.
    pub fn expects_error(&self) -> bool {
        matches!(self.expected, Expected::Error(_))
    }

    /// The input called `name`.
    ///
    /// # Errors
    /// [`LoadError::Missing`] when the case has no such input.
    pub fn input(&self, name: &str) -> Result<&RawTensor, LoadError> {
        self.inputs
            .get(name)
            .ok_or_else(|| self.missing(format!("input {name}")))
    }

    /// The input called `name`, if the case has it (an absent input is an absent argument).
    pub fn input_opt(&self, name: &str) -> Option<&RawTensor> {
        self.inputs.get(name)
    }

    /// The expected outputs (empty for an error case).
    pub fn expected_tensors(&self) -> BTreeMap<String, RawTensor> {
        match &self.expected {
            Expected::Tensors(t) => t.clone(),
            Expected::Error(_) => BTreeMap::new(),
        }
    }

    /// A numeric attribute; `None` when it is null. The strings `nan`, `inf` and `-inf` map to
    /// the non-finite values.
    ///
    /// # Errors
    /// [`LoadError::Missing`] when absent or not a number.
    pub fn attr_f64(&self, name: &str) -> Result<Option<f64>, LoadError> {
        match self.attrs.get(name) {
            Some(Value::Null) => Ok(None),
            Some(v) => number(v)
                .map(Some)
                .ok_or_else(|| self.missing(format!("numeric attribute {name}"))),
            None => Err(self.missing(format!("attribute {name}"))),
        }
    }

    /// A boolean attribute.
    ///
    /// # Errors
    /// [`LoadError::Missing`] when absent or not a boolean.
    pub fn attr_bool(&self, name: &str) -> Result<bool, LoadError> {
        self.attrs
            .get(name)
            .and_then(Value::as_bool)
            .ok_or_else(|| self.missing(format!("boolean attribute {name}")))
    }

    /// A string attribute; `None` when it is null.
    ///
    /// # Errors
    /// [`LoadError::Missing`] when absent or neither a string nor null.
    pub fn attr_str(&self, name: &str) -> Result<Option<&str>, LoadError> {
        match self.attrs.get(name) {
            Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            _ => Err(self.missing(format!("string attribute {name}"))),
        }
    }

    /// An integer attribute; `None` when it is null.
    ///
    /// # Errors
    /// [`LoadError::Missing`] when absent or not an integer.
    pub fn attr_i64(&self, name: &str) -> Result<Option<i64>, LoadError> {
        match self.attrs.get(name) {
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.missing(format!("integer attribute {name}"))),
            None => Err(self.missing(format!("attribute {name}"))),
        }
    }

    fn missing(&self, what: String) -> LoadError {
        LoadError::Missing {
            case: self.name.clone(),
            what,
        }
    }
}

/// A tensor as stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Its shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// Its elements, row-major.
    pub data: RawData,
}

/// Elements of a [`RawTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum RawData {
    /// Floats (`"f64"`), with the non-finite strings already mapped.
    F64(Vec<f64>),
    /// Integers (`"i64"`): class indices, counters, flags, shapes.
    I64(Vec<i64>),
}

impl RawTensor {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            RawData::F64(v) => v.len(),
            RawData::I64(v) => v.len(),
        }
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f64 (integers converted).
    pub fn values_f64(&self) -> Vec<f64> {
        match &self.data {
            RawData::F64(v) => v.clone(),
            #[allow(clippy::cast_precision_loss, reason = "test data holds small integers")]
            RawData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The elements as i64.
    ///
    /// # Errors
    /// [`LoadError::Malformed`] for float data.
    pub fn values_i64(&self) -> Result<Vec<i64>, LoadError> {
        match &self.data {
            RawData::I64(v) => Ok(v.clone()),
            RawData::F64(_) => Err(LoadError::Malformed("expected i64 data, got f64".into())),
        }
    }

    /// The single element of a scalar, as f64.
    ///
    /// # Errors
    /// [`LoadError::Malformed`] unless the tensor has exactly one element.
    pub fn scalar_f64(&self) -> Result<f64, LoadError> {
        match self.values_f64().as_slice() {
            [x] => Ok(*x),
            other => Err(LoadError::Malformed(format!(
                "expected one element, got {}",
                other.len()
            ))),
        }
    }

    /// A CPU tensor: float data as `dtype` (cast from f64, so f32 inputs are the rounded f64
    /// ones), integer data as i64 whatever `dtype` says.
    ///
    /// # Errors
    /// candle's error if the tensor cannot be built.
    pub fn to_tensor(&self, dtype: DType) -> Result<Tensor, LoadError> {
        self.to_tensor_on(dtype, &Device::Cpu)
    }

    /// As [`to_tensor`](Self::to_tensor), on `device`.
    ///
    /// # Errors
    /// candle's error if the tensor cannot be built.
    pub fn to_tensor_on(&self, dtype: DType, device: &Device) -> Result<Tensor, LoadError> {
        Ok(match &self.data {
            RawData::F64(v) => {
                Tensor::from_vec(v.clone(), self.shape.as_slice(), device)?.to_dtype(dtype)?
            }
            RawData::I64(v) => Tensor::from_vec(v.clone(), self.shape.as_slice(), device)?,
        })
    }
}

#[derive(Deserialize)]
struct RawFile {
    op: String,
    reference: String,
    semantics: String,
    #[serde(default)]
    notes: Option<String>,
    cases: Vec<RawCase>,
}

#[derive(Deserialize)]
struct RawCase {
    name: String,
    attrs: BTreeMap<String, Value>,
    inputs: BTreeMap<String, JsonTensor>,
    expected: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct JsonTensor {
    shape: Vec<usize>,
    dtype: String,
    data: Vec<Value>,
}

impl RawFile {
    fn check(self) -> Result<ConformanceFile, LoadError> {
        let cases = self
            .cases
            .into_iter()
            .map(|c| {
                let ctx = |what: &str| format!("{}: case {}: {what}", self.op, c.name);
                let inputs = c
                    .inputs
                    .into_iter()
                    .map(|(k, t)| Ok((k.clone(), t.check(&ctx(&k))?)))
                    .collect::<Result<_, LoadError>>()?;
                let expected = match c.expected.get("error") {
                    Some(Value::String(msg)) => Expected::Error(msg.clone()),
                    _ => Expected::Tensors(
                        c.expected
                            .into_iter()
                            .map(|(k, v)| {
                                let t: JsonTensor = serde_json::from_value(v).map_err(|e| {
                                    LoadError::Malformed(format!("{}: {e}", ctx(&k)))
                                })?;
                                Ok((k.clone(), t.check(&ctx(&k))?))
                            })
                            .collect::<Result<_, LoadError>>()?,
                    ),
                };
                Ok(Case {
                    name: c.name,
                    attrs: c.attrs,
                    inputs,
                    expected,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(ConformanceFile {
            op: self.op,
            reference: self.reference,
            semantics: self.semantics,
            notes: self.notes,
            cases,
        })
    }
}

impl JsonTensor {
    fn check(self, ctx: &str) -> Result<RawTensor, LoadError> {
        let n: usize = self.shape.iter().product();
        if n != self.data.len() {
            return Err(LoadError::Malformed(format!(
                "{ctx}: shape {:?} needs {n} elements, data has {}",
                self.shape,
                self.data.len()
            )));
        }
        let bad = |v: &Value| LoadError::Malformed(format!("{ctx}: bad element {v}"));
        let data = match self.dtype.as_str() {
            "f64" => RawData::F64(
                self.data
                    .iter()
                    .map(|v| number(v).ok_or_else(|| bad(v)))
                    .collect::<Result<_, _>>()?,
            ),
            "i64" => RawData::I64(
                self.data
                    .iter()
                    .map(|v| v.as_i64().ok_or_else(|| bad(v)))
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(LoadError::Malformed(format!(
                    "{ctx}: unknown dtype {other}"
                )));
            }
        };
        Ok(RawTensor {
            shape: self.shape,
            data,
        })
    }
}

/// A JSON number, or one of the strings the format uses for non-finite floats.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "nan" => Some(f64::NAN),
            "inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}
