//! Arguments shared by the commands (the checkpoint, the prompt, the media) and how
//! they become a loaded model, a prompt and media.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use gemma4::generate::sampling::SamplingParams;
use gemma4::model::Media;
use gemma4::prompt::chat::Message;
use gemma4::quant::QuantType;
use gemma4::vision::resize::ResizeKernel;
use gemma4::{Gemma4, Limits, LoadOptions, Prompt};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    pub(crate) fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json), or a Hugging Face
    /// hub id (`google/gemma-4-E2B-it`, `@REVISION` optional) found in the local hub cache.
    #[arg(long, value_parser = model_dir)]
    pub(crate) model: PathBuf,
    /// Compute dtype (default: the checkpoint's own, as `from_pretrained` loads it: bf16
    /// for the released checkpoints). f32 matches the reference run in f32 to 1e-4.
    #[arg(long, value_enum)]
    pub(crate) dtype: Option<DtypeArg>,
    /// Quantize the text decoder at load time: q8_0, q4_k, q6_k, q4_0 or q5_0 (projections in
    /// that format, the tied embedding in q8_0/q6_k; norms and the image/audio towers
    /// keep --dtype).
    #[arg(long, value_name = "FORMAT")]
    pub(crate) quant: Option<QuantType>,
    /// A LoRA adapter in peft's format (`adapter_config.json`, `adapter_model.safetensors`),
    /// applied unmerged; `:SCALE` multiplies its updates. Repeatable: all given adapters
    /// are on together, except in the server, where a request picks one by name (its
    /// directory's name) in `model`.
    #[arg(long, value_name = "DIR[:SCALE]", value_parser = lora_arg)]
    pub(crate) lora: Vec<LoraArg>,
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
}

/// `--lora DIR[:SCALE]`.
#[derive(Clone, Debug)]
pub(crate) struct LoraArg {
    pub(crate) dir: PathBuf,
    pub(crate) scale: f64,
}

pub(crate) fn lora_arg(s: &str) -> std::result::Result<LoraArg, String> {
    // `:SCALE` only when what follows the last colon is a number, so a directory with a
    // colon in its name still works.
    if let Some((dir, scale)) = s.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f64>() {
            if !scale.is_finite() {
                return Err(format!("scale `{scale}` is not a finite number"));
            }
            return Ok(LoraArg {
                dir: dir.into(),
                scale,
            });
        }
    }
    Ok(LoraArg {
        dir: s.into(),
        scale: 1.0,
    })
}

impl LoraArg {
    /// The adapter, its updates scaled; an error names the flag in front of the library's
    /// message (which names the adapter's directory), as text: `main` unwraps library
    /// errors to rename their arguments.
    pub(crate) fn load(&self) -> Result<gemma4::lora::LoraAdapter> {
        Ok(gemma4::lora::LoraAdapter::load(&self.dir)
            .map_err(lora_flag)?
            .scaled(self.scale))
    }
}

fn lora_flag(e: gemma4::Error) -> anyhow::Error {
    anyhow::anyhow!("--lora: {e}")
}

/// Loads and attaches every `--lora`, reporting each on stderr (an adapter that patched
/// nothing cannot load: [`gemma4::Gemma4::attach_adapter`] refuses it).
pub(crate) fn attach_loras(model: &mut Gemma4, loras: &[LoraArg]) -> Result<()> {
    for l in loras {
        let a = model.attach_adapter(&l.load()?).map_err(lora_flag)?;
        eprintln!(
            "lora: `{}` patched {} projections (rank {}, scale {})",
            a.name, a.modules, a.rank, l.scale
        );
    }
    Ok(())
}

const LIMITS: &str = "Limits on untrusted input";

