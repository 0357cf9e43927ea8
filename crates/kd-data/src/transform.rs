//! torchvision's ImageNet transforms on decoded images, one sample at a
//! time on a CPU worker thread:
//!
//! - training: `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`
//!   then `RandomHorizontalFlip()`;
//! - evaluation: `Resize(resize)` (shorter side, aspect kept) then
//!   `CenterCrop(size)`.
//!
//! Both resize as PIL does for torchvision's PIL path: antialiased bilinear
//! (a triangle filter widened by the scale factor when shrinking), done by
//! `fast_image_resize`, whose `Convolution(Bilinear)` is Pillow's filter.
//! Images are decoded as PIL's `Image.open(f).convert('RGB')` gives them:
//! grey replicated to three channels, alpha dropped (not blended), EXIF
//! orientation and ICC profiles ignored. The output of a sample is `u8`
//! pixels, rows of `size` RGB triples (HWC), what `PILToTensor` holds
//! before its transpose.

use fast_image_resize as fr;
use rand::Rng;

/// RandomResizedCrop's default bounds on the crop's share of the image
/// area and on its aspect ratio (width / height).
pub const SCALE: (f64, f64) = (0.08, 1.0);
pub const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// A rectangle of a source image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// A decoded image: `width × height` RGB triples, row-major.
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Decodes a JPEG or PNG file's bytes (the format is read from the bytes,
/// as PIL does, not from the file name) to 8-bit RGB. JPEG goes to
/// zune-jpeg directly (the `image` crate's wrapper around it copies the
/// file and parses its headers again, a third of the decoding time on
/// ImageNet-sized photos); everything else through `image`.
pub fn decode(bytes: &[u8]) -> Result<Rgb, String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes);
    }
    let img = image::load_from_memory(bytes).map_err(|e| {
        let text = one_line(&e.to_string());
        match e {
            image::ImageError::Unsupported(_) => {
                format!("{text} (kd decodes JPEG and PNG files only)")
            }
            _ => format!("cannot decode: {text}"),
        }
    })?;
    let rgb = img.into_rgb8();
    let (width, height) = rgb.dimensions();
    checked(Rgb {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}

/// The decoders' messages may span lines; errors here are one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// PIL's `DecompressionBombError` threshold (twice `MAX_IMAGE_PIXELS`):
/// larger images are refused rather than decoded into gigabytes.
const MAX_PIXELS: u64 = 2 * 89_478_485;

fn too_large(w: u64, h: u64) -> String {
    format!("the image is {w}×{h} pixels, more than {MAX_PIXELS} (PIL's decompression-bomb limit)")
}

fn checked(img: Rgb) -> Result<Rgb, String> {
    if img.width == 0 || img.height == 0 {
        return Err(format!("the image is {}×{} pixels", img.width, img.height));
    }
    if img.width as u64 * img.height as u64 > MAX_PIXELS {
        return Err(too_large(img.width as u64, img.height as u64));
    }
    Ok(img)
}

/// A JPEG of any colour space (grey, YCbCr, RGB, CMYK, YCCK) as RGB, the
/// conversion zune-jpeg does; lenient about recoverable stream errors, as
/// libjpeg (PIL's decoder) is.
fn decode_jpeg(bytes: &[u8]) -> Result<Rgb, String> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let fail = |e: zune_jpeg::errors::DecodeErrors| {
        format!("cannot decode: JPEG: {}", one_line(&format!("{e:?}")))
    };
    decoder.decode_headers().map_err(fail)?;
    if let Some((w, h)) = decoder.dimensions()
        && w as u64 * h as u64 > MAX_PIXELS
    {
        return Err(too_large(w as u64, h as u64));
    }
    let pixels = decoder.decode().map_err(fail)?;
    let (width, height) = decoder
        .dimensions()
        .ok_or_else(|| "cannot decode: JPEG: no frame header".to_string())?;
    let (width, height) = (width as u32, height as u32);
    if pixels.len() != 3 * width as usize * height as usize {
        return Err(format!(
            "cannot decode: JPEG: {} bytes of pixels for {width}×{height} RGB",
            pixels.len()
        ));
    }
    checked(Rgb {
        width,
        height,
        pixels,
    })
}

