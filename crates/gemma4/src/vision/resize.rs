//! Antialiased bicubic resize of 8-bit RGB images, bit-exact to the two resizers the
//! reference's processors use:
//!
//! - [`ResizeKernel::Pillow`]: Pillow's `Image.resize(..., BICUBIC)` (what
//!   `Gemma4ImageProcessorPil` calls): 22-bit fixed-point coefficients in i32.
//! - [`ResizeKernel::Torchvision`]: `torchvision.transforms.v2.functional.resize(uint8,
//!   BICUBIC, antialias=True)` on CPU (what the torchvision image processors and every
//!   video processor call): the same filter, but coefficients in i16 with the largest
//!   precision that keeps the biggest one below 2¹⁵.
//!
//! Both are separable: a horizontal pass (when the width changes) into an 8-bit
//! intermediate, then a vertical pass. The filter is Keys' cubic with a = −0.5, stretched by
//! the downscale factor (antialiasing); each output's weights are normalised to sum to one
//! in f64, then rounded half away from zero to fixed point. Accumulation starts at half an
//! LSB and the result is clamped to 0..=255.

use crate::vision::image_processor::RgbImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeKernel {
    /// Pillow (the reference's PIL image processor).
    #[default]
    Pillow,
    /// torchvision / torch uint8 antialiased bicubic (the torchvision processors).
    Torchvision,
}

impl std::str::FromStr for ResizeKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pillow" | "pil" => Ok(ResizeKernel::Pillow),
            "torchvision" | "torch" => Ok(ResizeKernel::Torchvision),
            other => Err(format!(
                "unknown resize kernel `{other}` (expected pillow or torchvision)"
            )),
        }
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index and normalised f64 weights.
fn weights(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| bicubic((i as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (lo, w)
        })
        .collect()
}

fn precision(kernel: ResizeKernel, ws: &[(usize, Vec<f64>)]) -> u32 {
    match kernel {
        ResizeKernel::Pillow => 22,
        ResizeKernel::Torchvision => {
            let max = ws
                .iter()
                .flat_map(|(_, w)| w.iter().copied())
                .fold(f64::MIN, f64::max);
            let mut p = 0;
            while p < 22 && ((0.5 + max * (1u64 << (p + 1)) as f64) as i64) < (1 << 15) {
                p += 1;
            }
            p
        }
    }
}

fn fixed(ws: Vec<(usize, Vec<f64>)>, prec: u32) -> Vec<(usize, Vec<i64>)> {
    let one = (1u64 << prec) as f64;
    ws.into_iter()
        .map(|(lo, w)| {
            let k = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i64
                    } else {
                        (0.5 + v * one) as i64
                    }
                })
                .collect();
            (lo, k)
        })
        .collect()
}

/// One pass along the horizontal or the vertical axis into an 8-bit image of `out_w × out_h`.
fn pass(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    horizontal: bool,
    kernel: ResizeKernel,
) -> RgbImage {
    let (in_len, out_len) = if horizontal {
        (src.width, out_w)
    } else {
        (src.height, out_h)
    };
    let ws = weights(in_len, out_len);
    let prec = precision(kernel, &ws);
    let ks = fixed(ws, prec);
    let half = 1i64 << (prec - 1).min(62);
    let mut data = vec![0u8; out_w * out_h * 3];
    let px = |x: usize, y: usize, c: usize| src.data[(y * src.width + x) * 3 + c] as i64;
    for y in 0..out_h {
        for x in 0..out_w {
            let (lo, k) = if horizontal { &ks[x] } else { &ks[y] };
            for c in 0..3 {
                let mut acc = if prec == 0 { 0 } else { half };
                for (j, &kk) in k.iter().enumerate() {
                    let v = if horizontal {
                        px(lo + j, y, c)
                    } else {
                        px(x, lo + j, c)
                    };
                    acc += v * kk;
                }
                data[(y * out_w + x) * 3 + c] = (acc >> prec).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Resizes `img` to `height × width` (no-op when the size is unchanged).
pub fn resize(img: &RgbImage, height: usize, width: usize, kernel: ResizeKernel) -> RgbImage {
    let mut cur = img.clone();
    if cur.width != width {
        cur = pass(&cur, width, cur.height, true, kernel);
    }
    if cur.height != height {
        cur = pass(&cur, width, height, false, kernel);
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_widen_when_downscaling() {
        for (i, o) in [(10, 3), (3, 10), (100, 48), (7, 7)] {
            for (_, w) in weights(i, o) {
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        // Upscaling: 4 taps; downscaling by 4: the support grows to 16 taps inside the image.
        assert!(weights(3, 10).iter().all(|(_, w)| w.len() <= 4));
        assert_eq!(weights(400, 100)[50].1.len(), 16);
    }

    #[test]
    fn constant_image_stays_constant_and_precision_fits_i16() {
        let img = RgbImage {
            width: 13,
            height: 5,
            data: vec![200; 13 * 5 * 3],
        };
        for k in [ResizeKernel::Pillow, ResizeKernel::Torchvision] {
            let r = resize(&img, 9, 31, k);
            assert!(r.data.iter().all(|&v| v == 200), "{k:?}");
        }
        let ws = weights(13, 31);
        let p = precision(ResizeKernel::Torchvision, &ws);
        let max = fixed(ws, p)
            .iter()
            .flat_map(|(_, k)| k.clone())
            .max()
            .unwrap();
        assert!(max < 1 << 15 && max * 2 >= 1 << 14, "{p} {max}");
    }
}
