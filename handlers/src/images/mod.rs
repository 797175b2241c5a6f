//! Images as the image handlers take them: [`decode`] turns encoded bytes into RGB
//! pixels within limits, [`resample`] resizes as Pillow does, and [`transform`] holds a
//! model's preprocessing (TorchServe's or a Hugging Face image processor's) as data.
//! No tensors and no I/O here: bytes in, floats out.

pub mod decode;
pub mod resample;
pub mod transform;

pub use decode::{ImageLimits, Rgb, decode_rgb};
pub use transform::Preprocess;
