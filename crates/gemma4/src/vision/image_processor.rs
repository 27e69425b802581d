//! Image input: decoding, RGB conversion and the Gemma 4 image processor
//! (`Gemma4ImageProcessorPil` / `Gemma4ImageProcessor`, and the 12B's
//! `Gemma4UnifiedImageProcessor`).
//!
//! Steps, as the reference: decode (PNG, JPEG, GIF first frame, WebP, BMP); convert to RGB,
//! compositing any transparency over white with Pillow's integer `alpha_composite`; resize
//! to the aspect-ratio-preserving size that fits the soft-token budget (up or down,
//! [`target_size`]) with antialiased bicubic ([`crate::vision::resize`]); rescale by 1/255 (no mean
//! or std); cut into `patch × patch` patches in row-major order, each flattened
//! `[row][col][channel]`, with `(x = column, y = row)` positions. The towers' patches are
//! 16 px and every 3×3 of them pools into one soft token; the 12B's embedder takes the
//! 48 px crop of each 3×3 group directly ([`PatchLayout::Merged`]), which is exactly the
//! reference's `patches_merge` of the 16 px patches. The reference pads every image to
//! the budget with zero patches at position −1; those are masked out of attention and
//! dropped after pooling, so they are not materialised here.

use std::io::Cursor;
use std::path::Path;

use serde_json::Value;

use crate::config::Fields;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::vision::resize::{resize, ResizeKernel};

/// The image decoders' limits: sides and allocation bounded by `max_image_pixels` (at
/// 16-bit RGBA, the widest layout the decoders produce).
pub(crate) fn decoder_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(1 << 20);
    l.max_image_height = Some(1 << 20);
    l.max_alloc = Some(limits.max_image_pixels.saturating_mul(8));
    l
}

/// Refuses a `width × height` image over `max_image_pixels`.
pub(crate) fn check_pixels(width: u64, height: u64, name: &str, limits: &Limits) -> Result<()> {
    let pixels = width.saturating_mul(height);
    if pixels > limits.max_image_pixels {
        return Err(image_error(
            name,
            format!(
                "{width}x{height} is {pixels} pixels, over {} (by default Pillow's \
                 decompression-bomb limit)",
                crate::limits::named("max_image_pixels", limits.max_image_pixels)
            ),
        ));
    }
    Ok(())
}

/// The largest patch side and pooling kernel a config may ask for (an image is resized to
/// about `budget · (pooling · patch)²` pixels).
pub const MAX_PATCH: usize = 64;
pub const MAX_POOLING: usize = 8;

/// Soft-token budgets the reference accepts (`_SUPPORTED_SOFT_TOKENS`).
pub const SUPPORTED_SOFT_TOKENS: [usize; 5] = [70, 140, 280, 560, 1120];

/// An 8-bit RGB image, rows top to bottom, `[height][width][3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

pub(crate) fn image_error(name: &str, message: impl Into<String>) -> Error {
    Error::Image {
        name: name.to_string(),
        message: message.into(),
    }
}

/// Pillow's `alpha_composite(white, rgba).convert("RGB")` for one channel value: 7-bit
/// fixed point and the `/255` shift trick of `AlphaComposite.c` with an opaque white
/// destination.
fn composite_over_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (v, a) = (v as u32, a as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << 7) / outa255;
    let coef2 = 255 * (1 << 7) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << 7);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> 7) as u8
}

/// Decodes an image file's bytes within the default [`Limits`]; `name` (the file or `-`)
/// is used in errors.
pub fn decode_image(bytes: &[u8], name: &str) -> Result<RgbImage> {
    decode_image_with(bytes, name, &Limits::DEFAULT)
}

/// [`decode_image`] within `limits`.
pub fn decode_image_with(bytes: &[u8], name: &str, limits: &Limits) -> Result<RgbImage> {
    use image::ImageFormat as F;
    if bytes.is_empty() {
        return Err(image_error(name, "file is empty"));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        image_error(
            name,
            "unrecognised image format (supported: PNG, JPEG, GIF, WebP, BMP)",
        )
    })?;
    if !matches!(format, F::Png | F::Jpeg | F::Gif | F::WebP | F::Bmp) {
        return Err(image_error(
            name,
            format!("unsupported image format {format:?} (supported: PNG, JPEG, GIF, WebP, BMP)"),
        ));
    }
    if format == F::Jpeg {
        return decode_jpeg(bytes, name, limits);
    }
    let cannot = |e: image::ImageError| image_error(name, format!("cannot decode {format:?}: {e}"));
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(cannot)?;
    check_pixels(width.into(), height.into(), name, limits)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits(limits));
    let img = reader.decode().map_err(cannot)?;
    from_dynamic(img, name)
}

