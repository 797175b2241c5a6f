//! Hostile images for tests.

/// A valid 1×1 grayscale PNG whose header declares `side` × `side` pixels (its IHDR
/// chunk's CRC made good again), as a decompression bomb declares a size it never holds.
pub fn png_declaring(side: u32) -> Vec<u8> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&[0], 1, 1, image::ExtendedColorType::L8)
        .expect("a 1x1 PNG encodes");
    // IHDR's width and height follow the 8-byte signature and the chunk's length and type.
    png[16..20].copy_from_slice(&side.to_be_bytes());
    png[20..24].copy_from_slice(&side.to_be_bytes());
    let crc = png[12..29].iter().fold(!0u32, |crc, &b| {
        (0..8).fold(crc ^ u32::from(b), |c, _| {
            if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            }
        })
    });
    png[29..33].copy_from_slice(&(!crc).to_be_bytes());
    png
}
