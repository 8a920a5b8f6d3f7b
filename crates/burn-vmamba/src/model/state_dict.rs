//! The tensor files a checkpoint comes in: [`StateDict`] (upstream-named f32 tensors) read from
//! `.safetensors` or PyTorch's `torch.save` zip files (`pth`), and written as `.safetensors`;
//! [`FloatDtype`], the one decoder of stored floats both formats use. Which key goes to which
//! parameter is [`crate::model::checkpoint`]'s job.

// A load error lists every bad key and is returned once per file: its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::path::Path;

use super::checkpoint::LoadError;

/// One tensor of a state dict, f32, row-major, in upstream's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct StateTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Upstream-named tensors (`layers.0.blocks.0.op.A_logs` → tensor).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    /// The tensors by key.
    pub tensors: BTreeMap<String, StateTensor>,
}

/// The float types a checkpoint may store, each read as f32 (little-endian, as both formats
/// store them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary64 (rounded to f32).
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatDtype {
    /// A safetensors dtype, or an error naming a non-float one.
    pub fn of_safetensors(dtype: safetensors::Dtype) -> Result<Self, String> {
        use safetensors::Dtype;
        match dtype {
            Dtype::F32 => Ok(Self::F32),
            Dtype::F64 => Ok(Self::F64),
            Dtype::F16 => Ok(Self::F16),
            Dtype::BF16 => Ok(Self::BF16),
            other => Err(format!(
                "dtype {other:?} is not a float type (expected F32, F64, F16 or BF16)"
            )),
        }
    }

    /// A PyTorch storage class (`FloatStorage`, …), or an error naming a non-float one.
    pub fn of_torch_storage(name: &str) -> Result<Self, String> {
        match name {
            "FloatStorage" => Ok(Self::F32),
            "DoubleStorage" => Ok(Self::F64),
            "HalfStorage" => Ok(Self::F16),
            "BFloat16Storage" => Ok(Self::BF16),
            other => Err(format!(
                "storage type {other} is not a float type (expected FloatStorage, \
                 DoubleStorage, HalfStorage or BFloat16Storage)"
            )),
        }
    }

    /// Bytes per value.
    pub fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 => 8,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// One value from exactly [`Self::width`] bytes.
    ///
    /// # Panics
    /// If `bytes` is not [`Self::width`] long (callers slice by the width).
    pub fn decode(self, bytes: &[u8]) -> f32 {
        let b = |i: usize| bytes[i];
        assert_eq!(
            bytes.len(),
            self.width(),
            "FloatDtype::decode takes one value"
        );
        match self {
            Self::F32 => f32::from_le_bytes([b(0), b(1), b(2), b(3)]),
            Self::F64 => {
                f64::from_le_bytes([b(0), b(1), b(2), b(3), b(4), b(5), b(6), b(7)]) as f32
            }
            Self::F16 => half::f16::from_le_bytes([b(0), b(1)]).to_f32(),
            Self::BF16 => half::bf16::from_le_bytes([b(0), b(1)]).to_f32(),
        }
    }

    /// Every value of a contiguous buffer (a trailing partial value is not read: safetensors
    /// checks the buffer's length against the shape before this).
    pub fn decode_all(self, bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(self.width())
            .map(|c| self.decode(c))
            .collect()
    }
}

impl StateDict {
    /// Reads `.safetensors`, or a PyTorch file (`.pth`, `.pt`, `.bin`, `.ckpt`): a release
    /// checkpoint's `model` entry when it has one, else the whole file as a state dict.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_lowercase();
        match ext.as_str() {
            "safetensors" => Self::read_safetensors(path),
            "pth" | "pt" | "bin" | "ckpt" => Self::read_pytorch(path),
            _ => Err(LoadError::read(
                path,
                format!(
                    "unknown extension {ext:?}: expected .safetensors, .pth, .pt, .bin or .ckpt"
                ),
            )),
        }
    }

    fn read_safetensors(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::read(path, e))?;
        let file =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LoadError::read(path, e))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let values = FloatDtype::of_safetensors(view.dtype())
                .map(|dtype| dtype.decode_all(view.data()))
                .map_err(|e| LoadError::read(path, format!("tensor {name}: {e}")))?;
            tensors.insert(
                name,
                StateTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(Self { tensors })
    }

    fn read_pytorch(path: &Path) -> Result<Self, LoadError> {
        let tensors = super::pth::read(path).map_err(|e| LoadError::read(path, e))?;
        Ok(Self {
            tensors: tensors
                .into_iter()
                .map(|(name, shape, values)| (name, StateTensor { shape, values }))
                .collect(),
        })
    }

    /// Writes the tensors as f32 `.safetensors`.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let bytes: &[u8] = bytemuck::cast_slice(&t.values);
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    t.shape.clone(),
                    bytes,
                )
                .map_err(std::io::Error::other)?;
                Ok((k.clone(), view))
            })
            .collect::<std::io::Result<_>>()?;
        safetensors::serialize_to_file(views, None, path.as_ref()).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::FloatDtype;

    /// 1.5 and −0.25 in each format, written out by hand (IEEE bit patterns, little-endian).
    #[test]
    fn every_float_dtype_decodes_its_bit_patterns() {
        let cases: [(FloatDtype, Vec<u8>); 4] = [
            // 1.5 = 0x3FC00000, −0.25 = 0xBE800000
            (FloatDtype::F32, vec![0, 0, 0xC0, 0x3F, 0, 0, 0x80, 0xBE]),
            // 1.5 = 0x3FF8000000000000, −0.25 = 0xBFD0000000000000
            (
                FloatDtype::F64,
                vec![0, 0, 0, 0, 0, 0, 0xF8, 0x3F, 0, 0, 0, 0, 0, 0, 0xD0, 0xBF],
            ),
            // 1.5 = 0x3E00, −0.25 = 0xB400
            (FloatDtype::F16, vec![0, 0x3E, 0, 0xB4]),
            // 1.5 = 0x3FC0, −0.25 = 0xBE80
            (FloatDtype::BF16, vec![0xC0, 0x3F, 0x80, 0xBE]),
        ];
        for (dtype, bytes) in cases {
            assert_eq!(dtype.decode_all(&bytes), vec![1.5, -0.25], "{dtype:?}");
        }
    }

    #[test]
    fn non_float_dtypes_are_named_in_the_error() {
        let err = FloatDtype::of_safetensors(safetensors::Dtype::I64).unwrap_err();
        assert!(err.contains("I64") && err.contains("F32"), "{err}");
        let err = FloatDtype::of_torch_storage("LongStorage").unwrap_err();
        assert!(err.contains("LongStorage"), "{err}");
        assert_eq!(
            FloatDtype::of_torch_storage("HalfStorage"),
            Ok(FloatDtype::F16)
        );
    }
}