/// Bounds on untrusted input ([`gemma4::Limits`]); an input over one is refused with an
/// error naming the flag.
#[derive(Args)]
pub(crate) struct LimitArgs {
    /// Pixels of one image or video frame (default: Pillow's decompression-bomb limit).
    #[arg(long, help_heading = LIMITS, value_name = "N", default_value_t = Limits::DEFAULT.max_image_pixels)]
    pub(crate) max_image_pixels: u64,
    /// Frames of an animated GIF, or files of a frame directory.
    #[arg(long, help_heading = LIMITS, value_name = "N", default_value_t = Limits::DEFAULT.max_video_frames)]
    pub(crate) max_video_frames: usize,
    /// Pixels of all of a GIF's frames together.
    #[arg(long, help_heading = LIMITS, value_name = "N", default_value_t = Limits::DEFAULT.max_video_pixels)]
    pub(crate) max_video_pixels: u64,
    /// Seconds of an audio file that are decoded (the rest is not read).
    #[arg(long, help_heading = LIMITS, value_name = "S", default_value_t = Limits::DEFAULT.max_audio_seconds)]
    pub(crate) max_audio_seconds: u64,
    /// Work one chat-template render may do: one per instruction, one per 64 bytes produced.
    #[arg(long, help_heading = LIMITS, value_name = "N", default_value_t = Limits::DEFAULT.template_fuel)]
    pub(crate) template_fuel: u64,
    /// Characters of one chat-template tag (bounds the compiler's nesting depth).
    #[arg(long, help_heading = LIMITS, value_name = "N", default_value_t = Limits::DEFAULT.max_template_tag_chars)]
    pub(crate) max_template_tag_chars: usize,
    /// Bytes one chat-template render may produce.
    #[arg(long, help_heading = LIMITS, value_name = "BYTES", default_value_t = Limits::DEFAULT.max_template_output_bytes)]
    pub(crate) max_template_output_bytes: usize,
    /// Bytes of text one tokenizer call takes.
    #[arg(long, help_heading = LIMITS, value_name = "BYTES", default_value_t = Limits::DEFAULT.max_prompt_bytes)]
    pub(crate) max_prompt_bytes: usize,
}

impl LimitArgs {
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_image_pixels: self.max_image_pixels,
            max_video_frames: self.max_video_frames,
            max_video_pixels: self.max_video_pixels,
            max_audio_seconds: self.max_audio_seconds,
            template_fuel: self.template_fuel,
            max_template_tag_chars: self.max_template_tag_chars,
            max_template_output_bytes: self.max_template_output_bytes,
            max_prompt_bytes: self.max_prompt_bytes,
        }
    }
}

/// `--model`: a directory, or a hub id resolved in the local hub cache, downloaded into
/// it when missing ([`crate::download`]).
pub(crate) fn model_dir(s: &str) -> std::result::Result<PathBuf, String> {
    use gemma4::loading::hub;
    let missing = match hub::resolve(std::path::Path::new(s)) {
        Ok(dir) => return Ok(dir),
        Err(e) => e.to_string(),
    };
    let cache = hub::cache_dir().ok_or_else(|| missing.clone())?;
    crate::download::download(&cache, s)
        .and_then(|_| hub::resolve_in(&cache, s).map_err(|e| e.to_string()))
        .map_err(|why| format!("{missing}; {why}"))
}

impl ModelArgs {
    /// `--dtype`, or the checkpoint's own ([`gemma4::default_dtype`]); f32 when
    /// quantizing at load (the quantized kernels compute in f32, as for a quantized
    /// checkpoint) and for a directory that does not exist, which loading then reports.
    pub(crate) fn dtype(&self) -> Result<DType> {
        Ok(match self.dtype {
            Some(d) => d.dtype(),
            None if self.quant.is_some() || !self.model.is_dir() => DType::F32,
            None => gemma4::default_dtype(&self.model)?,
        })
    }
}