/// Per-channel normalisation of `u8` pixels, `(v / 255 - mean) / std` in
/// `f32` as torch computes `ToTensor` then `Normalize`, tabulated: one
/// look-up per value on the worker threads instead of passes over the
/// batch on the training thread.
#[derive(Clone)]
pub struct Normalization {
    table: [[f32; 256]; 3],
}

impl Normalization {
    pub fn new(mean: [f64; 3], std: [f64; 3]) -> Normalization {
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            let (m, s) = (mean[c] as f32, std[c] as f32);
            for (v, out) in row.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - m) / s;
            }
        }
        Normalization { table }
    }

    /// `rgb` (RGB triples) normalised into `out`, in the same layout.
    pub fn apply(&self, rgb: &[u8], out: &mut [f32]) {
        for (px, o) in rgb.chunks_exact(3).zip(out.chunks_exact_mut(3)) {
            o[0] = self.table[0][px[0] as usize];
            o[1] = self.table[1][px[1] as usize];
            o[2] = self.table[2][px[2] as usize];
        }
    }
}

/// Python's `int(round(x))`: halves round to even.
fn round_py(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// The box `RandomResizedCrop.get_params` draws for a `width × height`
/// image: up to ten tries of an area fraction uniform in `SCALE` and a
/// log-uniform aspect ratio in `RATIO`, the first that fits the image
/// taken at a uniform position; if none fits, the central crop of the
/// image clamped to `RATIO`. The draws come from `rng`, not torch's
/// generator, so the boxes follow the same law but are not the same boxes.
pub fn random_resized_crop(width: u32, height: u32, rng: &mut impl Rng) -> CropBox {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (RATIO.0.ln(), RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(SCALE.0..SCALE.1);
        let aspect = rng.random_range(log_lo..log_hi).exp();
        let w = round_py((target * aspect).sqrt());
        let h = round_py((target / aspect).sqrt());
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let (w, h) = (w as u32, h as u32);
            return CropBox {
                top: rng.random_range(0..=height - h),
                left: rng.random_range(0..=width - w),
                height: h,
                width: w,
            };
        }
    }
    central_crop(width, height)
}

/// RandomResizedCrop's fallback: the whole image, narrowed to the nearest
/// allowed aspect ratio when it is outside `RATIO`, centred.
pub fn central_crop(width: u32, height: u32) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < RATIO.0 {
        (width, round_py(width as f64 / RATIO.0) as u32)
    } else if in_ratio > RATIO.1 {
        (round_py(height as f64 * RATIO.1) as u32, height)
    } else {
        (width, height)
    };
    // Rounding cannot pass the side it came from, but 1-pixel images
    // round to 0: keep at least one pixel.
    let (w, h) = (w.clamp(1, width), h.clamp(1, height));
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// `Resize(resize)`'s output size for a `width × height` image: the
/// shorter side becomes `resize`, the longer keeps the aspect ratio,
/// truncated (torchvision's `_compute_resized_output_size`).
pub fn resized_size(width: u32, height: u32, resize: u32) -> (u32, u32) {
    let long = |l: u32, s: u32| (resize as u64 * l as u64 / s as u64) as u32;
    if width <= height {
        (resize, long(height, width))
    } else {
        (long(width, height), resize)
    }
}

/// `CenterCrop`'s offset of the crop in one dimension of `len` pixels:
/// `int(round((len - crop) / 2))`, or, for a crop larger than the image,
/// minus the zero padding torchvision adds before it (left/top: half,
/// rounded down).
fn center_offset(len: u32, crop: u32) -> i64 {
    if crop > len {
        -((crop - len) as i64 / 2)
    } else {
        round_py((len - crop) as f64 / 2.0)
    }
}

/// Per-thread scratch space: the resizer and its output, reused across
/// the samples a worker handles.
#[derive(Default)]
pub struct Scratch {
    resizer: fr::Resizer,
    resized: Vec<u8>,
}

fn resize_error(e: impl std::fmt::Display) -> String {
    format!("resizing: {e}")
}

/// Resizes `src`'s `crop` to `dst_w × dst_h` into `out` (RGB rows), as
/// PIL's `img.crop(box).resize(size, BILINEAR)`: the filter sees only the
/// crop's pixels. A crop already of the output size is copied.
fn resize_crop(
    src: &Rgb,
    crop: CropBox,
    dst_w: u32,
    dst_h: u32,
    out: &mut [u8],
    resizer: &mut fr::Resizer,
) -> Result<(), String> {
    let image = fr::images::ImageRef::new(src.width, src.height, &src.pixels, fr::PixelType::U8x3)
        .map_err(resize_error)?;
    let view = fr::images::CroppedImage::new(&image, crop.left, crop.top, crop.width, crop.height)
        .map_err(resize_error)?;
    let mut dst = fr::images::Image::from_slice_u8(dst_w, dst_h, out, fr::PixelType::U8x3)
        .map_err(resize_error)?;
    let options =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    resizer
        .resize(&view, &mut dst, &options)
        .map_err(resize_error)
}

