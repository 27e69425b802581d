//! Bounds on what untrusted input may cost: image and video pixels, GIF frames, decoded
//! audio, chat-template work and the text handed to the tokenizer.
//!
//! Every check of a size a file merely claims happens before the memory or time is spent,
//! and an input over a limit is an error naming that limit (`max_image_pixels` …). The
//! field names are also the CLI's flags (`--max-image-pixels` …), and [`LoadOptions`]
//! carries them into a loaded model ([`Gemma4::limits`]), whose tokenizer and chat template
//! use them; media decoders take them as an argument (`decode_image_with` …). The defaults
//! admit everything the reference accepts from a well-formed input.
//!
//! [`LoadOptions`]: crate::LoadOptions
//! [`Gemma4::limits`]: crate::Gemma4::limits

/// Bounds on untrusted input; [`Limits::DEFAULT`] unless changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pixels of one image or frame, checked from its header: Pillow's decompression-bomb
    /// limit (`2 · Image.MAX_IMAGE_PIXELS`), above which the reference refuses to open it.
    pub max_image_pixels: u64,
    /// Frames of an animated GIF (each is decoded once to count and time the video) or
    /// files of a frame directory.
    pub max_video_frames: usize,
    /// Pixels all of a GIF's frames cover together (each is composited on the whole
    /// canvas, one frame in memory at a time): decoding time is proportional.
    pub max_video_pixels: u64,
    /// Seconds of an audio file that are decoded; the rest is not read (the conformer
    /// checkpoints hear the first 30 s). A fixed bound of 2^28 samples (1 GiB of f32)
    /// applies besides, whatever the rate and channel count.
    pub max_audio_seconds: u64,
    /// Work one chat-template render may do, in minijinja's fuel: one per instruction and
    /// one per 64 bytes of data it produces (strings, lists, output), so it bounds time
    /// and memory both: 10 million is 640 MB produced in all, ten times the output
    /// limit. A message costs a few thousand plus its bytes over 64; transformers' sandbox
    /// has no limit.
    pub template_fuel: u64,
    /// Characters in one `{{ … }}` or `{% … %}` tag of a chat template: about a thousand
    /// chained operators compile within a 2 MiB thread stack; a chain of 100,000
    /// overflowed it. A bound on nesting depth, which is what costs stack.
    pub max_template_tag_chars: usize,
    /// Bytes one chat-template render may produce.
    pub max_template_output_bytes: usize,
    /// Bytes of text one tokenizer call takes: the longest context (262,144 tokens) at 128
    /// bytes per token. Longer text cannot fit the context and is refused before the
    /// tokenizer spends time and memory on it.
    pub max_prompt_bytes: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_image_pixels: 2 * 89_478_485,
        max_video_frames: 10_000,
        max_video_pixels: 1 << 30,
        max_audio_seconds: 600,
        template_fuel: 10_000_000,
        max_template_tag_chars: 2_000,
        max_template_output_bytes: 64 << 20,
        max_prompt_bytes: 32 << 20,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// How an error names limit `field` with its value: `the max_image_pixels limit
/// (178956970; --max-image-pixels)`.
pub(crate) fn named(field: &str, value: impl std::fmt::Display) -> String {
    format!("the {field} limit ({value}; --{})", field.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_its_flag() {
        assert_eq!(
            named("max_image_pixels", Limits::DEFAULT.max_image_pixels),
            "the max_image_pixels limit (178956970; --max-image-pixels)"
        );
        assert_eq!(Limits::default(), Limits::DEFAULT);
    }
}