/// JPEG through libjpeg-turbo's decoder (the mozjpeg fork, same IDCT and fancy
/// upsampling), so pixels equal Pillow's bit for bit; pure-Rust decoders differ by a few
/// levels on chroma-subsampled files.
fn decode_jpeg(bytes: &[u8], name: &str, limits: &Limits) -> Result<RgbImage> {
    // libjpeg fills the rest of a file cut short with grey and only warns; Pillow refuses
    // it ("image file is truncated"). A whole file ends its image with the EOI marker.
    if !bytes.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(image_error(
            name,
            "cannot decode JPEG: the file is truncated (no end-of-image marker)",
        ));
    }
    type Decoded = std::result::Result<(usize, usize, Vec<u8>), (u64, u64)>;
    let decoded = crate::error::catch_panic(|| -> std::io::Result<Decoded> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = (d.width() as u64, d.height() as u64);
        if w.saturating_mul(h) > limits.max_image_pixels {
            return Ok(Err((w, h)));
        }
        let mut img = d.rgb()?;
        let (w, h) = (img.width(), img.height());
        let px: Vec<[u8; 3]> = img.read_scanlines()?;
        img.finish()?;
        Ok(Ok((w, h, px.into_iter().flatten().collect())))
    });
    let (width, height, data) = match decoded {
        Ok(Ok(Ok(v))) => v,
        Ok(Ok(Err((w, h)))) => {
            return check_pixels(w, h, name, limits).and(Err(image_error(name, "too large")))
        }
        Ok(Err(e)) => return Err(image_error(name, format!("cannot decode JPEG: {e}"))),
        Err(_) => return Err(image_error(name, "cannot decode JPEG: corrupt data")),
    };
    if width == 0 || height == 0 || data.len() != width * height * 3 {
        return Err(image_error(
            name,
            format!("cannot decode JPEG: {width}x{height} image with truncated data"),
        ));
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

pub(crate) fn from_dynamic(img: image::DynamicImage, name: &str) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(image_error(
            name,
            format!("image is empty ({w}x{h} pixels)"),
        ));
    }
    let data = if img.color().has_alpha() {
        img.to_rgba8()
            .pixels()
            .flat_map(|p| {
                let [r, g, b, a] = p.0;
                [
                    composite_over_white(r, a),
                    composite_over_white(g, a),
                    composite_over_white(b, a),
                ]
            })
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Reads and decodes an image file; `-` reads standard input.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    load_image_with(path, &Limits::DEFAULT)
}

/// [`load_image`] within `limits`.
pub fn load_image_with(path: &Path, limits: &Limits) -> Result<RgbImage> {
    decode_image_with(
        &crate::loading::input::read_input(path)?,
        &path.display().to_string(),
        limits,
    )
}

/// The reference's `get_aspect_ratio_preserving_size`: the largest size with sides that
/// are multiples of `pooling_kernel_size × patch_size` and at most `max_patches` patches.
pub fn target_size(
    height: usize,
    width: usize,
    patch_size: usize,
    max_patches: usize,
    pooling_kernel_size: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(Error::invalid_argument(
            "image",
            format!("{height}x{width} image has no pixels"),
        ));
    }
    let total_px = (height * width) as f64;
    let target_px = (max_patches * patch_size * patch_size) as f64;
    let factor = (target_px / total_px).sqrt();
    let side = pooling_kernel_size * patch_size;
    let mut th = (factor * height as f64 / side as f64).floor() as usize * side;
    let mut tw = (factor * width as f64 / side as f64).floor() as usize * side;
    if th == 0 && tw == 0 {
        return Err(Error::invalid_argument(
            "image",
            format!("{height}x{width} would resize to 0x0"),
        ));
    }
    let max_side = (max_patches / (pooling_kernel_size * pooling_kernel_size)) * side;
    if th == 0 {
        th = side;
        tw = ((width as f64 / height as f64).floor() as usize * side).min(max_side);
    } else if tw == 0 {
        tw = side;
        th = ((height as f64 / width as f64).floor() as usize * side).min(max_side);
    }
    if th * tw > max_patches * patch_size * patch_size {
        return Err(Error::invalid_argument(
            "image",
            format!("resizing {height}x{width} to {th}x{tw} exceeds {max_patches} patches"),
        ));
    }
    Ok((th, tw))
}