/// The training transform of one image into `out` (`size × size` RGB):
/// `crop` resized to the output, mirrored left to right when `flip`.
pub fn train_into(
    src: &Rgb,
    crop: CropBox,
    flip: bool,
    size: u32,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), String> {
    resize_crop(src, crop, size, size, out, &mut scratch.resizer)?;
    if flip {
        for row in out.chunks_exact_mut(3 * size as usize) {
            // Reversing the bytes reverses the pixels and each pixel's
            // channels; reversing each pixel back restores RGB order.
            row.reverse();
            for px in row.chunks_exact_mut(3) {
                px.swap(0, 2);
            }
        }
    }
    Ok(())
}

/// The evaluation transform of one image into `out` (`size × size` RGB):
/// the shorter side resized to `resize`, then the central `size × size`,
/// zero where the crop is larger than the resized image.
pub fn eval_into(
    src: &Rgb,
    resize: u32,
    size: u32,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<(), String> {
    let (rw, rh) = resized_size(src.width, src.height, resize);
    if rw == 0 || rh == 0 {
        return Err(format!(
            "a {}×{} image resized to a shorter side of {resize} has no pixels",
            src.width, src.height
        ));
    }
    // torchvision returns the image as it is when it already has the size.
    let resized: &[u8] = if (rw, rh) == (src.width, src.height) {
        &src.pixels
    } else {
        scratch.resized.resize(3 * rw as usize * rh as usize, 0);
        let whole = CropBox {
            top: 0,
            left: 0,
            height: src.height,
            width: src.width,
        };
        resize_crop(
            src,
            whole,
            rw,
            rh,
            &mut scratch.resized,
            &mut scratch.resizer,
        )?;
        &scratch.resized
    };
    let (top, left) = (center_offset(rh, size), center_offset(rw, size));
    let row_bytes = 3 * size as usize;
    for (y, row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let sy = y as i64 + top;
        if !(0..rh as i64).contains(&sy) {
            row.fill(0);
            continue;
        }
        // Columns inside the resized image: [x0, x1) of the output.
        let x0 = (-left).clamp(0, size as i64) as usize;
        let x1 = (rw as i64 - left).clamp(0, size as i64) as usize;
        row[..3 * x0].fill(0);
        row[3 * x1..].fill(0);
        if x0 < x1 {
            let start = 3 * (sy as usize * rw as usize + (x0 as i64 + left) as usize);
            row[3 * x0..3 * x1].copy_from_slice(&resized[start..start + 3 * (x1 - x0)]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Whether `b` can come from one of RandomResizedCrop's tries: some
    /// real width and height within half a pixel of it (Python's rounding)
    /// have an area share in `SCALE` and a ratio in `RATIO`.
    fn from_a_try(b: CropBox, width: u32, height: u32) -> bool {
        let area = width as f64 * height as f64;
        let (w, h) = (b.width as f64, b.height as f64);
        let (w_lo, w_hi, h_lo, h_hi) = (w - 0.5, w + 0.5, (h - 0.5).max(1e-9), h + 0.5);
        w_lo * h_lo <= SCALE.1 * area
            && w_hi * h_hi >= SCALE.0 * area
            && w_hi / h_lo >= RATIO.0
            && w_lo / h_hi <= RATIO.1
    }

    proptest! {
        // Seeded by proptest each run; a failure prints its case. Nothing
        // is written into the source tree.
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_resized_crop_obeys_torchvision_bounds(
            width in 1u32..2000,
            height in 1u32..2000,
            seed in any::<u64>(),
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let b = random_resized_crop(width, height, &mut rng);
            prop_assert!(b.width >= 1 && b.height >= 1);
            prop_assert!(b.left + b.width <= width && b.top + b.height <= height, "{b:?} outside {width}×{height}");
            prop_assert!(
                from_a_try(b, width, height) || b == central_crop(width, height),
                "{b:?} of {width}×{height} is neither a try's box nor the fallback"
            );
        }

        #[test]
        fn the_fallback_is_centred_and_within_the_ratio_bounds(
            width in 1u32..3000,
            height in 1u32..3000,
        ) {
            let b = central_crop(width, height);
            prop_assert!(b.left + b.width <= width && b.top + b.height <= height);
            prop_assert_eq!((b.top, b.left), ((height - b.height) / 2, (width - b.width) / 2));
            // Full width or full height, whichever keeps the ratio in bounds.
            prop_assert!(b.width == width || b.height == height);
            let r = b.width as f64 / b.height as f64;
            let slack = 1.0 / b.height.min(b.width) as f64 + 1e-9;
            prop_assert!(r >= RATIO.0 - slack && r <= RATIO.1 + slack, "ratio {r}");
        }
    }

    #[test]
    fn tries_spread_over_the_scale_range_and_thin_images_fall_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let shares: Vec<f64> = (0..2000)
            .map(|_| {
                let b = random_resized_crop(400, 300, &mut rng);
                (b.width * b.height) as f64 / 120_000.0
            })
            .collect();
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        // Uniform in [0.08, 1] less the draws that do not fit: near 0.5.
        assert!((0.4..0.6).contains(&mean), "mean area share {mean}");
        assert!(shares.iter().any(|&s| s < 0.1) && shares.iter().any(|&s| s > 0.9));
        // A 1000×10 strip fits no try: the central 13×10 (ratio 4/3).
        let b = random_resized_crop(1000, 10, &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 493,
                height: 10,
                width: 13
            }
        );
    }

    #[test]
    fn resize_keeps_the_aspect_ratio_and_center_crop_rounds_half_to_even() {
        assert_eq!(resized_size(500, 375, 256), (341, 256));
        assert_eq!(resized_size(375, 500, 256), (256, 341));
        assert_eq!(resized_size(64, 64, 36), (36, 36));
        // (37 - 32) / 2 = 2.5 rounds to 2, (39 - 32) / 2 = 3.5 to 4.
        assert_eq!(center_offset(37, 32), 2);
        assert_eq!(center_offset(39, 32), 4);
        // A crop wider than the image: padded by 2 on the left, 3 on the right.
        assert_eq!(center_offset(27, 32), -2);
    }

    fn gradient(width: u32, height: u32) -> Rgb {
        let pixels = (0..height)
            .flat_map(|y| (0..width).flat_map(move |x| [x as u8, y as u8, (x + y) as u8]))
            .collect();
        Rgb {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn an_unscaled_crop_is_copied_and_a_flip_mirrors_it() {
        let src = gradient(40, 30);
        let crop = CropBox {
            top: 3,
            left: 5,
            height: 16,
            width: 16,
        };
        let mut s = Scratch::default();
        let (mut plain, mut flipped) = (vec![0; 16 * 16 * 3], vec![0; 16 * 16 * 3]);
        train_into(&src, crop, false, 16, &mut plain, &mut s).unwrap();
        train_into(&src, crop, true, 16, &mut flipped, &mut s).unwrap();
        for y in 0..16 {
            for x in 0..16 {
                let want = [(x + 5) as u8, (y + 3) as u8, (x + y + 8) as u8];
                let at = |v: &[u8], x: usize| v[3 * (16 * y + x)..3 * (16 * y + x) + 3].to_vec();
                assert_eq!(at(&plain, x), want);
                assert_eq!(at(&flipped, 15 - x), want);
            }
        }
    }

    #[test]
    fn eval_of_an_image_smaller_than_the_crop_is_zero_padded() {
        let src = gradient(20, 20);
        let mut out = vec![7; 24 * 24 * 3];
        eval_into(&src, 20, 24, &mut out, &mut Scratch::default()).unwrap();
        // 2 pixels of padding before the image, 2 after, in each direction.
        let at = |x: usize, y: usize| &out[3 * (24 * y + x)..3 * (24 * y + x) + 3];
        assert_eq!(at(0, 0), [0, 0, 0]);
        assert_eq!(at(1, 5), [0, 0, 0]);
        assert_eq!(at(2, 2), [0, 0, 0]);
        assert_eq!(at(3, 2), [1, 0, 1]);
        assert_eq!(at(21, 21), [19, 19, 38]);
        assert_eq!(at(22, 21), [0, 0, 0]);
    }
}
