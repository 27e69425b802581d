//! Video input as the reference's video processors (`Gemma4VideoProcessor`,
//! `Gemma4UnifiedVideoProcessor`) treat it: `num_frames` frames sampled uniformly
//! (`i·T/n`), each resized and patchified like an image at the video budget (70 soft
//! tokens by default) with torchvision's resize, and a `mm:ss` timestamp per frame
//! (`index / fps`) that goes into the prompt.
//!
//! Only the sampled frames are kept: a GIF is decoded twice (to count, then to keep), one
//! frame in memory at a time, within [`MAX_GIF_FRAMES`] and [`MAX_GIF_PIXELS`]; a
//! directory's other files are never read.
//!
//! Sources: an animated GIF (frame delays give the fps) or a directory of frame images
//! in name order (fps unknown: the reference then assumes 24). Other containers (mp4,
//! webm) need a video demuxer and decoder, which this crate does not link.

use std::path::Path;

use image::AnimationDecoder;

use crate::config::Fields;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::vision::image_processor::{
    check_pixels, decode_image_with, decoder_limits, from_dynamic, process_image,
    ImageProcessorConfig, PatchLayout, ProcessedImage, Rescale, RgbImage,
};
use crate::vision::resize::ResizeKernel;

/// Frames per second the reference assumes when a video carries none.
pub const DEFAULT_FPS: f64 = 24.0;

/// A video's sampled frames.
#[derive(Debug, Clone)]
pub struct Video {
    /// The frames kept, in order.
    pub frames: Vec<RgbImage>,
    /// Each kept frame's number in the whole video (its timestamp is `index / fps`).
    pub indices: Vec<usize>,
    pub fps: Option<f64>,
}

/// Video processor settings (`video_processor` in `processor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct VideoProcessorConfig {
    pub frame: ImageProcessorConfig,
    pub num_frames: usize,
}

impl VideoProcessorConfig {
    /// The released defaults: 32 frames, 70 soft tokens each, torchvision resize.
    pub fn new(layout: PatchLayout) -> Self {
        let mut frame = ImageProcessorConfig::new(layout);
        frame.max_soft_tokens = 70;
        frame.resize = ResizeKernel::Torchvision;
        frame.rescale = Rescale::F32Div;
        VideoProcessorConfig {
            frame,
            num_frames: 32,
        }
    }

    pub fn update_from(&mut self, section: &serde_json::Value) -> std::result::Result<(), String> {
        self.frame.update_from(section)?;
        let f = Fields(section.as_object().ok_or("the section is not an object")?);
        self.num_frames = f.usize("num_frames", self.num_frames)?;
        if self.num_frames == 0 {
            return Err("`num_frames` must be a positive integer, found 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ProcessedVideo {
    pub frames: Vec<ProcessedImage>,
    /// Seconds of each sampled frame.
    pub timestamps: Vec<f64>,
}

impl ProcessedVideo {
    pub fn soft_tokens_per_frame(&self) -> usize {
        self.frames.first().map_or(0, |f| f.num_soft_tokens)
    }
}

/// Loads an animated GIF, or a directory of frames (sorted by file name), keeping only the
/// `num_frames` frames the processor samples ([`sample_indices`]): the others are never
/// kept (GIF) or never decoded (directory). Within `limits`: `max_video_frames` frames
/// (files, for a directory), `max_video_pixels` for a GIF's frames together,
/// `max_image_pixels` for each frame.
pub fn load_video(path: &Path, num_frames: usize, limits: &Limits) -> Result<Video> {
    let name = path.display().to_string();
    if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let p = entry.map_err(|e| Error::io(path, e))?.path();
            if !p.is_file() {
                continue;
            }
            if files.len() == limits.max_video_frames {
                return Err(Error::Image {
                    name,
                    message: format!(
                        "directory holds more than {} frames",
                        crate::limits::named("max_video_frames", limits.max_video_frames)
                    ),
                });
            }
            files.push(p);
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Image {
                name,
                message: "directory holds no frames".into(),
            });
        }
        let indices = sample_indices(files.len(), num_frames);
        let frames = indices
            .iter()
            .map(|&i| crate::vision::image_processor::load_image_with(&files[i], limits))
            .collect::<Result<Vec<_>>>()?;
        if frames
            .iter()
            .any(|f| (f.width, f.height) != (frames[0].width, frames[0].height))
        {
            return Err(Error::Image {
                name,
                message: "frames differ in size".into(),
            });
        }
        return Ok(Video {
            frames,
            indices,
            fps: None,
        });
    }
    let bytes = crate::loading::input::read_input(path)?;
    decode_video(&bytes, &name, num_frames, limits)
}