/// How pixel values are rescaled to [0, 1]; the backends round differently in the last bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    /// NumPy (PIL processor): `f32(f64(v) · (1/255))`.
    F64Mul,
    /// torchvision image processors: `f32(v) · f32(1/255)`.
    F32Mul,
    /// torchvision video processors (rescale fused into normalize): `f32(v) / 255`.
    F32Div,
}

impl Rescale {
    fn apply(self, v: u8) -> f32 {
        match self {
            Rescale::F64Mul => (v as f64 * (1.0 / 255.0)) as f32,
            Rescale::F32Mul => v as f32 * (1.0f64 / 255.0) as f32,
            Rescale::F32Div => v as f32 / 255.0,
        }
    }
}

/// What the model consumes per patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchLayout {
    /// `patch_size` patches, pooled k×k by the vision tower.
    Tower,
    /// `k·patch_size` crops, one soft token each (the 12B's encoder-free embedder).
    Merged,
}

/// Image (or video frame) processor settings from `processor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub max_soft_tokens: usize,
    pub pooling_kernel_size: usize,
    pub do_resize: bool,
    pub resize: ResizeKernel,
    pub rescale: Rescale,
    pub layout: PatchLayout,
}

impl ImageProcessorConfig {
    /// The released defaults (patch 16, 280 tokens, pooling 3) with the PIL processor's
    /// resize; `layout` selects tower patches or the 12B's merged crops.
    pub fn new(layout: PatchLayout) -> Self {
        ImageProcessorConfig {
            patch_size: 16,
            max_soft_tokens: 280,
            pooling_kernel_size: 3,
            do_resize: true,
            resize: ResizeKernel::Pillow,
            rescale: Rescale::F64Mul,
            layout,
        }
    }

    /// Resizes and rescales as the reference's processor for `kernel`'s backend does:
    /// Pillow (the PIL processor: Pillow's bicubic, NumPy's f64 rescale) or torchvision
    /// (its antialiased bicubic on uint8, an f32 rescale).
    pub fn set_backend(&mut self, kernel: ResizeKernel) {
        self.resize = kernel;
        self.rescale = match kernel {
            ResizeKernel::Pillow => Rescale::F64Mul,
            ResizeKernel::Torchvision => Rescale::F32Mul,
        };
    }

    /// Reads `patch_size`, `max_soft_tokens`, `pooling_kernel_size` and `do_resize` from a
    /// processor section (`image_processor` / `video_processor`).
    pub fn update_from(&mut self, section: &Value) -> std::result::Result<(), String> {
        let f = Fields(section.as_object().ok_or("the section is not an object")?);
        self.patch_size = f.usize("patch_size", self.patch_size)?;
        self.max_soft_tokens = f.usize("max_soft_tokens", self.max_soft_tokens)?;
        self.pooling_kernel_size = f.usize("pooling_kernel_size", self.pooling_kernel_size)?;
        self.do_resize = f.bool("do_resize", self.do_resize)?;
        if let Some(r) = f.get("resample").and_then(Value::as_u64) {
            if r != 3 {
                return Err(format!(
                    "`resample` {r} is not supported (Gemma 4 uses 3, bicubic)"
                ));
            }
        }
        self.validate()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !SUPPORTED_SOFT_TOKENS.contains(&self.max_soft_tokens) {
            return Err(format!(
                "`max_soft_tokens` must be one of {SUPPORTED_SOFT_TOKENS:?}, got {}",
                self.max_soft_tokens
            ));
        }
        if !(1..=MAX_PATCH).contains(&self.patch_size)
            || !(1..=MAX_POOLING).contains(&self.pooling_kernel_size)
        {
            return Err(format!(
                "`patch_size` ({}) and `pooling_kernel_size` ({}) must be within 1..={MAX_PATCH} \
                 and 1..={MAX_POOLING} (Gemma 4: 16 and 3)",
                self.patch_size, self.pooling_kernel_size
            ));
        }
        Ok(())
    }

    pub fn max_patches(&self) -> usize {
        self.max_soft_tokens * self.pooling_kernel_size * self.pooling_kernel_size
    }

    /// Side of the patches handed to the model.
    pub fn model_patch_size(&self) -> usize {
        match self.layout {
            PatchLayout::Tower => self.patch_size,
            PatchLayout::Merged => self.patch_size * self.pooling_kernel_size,
        }
    }
}