/// Sampling flags; unset ones take the checkpoint's `generation_config.json` values.
#[derive(Args)]
pub(crate) struct SamplingArgs {
    /// Always pick the most likely token (overrides the checkpoint's sampling defaults).
    #[arg(long)]
    pub(crate) greedy: bool,
    /// Sampling temperature (0 = greedy). Unset sampling flags take the checkpoint's
    /// generation_config.json values.
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    #[arg(long)]
    pub(crate) top_p: Option<f64>,
    #[arg(long)]
    pub(crate) min_p: Option<f64>,
    #[arg(long)]
    pub(crate) repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

impl SamplingArgs {
    /// Greedy with `--greedy`, or when no sampling flag is given and the checkpoint does
    /// not sample; otherwise the flags over the checkpoint's values.
    pub(crate) fn params(&self, model: &Gemma4) -> SamplingParams {
        let g = &model.generation_config;
        let any_flag = self.temperature.is_some()
            || self.top_k.is_some()
            || self.top_p.is_some()
            || self.min_p.is_some();
        if self.greedy || (!any_flag && !g.do_sample) {
            return SamplingParams {
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                ..Default::default()
            };
        }
        SamplingParams {
            temperature: self.temperature.or(g.temperature).or(Some(1.0)),
            top_k: self.top_k.or(g.top_k),
            top_p: self.top_p.or(g.top_p),
            min_p: self.min_p.or(g.min_p),
            repetition_penalty: self.repetition_penalty.or(g.repetition_penalty),
            seed: self.seed,
            ..Default::default()
        }
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct PromptArgs {
    /// Raw text prompt (a BOS token is put in front if the tokenizer adds none).
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// Comma-separated token ids, used as they are.
    #[arg(long, value_name = "IDS")]
    pub(crate) prompt_ids: Option<String>,
    /// A user message, rendered with the checkpoint's chat template.
    #[arg(long)]
    pub(crate) chat: Option<String>,
}

#[derive(Args)]
pub(crate) struct MediaArgs {
    /// An image for the next `<|image|>` marker of the prompt (repeatable; `-` reads
    /// standard input). PNG, JPEG, GIF, WebP or BMP.
    #[arg(long, value_name = "PATH")]
    pub(crate) image: Vec<PathBuf>,
    /// A video for the next `<|video|>` marker (repeatable): an animated GIF or a directory
    /// of frames.
    #[arg(long, value_name = "PATH")]
    pub(crate) video: Vec<PathBuf>,
    /// Soft-token budget per image: 70, 140, 280, 560 or 1120 (default: the checkpoint's
    /// processor config, 280 for released checkpoints).
    #[arg(long, value_name = "N")]
    pub(crate) image_tokens: Option<usize>,
    /// Image processor to match: torchvision (the default, as transformers picks when
    /// torchvision is installed) or pillow (the reference's PIL processor).
    #[arg(long, value_name = "KERNEL")]
    pub(crate) resize: Option<ResizeKernel>,
    /// An audio clip for the next `<|audio|>` marker (repeatable; `-` reads standard
    /// input). WAV, FLAC, MP3 or Ogg Vorbis, any rate and channel count.
    #[arg(long, value_name = "PATH")]
    pub(crate) audio: Vec<PathBuf>,
    /// Resampling of clips not at 16 kHz: torchaudio (exact to the reference's
    /// torchaudio backend) or soxr (its soundfile backend; needs the `soxr` build feature).
    #[arg(long, value_name = "KIND")]
    pub(crate) resample: Option<gemma4::audio::resample::Resampler>,
}

/// A byte progress bar on a TTY, nothing when stderr is piped.
pub(crate) fn load_progress(what: &'static str) -> Option<gemma4::loading::weights::ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{msg}}"
        ))
        .expect("static template"),
    );
    Some(Box::new(move |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    }))
}

/// Loads the checkpoint; the image and audio encoders only when the command has images,
/// videos or clips, so text prompts never read their weights.
pub(crate) fn load(args: &ModelArgs, media: &MediaArgs) -> Result<Gemma4> {
    load_with(
        args,
        !media.image.is_empty() || !media.video.is_empty(),
        !media.audio.is_empty(),
    )
}

/// Loads the checkpoint, with its image and audio encoders when asked and present.
pub(crate) fn load_with(args: &ModelArgs, vision: bool, audio: bool) -> Result<Gemma4> {
    let progress = load_progress("loading");
    let opts = LoadOptions {
        dtype: args.dtype()?,
        device: Device::Cpu,
        progress,
        vision,
        audio,
        quant: args.quant,
        limits: args.limits.limits(),
    };
    let mut model = Gemma4::load(&args.model, opts)?;
    attach_loras(&mut model, &args.lora)?;
    Ok(model)
}