/// Decodes an animated GIF's frames (fully composited, as players show them), keeping the
/// `num_frames` that [`sample_indices`] picks.
pub fn decode_video(bytes: &[u8], name: &str, num_frames: usize, limits: &Limits) -> Result<Video> {
    let err = |m: String| Error::Image {
        name: name.to_string(),
        message: m,
    };
    if image::guess_format(bytes).ok() != Some(image::ImageFormat::Gif) {
        // A still image is a one-frame video.
        let frame = decode_image_with(bytes, name, limits).map_err(|e| match e {
            Error::Image { message, .. } => err(format!(
                "{message}; videos are read from animated GIFs or frame directories"
            )),
            e => e,
        })?;
        return Ok(Video {
            frames: vec![frame],
            indices: vec![0],
            fps: None,
        });
    }
    let frames_of = || -> Result<_> {
        let mut decoder = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(bytes))
            .map_err(|e| err(format!("cannot decode GIF: {e}")))?;
        let (w, h) = image::ImageDecoder::dimensions(&decoder);
        check_pixels(w.into(), h.into(), name, limits)?;
        image::ImageDecoder::set_limits(&mut decoder, decoder_limits(limits))
            .map_err(|e| err(format!("cannot decode GIF: {e}")))?;
        Ok((decoder.into_frames(), u64::from(w) * u64::from(h)))
    };
    // First pass: count the frames and add up their delays, one frame in memory at a time.
    let (frames, canvas) = frames_of()?;
    let (mut total, mut millis) = (0usize, 0.0);
    for f in frames {
        let f = f.map_err(|e| err(format!("cannot decode GIF frame {total}: {e}")))?;
        let (n, d) = f.delay().numer_denom_ms();
        millis += n as f64 / d.max(1) as f64;
        total += 1;
        if total > limits.max_video_frames {
            return Err(err(format!(
                "GIF of more than {} frames",
                crate::limits::named("max_video_frames", limits.max_video_frames)
            )));
        }
        if (total as u64).saturating_mul(canvas) > limits.max_video_pixels {
            return Err(err(format!(
                "GIF of more than {} frames of {canvas} pixels, over {} in all",
                total - 1,
                crate::limits::named("max_video_pixels", limits.max_video_pixels)
            )));
        }
    }
    if total == 0 {
        return Err(err("GIF has no frames".into()));
    }
    // Second pass: keep the sampled frames.
    let indices = sample_indices(total, num_frames);
    let mut kept = Vec::with_capacity(indices.len());
    let (frames, _) = frames_of()?;
    for (i, f) in frames
        .enumerate()
        .take(indices.last().map_or(0, |&l| l + 1))
    {
        let f = f.map_err(|e| err(format!("cannot decode GIF frame {i}: {e}")))?;
        if indices.binary_search(&i).is_ok() {
            kept.push(from_dynamic(
                image::DynamicImage::ImageRgba8(f.into_buffer()),
                name,
            )?);
        }
    }
    let fps = (millis > 0.0).then(|| total as f64 / (millis / 1000.0));
    Ok(Video {
        frames: kept,
        indices,
        fps,
    })
}

/// The reference's `default_sample_indices_fn`: `n` indices `i·T // n`. Asking for more
/// frames than the video has is an error in the reference; here it takes every frame.
pub fn sample_indices(total: usize, num_frames: usize) -> Vec<usize> {
    let n = num_frames.min(total);
    (0..n).map(|i| i * total / n).collect()
}

pub fn process_video(video: &Video, cfg: &VideoProcessorConfig) -> Result<ProcessedVideo> {
    let fps = video.fps.unwrap_or(DEFAULT_FPS);
    // Loading kept the sampled frames already; sampling them again is the identity then.
    let idx = sample_indices(video.frames.len(), cfg.num_frames);
    let frames = idx
        .iter()
        .map(|&i| process_image(&video.frames[i], &cfg.frame))
        .collect::<Result<Vec<_>>>()?;
    Ok(ProcessedVideo {
        frames,
        timestamps: idx
            .iter()
            .map(|&i| video.indices.get(i).copied().unwrap_or(i) as f64 / fps)
            .collect(),
    })
}

/// `mm:ss` as the reference's prompt writes frame times.
pub fn timestamp(seconds: f64) -> String {
    format!(
        "{:02}:{:02}",
        (seconds / 60.0).floor() as u64,
        (seconds % 60.0).floor() as u64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_and_timestamps_follow_the_reference() {
        assert_eq!(sample_indices(12, 4), vec![0, 3, 6, 9]);
        assert_eq!(sample_indices(100, 32)[..4], [0, 3, 6, 9]);
        assert_eq!(sample_indices(3, 32), vec![0, 1, 2]);
        assert_eq!(timestamp(0.0), "00:00");
        assert_eq!(timestamp(59.99), "00:59");
        assert_eq!(timestamp(61.5), "01:01");
    }
}
