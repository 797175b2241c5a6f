//! Encoded image bytes → 8-bit RGB pixels, as a PIL user's `Image.open(...).convert("RGB")`
//! sees them (gray replicated, alpha dropped, a palette looked up, a GIF's first frame),
//! with the EXIF orientation applied. Sizes are checked against [`ImageLimits`] from the
//! header, before any pixel is allocated: a decompression bomb is refused, not decoded.
//!
//! JPEGs are decoded by libjpeg-turbo's decoder (as Pillow's are), so their pixels are
//! Pillow's to the byte; the other formats by the `image` crate, lossless either way. A
//! JPEG cut short is refused as Pillow refuses it ("image file is truncated"), where
//! libjpeg alone would fill the rest with gray.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::HandlerError;

/// How large an image may be, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Pixels (width × height); Pillow's own bomb check errors at 2 × 89,478,485.
    pub max_pixels: u64,
    /// Bytes the decoder may allocate.
    pub max_decoded_bytes: u64,
}

impl Default for ImageLimits {
    /// 50 megapixels and 512 MiB decoded: any camera photo, no bomb.
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
            max_decoded_bytes: 512 << 20,
        }
    }
}

/// An image decoded to RGB, 3 bytes a pixel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

const FORMATS: &str = "JPEG, PNG, WebP, GIF or BMP";

fn refused(message: String) -> HandlerError {
    HandlerError::Input(message)
}

/// Decodes `bytes` (the format found from its first bytes, not from a name).
pub fn decode_rgb(bytes: &[u8], limits: &ImageLimits) -> Result<Rgb, HandlerError> {
    if bytes.is_empty() {
        return Err(refused("the image is empty (0 bytes)".into()));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        refused(format!(
            "the input is not an image Spillway decodes ({FORMATS}); it starts with {:02x?}",
            &bytes[..bytes.len().min(8)]
        ))
    })?;
    if !matches!(
        format,
        ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
    ) {
        return Err(refused(format!(
            "the image is {format:?}, which Spillway does not decode ({FORMATS})"
        )));
    }
    let name = format!("{format:?}").to_uppercase();
    let broken = |e: image::ImageError| match e {
        image::ImageError::Limits(e) => refused(format!(
            "the {name} image is larger than this model takes decoded: {e}"
        )),
        other => refused(format!("the {name} image cannot be decoded: {other}")),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(broken)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(refused(format!(
            "the {name} image declares {width}x{height} = {pixels} pixels, past the limit of {}",
            limits.max_pixels
        )));
    }
    if pixels == 0 {
        return Err(refused(format!("the {name} image is {width}x{height}")));
    }
    let orientation = decoder.orientation().map_err(broken)?;
    if format == ImageFormat::Jpeg
        && let Some(pixels) = jpeg_as_pillow(bytes, (width as usize, height as usize))?
    {
        let mut image =
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(width, height, pixels).ok_or_else(
                || refused("the JPEG decoded to fewer pixels than it declares".into()),
            )?);
        image.apply_orientation(orientation);
        return Ok(into_rgb(image));
    }
    let mut image = DynamicImage::from_decoder(decoder).map_err(broken)?;
    image.apply_orientation(orientation);
    Ok(into_rgb(image))
}

fn into_rgb(image: DynamicImage) -> Rgb {
    let rgb = image.into_rgb8();
    Rgb {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        pixels: rgb.into_raw(),
    }
}

/// Whether the JPEG ends: an end-of-image marker after its last start-of-scan (an EXIF
/// thumbnail's own markers come before the image's scans).
fn jpeg_is_whole(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let end = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_scan, end), (Some(scan), Some(end)) if end > scan)
}

/// The JPEG's RGB pixels from libjpeg-turbo's decoder, `None` for the color spaces it
/// does not turn into RGB itself (CMYK, YCCK: the `image` crate's decoder takes those).
fn jpeg_as_pillow(
    bytes: &[u8],
    (width, height): (usize, usize),
) -> Result<Option<Vec<u8>>, HandlerError> {
    if !jpeg_is_whole(bytes) {
        return Err(refused(
            "the JPEG image cannot be decoded: it is truncated (no end of image after its last scan)".into(),
        ));
    }
    // libjpeg reports errors by unwinding out of its callbacks.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<Vec<u8>>> {
        let decompress = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(
            decompress.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        ) {
            return Ok(None);
        }
        let mut image = decompress.rgb()?;
        let rows: Vec<[u8; 3]> = image.read_scanlines()?;
        image.finish()?;
        Ok(Some(rows.into_iter().flatten().collect()))
    });
    match decoded {
        Ok(Ok(Some(pixels))) if pixels.len() == width * height * 3 => Ok(Some(pixels)),
        Ok(Ok(Some(pixels))) => Err(refused(format!(
            "the JPEG image cannot be decoded: {} pixels for {width}x{height}",
            pixels.len() / 3
        ))),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(refused(format!("the JPEG image cannot be decoded: {e}"))),
        Err(_) => Err(refused(
            "the JPEG image cannot be decoded: libjpeg refused it".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, codecs::png::PngEncoder};

    fn png(width: u32, height: u32, color: image::ExtendedColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(data, width, height, color)
            .expect("png");
        out
    }

    #[test]
    fn gray_and_alpha_become_rgb_as_pil_converts_them() {
        let gray = decode_rgb(
            &png(2, 1, image::ExtendedColorType::L8, &[10, 200]),
            &ImageLimits::default(),
        )
        .expect("gray");
        assert_eq!(gray.pixels, [10, 10, 10, 200, 200, 200]);
        // RGBA: the alpha is dropped, not composited (PIL's convert("RGB")).
        let rgba = decode_rgb(
            &png(1, 1, image::ExtendedColorType::Rgba8, &[10, 20, 30, 0]),
            &ImageLimits::default(),
        )
        .expect("rgba");
        assert_eq!(
            (rgba.width, rgba.height, rgba.pixels),
            (1, 1, vec![10, 20, 30])
        );
    }

    #[test]
    fn broken_and_foreign_bytes_are_client_errors_that_say_why() {
        let limits = ImageLimits::default();
        let whole = png(4, 4, image::ExtendedColorType::Rgb8, &[7; 48]);
        let cases: [(&[u8], &str); 4] = [
            (&[], "empty"),
            (b"PK\x03\x04 a zip file renamed .png", "not an image"),
            (&whole[..whole.len() / 2], "cannot be decoded"),
            (b"%PDF-1.7", "not an image"),
        ];
        for (bytes, says) in cases {
            let err = decode_rgb(bytes, &limits).expect_err("refused");
            assert!(matches!(err, HandlerError::Input(_)), "{err:?}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    /// A PNG whose header declares 100000 × 100000 pixels is refused from its header:
    /// nothing near 30 GB is allocated.
    #[test]
    fn a_declared_size_past_the_limit_is_refused_before_decoding() {
        let bomb = crate::testing::images::png_declaring(100_000);
        let err = decode_rgb(&bomb, &ImageLimits::default()).expect_err("bomb");
        assert!(err.to_string().contains("past the limit"), "{err}");
    }
}
