//! PyTorch checkpoints for tests: [`write_state_dict`] writes a state dict as
//! `torch.save` does (a zip of `archive/data.pkl`, a protocol-2 pickle of an
//! `OrderedDict` of `torch._utils._rebuild_tensor_v2` calls, and one `archive/data/N`
//! entry per storage), so the `.pth` path of an archive is tested without Python.
//! `torch.load(path, weights_only=True)` reads what it writes.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::HandlerError;
use crate::error::CandleContext;

/// A pickle being written.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, code: u8) -> &mut Self {
        self.0.push(code);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.op(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: usize) -> &mut Self {
        self.op(b'J');
        self.0.extend_from_slice(&(v as i32).to_le_bytes());
        self
    }
    fn ints(&mut self, values: &[usize]) -> &mut Self {
        self.op(b'(');
        for v in values {
            self.int(*v);
        }
        self.op(b't')
    }
    fn empty_ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b')').op(b'R')
    }
}

fn storage_class(dtype: DType) -> Result<&'static str, HandlerError> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        other => {
            return Err(HandlerError::Unsupported(format!(
                "no storage class for {other:?}"
            )));
        }
    })
}

/// Writes `tensors` (in this order) to `path` as `torch.save(state_dict, path)` would.
pub fn write_state_dict(tensors: &[(String, Tensor)], path: &Path) -> Result<(), HandlerError> {
    let io = |source| HandlerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let zip_err = |e: zip::result::ZipError| io(std::io::Error::other(e));
    let mut pickle = Pickle(vec![0x80, 2]);
    pickle.empty_ordered_dict().op(b'(');
    for (key, (name, tensor)) in tensors.iter().enumerate() {
        let dims = tensor.dims().to_vec();
        let mut strides = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        pickle
            .text(name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b'(');
        // The storage's persistent id: ('storage', class, key, location, numel).
        pickle
            .op(b'(')
            .text("storage")
            .global("torch", storage_class(tensor.dtype())?)
            .text(&key.to_string())
            .text("cpu")
            .int(tensor.elem_count())
            .op(b't')
            .op(b'Q');
        pickle
            .int(0)
            .ints(&dims)
            .ints(&strides)
            .op(0x89)
            .empty_ordered_dict()
            .op(b't')
            .op(b'R');
    }
    pickle.op(b'u').op(b'.');

    let file = std::fs::File::create(path).map_err(io)?;
    let mut zip = zip::ZipWriter::new(file);
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored)
        .map_err(zip_err)?;
    zip.write_all(&pickle.0).map_err(io)?;
    zip.start_file("archive/byteorder", stored)
        .map_err(zip_err)?;
    zip.write_all(b"little").map_err(io)?;
    for (key, (name, tensor)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), stored)
            .map_err(zip_err)?;
        let mut bytes = Vec::new();
        tensor
            .flatten_all()
            .and_then(|t| t.write_bytes(&mut bytes))
            .context(|| format!("tensor {name}"))?;
        zip.write_all(&bytes).map_err(io)?;
    }
    zip.start_file("archive/version", stored).map_err(zip_err)?;
    zip.write_all(b"3\n").map_err(io)?;
    zip.finish().map_err(zip_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's reader (what the server converts `.pth` files with) reads back names,
    /// shapes, dtypes and values.
    #[test]
    fn a_written_state_dict_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.pth");
        let a = Tensor::arange(0f32, 24f32, &candle_core::Device::Cpu)
            .and_then(|t| t.reshape((2, 3, 4)))
            .expect("a");
        let b = Tensor::new(&[7i64], &candle_core::Device::Cpu).expect("b");
        write_state_dict(
            &[("x.weight".into(), a.clone()), ("n.count".into(), b)],
            &path,
        )
        .expect("write");
        let mut read = candle_core::pickle::read_all(&path).expect("read");
        read.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(read[0].0, "n.count");
        assert_eq!(read[0].1.to_vec1::<i64>().expect("i64"), [7]);
        assert_eq!(read[1].0, "x.weight");
        assert_eq!(read[1].1.dims(), [2, 3, 4]);
        let diff: f32 = (&read[1].1 - &a)
            .and_then(|d| d.abs()?.sum_all()?.to_scalar())
            .expect("diff");
        assert_eq!(diff, 0.0);
    }
}