/// One processed image: the model's patches and their positions.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[num_patches, patch_dim]` row-major, values in [0, 1].
    pub pixel_values: Vec<f32>,
    /// `(x, y)` grid position of each patch.
    pub positions: Vec<[usize; 2]>,
    pub patch_dim: usize,
    /// Soft tokens this image becomes (placeholders in the prompt).
    pub num_soft_tokens: usize,
    /// Size after resizing.
    pub height: usize,
    pub width: usize,
}

impl ProcessedImage {
    pub fn num_patches(&self) -> usize {
        self.positions.len()
    }
}

/// Resizes, rescales and patchifies one image.
pub fn process_image(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<ProcessedImage> {
    cfg.validate()
        .map_err(|m| Error::invalid_argument("image processor", m))?;
    let img = if cfg.do_resize {
        let (th, tw) = target_size(
            img.height,
            img.width,
            cfg.patch_size,
            cfg.max_patches(),
            cfg.pooling_kernel_size,
        )?;
        resize(img, th, tw, cfg.resize)
    } else {
        img.clone()
    };
    let p = cfg.model_patch_size();
    let (ph, pw) = (img.height / p, img.width / p);
    if ph == 0 || pw == 0 {
        return Err(Error::invalid_argument(
            "image",
            format!(
                "{}x{} is smaller than one {p}-pixel patch",
                img.height, img.width
            ),
        ));
    }
    let patch_dim = p * p * 3;
    let mut pixel_values = Vec::with_capacity(ph * pw * patch_dim);
    let mut positions = Vec::with_capacity(ph * pw);
    for gy in 0..ph {
        for gx in 0..pw {
            for r in 0..p {
                let row = (gy * p + r) * img.width + gx * p;
                for v in &img.data[row * 3..(row + p) * 3] {
                    pixel_values.push(cfg.rescale.apply(*v));
                }
            }
            positions.push([gx, gy]);
        }
    }
    let k2 = cfg.pooling_kernel_size * cfg.pooling_kernel_size;
    let num_soft_tokens = match cfg.layout {
        PatchLayout::Tower => positions.len() / k2,
        PatchLayout::Merged => positions.len(),
    };
    Ok(ProcessedImage {
        pixel_values,
        positions,
        patch_dim,
        num_soft_tokens,
        height: img.height,
        width: img.width,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_sizes_match_the_reference_examples() {
        // From the spec's worked examples at the 280 budget (max_patches 2520).
        assert_eq!(target_size(1024, 1024, 16, 2520, 3).unwrap(), (768, 768));
        assert_eq!(target_size(480, 640, 16, 2520, 3).unwrap(), (672, 912));
        assert_eq!(target_size(1080, 1920, 16, 2520, 3).unwrap(), (576, 1056));
        assert_eq!(target_size(224, 224, 16, 2520, 3).unwrap(), (768, 768));
        // A sliver: the short side rounds to 0 and is set to one 48 px row.
        assert_eq!(target_size(10, 1000, 16, 630, 3).unwrap(), (48, 3360));
    }

    #[test]
    fn alpha_composite_matches_pillow_endpoints() {
        assert_eq!(composite_over_white(17, 255), 17);
        assert_eq!(composite_over_white(17, 0), 255);
        // Half transparent black over white is mid grey.
        let g = composite_over_white(0, 128);
        assert!((126..=128).contains(&g), "{g}");
    }

    #[test]
    fn patches_are_row_major_with_channel_fastest() {
        // 2x4 image, patch 2 → two patches side by side.
        let data: Vec<u8> = (0..2 * 4 * 3).map(|v| v as u8).collect();
        let img = RgbImage {
            width: 4,
            height: 2,
            data,
        };
        let mut cfg = ImageProcessorConfig::new(PatchLayout::Tower);
        cfg.do_resize = false;
        cfg.patch_size = 2;
        cfg.pooling_kernel_size = 1;
        let p = process_image(&img, &cfg).unwrap();
        assert_eq!(p.positions, vec![[0, 0], [1, 0]]);
        let px = |v: u8| Rescale::F64Mul.apply(v);
        // Patch 1 = pixels (0,2),(0,3),(1,2),(1,3).
        let want: Vec<f32> = [6, 7, 8, 9, 10, 11, 18, 19, 20, 21, 22, 23]
            .iter()
            .map(|&v| px(v))
            .collect();
        assert_eq!(&p.pixel_values[12..], &want[..]);
    }
}