/// Applies the media flags to the model's processors and loads the files.
pub(crate) fn media_of(a: &MediaArgs, model: &mut Gemma4) -> Result<Media> {
    let stdin_uses = a
        .image
        .iter()
        .chain(&a.video)
        .chain(&a.audio)
        .filter(|p| p.as_os_str() == "-")
        .count();
    if stdin_uses > 1 {
        bail!("standard input (`-`) can be given for only one --image, --video or --audio");
    }
    if let Some(n) = a.image_tokens {
        model.image_processor.max_soft_tokens = n;
        model
            .image_processor
            .validate()
            .map_err(|m| anyhow::anyhow!("--image-tokens: {m}"))?;
    }
    if let Some(k) = a.resize {
        model.image_processor.set_backend(k);
    }
    if let Some(r) = a.resample {
        model.resampler = r;
    }
    let images = a
        .image
        .iter()
        .map(|p| model.load_image(p))
        .collect::<gemma4::Result<Vec<_>>>()?;
    let videos = a
        .video
        .iter()
        .map(|p| model.load_video(p))
        .collect::<gemma4::Result<Vec<_>>>()?;
    let audio = a
        .audio
        .iter()
        .map(|p| model.load_audio(p))
        .collect::<gemma4::Result<Vec<_>>>()?;
    for (clip, path) in audio.iter().zip(&a.audio) {
        if let Some((kept, total)) = model.audio_truncation(clip) {
            eprintln!(
                "warning: {}: {total:.1} s long; the model reads its first {kept:.0} s (the reference's limit)",
                path.display()
            );
        }
    }
    Ok(Media {
        images,
        videos,
        audio,
    })
}

pub(crate) fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--prompt-ids: `{t}` is not a token id"))
        })
        .collect()
}

pub(crate) fn prompt_of(p: &PromptArgs, system: Option<&str>) -> Result<Prompt> {
    if system.is_some() && p.chat.is_none() {
        bail!("--system goes with --chat (a raw --prompt or --prompt-ids is used as it is)");
    }
    Ok(match (&p.prompt, &p.prompt_ids, &p.chat) {
        (Some(t), _, _) => Prompt::Text(t.clone()),
        (_, Some(ids), _) => Prompt::Ids(parse_ids(ids)?),
        (_, _, Some(msg)) => {
            let mut m = Vec::new();
            if let Some(s) = system {
                m.push(Message::new("system", s));
            }
            m.push(Message::new("user", msg));
            Prompt::Chat(m)
        }
        _ => bail!("one of --prompt, --prompt-ids or --chat is required"),
    })
}

/// Speculative decoding with an assistant drafter.
#[derive(Args, Clone, Default)]
pub(crate) struct DraftArgs {
    /// An assistant drafter checkpoint (`gemma4_assistant`, e.g. gemma-4-E2B-it-assistant)
    /// that proposes tokens for the model to check in one pass. Output is unchanged.
    #[arg(long, value_name = "DIR")]
    pub(crate) draft: Option<std::path::PathBuf>,
    /// Tokens drafted per round (default: the drafter's `num_assistant_tokens`, else 20).
    #[arg(long, value_name = "K", requires = "draft")]
    pub(crate) draft_tokens: Option<usize>,
}

impl DraftArgs {
    /// The drafter for `model` and the tokens it drafts per round, when `--draft` is given.
    pub(crate) fn options(
        &self,
        model: &gemma4::Gemma4,
    ) -> anyhow::Result<Option<gemma4::generate::speculative::DraftOptions>> {
        let Some(dir) = &self.draft else {
            return Ok(None);
        };
        let drafter = gemma4::draft::Drafter::load(dir, &model.text)
            .with_context(|| format!("loading the drafter {}", dir.display()))?;
        // A drafter's own default past the engine's bound drafts at the bound; only an
        // explicit --draft-tokens out of range is an error.
        let max = gemma4::generate::speculative::MAX_DRAFT_TOKENS;
        let k = self.draft_tokens.unwrap_or_else(|| {
            drafter
                .config()
                .num_assistant_tokens
                .unwrap_or(gemma4::draft::DEFAULT_DRAFT_TOKENS)
                .min(max)
        });
        Ok(Some(gemma4::generate::speculative::DraftOptions::new(
            std::sync::Arc::new(drafter),
            k,
        )?))
    }
}
